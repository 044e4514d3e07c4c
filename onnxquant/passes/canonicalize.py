"""Canonicalization before quantization: constant folding and the bias and activation fusions that real
exports (PyTorch, tf2onnx, Paddle) leave undone, done with onnxscript's optimizer and rewriter.

Why onnxscript and not ONNX Runtime's graph optimizer: onnxscript writes standard ONNX ops only, its rules are
pattern + check + rewrite like our passes (so each one is readable and testable on its own), and it is kept by
the ONNX project. ONNX Runtime's basic level folds constants and fuses Conv+Add/Mul but has no hard-swish
fusion; its extended level emits com.microsoft contrib ops that other runtimes (TensorRT) cannot load.

What runs, in order (`canonicalize`):
1. Constant folding (`onnxscript.optimizer.FoldConstantsPass`): Reshape/Unsqueeze/Cast/Shape arithmetic of
   constants become initializers; identities and no-op Reshapes/Casts disappear. Initializers that are also
   graph inputs (overridable) are never folded.
2. Transposes moved below element-wise ops (`TransposeSinking`, each reader of a Transpose given its own
   copy first), inverse pairs cancelled by onnxscript's `transpose_transpose_rule` and
   `no_op_transpose_rule`, copies that stayed side by side merged again: TensorFlow exports' NCHW↔NHWC
   pairs around every Conv go, and the bias/BatchNorm affine between them meets its Conv.
3. Fusions: onnxscript's `fuse_hardswish_rules` (`Div(Clip(x+3,0,6),6)` → HardSigmoid,
   `Div(x·Clip(x+3,0,6),6)` and `x·HardSigmoid(x)` → HardSwish) and its no-op rules (`x+0`, `x·1`, `x/1`,
   `x−0`, inference Dropout), and the rules written here, which onnxscript lacks: a per-channel constant Add
   folded into the bias of Conv/ConvTranspose/Gemm, rank-2 MatMul + constant bias → Gemm, `Clip(a·x+b, 0, 1)`
   → HardSigmoid, `Clip(x+b,0,h)·s` with `s·h = 1` → HardSigmoid, `x·Clip(x+3,0,6)·(1/6)` → HardSwish, Erf
   GELU → Gelu (opset ≥ 20 only).
4. `Div` by a nonzero float constant → `Mul` by its reciprocal, then step 3 once more for the patterns this
   exposes (`Clip(x/6+0.5, 0, 1)`).
onnxscript's BatchNormalization fusions are not used: onnxquant's fold_bn passes do those, with reasons that
`inspect` shows. The model's opset is never raised: HardSwish needs opset 14, Gelu opset 20.

A model where nothing applies is returned as the same object, so outputs stay byte-identical.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript import optimizer as ox_optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as ox_rules

from onnxquant.errors import first_line
from onnxquant.ir import name_nodes
from onnxquant.passes.base import Outcome

__all__ = ["NAME", "canonicalize"]

log = logging.getLogger(__name__)

NAME = "canonicalize"
_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOATS = (np.float16, np.float32, np.float64)
_METADATA_PREFIX = "pkg.onnxscript"


# -- rules written here -----------------------------------------------------------------------------------
def _const(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant that no graph input can override, or None."""
    if value is None or value.is_graph_input() or value.const_value is None:
        return None
    try:
        return value.const_value.numpy()
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _scalar(value: ir.Value | None) -> float | None:
    """The element of a one-element float constant of rank ≤ 1 (broadcasting it never changes a shape)."""
    v = _const(value)
    if v is None or v.size != 1 or v.ndim > 1 or v.dtype.type not in _FLOATS:
        return None
    return float(v.reshape(()))


def _near(value: ir.Value | None, expected: float) -> bool:
    got = _scalar(value)
    return got is not None and bool(np.isclose(got, expected, rtol=1e-4, atol=1e-7))


class BiasAddFusion(pattern.RewriteRuleClassBase):
    """`Add(Conv(x, W, b), c)` → `Conv(x, W, b + c)` for a constant `c` that is constant over every axis but
    the channel axis 1 (shape `[C]`-like after broadcasting to the output: `[1,C,1,1]`, `[C,1,1]`, scalar).
    Conv/ConvTranspose add their bias along axis 1, so `Conv(x) + b + c = Conv(x) + (b + c)`. For Gemm
    (`y = α·A·B + β·C`) the new bias is `β·C + c` with β = 1; C must itself be per-output-channel."""

    def __init__(self, op_type: str):
        super().__init__(f"{op_type}BiasAddFusion")
        self.op_type = op_type

    def pattern(self, op, x, w, c):
        y = getattr(op, self.op_type)(
            x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"]
        )
        return op.Add(y, c)

    def check(self, context, x, w, c, y) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = y.producer()
        channels, rank = _channels(node, w)
        if channels is None:
            return result.fail(f"{self.op_type} weight shape is not static")
        added = _const(c)
        if added is None or added.dtype.type not in _FLOATS:
            return result.fail("the added tensor is not a float constant")
        if _per_channel(added, channels, rank) is None:
            return result.fail(f"the added constant of shape {added.shape} is not per-channel")
        if _bias(node, channels) is None:
            return result.fail(f"the {self.op_type} bias is not a per-channel constant")
        return result

    def rewrite(self, op, x, w, c, y):
        node = y.producer()
        channels, rank = _channels(node, w)
        added = _const(c)
        bias = (_bias(node, channels) + _per_channel(added, channels, rank)).astype(added.dtype)
        attrs = {k: v for k, v in node.attributes.items() if k != "beta"}
        inputs = [x, w, op.initializer(ir.tensor(bias), f"{node.name or 'node'}_bias")]
        return getattr(op, self.op_type)(*inputs, **attrs)


def _channels(node: ir.Node, w: ir.Value) -> tuple[int | None, int]:
    """Output channels and output rank of a Conv/ConvTranspose/Gemm, from the static shape of `w`."""
    shape = w.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None, 0
    dims = list(shape)
    if node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        return (dims[0] if trans_b else dims[1]) if len(dims) == 2 else None, 2
    if len(dims) < 3:
        return None, 0
    if node.op_type == "ConvTranspose":
        return dims[1] * node.attributes.get_int("group", 1), len(dims)
    return dims[0], len(dims)


def _per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`value` as a `[channels]` vector when it broadcasts along axis 1 of a rank-`rank` tensor and changes no
    other axis; else None."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,))


def _bias(node: ir.Node, channels: int) -> np.ndarray | None:
    """The bias a Conv/ConvTranspose/Gemm adds, as a `[channels]` vector (β·C for Gemm); zeros if absent."""
    slot = node.inputs[2] if len(node.inputs) > 2 else None
    if slot is None:
        return np.zeros(channels)
    value = _const(slot)
    if value is None or value.dtype.type not in _FLOATS:
        return None
    if node.op_type == "Gemm":
        vector = _per_channel(value, channels, 2)
        return None if vector is None else vector * node.attributes.get_float("beta", 1.0)
    return value.astype(np.float64) if value.shape == (channels,) else None


class HardSigmoidFromAffineClip(pattern.RewriteRuleClassBase):
    """`Clip(a·x + b, 0, 1)` → `HardSigmoid(x, alpha=a, beta=b)`: HardSigmoid is `max(0, min(1, a·x + b))`."""

    def pattern(self, op, x, a, b, lo, hi):
        return op.Clip(op.Add(op.Mul(x, a), b), lo, hi)

    def check(self, context, x, a, b, lo, hi) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if _scalar(a) is None or _scalar(b) is None:
            return result.fail("scale and offset must be scalar constants")
        if not (_near(lo, 0.0) and _near(hi, 1.0)):
            return result.fail("Clip bounds must be 0 and 1")
        return result

    def rewrite(self, op, x, a, b, lo, hi):
        return op.HardSigmoid(x, alpha=_scalar(a), beta=_scalar(b))


class HardSigmoidFromScaledClip(pattern.RewriteRuleClassBase):
    """`Clip(x + b, 0, h)·s` with `s·h = 1` (e.g. `Clip(x+3, 0, 6)·(1/6)`) →
    `HardSigmoid(x, alpha=s, beta=b·s)`, since `s·clip(x + b, 0, h) = clip(s·x + s·b, 0, s·h)` for s > 0."""

    def pattern(self, op, x, b, lo, hi, s):
        return op.Mul(op.Clip(op.Add(x, b), lo, hi), s)

    def check(self, context, x, b, lo, hi, s) -> pattern.MatchResult:
        result = pattern.MatchResult()
        scale, high = _scalar(s), _scalar(hi)
        if _scalar(b) is None or scale is None or high is None or scale <= 0:
            return result.fail("offset, bound and scale must be scalar constants, scale > 0")
        if not (_near(lo, 0.0) and np.isclose(scale * high, 1.0, rtol=1e-4)):
            return result.fail("Clip must be to [0, h] with scale·h = 1")
        return result

    def rewrite(self, op, x, b, lo, hi, s):
        return op.HardSigmoid(x, alpha=_scalar(s), beta=_scalar(b) * _scalar(s))


class HardSwishFromScaledClip(pattern.RewriteRuleClassBase):
    """`x·Clip(x + 3, 0, 6)·(1/6)` → `HardSwish(x)`, which is `x·max(0, min(1, x/6 + 1/2))` (opset 14)."""

    def pattern(self, op, x, b, lo, hi, s):
        return op.Mul(op.Mul(x, op.Clip(op.Add(x, b), lo, hi)), s)

    def check(self, context, x, b, lo, hi, s) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not (_near(b, 3.0) and _near(lo, 0.0) and _near(hi, 6.0) and _near(s, 1 / 6)):
            return result.fail("constants are not 3, 0, 6 and 1/6")
        return result

    def rewrite(self, op, x, b, lo, hi, s):
        return op.HardSwish(x)


class ErfGeluFusion(pattern.RewriteRuleClassBase):
    """`0.5·x·(1 + erf(x/√2))` → `Gelu(x)` (opset 20), in the three groupings exporters write
    (`(x·(1+e))·0.5`, `x·((1+e)·0.5)`, `(x·0.5)·(1+e)`), with `x/√2` written as a Div or as `x·(1/√2)`."""

    def __init__(self, grouping: int, divide: bool):
        super().__init__(f"ErfGeluFusion{grouping}{'Div' if divide else 'Mul'}")
        self.grouping, self.divide = grouping, divide

    def pattern(self, op, x, k, one, half):
        scaled = op.Div(x, k) if self.divide else op.Mul(x, k)
        one_plus = op.Add(op.Erf(scaled), one)
        if self.grouping == 0:
            return op.Mul(op.Mul(x, one_plus), half)
        if self.grouping == 1:
            return op.Mul(x, op.Mul(one_plus, half))
        return op.Mul(op.Mul(x, half), one_plus)

    def check(self, context, x, k, one, half) -> pattern.MatchResult:
        result = pattern.MatchResult()
        root2 = np.sqrt(2.0) if self.divide else 1 / np.sqrt(2.0)
        if not (_near(k, root2) and _near(one, 1.0) and _near(half, 0.5)):
            return result.fail("constants are not √2 (or 1/√2), 1 and 0.5")
        return result

    def rewrite(self, op, x, k, one, half):
        return op.Gelu(x)


class ConvScaleFusion(pattern.RewriteRuleClassBase):
    """`Mul(Conv(x, W, b), c)` → `Conv(x, W·c, b·c)` for a float constant `c` per output channel (axis 1, or a
    scalar): each output channel o is `Σ W_o·x + b_o`, so scaling it scales W_o and b_o. This is the affine
    half of a BatchNorm that Caffe-style exports write as Mul/Add after the Conv."""

    def pattern(self, op, x, w, c):
        y = op.Conv(x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])
        return op.Mul(y, c)

    def check(self, context, x, w, c, y) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = y.producer()
        channels, rank = _channels(node, w)
        weight, scale = _const(w), _const(c)
        if channels is None or weight is None or weight.dtype.type not in _FLOATS:
            return result.fail("the Conv weight is not a static float constant")
        if scale is None or scale.dtype.type not in _FLOATS or _per_channel(scale, channels, rank) is None:
            return result.fail("the factor is not a per-channel float constant")
        if _bias(node, channels) is None:
            return result.fail("the Conv bias is not a per-channel constant")
        return result

    def rewrite(self, op, x, w, c, y):
        node = y.producer()
        channels, rank = _channels(node, w)
        weight, scale = _const(w), _per_channel(_const(c), channels, rank).astype(np.float64)
        scaled = (weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(
            weight.dtype
        )
        bias = (_bias(node, channels) * scale).astype(weight.dtype)
        name = node.name or "conv"
        inputs = [x, op.initializer(ir.tensor(scaled), f"{name}_w_scaled")]
        inputs.append(op.initializer(ir.tensor(bias), f"{name}_bias_scaled"))
        return op.Conv(*inputs, **dict(node.attributes.items()))


class SubByConstant(pattern.RewriteRuleClassBase):
    """`x − c` → `x + (−c)` for a float constant `c`, so a constant subtracted after a Conv (a BatchNorm's
    mean in Caffe-style exports) folds into its bias like an added one."""

    def pattern(self, op, x, c):
        return op.Sub(x, c)

    def check(self, context, x, c) -> pattern.MatchResult:
        result = pattern.MatchResult()
        value = _const(c)
        if x.const_value is not None or value is None or value.dtype.type not in _FLOATS:
            return result.fail("the subtrahend is not a float constant (or the minuend is constant)")
        return result

    def rewrite(self, op, x, c):
        return op.Add(x, op.initializer(ir.tensor(-_const(c)), f"{c.name or 'subtrahend'}_negated"))


class DivByConstant(pattern.RewriteRuleClassBase):
    """`x / d` → `x · (1/d)` for a float constant `d` with no zero (the reciprocal computed in float64; the
    result differs from the Div by at most an ulp). Quantizers and runtimes treat a Mul by a constant as a
    scale."""

    def pattern(self, op, x, d):
        return op.Div(x, d)

    def check(self, context, x, d) -> pattern.MatchResult:
        result = pattern.MatchResult()
        divisor = _const(d)
        if x.const_value is not None or divisor is None or divisor.dtype.type not in _FLOATS:
            return result.fail("the divisor is not a float constant (or the dividend is constant)")
        with np.errstate(divide="ignore", over="ignore"):
            inverse = (1.0 / divisor.astype(np.float64)).astype(divisor.dtype)
        if not np.all(np.isfinite(inverse)) or np.any(inverse == 0):
            return result.fail("the divisor has zeros, or a reciprocal that is not finite")
        return result

    def rewrite(self, op, x, d):
        divisor = _const(d)
        inverse = (1.0 / divisor.astype(np.float64)).astype(divisor.dtype)
        return op.Mul(x, op.initializer(ir.tensor(inverse), f"{d.name or 'divisor'}_reciprocal"))


class TransposeSinking(pattern.RewriteRuleClassBase):
    """`f(Transpose(x, perm), ...)` → `Transpose(f(x, ...), perm)` for an element-wise `f`, so a Transpose
    travels down until it meets its inverse (and both go) or a node that is not element-wise. TensorFlow
    exports wrap every Conv in NCHW↔NHWC Transposes with the bias, BatchNorm affine and activation in between;
    moved below them, the affine folds into the Conv and the Conv's output reaches its quantized reader
    directly (ONNX Runtime then fuses it into an integer kernel). `operands` says what the other inputs are:
    `"scalars"` (a unary op, Clip's bounds), `"constant"` (a constant of any broadcastable shape, permuted to
    `x`'s layout: `c' = transpose(c, perm⁻¹)` after padding its rank) or `"transposed"` (the same Transpose
    on both inputs). `position` is the input the Transpose feeds."""

    def __init__(self, op_type: str, operands: str, position: int = 0):
        super().__init__(f"TransposeSinking{op_type}{operands.title()}{position}")
        self.op_type, self.operands, self.position = op_type, operands, position

    def pattern(self, op, x, other, perm):
        moved = op.Transpose(x, perm=perm)
        if self.operands == "scalars":
            return getattr(op, self.op_type)(
                moved, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"]
            )
        if self.operands == "transposed":
            other = op.Transpose(other, perm=perm)
        inputs = (moved, other) if self.position == 0 else (other, moved)
        return getattr(op, self.op_type)(*inputs, _outputs=["y"])

    def check(self, context, x, other, perm, y) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if perm.is_ref():
            return result.fail("the permutation is a reference attribute")
        if self.operands == "scalars":
            extra = y.producer().inputs[1:]
            if any(v is not None and (_const(v) is None or _const(v).size != 1) for v in extra):
                return result.fail("an extra input is not a one-element constant")
        if self.operands == "constant":
            value = _const(other)
            if value is None or value.ndim > len(perm.as_ints()):
                return result.fail("the other operand is not a constant of at most the Transpose's rank")
        return result

    def rewrite(self, op, x, other, perm, y):
        node, order = y.producer(), list(perm.as_ints())
        if self.operands == "scalars":
            attrs = dict(node.attributes.items())
            return self._transposed(op, getattr(op, self.op_type)(x, *node.inputs[1:], **attrs), x, order)
        if self.operands == "transposed":
            operand = other
        else:
            value = _const(other)
            padded = value.reshape((1,) * (len(order) - value.ndim) + value.shape)
            permuted = np.ascontiguousarray(np.transpose(padded, np.argsort(order)))
            operand = op.initializer(ir.tensor(permuted), f"{other.name or 'operand'}_permuted")
        inputs = (x, operand) if self.position == 0 else (operand, x)
        return self._transposed(op, getattr(op, self.op_type)(*inputs), x, order)

    @staticmethod
    def _transposed(op, inner: ir.Value, x: ir.Value, order: list[int]) -> ir.Value:
        """`Transpose(inner)`, with `inner` typed like `x` (an element-wise result has its input's type):
        placement reads a tensor's type to decide whether it can be quantized."""
        inner.dtype = x.dtype
        result = op.Transpose(inner, perm=order)
        result.dtype = x.dtype
        return result


_SINK_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Clip", "Neg")
_SINK_BINARY = ("Add", "Sub", "Mul", "Div")


def _sinking_rules() -> list[pattern.RewriteRule]:
    rules = [TransposeSinking.rule(op, "scalars") for op in _SINK_UNARY]
    rules += [TransposeSinking.rule(op, "transposed") for op in _SINK_BINARY]
    rules += [TransposeSinking.rule(op, "constant", i) for op in _SINK_BINARY for i in (0, 1)]
    return rules + [ox_rules.transpose_transpose_rule, ox_rules.no_op_transpose_rule]


# -- rule sets ------------------------------------------------------------------------------------------
def _rules(opset: int) -> tuple[list[pattern.RewriteRule], list[pattern.RewriteRule]]:
    """(fusions, Div→Mul) for a model at `opset`, every commuted variant listed."""
    ours = [BiasAddFusion.rule(op) for op in ("Conv", "ConvTranspose", "Gemm")] + [MatMulBiasToGemm.rule()]
    ours += [HardSigmoidFromAffineClip.rule(), HardSigmoidFromScaledClip.rule()]
    hardswish = [r for r in ox_rules.fuse_hardswish_rules() if opset >= 14 or "Swish" not in str(r)]
    if opset >= 14:
        ours.append(HardSwishFromScaledClip.rule())
    if opset >= 20:
        ours += [ErfGeluFusion.rule(g, d) for g in range(3) for d in (True, False)]
    library = [
        *hardswish,
        *_commuted([ox_rules.add_0_rule, ox_rules.mul_by_1_rule]),
        ox_rules.sub_0_rule,
        ox_rules.div_by_1_rule,
        ox_rules.dropout_inference_rule,
        ox_rules.dropout_zero_rule,
    ]
    return _commuted([*ours, ConvScaleFusion.rule()]) + library, [DivByConstant.rule(), SubByConstant.rule()]


def _commuted(rules: Sequence[pattern.RewriteRule]) -> list[pattern.RewriteRule]:
    return list(pattern.RewriteRuleSet(list(rules), commute=True))


class MatMulBiasToGemm(pattern.RewriteRuleClassBase):
    """`Add(MatMul(a, B), c)` → `Gemm(a, B, c)` for rank-2 `a` and `B` and a constant `c` per output column
    (`[N]`, `[1, N]` or scalar): Gemm computes `a·B + c` with that broadcast. A residual Add (non-constant
    `c`) stays an Add. (onnxscript's `matmul_add_to_gemm_rule` accepts any `c`.)"""

    def pattern(self, op, a, b, c):
        return op.Add(op.MatMul(a, b), c)

    def check(self, context, a, b, c) -> pattern.MatchResult:
        result = pattern.MatchResult()
        shape_a, shape_b, bias = a.shape, b.shape, _const(c)
        if shape_a is None or shape_b is None or shape_a.rank() != 2 or shape_b.rank() != 2:
            return result.fail("MatMul inputs are not known to be rank 2")
        if not isinstance(shape_b[1], int) or bias is None or bias.dtype.type not in _FLOATS:
            return result.fail("the added tensor is not a float constant")
        if _per_channel(bias, shape_b[1], 2) is None:
            return result.fail(f"the added constant of shape {bias.shape} is not per-column")
        return result

    def rewrite(self, op, a, b, c):
        return op.Gemm(a, b, c)


# -- driver ---------------------------------------------------------------------------------------------
def canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Outcome]]:
    """Fold constants and apply the fusions above; return the model (the same object if nothing applied)
    and one outcome per fusion plus one for the folding. Should onnxscript fail on an unusual graph, the
    model is returned unchanged with one refused outcome saying why."""
    try:
        return _canonicalize(model)
    except Exception as e:  # noqa: BLE001 - a library failure must not stop quantization
        reason = f"skipped: onnxscript failed ({type(e).__name__}: {first_line(e)})"
        log.warning("%s: %s", NAME, reason)
        return model, [Outcome(NAME, (), False, reason)]


def _canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Outcome]]:
    work = model
    names = [n.name for n in model.graph.node]
    if not all(names) or len(set(names)) != len(names):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        name_nodes(work.graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    graph_model = ir.serde.deserialize_model(work)
    outcomes: list[Outcome] = []

    _fold(graph_model, outcomes)
    fusions, divisions = _rules(opset)
    applied = _sink_transposes(graph_model, outcomes)
    applied += _apply(graph_model, fusions, outcomes)
    if _apply(graph_model, divisions, outcomes):
        applied += 1 + _apply(graph_model, fusions, outcomes)
    if not outcomes:
        _forget_weights(graph_model)
        return model, []
    if applied:  # the Identity nodes that no-op rules leave go here, already reported
        _fold(graph_model, outcomes, reported={o.nodes[0] for o in outcomes if "no-op" in o.reason})
    result = _export(graph_model, work)
    _forget_weights(graph_model)
    for o in outcomes:
        log.info("%s %s: %s", o.pass_name, ",".join(o.nodes), o.reason)
    return result, outcomes


def _sink_transposes(graph_model: ir.Model, outcomes: list[Outcome]) -> int:
    """Move Transposes below element-wise ops until none moves (`TransposeSinking`), cancelling inverse pairs;
    one outcome for them all. Returns the number of rewrites."""
    transposes = sum(1 for n in graph_model.graph if n.op_type == "Transpose")
    if not transposes:
        return 0
    rules, moves = _sinking_rules(), []
    for _ in range(len(graph_model.graph)):
        _split_transposes(graph_model.graph)
        if not _apply(graph_model, rules, moves):
            break
    _merge_transposes(graph_model.graph)
    if moves:
        left = sum(1 for n in graph_model.graph if n.op_type == "Transpose")
        nodes = tuple(dict.fromkeys(name for o in moves for name in o.nodes))
        reason = f"moved Transposes below element-wise ops ({len(moves)} moves): {transposes} → {left}"
        reason += " Transposes"
        outcomes.append(Outcome(NAME, nodes, True, reason))
    return len(moves)


def _split_transposes(graph: ir.Graph) -> None:
    """Give each reader of a Transpose its own copy, so each copy can travel down its own branch (a residual
    block's input feeds a Conv and the block's Add)."""
    transposes = [n for n in graph if n.op_type == "Transpose" and len(n.outputs[0].uses()) > 1]
    if not transposes:
        return
    taken = {v.name for n in graph for v in n.outputs} | {n.name for n in graph} | set(graph.initializers)
    taken |= {v.name for v in graph.inputs}
    for node in transposes:
        out = node.outputs[0]
        for reader, index in out.uses()[1:]:
            name = _fresh(node.name, taken)
            copy = ir.Node("", "Transpose", node.inputs, node.attributes.values(), name=name)
            copy.outputs[0].name = _fresh(out.name, taken)
            graph.insert_after(node, copy)
            reader.replace_input_with(index, copy.outputs[0])


def _merge_transposes(graph: ir.Graph) -> None:
    """Undo `_split_transposes` where copies stayed side by side: one Transpose per (input, permutation)."""
    first: dict[tuple[int, tuple[int, ...]], ir.Node] = {}
    for node in [n for n in graph if n.op_type == "Transpose" and n.inputs[0] is not None]:
        key = (id(node.inputs[0]), tuple(node.attributes.get_ints("perm", ())))
        kept = first.setdefault(key, node)
        if kept is not node and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(kept.outputs[0])
            graph.remove(node, safe=True)


def _forget_weights(graph_model: ir.Model) -> None:
    """onnxscript's rule matchers keep the last graph they matched; its constants wrap our model's tensors,
    which would then live (a big model's weights) until the next canonicalization."""
    for value in graph_model.graph.initializers.values():
        value.const_value = None


def _fold(graph_model: ir.Model, outcomes: list[Outcome], reported: set[str] | None = None) -> None:
    """Fold constants and drop unused nodes and initializers; report the removed nodes not yet `reported`
    (after the fusions: the Identity nodes no-op rules leave, and operands nothing reads any more)."""
    nodes_before = list(graph_model.graph)
    folded = ox_optimizer.fold_constants(
        graph_model,
        onnx_shape_inference=True,
        input_size_limit=sys.maxsize,  # weights behind Reshape/Transpose/Cast must become initializers
    ).modified
    ir_passes.RemoveUnusedNodesPass()(graph_model)
    gone = [n.name for n in nodes_before if n.graph is None and n.name not in (reported or ())]
    if gone:
        first = reported is None
        what = "folded {} constant or no-op nodes" if first else "removed {} nodes left unused by the fusions"
        outcomes.append(Outcome(NAME, tuple(gone), True, what.format(len(gone))))
    elif folded and reported is None:
        outcomes.append(Outcome(NAME, (), True, "replaced uses of constant or no-op results"))


def _apply(model: ir.Model, rules: Sequence[pattern.RewriteRule], outcomes: list[Outcome]) -> int:
    """Apply `rules` once over the main graph in node order (onnxscript's `RewriteRuleSet` loop, here so each
    match's nodes can be named and reported); return how many rewrites were made."""
    graph = model.graph
    ox_optimizer.basic_constant_propagation(graph)
    count, taken = 0, None
    for node in graph:
        for rule in rules:
            delta = rule.try_rewrite(model, graph, node)
            if delta is None or _overridable(delta.match.nodes):
                continue
            if taken is None:
                taken = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
                taken |= set(graph.initializers)
            for init in delta.new_initializers:
                init.name = _fresh(init.name or "const", taken)
                graph.register_initializer(init)
            ox_optimizer.basic_constant_propagation(delta.new_nodes)
            matched = _in_order(delta.match.nodes)
            outcomes.append(_outcome(matched, delta.new_nodes, node))
            ir.convenience.replace_nodes_and_values(
                graph, node, delta.match.nodes, delta.new_nodes, delta.match.outputs, delta.new_outputs
            )
            count += 1
            break
    return count


def _in_order(nodes: Sequence[ir.Node]) -> list[ir.Node]:
    """The matched `nodes`, producers before consumers."""
    members, order = set(nodes), []

    def visit(node: ir.Node) -> None:
        if node in members and node not in order:
            for value in node.inputs:
                if value is not None and value.producer() is not None:
                    visit(value.producer())
            order.append(node)

    for node in nodes:
        visit(node)
    return order


def _overridable(nodes: Sequence[ir.Node]) -> bool:
    """Whether a matched node reads an initializer that is also a graph input (it can be overridden)."""
    return any(
        v is not None and v.is_graph_input() and v.const_value is not None for n in nodes for v in n.inputs
    )


def _fresh(base: str, taken: set[str]) -> str:
    """A name not in `taken` (reserved on return)."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _outcome(matched: list[ir.Node], new: Sequence[ir.Node], root: ir.Node) -> Outcome:
    """Name the replacement after the compute node it keeps (Conv → Conv), else after the matched root, and
    say what was done."""
    compute = next((n for n in matched if n.op_type in _COMPUTE), None)
    main = new[-1]
    moved = [n for n in matched if n.op_type == "Transpose"]
    if moved and root.op_type != "Transpose" and main.op_type == "Transpose":
        new[-2].name, main.name = root.name, moved[0].name
        reason = f"moved Transpose '{main.name}' below {root.op_type} '{root.name}'"
        return Outcome(NAME, tuple(n.name for n in matched), True, reason)
    main.name = (compute or root).name
    ops = "/".join(n.op_type for n in matched)
    names = tuple(n.name for n in matched)
    if compute is not None and main.op_type == compute.op_type:
        others = [n for n in matched if n is not compute]
        op = others[0].op_type if others else "Add"
        named = ", ".join(f"'{n.name}'" for n in others)
        kind = "(scale)" if op == "Mul" else "(bias)"
        reason = f"fused {op} {named} {kind} into {compute.op_type} '{main.name}'"
    elif root.op_type == "Div" and main.op_type == "Mul" and len(matched) == 1:
        reason = f"replaced Div '{root.name}' by a constant with a Mul by its reciprocal"
    elif root.op_type == "Sub" and main.op_type == "Add" and len(matched) == 1:
        reason = f"replaced Sub '{root.name}' of a constant with an Add of its negation"
    elif main.op_type == "Identity":
        reason = f"removed no-op {ops} '{root.name}'"
    else:
        reason = f"fused {ops} into {main.op_type} '{main.name}'"
    return Outcome(NAME, names, True, reason)


def _export(graph_model: ir.Model, like: onnx.ModelProto) -> onnx.ModelProto:
    """The IR model as a proto: nodes named, no onnxscript metadata, value_info only for tensors `like`
    described that still exist, and checked."""
    proto = ir.serde.serialize_model(graph_model)
    name_nodes(proto.graph)
    described = {v.name for v in like.graph.value_info}
    produced = {o for n in proto.graph.node for o in n.output}
    kept = [v for v in proto.graph.value_info if v.name in described and v.name in produced]
    for v in proto.graph.value_info:  # a new tensor keeps its element type, not the shape onnxscript guessed
        if v.name not in described and v.name in produced and v.type.tensor_type.elem_type:
            kept.append(onnx.helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None))
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    for item in (*proto.graph.node, *proto.graph.initializer, *proto.graph.value_info):
        _strip_metadata(item)
    onnx.checker.check_model(proto)
    return proto


def _strip_metadata(item) -> None:
    keep = [p for p in item.metadata_props if not p.key.startswith(_METADATA_PREFIX)]
    if len(keep) != len(item.metadata_props):
        del item.metadata_props[:]
        item.metadata_props.extend(keep)

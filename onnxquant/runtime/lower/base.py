"""What every lowering family shares: quantization parameters (`QInfo`), the `Refused` signal and the lowering
`Context` over one model's graph-surgeon graph.

Constant folding: a DequantizeLinear of a constant ``q`` is the weight ``(q − z) s`` (its codes and parameters
are kept for the integer kernels); a QuantizeLinear of a float constant ``x`` is ``clip(round(x / s) + z)`` in
float32, exactly as ONNX Runtime computes it.

Output side of a pattern: from a step's float output, ``[Add(const)] [Relu | Clip]* → Q`` is followed through
single-consumer tensors. Q is monotone, so ``Q(clip(v, a, b)) = clip(Q(v), Q(a), Q(b))`` and
``Q(relu(v)) = max(Q(v), Q(0))``: the activations become a narrower code range ``[lo, hi]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxquant import ir
from onnxquant.errors import BadModelError, InternalError
from onnxquant.model import infer_shapes
from onnxquant.runtime import plan as P
from onnxquant.runtime.requant import INT32_MAX, quantize_f32

DTYPE_RANGE = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint4": (0, 15),
    "int4": (-8, 7),
    "uint2": (0, 3),
    "int2": (-2, 1),
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
    "int32": (-(1 << 31), INT32_MAX),
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class Refused(Exception):
    """A pattern does not apply; the message is the reason shown to the user."""


@dataclass
class QInfo:
    """Quantization parameters of one Q or DQ node (scale float32, zero point int64, per-axis or scalar)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    dtype: str

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def range(self) -> tuple[int, int]:
        return DTYPE_RANGE[self.dtype]

    def scalar(self) -> tuple[float, int]:
        return np.float32(self.scale.reshape(-1)[0]), int(self.zero_point.reshape(-1)[0])


@dataclass
class Chain:
    """The output side of a pattern: the closing QuantizeLinear, the float clamp and a bias Add's value."""

    q: gs.Node
    lo: float
    hi: float
    bias: np.ndarray | None
    covered: list[gs.Node]


def dtype_name(arr) -> str:
    name = np.asarray(arr).dtype.name
    return {"float8_e4m3fn": "unsupported"}.get(name, name)


def bcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """Per-axis `values` shaped to broadcast along `axis` of an `ndim`-D array (scalars unchanged)."""
    if axis is None or np.ndim(values) == 0:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(values, shape)


class Context:
    """One model being lowered: its graph (`ir.import_graph` after shape inference), the values of constant
    tensors (initializers and folded Q/DQ of constants) by name, and the status of every node by name."""

    def __init__(self, model: onnx.ModelProto):
        self.model = infer_shapes(model)
        self.graph = ir.import_graph(self.model)
        if [n.op for n in self.graph.nodes] != [n.op_type for n in self.model.graph.node]:
            raise InternalError("graph-surgeon import did not keep the model's node order")
        # float fallback steps run the source node itself (graph-surgeon keeps node order)
        self.protos = {n.name: p for n, p in zip(self.graph.nodes, self.model.graph.node)}
        tensors = self.graph.tensors()
        self.consts: dict[str, np.ndarray] = {
            k: ir.constant(t) for k, t in tensors.items() if isinstance(t, gs.Constant)
        }
        self.graph_outputs = [t.name for t in self.graph.outputs]
        self.inputs = [t.name for t in self.graph.inputs if isinstance(t, gs.Variable)]
        self.status: dict[str, P.NodeStatus] = {}
        self.weights: dict[str, tuple[np.ndarray, QInfo]] = {}  # DQ(const) output -> (codes, params)
        self.dq: dict[str, tuple[str, QInfo]] = {}  # DQ(activation) output -> (source codes, params)
        self.int_dtypes: dict[str, str] = {}
        self.ranges: dict[str, tuple[int, int]] = {}

    # ---------------------------------------------------------------- parameters and constants
    def const(self, tensor: gs.Tensor) -> np.ndarray | None:
        """The value of `tensor` when it is constant (an initializer or a folded Q/DQ of one), else None."""
        return self.consts.get(tensor.name)

    def qinfo(self, node: gs.Node) -> QInfo:
        """Parameters of a Q or DQ node; Refused unless they are constant and of a lowered type."""
        if node.attrs.get("block_size", 0):
            raise Refused("blocked quantization (block_size) is not lowered")
        scale = self.const(node.inputs[1])
        if scale is None:
            raise Refused(f"scale {node.inputs[1].name!r} is not a constant")
        zname = node.inputs[2].name if len(node.inputs) > 2 else ""
        src = node.inputs[0].name
        if zname:
            zp = self.consts.get(zname)
            if zp is None:
                raise Refused(f"zero point {zname!r} is not a constant")
            dtype = dtype_name(zp)
        else:
            zp = np.zeros((), dtype=np.int64)
            out_type = node.attrs.get("output_dtype", 0)
            if node.op == "DequantizeLinear" and src in self.int_dtypes:
                dtype = self.int_dtypes[src]
            elif node.op == "DequantizeLinear" and src in self.consts:
                dtype = dtype_name(self.consts[src])
            elif out_type:
                dtype = dtype_name(np.zeros((), helper.tensor_dtype_to_np_dtype(out_type)))
            else:
                dtype = "uint8"
        if dtype not in DTYPE_RANGE or scale.dtype != np.float32:
            raise Refused(f"quantized type {dtype}/{scale.dtype} is not lowered")
        scale = np.asarray(scale, dtype=np.float32)
        if not (np.isfinite(scale) & (scale > 0)).all():
            bad = float(scale.reshape(-1)[int(np.argmin(np.isfinite(scale) & (scale > 0)))])
            raise BadModelError(
                f"{node.op} {node.name!r}: scale {node.inputs[1].name!r} holds {bad:g}; "
                "accepted: positive finite scales (ONNX Q/DQ divide by the scale)"
            )
        axis = int(node.attrs.get("axis", 1)) if scale.size > 1 else None
        return QInfo(
            scale.reshape(-1) if scale.size > 1 else scale.reshape(()),
            np.asarray(zp).astype(np.int64).reshape(-1)
            if np.size(zp) > 1
            else np.asarray(zp).astype(np.int64).reshape(()),
            axis,
            dtype,
        )

    def fold_constants(self) -> None:
        """Fold Constant nodes and Q/DQ of constants; record the DQ of activations and the Q code ranges."""
        for node in self.graph.nodes:
            out = node.outputs[0].name if node.outputs else ""
            if node.op == "Constant" and node.attrs.get("value") is not None:
                self.consts[out] = ir.constant(node.attrs["value"])
                self.set(node, P.KIND_CONSTANT, "")
            elif node.op in QDQ_OPS:
                try:
                    qi = self.qinfo(node)
                except Refused:
                    continue
                src = self.const(node.inputs[0])
                if node.op == "QuantizeLinear":
                    self._fold_quantize(node, qi, src)
                elif src is not None:
                    codes = np.asarray(src).astype(np.int64)
                    if qi.axis is not None:
                        qi.axis = qi.axis % codes.ndim
                    self.weights[out] = (codes, qi)
                    s, z = bcast(qi.scale, qi.axis, codes.ndim), bcast(qi.zero_point, qi.axis, codes.ndim)
                    self.consts[out] = ((codes - z).astype(np.float32) * s).astype(np.float32)
                    self.set(node, P.KIND_CONSTANT, "")
                else:
                    self.dq[out] = (node.inputs[0].name, qi)

    def _fold_quantize(self, node: gs.Node, qi: QInfo, src: np.ndarray | None) -> None:
        out = node.outputs[0].name
        self.int_dtypes[out] = qi.dtype
        if src is None:
            self.ranges[out] = qi.range
            return
        x = np.asarray(src, dtype=np.float32)
        s, z = bcast(qi.scale, qi.axis, x.ndim), bcast(qi.zero_point, qi.axis, x.ndim)
        self.consts[out] = quantize_f32(x, s, z, *qi.range)
        self.set(node, P.KIND_CONSTANT, "")

    def set(self, node: gs.Node, kind: str, step: str, reason: str = "") -> None:
        self.status[node.name] = P.NodeStatus(node.name, node.op, kind, step, reason)

    # ---------------------------------------------------------------- matching helpers
    def act(self, tensor: gs.Tensor, what: str) -> tuple[str, QInfo]:
        """(source codes, parameters) of an activation that is the output of a per-tensor DequantizeLinear."""
        if tensor.name not in self.dq:
            raise Refused(f"{what} {tensor.name!r} is not the output of a DequantizeLinear")
        src, qi = self.dq[tensor.name]
        if not qi.per_tensor:
            raise Refused(f"{what} {tensor.name!r} is quantized per channel")
        return src, qi

    def range_of(self, src: str, qi: QInfo) -> tuple[int, int]:
        """Code range of `src`: its type's range, narrowed by the step that wrote it."""
        lo, hi = qi.range
        if src in self.ranges:
            rlo, rhi = self.ranges[src]
            lo, hi = max(lo, rlo), min(hi, rhi)
        return lo, hi

    def single_consumer(self, tensor: gs.Tensor) -> gs.Node:
        """The one node reading an intermediate tensor; Refused for graph outputs and shared tensors."""
        users = ir.consumers(tensor)
        if tensor.name in self.graph_outputs:
            raise Refused(f"intermediate {tensor.name!r} is a graph output")
        if len(users) != 1:
            raise Refused(f"{tensor.name!r} has {len(users)} consumers, expected one")
        return users[0]

    def chain(self, tensor: gs.Tensor, allow_bias: bool) -> Chain:
        """Follow ``[Add(const)] [Relu | Clip]* → Q`` from `tensor` (see the module docstring)."""
        lo, hi, bias, covered = -np.inf, np.inf, None, []
        while True:
            node = self.single_consumer(tensor)
            if node.op == "QuantizeLinear":
                return Chain(node, lo, hi, bias, covered)
            if node.op == "Relu":
                lo = max(lo, 0.0)
            elif node.op == "Clip":
                cmin, cmax = self._clip_bounds(node)
                if cmin is not None:
                    lo = max(lo, float(cmin))
                if cmax is not None:
                    hi = min(hi, float(cmax))
            elif node.op == "Add" and allow_bias and bias is None and not covered:
                other = [t for t in node.inputs if t.name != tensor.name]
                if len(other) != 1 or self.const(other[0]) is None:
                    raise Refused(f"output feeds Add {node.name!r} whose other operand is not constant")
                bias = np.asarray(self.const(other[0]), dtype=np.float64)
            else:
                raise Refused(f"output feeds {node.op} {node.name!r}, not QuantizeLinear")
            if lo > hi:
                raise Refused("activation clip range is empty")
            covered.append(node)
            tensor = node.outputs[0]

    def _clip_bounds(self, node: gs.Node) -> tuple[float | None, float | None]:
        """Clip's (min, max): attributes before opset 11, constant inputs after."""
        bounds = [node.attrs.get("min"), node.attrs.get("max")] if len(node.inputs) < 2 else [None, None]
        for pos, name in ((1, "min"), (2, "max")):
            if len(node.inputs) > pos and node.inputs[pos].name:
                value = self.const(node.inputs[pos])
                if value is None:
                    raise Refused(f"Clip {name} is not a constant")
                bounds[pos - 1] = float(np.asarray(value).reshape(-1)[0])
        return bounds[0], bounds[1]

    def out(self, chain: Chain) -> tuple[QInfo, int, int]:
        """Parameters of the closing Q and the code range ``[lo, hi]`` narrowed by the chain's clamp."""
        qi = self.qinfo(chain.q)
        if not qi.per_tensor:
            raise Refused("output QuantizeLinear is per channel")
        s, z = qi.scale, qi.zero_point
        lo, hi = qi.range
        if chain.lo > -np.inf:
            lo = max(lo, int(quantize_f32(np.float32(chain.lo), s, z, *qi.range)))
        if chain.hi < np.inf:
            hi = min(hi, int(quantize_f32(np.float32(chain.hi), s, z, *qi.range)))
        return qi, lo, hi

    def finish(self, step: P.Step, anchor: gs.Node, chain: Chain, lo: int, hi: int, dtype: str) -> P.Step:
        """Close an integer step: it covers `anchor`, the chain and its Q, and writes the Q's output codes."""
        out = chain.q.outputs[0].name
        nodes = [anchor, *chain.covered, chain.q]
        step.outputs = [out]
        step.nodes = [n.name for n in nodes]
        for n in nodes:
            self.set(n, P.KIND_INTEGER, step.name)
        self.int_dtypes[out] = dtype
        self.ranges[out] = (lo, hi)
        return step

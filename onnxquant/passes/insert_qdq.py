"""Insert QuantizeLinear/DequantizeLinear nodes per a `QuantPlan` and a `CalibrationTable`: every number
comes from the table (activations, and `kind="weight"` entries made by `calib.weight_table`); nothing is
calibrated here.

Weights are stored quantized — `q = clip(round_half_even(W / s) + z)` per output channel, with the entry's
scales and widths — as INT8, or as INT4/UINT4 (two per byte) from opset 21, followed by a DequantizeLinear.
A bias becomes int32 with scale `s_x · s_w` (zero point 0), the form ONNX Runtime fuses into
QLinearConv/QGemm; a weight entry's `bias_shift` (bias correction) is added to it first, and its
`spread_ratio` ξ_c scales the DequantizeLinear scale (the codes stay those of the entry's scale). Activations
get Q→DQ with the table's scale and zero point (per tensor, or per channel on axis 1 with per-channel widths
from activation bit allocation, the bias then staying float). Weight widths without an ONNX type (2, 3, 5–7
bits) live in an 8-bit container.
Activations below 8 bits always use an 8-bit container (ONNX Runtime moves DequantizeLinear past MaxPool and
then has no uint4 MaxPool; TensorRT has no 4-bit activations); such an activation is first clipped to
`[s (q_min − z), s (q_max − z)]`, so its codes stay in the b-bit range and the float simulation is exact.
New nodes are placed by `stable_toposort` right after the last node they read from (weight DQs first).

Number formats (see calib/blocks.py, calib/fp8.py, calib/pow2.py): a block-wise weight entry becomes a
DequantizeLinear with `axis` and `block_size` (opset 21) whose scale has the weight's rank (symmetric codes
store no zero point: b + 32/B bits per weight); an FP8 entry (opset 21, see calib/fp8.py) stores the weight
as FLOAT8E4M3FN or FLOAT8E5M2 values `fp8(W / s)`, and an FP8 activation gets a QuantizeLinear with that
`output_dtype` → DequantizeLinear, all without zero points (0, the default).
Their layers keep a float bias: a block-wise or FP8 product has no single int32 accumulator scale s_x·s_w per
output channel. Power-of-two scales need nothing here: they are ordinary scales that happen to be 2^k.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxquant.calib.blocks import stored_bits
from onnxquant.calib.fp8 import FP8_FORMATS, FP8_OPSET, fp8_codes, is_fp8
from onnxquant.errors import BadModelError, InternalError
from onnxquant.model import INT4_OPSET, opset_of
from onnxquant.passes.base import Graph, constant_value, input_at, stable_toposort
from onnxquant.passes.insert_codebook import insert_codebook
from onnxquant.passes.plan import QuantPlan
from onnxquant.quant import QParams, qrange, quantize
from onnxquant.rules import QuantSpec
from onnxquant.tables import CalibrationTable, TensorRange

log = logging.getLogger(__name__)

PER_CHANNEL_OPSET = 13
BLOCK_OPSET = 21  # DequantizeLinear block_size
K_MAX = 2**16  # largest equalization factor of a depthwise input channel (see passes/plan.py)


@dataclass
class QdqSummary:
    weights: Counter = field(default_factory=Counter)
    activations: Counter = field(default_factory=Counter)
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weight_formats: Counter = field(default_factory=Counter)  # (bits, label) -> weights, e.g. (8, "fp8_e4m3")
    activation_formats: Counter = field(default_factory=Counter)  # (bits, label) -> activations
    block_storage: dict = field(default_factory=dict)  # (bits, block size) -> [bits stored, weights]

    def weights_line(self) -> str:
        """E.g. "22 at 4 bits (per block 32: 5.0 bits/weight stored), 2 at 8 bits" ("none" when empty)."""
        parts = []
        for (bits, label), n in sorted(_with_plain(self.weight_formats, self.weights).items()):
            if label.startswith("per block"):
                total, count = self.block_storage[(bits, int(label.split()[-1]))]
                label = f"{label}: {total / count:.1f} bits/weight stored"
            parts.append(f"{n} at {bits} bits" + (f" ({label})" if label else ""))
        return ", ".join(parts) or "none"

    def activations_line(self) -> str:
        parts = [
            f"{n} at {bits} bits" + (f" ({label})" if label else "")
            for (bits, label), n in sorted(_with_plain(self.activation_formats, self.activations).items())
        ]
        return ", ".join(parts) or "none"


def _with_plain(formats: Counter, widths: Counter) -> Counter:
    """`formats` plus, as plain (label ""), the tensors counted in `widths` that `formats` lacks."""
    out = Counter(formats)
    for bits, n in widths.items():
        listed = sum(c for (b, _), c in formats.items() if b == bits)
        if n > listed:
            out[(bits, "")] += n - listed
    return out


def format_opset(plan: QuantPlan) -> int:
    """The opset the plan's number formats need: 21 for block-wise weights and FP8 (calib/fp8.py), else 13."""
    weights = [d.weights for d in plan.nodes if d.quantize and d.weight]
    if any(w.granularity == "per_block" for w in weights):
        return BLOCK_OPSET
    if any(is_fp8(w.format) for w in weights) or any(is_fp8(a.format) for a in plan.activations.values()):
        return FP8_OPSET
    return PER_CHANNEL_OPSET


def _format_label(spec: QuantSpec | None, entry: TensorRange) -> str:
    """How a tensor's numbers are stored beyond their width, for the summary ("" for free-scale integers)."""
    if entry.block_size:
        return f"per block {entry.block_size}"
    if getattr(spec, "granularity", None) == "per_block":  # a weight spec whose axis was too short
        return "per channel: input axis shorter than a block"
    labels = [entry.format] if entry.format != "int" else []
    if spec is not None and spec.scale == "pow2":
        labels.append("power-of-two scales")
    return ", ".join(labels)


def _check_opset(name: str, entry: TensorRange, opset: int) -> None:
    """Refuse an entry the model's opset cannot express (api.convert upgrades the opset first)."""
    need, what = (BLOCK_OPSET, "block-wise") if entry.block_size else (FP8_OPSET, entry.format)
    if (entry.block_size or is_fp8(entry.format)) and opset < need:
        raise BadModelError(
            f"tensor {name}: {what} quantization needs opset {need}, the model has {opset}; "
            f"accepted: a model upgraded to opset {need} (api.convert does)"
        )


def container(bits: int, signed: bool, opset: int) -> int:
    """The ONNX element type that stores b-bit codes."""
    if bits == 4 and opset >= INT4_OPSET:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def _np_type(elem_type: int):
    return {
        TensorProto.INT4: ml_dtypes.int4,
        TensorProto.UINT4: ml_dtypes.uint4,
        TensorProto.INT8: np.int8,
        TensorProto.UINT8: np.uint8,
        TensorProto.INT32: np.int32,
    }[elem_type]


class _Builder:
    """New constants and nodes for `graph`, named by the graph; `finish` lists the nodes in place."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[gs.Node] = []

    def constant(self, base: str, array: np.ndarray) -> gs.Constant:
        return self.graph.add_constant(base, array)

    def node(self, op: str, inputs: list[gs.Tensor], out_base: str, **attrs) -> gs.Variable:
        out = self.graph.new_variable(out_base)
        self.nodes.append(self.graph.make_node(op, inputs, [out], f"{out_base}_node", **attrs))
        return out

    def finish(self) -> None:
        """New nodes go first in creation order, so the stable sort puts each right after what it reads."""
        self.graph.gs.nodes = self.nodes + self.graph.gs.nodes
        stable_toposort(self.graph.gs)


def insert_qdq(
    model: onnx.ModelProto, plan: QuantPlan, table: CalibrationTable
) -> tuple[onnx.ModelProto, QdqSummary]:
    """A copy of `model` with Q/DQ inserted as `table` says; the float model is never modified.

    Every quantized weight needs a `kind="weight"` entry (`calib.weight_table.weight_entries`); a planned
    activation without an entry is left float, with a note.
    """
    opset = opset_of(model)
    if opset < PER_CHANNEL_OPSET:
        raise BadModelError(
            f"model: opset {opset} is below {PER_CHANNEL_OPSET}, needed for per-channel Q/DQ; "
            "upgrade the model first (api.convert does)"
        )
    graph = Graph(model)
    build = _Builder(graph)
    summary = QdqSummary()
    tensors = graph.tensors()
    listed = {id(n) for n in graph.gs.nodes}
    by_name = {n.name: n for n in graph.gs.nodes}
    first_input = {n.name: n.inputs[0].name for n in graph.gs.nodes if n.inputs}
    quantized = {d.name for d in plan.nodes if d.quantize}
    skipped = {d.name for d in plan.nodes if not d.quantize and d.reason.startswith("skipped")}

    act_params: dict[str, QParams] = {}
    fp8_scales: dict[str, np.float32] = {}  # FP8 activations' scales
    equalizers: dict[str, np.ndarray] = {}  # depthwise Conv -> k, its input's per-channel equalization
    for name in sorted(plan.activations):
        entry = table.tensors.get(name)
        if entry is None:
            summary.notes.append(f"{name}: no calibration entry, left float")
            continue
        _check_opset(name, entry, opset)
        tensor = tensors[name]
        readers = _readers(tensor, listed, quantized, skipped)
        params = entry.qparams()
        spec = plan.activations[name]
        summary.activation_formats[(int(np.max(params.bits)), _format_label(spec, entry))] += 1
        if is_fp8(entry.format):  # no act_params: the readers keep a float bias
            fp8_scales[name] = np.float32(params.scale)
            dq = _insert_fp8_qdq(build, tensor, params, entry.format)
            summary.activations[8] += 1
            for node in readers:
                _rewire(node, tensor, dq)
            continue
        source = tensor
        if name in plan.equalized and params.axis == 1 and _equalizable(params):
            params, k = _equalized(params)
            equalizers[plan.equalized[name]] = k
            k_shape = (1, -1) + (1,) * (len(tensor.shape) - 2 if tensor.shape is not None else 2)
            source = build.node(
                "Mul", [tensor, build.constant(f"{name}_k", k.reshape(k_shape))], f"{name}_eq"
            )
        dq = _insert_activation_qdq(build, source, params)
        act_params[name] = params
        summary.activations[int(np.max(params.bits))] += 1
        for node in readers:
            _rewire(node, tensor, dq)

    dequantized: dict[str, gs.Tensor] = {}
    for decision in plan.nodes:
        if not decision.quantize:
            if decision.reason:
                summary.float_nodes.append((decision.name, decision.op_type, decision.reason))
            continue
        if decision.weight is None:
            continue
        node = by_name[decision.name]
        if decision.weights.levels != "uniform":  # APoT / k-means: Gather(codebook, indices), float node
            insert_codebook(build, node, decision, dequantized, summary, opset, equalizers.get(node.name))
            continue
        entry = table.tensors.get(decision.weight)
        if entry is None or entry.kind != "weight":
            raise InternalError(
                f"weight {decision.weight!r} of node {decision.name!r} has no weight entry in "
                "the calibration table (calib.weight_table.weight_entries makes them)"
            )
        _check_opset(decision.weight, entry, opset)
        codes_params = entry.qparams()
        w_scale = codes_params.scale.astype(np.float32)
        if entry.spread_ratio is not None:
            w_scale = (w_scale * np.asarray(entry.spread_ratio)).astype(np.float32)
        if node.name in equalizers:  # the Conv reads x·k: dividing its weights' scales by k restores x
            k = equalizers[node.name]
            w_scale = w_scale / (k.reshape((-1,) + (1,) * (w_scale.ndim - 1)) if entry.block_size else k)
            w_scale = w_scale.astype(np.float32)
        w_params = replace(codes_params, scale=w_scale)
        if decision.weight not in dequantized:
            w = constant_value(node.inputs[1], readonly=True)
            dequantized[decision.weight] = _quantized_weight(
                build, decision.weight, w, entry, w_params, opset
            )
            bits = round(float(np.mean(entry.bits)))  # the table's width (mean if per channel)
            summary.weights[bits] += 1
            summary.weight_formats[(bits, _format_label(decision.weights, entry))] += 1
            if entry.block_size:
                stored = summary.block_storage.setdefault((bits, entry.block_size), [0.0, 0])
                scale_bits = 16 if half_scales(w_params, codes_params) else 32
                per_weight = stored_bits(
                    w.shape, entry.axis, entry.block_size, bits, entry.signed, scale_bits
                )
                stored[0] += per_weight * w.size
                stored[1] += w.size
        _rewire(node, node.inputs[1], dequantized[decision.weight], only_index=1)
        bias_tensor = input_at(node, 2)
        bias = _float_bias(bias_tensor)
        if bias is None and bias_tensor is not None:
            continue
        if entry.note:
            summary.notes.append(f"{node.name}: {entry.note}")
        shift = None if entry.bias_shift is None else np.asarray(entry.bias_shift, np.float64)
        if shift is not None:
            bias = shift if bias is None else bias + shift
        x_params = act_params.get(first_input[node.name])
        if x_params is not None and x_params.axis is not None:
            x_params = None  # per-channel input scales: no single bias scale s_x·s_w, the bias stays float
        if entry.block_size or is_fp8(entry.format):
            x_params = None  # no int32 accumulator with one scale per output channel: the bias stays float
        x_fp8 = fp8_scales.get(first_input[node.name])
        if bias is not None and x_fp8 is not None and _bias_overflows(bias, x_fp8, w_params.scale):
            _insert_wide_bias(build, node, bias)
        elif bias is not None and (shift is not None or x_params is not None):
            _insert_bias(build, node, bias, x_params, w_params)
    build.finish()
    return graph.export(), summary


def _float_bias(tensor: gs.Tensor | None) -> np.ndarray | None:
    bias = constant_value(tensor)
    return bias.astype(np.float64) if bias is not None and bias.ndim == 1 else None


def _equalized(params: QParams) -> tuple[QParams, np.ndarray]:
    """Per-tensor parameters of x·k for per-channel `params` (scales s_c): scale s = max_c s_c and
    k_c = s / s_c, so round(x_c·k_c / s) = round(x_c / s_c), x's per-channel codes. Symmetric codes are stored
    unsigned with zero point 2^(b−1) (the same values shifted): ONNX Runtime's fast x86 kernels take uint8
    activations. One-sided channels (unsigned, zero point 0) stay so."""
    scales = np.asarray(params.scale, np.float32)
    s = np.float32(scales.max())
    k = np.minimum(s / scales, np.float32(K_MAX)).astype(np.float32)
    bits = int(np.max(params.bits))
    zero = 1 << (bits - 1) if params.signed else 0
    return QParams(scale=s, zero_point=np.int64(zero), bits=bits, signed=False), k


def _equalizable(params: QParams) -> bool:
    """One width, and symmetric codes or unsigned codes with zero point 0: one zero point serves all."""
    return np.ptp(params.bits) == 0 and (params.signed or not np.any(params.zero_point))


def _readers(tensor: gs.Tensor, listed: set[int], quantized: set[str], skipped: set[str]) -> list[gs.Node]:
    """The nodes that read an activation's DequantizeLinear. A quantized producer's output goes through Q/DQ
    for every reader but skipped ones: a runtime fuses the producer into an integer kernel only when Q is its
    output's one consumer. A float producer's output (a LayerNorm's, read by the next layer's MatMuls and by a
    residual Add) keeps its float value for its float readers: their inputs were never meant to be rounded."""
    readers = [n for n in tensor.outputs if id(n) in listed and n.name not in skipped]
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.name in quantized:
        return readers
    return [n for n in readers if n.name in quantized]


def _rewire(node: gs.Node, old: gs.Tensor, new: gs.Tensor, only_index: int | None = None) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old and (only_index is None or i == only_index):
            node.inputs[i] = new


def _insert_activation_qdq(build: _Builder, tensor: gs.Tensor, params: QParams) -> gs.Tensor:
    """Q→DQ of an activation, per tensor or per channel (axis 1), in an 8-bit container; widths below 8 bits
    are clipped first to the codes' range (Clip per tensor; Min/Max with per-channel bounds per channel)."""
    name = tensor.name
    elem = TensorProto.INT8 if params.signed else TensorProto.UINT8
    shape = () if params.axis is None else (-1,)
    scale = build.constant(f"{name}_scale", np.asarray(params.scale, np.float32).reshape(shape))
    zero = build.constant(
        f"{name}_zero_point", np.asarray(params.zero_point).reshape(shape).astype(_np_type(elem))
    )
    attrs = {} if params.axis is None else {"axis": params.axis}
    source = tensor
    if int(np.min(params.bits)) < 8:
        scale32 = np.asarray(params.scale, np.float32)
        lo = scale32 * (params.qmin - params.zero_point).astype(np.float32)
        hi = scale32 * (params.qmax - params.zero_point).astype(np.float32)
        if params.axis is None:
            source = build.node(
                "Clip",
                [tensor, build.constant(f"{name}_clip_min", lo), build.constant(f"{name}_clip_max", hi)],
                f"{name}_clipped",
            )
        else:
            if tensor.shape is None:
                raise BadModelError(
                    f"tensor {name}: rank unknown; per-channel activation quantization needs "
                    "its shape (run shape inference on the model)"
                )
            bounds = (-1,) + (1,) * (len(tensor.shape) - 1 - params.axis)
            low = build.node(
                "Max", [tensor, build.constant(f"{name}_clip_min", lo.reshape(bounds))], f"{name}_clipped_low"
            )
            source = build.node(
                "Min", [low, build.constant(f"{name}_clip_max", hi.reshape(bounds))], f"{name}_clipped"
            )
    q = build.node("QuantizeLinear", [source, scale, zero], f"{name}_quantized", **attrs)
    return build.node("DequantizeLinear", [q, scale, zero], f"{name}_dequantized", **attrs)


CHUNK = 2**22  # elements quantized at a time: int64 codes of a whole large weight would cost 8 bytes each


def _weight_codes(w: np.ndarray, params: QParams, dtype) -> np.ndarray:
    """`quantize(w, params)` as codes of the stored `dtype`, computed in slices across the channel axis, so
    the float and int64 temporaries of a weight of hundreds of MB stay a few MB and no wider copy of the
    codes is made; each element's code is the same."""
    w = np.asarray(w, dtype=np.float32)
    if w.size <= CHUNK or w.ndim < 2:
        return quantize(w, params).astype(dtype)
    axis = w.ndim - 1 if params.axis is not None and params.axis % w.ndim == 0 else 0
    step = max(1, CHUNK * w.shape[axis] // w.size)
    codes = np.empty(w.shape, dtype)
    for start in range(0, w.shape[axis], step):
        part = [slice(None)] * w.ndim
        part[axis] = slice(start, start + step)
        codes[tuple(part)] = quantize(w[tuple(part)], _part_params(params, tuple(part)))
    return codes


def _part_params(params: QParams, part: tuple[slice, ...]) -> QParams:
    """`params` for the slice `part` of the tensor: block-wise scales and zero points are sliced alike (the
    slice never crosses the block axis); other parameters serve every slice."""
    if not params.block_size:
        return params
    zero = params.zero_point[part] if np.ndim(params.zero_point) else params.zero_point
    return replace(params, scale=params.scale[part], zero_point=zero)


def _quantized_weight(
    build: _Builder, name: str, w: np.ndarray, entry: TensorRange, params: QParams, opset: int
) -> gs.Tensor:
    """The stored weight and its DequantizeLinear: FP8 values, or b-bit codes of the entry's scale (`params`
    holds the DequantizeLinear scale, which bias correction or depthwise equalization may have changed)."""
    codes_params = entry.qparams()
    if is_fp8(entry.format):
        codes = fp8_codes(w, codes_params.scale, entry.format, codes_params.axis)
        return _insert_weight(build, name, codes, params, None)  # zero point 0: the default
    if half_scales(params, codes_params):
        params = replace(params, scale=np.asarray(params.scale, np.float16))
        codes_params = replace(codes_params, scale=params.scale.astype(np.float32))
    elem = container(int(np.max(params.bits)), params.signed, opset)
    codes = _weight_codes(w, codes_params, _np_type(elem))
    zero = np.asarray(params.zero_point).astype(_np_type(elem))
    if params.block_size and params.signed:
        zero = None  # all zero: DequantizeLinear's default, and 4/B bits per weight not stored
    return _insert_weight(build, name, codes, params, zero)


def half_scales(params: QParams, codes_params: QParams) -> bool:
    """Whether a block-wise weight stores its scales as float16 (16/B bits per weight instead of 32/B): when
    every scale is a float16 normal number and no stage changed the DequantizeLinear's scale from the one the
    codes are rounded with. The codes are then rounded with the float16 scale."""
    scale = np.asarray(params.scale, np.float32)
    if not params.block_size or not np.array_equal(scale, np.asarray(codes_params.scale, np.float32)):
        return False
    limits = np.finfo(np.float16)
    return bool(np.all((scale >= limits.smallest_normal) & (scale <= limits.max)))


def _insert_weight(
    build: _Builder, name: str, codes: np.ndarray, params: QParams, zero: np.ndarray | None
) -> gs.Tensor:
    """Stored codes → DequantizeLinear with `params`' scale (per tensor, channel or block) and `zero`."""
    q = build.constant(f"{name}_quantized", codes)
    if np.asarray(params.scale).dtype == np.float16:  # a Cast that runtimes fold at load time
        half = build.constant(f"{name}_scale", params.scale)
        scale = build.node("Cast", [half], f"{name}_scale_float", to=TensorProto.FLOAT)
    else:
        scale = build.constant(f"{name}_scale", np.asarray(params.scale, np.float32))
    inputs = [q, scale] + ([] if zero is None else [build.constant(f"{name}_zero_point", zero)])
    attrs = {} if params.axis is None else {"axis": params.axis}
    if params.block_size:
        attrs["block_size"] = params.block_size
    return build.node("DequantizeLinear", inputs, f"{name}_dequantized", **attrs)


def _insert_fp8_qdq(build: _Builder, tensor: gs.Tensor, params: QParams, fmt: str) -> gs.Tensor:
    """Q→DQ of an activation in FP8, per tensor: QuantizeLinear with `output_dtype` and no zero point (see
    calib/fp8.py FP8_OPSET), saturating."""
    name = tensor.name
    scale = build.constant(f"{name}_scale", np.asarray(params.scale, np.float32).reshape(()))
    dtype = FP8_FORMATS[fmt].onnx_type
    q = build.node("QuantizeLinear", [tensor, scale], f"{name}_quantized", output_dtype=dtype, saturate=1)
    return build.node("DequantizeLinear", [q, scale], f"{name}_dequantized")


INT32_MAX = 2**31 - 1


def _bias_overflows(bias: np.ndarray, x_scale: np.float32, w_scale: np.ndarray) -> bool:
    """Whether ONNX Runtime's BiasQuantization (a float bias of a Conv/Gemm between DequantizeLinears becomes
    int32 round(b / (s_x·s_w))) would overflow int32: FP8 scales (amax / 57344 for E5M2) are small enough."""
    if np.ndim(w_scale) > 1:
        return False  # block-wise weights: ONNX Runtime leaves the bias alone
    product = np.float64(x_scale) * np.asarray(w_scale, np.float64).ravel()
    return bool(np.any(np.abs(bias) / product > INT32_MAX))


def _insert_wide_bias(build: _Builder, node: gs.Node, bias: np.ndarray) -> None:
    """A float bias as int32 codes with its own scale max|b| / (2^31 − 1) (31 bits, finer than float32's 24
    for the largest entry): its DequantizeLinear keeps ONNX Runtime from quantizing it with s_x·s_w."""
    old = input_at(node, 2)
    base = old.name if old is not None else f"{node.name}_bias"
    scale = np.float32(max(float(np.abs(bias).max()), float(np.finfo(np.float32).tiny)) / INT32_MAX)
    codes = np.clip(np.rint(bias / np.float64(scale)), -INT32_MAX, INT32_MAX).astype(np.int32)
    q = build.constant(f"{base}_quantized", codes)
    s = build.constant(f"{base}_scale", np.asarray(scale, np.float32))
    node.inputs[2] = build.node("DequantizeLinear", [q, s], f"{base}_dequantized")


def _insert_bias(build: _Builder, node: gs.Node, bias: np.ndarray, x: QParams | None, w: QParams) -> None:
    """Bias as int32 codes with scale s_x·s_w per output channel (float when the input is not quantized)."""
    old = input_at(node, 2)
    base = old.name if old is not None else f"{node.name}_bias"
    if x is None:
        tensor = build.constant(f"{base}_corrected", bias.astype(np.float32))
    else:
        w_scale = np.asarray(w.scale, np.float64).ravel()
        if w_scale.size not in (1, bias.size):
            w_scale = np.tile(w_scale, bias.size // w_scale.size)
        scale = np.broadcast_to((np.float64(x.scale) * w_scale).astype(np.float32), bias.shape)
        lo, hi = qrange(32, True)
        codes = np.clip(np.rint(bias / scale.astype(np.float64)), lo, hi).astype(np.int32)
        q = build.constant(f"{base}_quantized", codes)
        s = build.constant(f"{base}_scale", np.ascontiguousarray(scale, np.float32))
        z = build.constant(f"{base}_zero_point", np.zeros(bias.shape, np.int32))
        tensor = build.node("DequantizeLinear", [q, s, z], f"{base}_dequantized", axis=0)
    if len(node.inputs) > 2:
        node.inputs[2] = tensor
    else:
        node.inputs.append(tensor)

"""Insert QuantizeLinear/DequantizeLinear nodes per a `QuantPlan` and a `CalibrationTable`.

Weights are stored quantized — `q = clip(round_half_even(W / s) + z)` per output channel — as INT8, or as
INT4/UINT4 (two per byte) from opset 21, followed by a DequantizeLinear. A bias becomes int32 with scale
`s_x · s_w` (zero point 0), the form ONNX Runtime fuses into QLinearConv/QGemm. Activations get Q→DQ with the
table's scale and zero point (per tensor, or per channel on axis 1 with per-channel widths from activation bit
allocation, the bias then staying float). Weight widths without an ONNX type (2, 3, 5–7 bits) live in an
8-bit container.
Activations below 8 bits always use an 8-bit container (ONNX Runtime moves DequantizeLinear past MaxPool and
then has no uint4 MaxPool; TensorRT has no 4-bit activations); such an activation is first clipped to `[s (q_min − z), s (q_max − z)]`, so its codes stay in the b-bit range and
the float simulation is exact.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxquant.errors import OnnxQuantError
from onnxquant.model import INT4_OPSET, opset_of
from onnxquant.passes.plan import QuantPlan, consumers, tensor_shapes
from onnxquant.quant import MAX_BITS, MIN_BITS, QParams, dequantize, qparams_from_range, qrange, quantize
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)

PER_CHANNEL_OPSET = 13


@dataclass
class QdqSummary:
    weights: Counter = field(default_factory=Counter)
    activations: Counter = field(default_factory=Counter)
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def container(bits: int, signed: bool, opset: int) -> int:
    """The ONNX element type that stores b-bit codes."""
    if bits == 4 and opset >= INT4_OPSET:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def _np_type(elem_type: int):
    return {TensorProto.INT4: ml_dtypes.int4, TensorProto.UINT4: ml_dtypes.uint4, TensorProto.INT8: np.int8,
            TensorProto.UINT8: np.uint8, TensorProto.INT32: np.int32}[elem_type]


def weight_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The output-channel axis of a compute node's weight."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return ndim - 1
    return 0


class _Builder:
    """Adds initializers and nodes to a graph under unique names."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.names = {t.name for t in self.graph.initializer} | {o for n in self.graph.node for o in n.output}
        self.names |= {i.name for i in self.graph.input}
        self.new_nodes: list[tuple[str | None, onnx.NodeProto]] = []

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, after: str | None, op: str, inputs: list[str], out_base: str, **attrs) -> str:
        out = self.unique(out_base)
        self.new_nodes.append((after, helper.make_node(op, inputs, [out], name=self.unique(f"{out_base}_node"),
                                                       **attrs)))
        return out

    def finish(self) -> None:
        """Place each new node right after the producer of its input, keeping the graph topologically sorted."""
        by_anchor: dict[str | None, list[onnx.NodeProto]] = {}
        for after, node in self.new_nodes:
            by_anchor.setdefault(after, []).append(node)
        ordered = list(by_anchor.get(None, []))
        for node in self.graph.node:
            ordered.append(node)
            for out in node.output:
                ordered.extend(by_anchor.get(out, []))
        produced_by_new = {o for _, n in self.new_nodes for o in n.output}
        graph_inputs = {i.name for i in self.graph.input}
        for after, nodes in by_anchor.items():
            if after is not None and after in graph_inputs and after not in produced_by_new:
                ordered[0:0] = nodes
        del self.graph.node[:]
        self.graph.node.extend(ordered)


def insert_qdq(model: onnx.ModelProto, plan: QuantPlan, table: CalibrationTable, *,
               bias_correction: str | None = None, bit_alloc: bool = False,
               input_means: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, QdqSummary]:
    """A copy of `model` with Q/DQ inserted; the float graph is never modified.

    `bias_correction` ("mean" or "full", ACIQ eq. 12–13) needs `input_means`, the per-channel means of each
    compute node's input; `bit_alloc` spreads each weight's width over its channels (ACIQ eq. 10–11).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = opset_of(out)
    if opset < PER_CHANNEL_OPSET:
        raise OnnxQuantError(f"model: opset {opset} is below {PER_CHANNEL_OPSET}, needed for per-channel Q/DQ; "
                             "upgrade the model first (api.convert does)")
    summary = QdqSummary()
    build = _Builder(out)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    users = consumers(out)
    skipped = {d.name for d in plan.nodes if not d.quantize and d.reason.startswith("skipped")}
    input_means = input_means or {}

    act_params: dict[str, QParams] = {}
    ranks = {name: len(shape.dim) for name, shape in tensor_shapes(out).items()}
    for tensor in sorted(plan.activations):
        entry = table.tensors.get(tensor)
        if entry is None:
            summary.notes.append(f"{tensor}: no calibration entry, left float")
            continue
        params = entry.qparams()
        dq = _insert_activation_qdq(build, tensor, params, ranks.get(tensor))
        act_params[tensor] = params
        summary.activations[int(np.max(params.bits))] += 1
        for node in users.get(tensor, []):
            if node.name not in skipped:
                _rewire(node, tensor, dq)

    quantized_weights: dict[tuple, tuple[str, QParams, np.ndarray | None]] = {}
    by_name = {n.name: n for n in graph.node}
    first_input = {n.name: n.input[0] for n in model.graph.node if n.input}
    for decision in plan.nodes:
        if not decision.quantize:
            if decision.reason:
                summary.float_nodes.append((decision.name, decision.op_type, decision.reason))
            continue
        if decision.weight is None:
            continue
        node = by_name[decision.name]
        x_name = first_input[node.name]
        spec = decision.weights
        w = numpy_helper.to_array(inits[decision.weight]).astype(np.float32)
        axis = weight_axis(node, w.ndim) if spec.granularity == "per_channel" else None
        key = (decision.weight, spec, axis)
        if key not in quantized_weights:
            params = weight_params(w, axis, spec, bit_alloc)
            offset = None
            if bias_correction and axis is not None and node.op_type in ("Conv", "Gemm"):
                params, offset = _corrected(w, params, axis, full=bias_correction == "full")
            quantized_weights[key] = (_insert_weight(build, decision.weight, w, params, opset), params, offset)
            summary.weights[spec.bits] += 1
        dq, w_params, offset = quantized_weights[key]
        _rewire(node, decision.weight, dq, only_index=1)
        bias = _float_bias(node, inits)
        if bias is None and len(node.input) > 2 and node.input[2]:
            continue
        shift = None if offset is None else _bias_shift(node, offset, input_means.get(x_name), w.shape)
        if offset is not None and shift is None:
            summary.notes.append(f"{node.name}: bias correction skipped (no per-channel mean of {x_name!r})")
        if shift is not None:
            bias = shift if bias is None else bias + shift
        x_params = act_params.get(x_name)
        if x_params is not None and x_params.axis is not None:
            x_params = None  # per-channel input scales: no single bias scale s_x·s_w, the bias stays float
        if bias is not None and (shift is not None or x_params is not None):
            _insert_bias(build, node, bias, x_params, w_params)
    build.finish()
    _drop_unused_initializers(out)
    return out, summary


def weight_params(w: np.ndarray, axis: int | None, spec, bit_alloc: bool = False) -> QParams:
    """Quantization parameters of a weight: per-channel range by `spec.method`, optionally bit-allocated."""
    from onnxquant.calib.bitalloc import allocate_bits
    from onnxquant.calib.weights import weight_range

    bits = spec.bits
    if bit_alloc and axis is not None:
        lo, hi = weight_range(w, axis, bits, spec.method, symmetric=spec.symmetric)
        bits = allocate_bits(np.maximum(-lo, hi), spec.bits, lo=MIN_BITS, hi=MAX_BITS)
    lo, hi = weight_range(w, axis, bits, spec.method, symmetric=spec.symmetric)
    return qparams_from_range(lo, hi, bits, spec.symmetric, axis)


def _corrected(w: np.ndarray, params: QParams, axis: int, full: bool) -> tuple[QParams, np.ndarray]:
    """Scale ξ_c folded into the channel scales, and the per-channel weight offset left for the bias."""
    from onnxquant.calib.weights import bias_correction

    w_deq = dequantize(quantize(w, params), params)
    shift, ratio = bias_correction(w, w_deq, axis, full)
    deq_mean = np.moveaxis(w_deq, axis, 0).reshape(w.shape[axis], -1).mean(axis=1)
    scaled = replace(params, scale=(params.scale * ratio).astype(np.float32))
    return scaled, (1.0 - ratio) * deq_mean + shift


def _bias_shift(node: onnx.NodeProto, offset: np.ndarray, x_mean: np.ndarray | None,
                w_shape: tuple[int, ...]) -> np.ndarray | None:
    """E[Σ over a receptive field of x] times each output channel's weight offset (padding ignored)."""
    if x_mean is None:
        return None
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if x_mean.size != w_shape[1] * group:
            return None
        per_group = x_mean.reshape(group, w_shape[1]).sum(axis=1) * int(np.prod(w_shape[2:]))
        return offset * np.repeat(per_group, w_shape[0] // group)
    trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
    if trans_a or x_mean.size != (w_shape[1] if weight_axis(node, 2) == 0 else w_shape[0]):
        return None
    return offset * x_mean.sum()


def _float_bias(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if len(node.input) > 2 and node.input[2] in inits:
        bias = numpy_helper.to_array(inits[node.input[2]])
        return bias.astype(np.float64) if bias.ndim == 1 else None
    return None


def _rewire(node: onnx.NodeProto, old: str, new: str, only_index: int | None = None) -> None:
    for i, name in enumerate(node.input):
        if name == old and (only_index is None or i == only_index):
            node.input[i] = new


def _insert_activation_qdq(build: _Builder, tensor: str, params: QParams, rank: int | None) -> str:
    """Q→DQ of an activation, per tensor or per channel (axis 1), in an 8-bit container; widths below 8 bits
    are clipped first to the codes' range (Clip per tensor; Min/Max with per-channel bounds per channel)."""
    elem = TensorProto.INT8 if params.signed else TensorProto.UINT8
    shape = () if params.axis is None else (-1,)
    scale = build.constant(f"{tensor}_scale", np.asarray(params.scale, np.float32).reshape(shape))
    zero = build.constant(f"{tensor}_zero_point", np.asarray(params.zero_point).reshape(shape).astype(_np_type(elem)))
    attrs = {} if params.axis is None else {"axis": params.axis}
    source = tensor
    if int(np.min(params.bits)) < 8:
        scale32 = np.asarray(params.scale, np.float32)
        lo = scale32 * (params.qmin - params.zero_point).astype(np.float32)
        hi = scale32 * (params.qmax - params.zero_point).astype(np.float32)
        if params.axis is None:
            source = build.node(tensor, "Clip", [tensor, build.constant(f"{tensor}_clip_min", lo),
                                                 build.constant(f"{tensor}_clip_max", hi)], f"{tensor}_clipped")
        else:
            if rank is None:
                raise OnnxQuantError(f"tensor {tensor}: rank unknown; per-channel activation quantization needs "
                                     "its shape (run shape inference on the model)")
            bounds = (-1,) + (1,) * (rank - 1 - params.axis)
            low = build.node(tensor, "Max", [tensor, build.constant(f"{tensor}_clip_min", lo.reshape(bounds))],
                             f"{tensor}_clipped_low")
            source = build.node(tensor, "Min", [low, build.constant(f"{tensor}_clip_max", hi.reshape(bounds))],
                                f"{tensor}_clipped")
    q = build.node(tensor, "QuantizeLinear", [source, scale, zero], f"{tensor}_quantized", **attrs)
    return build.node(tensor, "DequantizeLinear", [q, scale, zero], f"{tensor}_dequantized", **attrs)


def _insert_weight(build: _Builder, name: str, w: np.ndarray, params: QParams, opset: int) -> str:
    bits = int(np.max(params.bits))
    elem = container(bits, params.signed, opset)
    codes = quantize(w, params).astype(_np_type(elem))
    q = build.constant(f"{name}_quantized", codes)
    scale = build.constant(f"{name}_scale", np.asarray(params.scale, np.float32))
    zero = build.constant(f"{name}_zero_point", np.asarray(params.zero_point).astype(_np_type(elem)))
    attrs = {} if params.axis is None else {"axis": params.axis}
    return build.node(None, "DequantizeLinear", [q, scale, zero], f"{name}_dequantized", **attrs)


def _insert_bias(build: _Builder, node: onnx.NodeProto, bias: np.ndarray, x: QParams | None, w: QParams) -> None:
    """Bias as int32 codes with scale s_x·s_w per output channel (float when the input is not quantized)."""
    base = node.input[2] if len(node.input) > 2 and node.input[2] else f"{node.name}_bias"
    if x is None:
        name = build.constant(f"{base}_corrected", bias.astype(np.float32))
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
        name = build.node(None, "DequantizeLinear", [q, s, z], f"{base}_dequantized", axis=0)
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    dropped = {t.name for t in model.graph.initializer if t.name not in used}
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    inputs = [i for i in model.graph.input if i.name not in dropped]
    del model.graph.initializer[:], model.graph.input[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(inputs)

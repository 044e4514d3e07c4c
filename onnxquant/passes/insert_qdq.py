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

from onnxquant.errors import BadModelError, InternalError
from onnxquant.model import INT4_OPSET, opset_of
from onnxquant.passes.base import Graph, constant_value, input_at, stable_toposort
from onnxquant.passes.plan import QuantPlan
from onnxquant.quant import QParams, qrange, quantize
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)

PER_CHANNEL_OPSET = 13
K_MAX = 2**16  # largest equalization factor of a depthwise input channel (see passes/plan.py)


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
    skipped = {d.name for d in plan.nodes if not d.quantize and d.reason.startswith("skipped")}

    act_params: dict[str, QParams] = {}
    equalizers: dict[str, np.ndarray] = {}  # depthwise Conv -> k, its input's per-channel equalization
    for name in sorted(plan.activations):
        entry = table.tensors.get(name)
        if entry is None:
            summary.notes.append(f"{name}: no calibration entry, left float")
            continue
        tensor = tensors[name]
        readers = [n for n in tensor.outputs if id(n) in listed and n.name not in skipped]
        params = entry.qparams()
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
        entry = table.tensors.get(decision.weight)
        if entry is None or entry.kind != "weight":
            raise InternalError(
                f"weight {decision.weight!r} of node {decision.name!r} has no weight entry in "
                "the calibration table (calib.weight_table.weight_entries makes them)"
            )
        codes_params = entry.qparams()
        w_scale = codes_params.scale.astype(np.float32)
        if entry.spread_ratio is not None:
            w_scale = (w_scale * np.asarray(entry.spread_ratio)).astype(np.float32)
        if node.name in equalizers:  # the Conv reads x·k: dividing its weights' scales by k restores x
            w_scale = (w_scale / equalizers[node.name]).astype(np.float32)
        w_params = replace(codes_params, scale=w_scale)
        if decision.weight not in dequantized:
            elem = container(int(np.max(w_params.bits)), w_params.signed, opset)
            codes = _weight_codes(constant_value(node.inputs[1], readonly=True), codes_params, _np_type(elem))
            dequantized[decision.weight] = _insert_weight(build, decision.weight, codes, w_params, elem)
            summary.weights[round(float(np.mean(entry.bits)))] += 1  # the table's width (mean if per channel)
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
        if bias is not None and (shift is not None or x_params is not None):
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
        codes[tuple(part)] = quantize(w[tuple(part)], params)
    return codes


def _insert_weight(build: _Builder, name: str, codes: np.ndarray, params: QParams, elem: int) -> gs.Tensor:
    """Stored codes (of the ONNX type `elem`) → DequantizeLinear with `params`' scale and zero point."""
    q = build.constant(f"{name}_quantized", codes)
    scale = build.constant(f"{name}_scale", np.asarray(params.scale, np.float32))
    zero = build.constant(f"{name}_zero_point", np.asarray(params.zero_point).astype(_np_type(elem)))
    attrs = {} if params.axis is None else {"axis": params.axis}
    return build.node("DequantizeLinear", [q, scale, zero], f"{name}_dequantized", **attrs)


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

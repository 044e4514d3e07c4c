"""Empirical bias correction: measure the mean shift each quantized layer adds to its output, and remove it
through the layer's bias.

Quantizing a layer's weights (and its input) biases its output: with W the float weights, Ŵ the dequantized
ones and x̂ the fake-quantized input, E[Ŵ x̂ − W x] is in general not 0, and a per-channel error of the
mean passes through every following layer (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.2; its empirical variant, which measures the shift on data
instead of deriving it from batch-norm statistics; Banner et al., ACIQ, eq. 12–13 correct the weights' part
analytically). Here, per quantized Conv/ConvTranspose/Gemm L with its float input x taken from the float
model, the quantized layer L_q (the Q→DQ of its input and its dequantized weights and bias, exactly as the
Q/DQ model computes them) and output channel c (axis 1):

    shift_c = E[ L_q(x)_c − L(x)_c ]        over samples and every other position,

and the corrected float model has the bias b_c − shift_c. Every layer reads its *float* input, so the
shifts do not depend on each other and one pass over the data measures them all (NNCF's "fast bias
correction" does the same per layer). Re-inserting Q/DQ with the corrected float model and the same table
quantizes the new bias (int32, scale s_x·s_w), so the corrected layer's shift is left at the rounding of the
two biases: at most one bias step s_x·s_w.

The measurement runs one probe model: the float model plus, for each layer, a copy of the quantized node fed
by a copy of its input's Q/DQ chain applied to the float input, then `ReduceMean(Sub(y_q, y))` over every
axis but 1 and `Size` of the difference as small graph outputs. Batch means are combined weighted by their
element counts, a streaming mean whose memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxquant.calib.engine import stream_tensors
from onnxquant.calib.segments import DEFAULT_BUDGET
from onnxquant.errors import BadDataError, BadModelError
from onnxquant.model import opset_of

log = logging.getLogger(__name__)

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")
# what insert_qdq puts between a float activation and the node reading it (equalization Mul, sub-8-bit clip)
ACTIVATION_CHAIN = ("QuantizeLinear", "DequantizeLinear", "Clip", "Max", "Min", "Mul")
PREFIX = "bias_probe/"
REDUCE_AXES_AS_INPUT = 18  # ReduceMean takes its axes as an input from opset 18
MAX_CONSTANT_DEPTH = 8  # nodes between a weight and its initializers (insert_qdq: one DequantizeLinear)


@dataclass(frozen=True)
class _Probe:
    """One layer's graph outputs in the probe model: the batch's per-channel mean of y_q − y and the element
    count of y_q − y."""

    layer: str
    mean: str
    size: str


def measure_output_shift(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    progress: bool = False,
    budget: int = DEFAULT_BUDGET,
) -> dict[str, np.ndarray]:
    """Per quantized Conv/ConvTranspose/Gemm of `quant_model` (by node name): E[y_q − y] per output channel
    (float64), its float input taken from `float_model`, the model `quant_model` was made from. Layers whose
    input is not quantized or whose weight or bias is not constant are left out, as is MatMul (no bias).
    The probe model runs in segments of about `budget` bytes of tensors, as calibration does."""
    if opset_of(float_model) != opset_of(quant_model):
        raise BadModelError(
            f"float model: opset {opset_of(float_model)} differs from the quantized model's "
            f"{opset_of(quant_model)}; accepted: the float model the quantized model was made from"
        )
    probe, probes = _build_probe(float_model, quant_model)
    if not probes:
        log.info("bias correction: no quantized Conv/ConvTranspose/Gemm with a quantized input")
        return {}
    return _run_probe(probe, probes, batches, progress, budget)


def correct_biases(float_model: onnx.ModelProto, shifts: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `float_model` whose layers named in `shifts` have the bias b_c − shift_c (a bias −shift
    added where a layer has none), in the bias's dtype (the weight's for a new one)."""
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    names = _tensor_names(model)
    readers = _reader_counts(model)
    for name in sorted(shifts):
        node = nodes.get(name)
        if node is None or node.op_type not in CORRECTED_OPS:
            raise BadModelError(
                f"node {name!r}: not a Conv, ConvTranspose or Gemm of the float model; accepted: the "
                "layers measure_output_shift returns for this model"
            )
        shift = np.asarray(shifts[name], np.float64).ravel()
        _check_channels(node, inits, shift)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if bias_name:
            _shift_bias(model, node, inits, bias_name, shift, shared=readers[bias_name] > 1, names=names)
        else:
            _add_bias(model, node, inits, shift, names)
    return model


def _build_probe(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto
) -> tuple[onnx.ModelProto, list[_Probe]]:
    """The probe model (see the module docstring) and its `_Probe`s, one per measured layer."""
    builder = _ProbeBuilder(float_model, quant_model)
    float_nodes = {n.name: n for n in float_model.graph.node}
    probes = []
    for node in quant_model.graph.node:
        original = float_nodes.get(node.name)
        if node.op_type not in CORRECTED_OPS or original is None or original.op_type != node.op_type:
            continue
        probe = builder.add_layer(node, original)
        if probe is not None:
            probes.append(probe)
    return builder.finish(), probes


class _ProbeBuilder:
    """The float model with copies of quantized layers; a quantized model's tensor T is copied once, as
    PREFIX + T."""

    def __init__(self, float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(float_model)
        self.opset = opset_of(float_model)
        self.quant_inits = {t.name: t for t in quant_model.graph.initializer}
        self.producer = {o: n for n in quant_model.graph.node for o in n.output if o}
        self.copied: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.outputs: list[str] = []

    def add_layer(self, node: onnx.NodeProto, original: onnx.NodeProto) -> _Probe | None:
        """Copy the quantized `node` with its input chain on `original`'s float input; None (logged) when
        the layer cannot be measured."""
        x_chain = self._activation_chain(node.input[0], original.input[0])
        if x_chain is None:
            log.debug("bias correction: %s skipped (input not quantized)", node.name)
            return None
        side = [self._constant_chain(t, 0) for t in node.input[1:3] if t]
        if any(chain is None for chain in side):
            log.debug("bias correction: %s skipped (weight or bias not constant)", node.name)
            return None
        keep = {original.input[0]}
        for chain in [x_chain, *side, [node]]:
            self._copy(chain, keep)
        return self._difference(node.name, PREFIX + node.output[0], original.output[0])

    def finish(self) -> onnx.ModelProto:
        self.model.graph.node.extend(self.nodes)
        self.model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in self.outputs)
        return self.model

    def _activation_chain(self, tensor: str, float_input: str) -> list[onnx.NodeProto] | None:
        """The quantized model's nodes from `float_input` to `tensor` (first to last), all of them Q/DQ,
        clipping or equalization with constant side inputs; None unless they hold a QuantizeLinear."""
        chain = []
        while tensor != float_input:
            node = self.producer.get(tensor)
            if node is None or node.op_type not in ACTIVATION_CHAIN:
                return None
            if any(t and t not in self.quant_inits for t in node.input[1:]):
                return None
            chain.append(node)
            tensor = node.input[0]
        if not any(n.op_type == "QuantizeLinear" for n in chain):
            return None
        return chain[::-1]

    def _constant_chain(self, tensor: str, depth: int) -> list[onnx.NodeProto] | None:
        """The nodes computing `tensor` from initializers only (first to last); None if it reads anything
        else."""
        if tensor in self.quant_inits:
            return []
        node = self.producer.get(tensor)
        if node is None or depth >= MAX_CONSTANT_DEPTH:
            return None
        chain: list[onnx.NodeProto] = []
        for t in (t for t in node.input if t):
            inner = self._constant_chain(t, depth + 1)
            if inner is None:
                return None
            chain.extend(inner)
        return [*chain, node]

    def _copy(self, nodes: list[onnx.NodeProto], keep: set[str]) -> None:
        """Copies of `nodes` reading and writing PREFIX-ed names, except the float tensors in `keep`."""
        for node in nodes:
            if all(o in self.copied for o in node.output if o):
                continue
            for t in node.input:
                if t in self.quant_inits:
                    self._copy_initializer(t)
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = PREFIX + node.name
            copy.input[:] = [t if not t or t in keep else PREFIX + t for t in node.input]
            copy.output[:] = [PREFIX + t if t else t for t in node.output]
            self.copied.update(o for o in node.output if o)
            self.nodes.append(copy)

    def _copy_initializer(self, name: str) -> None:
        if name in self.copied:
            return
        tensor = onnx.TensorProto()
        tensor.CopyFrom(self.quant_inits[name])
        tensor.name = PREFIX + name
        self.model.graph.initializer.append(tensor)
        self.copied.add(name)

    def _difference(self, layer: str, y_q: str, y: str) -> _Probe:
        """Sub(y_q, y), reshaped to (N, C, positions) and averaged over axes 0 and 2, and its Size."""
        base = f"{PREFIX}{layer}/"
        shape = self._constant(base + "shape", np.array([0, 0, -1], np.int64))
        self._node("Sub", [y_q, y], base + "diff")
        self._node("Reshape", [base + "diff", shape], base + "rows")
        axes = np.array([0, 2], np.int64)
        if self.opset >= REDUCE_AXES_AS_INPUT:
            axes_input = self._constant(base + "axes", axes)
            self._node("ReduceMean", [base + "rows", axes_input], base + "mean", keepdims=0)
        else:
            self._node("ReduceMean", [base + "rows"], base + "mean", axes=axes.tolist(), keepdims=0)
        self._node("Size", [base + "diff"], base + "count")
        self._node(
            "Cast", [base + "count"], base + "size", to=onnx.TensorProto.DOUBLE
        )  # float: segments fetch
        self.outputs += [base + "mean", base + "size"]
        return _Probe(layer, base + "mean", base + "size")

    def _constant(self, name: str, value: np.ndarray) -> str:
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def _node(self, op: str, inputs: list[str], output: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output + "_node", **attrs))


def _run_probe(
    probe: onnx.ModelProto,
    probes: list[_Probe],
    batches: Iterable[Mapping[str, np.ndarray]],
    progress: bool,
    budget: int,
) -> dict[str, np.ndarray]:
    """Run `probe` in segments (calib/engine.py) on every batch and combine the batch means, weighted by their
    element counts; a layer's mean and count may come from different segments of one batch."""
    layer_of = {name: p.layer for p in probes for name in (p.mean, p.size)}
    is_mean = {p.mean for p in probes}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {p.layer: 0.0 for p in probes}
    pending: dict[str, dict[str, np.ndarray]] = {}

    def update(name: str, x: np.ndarray) -> None:
        parts = pending.setdefault(layer_of[name], {})
        parts["mean" if name in is_mean else "size"] = x
        if len(parts) == 2:
            layer, mean = layer_of[name], np.asarray(parts["mean"], np.float64)
            count = float(parts["size"]) / max(mean.size, 1)
            sums[layer] = sums.get(layer, 0.0) + mean * count
            counts[layer] += count
            del pending[layer]

    samples = stream_tensors(
        probe, list(layer_of), batches, update, label="bias correction", progress=progress, budget=budget
    )
    if samples == 0:
        raise BadDataError("bias correction: the calibration data is empty; accepted: at least one sample")
    return _finite_means(sums, counts)


def _finite_means(sums: Mapping[str, np.ndarray], counts: Mapping[str, float]) -> dict[str, np.ndarray]:
    """sums / counts per layer; a layer with an empty output or a non-finite mean is left out, with a
    warning."""
    shifts = {}
    for layer, total in sums.items():
        shift = total / counts[layer] if counts[layer] else None
        if shift is None or not np.all(np.isfinite(shift)):
            log.warning("bias correction: %s left uncorrected (empty or non-finite output difference)", layer)
            continue
        shifts[layer] = shift
    return shifts


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _reader_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Readers of each tensor, a graph output counting as one."""
    counts: dict[str, int] = {o.name: 1 for o in model.graph.output}
    for node in model.graph.node:
        for t in node.input:
            counts[t] = counts.get(t, 0) + 1
    return counts


def _out_channels(node: onnx.NodeProto, weight: np.ndarray) -> int:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * int(attrs.get("group", 1))
    return weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]


def _check_channels(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], shift: np.ndarray) -> None:
    """A shift of one value per output channel (checked when the weight is an initializer)."""
    weight = inits.get(node.input[1])
    if weight is None:
        return
    channels = _out_channels(node, numpy_helper.to_array(weight))
    if shift.size != channels:
        raise BadModelError(
            f"node {node.name!r}: bias shift of {shift.size} values for {channels} output channels; "
            "accepted: one value per output channel"
        )


def _weight_dtype(inits: Mapping[str, onnx.TensorProto], node: onnx.NodeProto) -> np.dtype:
    weight = inits.get(node.input[1])
    return numpy_helper.to_array(weight).dtype if weight is not None else np.dtype(np.float32)


def _unique(names: set[str], base: str) -> str:
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    names.add(name)
    return name


def _add_bias(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    shift: np.ndarray,
    names: set[str],
) -> None:
    """A new bias −shift (in the weight's dtype) as the node's third input."""
    name = _unique(names, f"{node.name}_bias")
    tensor = numpy_helper.from_array((-shift).astype(_weight_dtype(inits, node)), name)
    model.graph.initializer.append(tensor)
    inits[name] = tensor
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name


def _shift_bias(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    bias_name: str,
    shift: np.ndarray,
    *,
    shared: bool,
    names: set[str],
) -> None:
    """bias − shift, in place, or as a new initializer when the bias is shared or changes shape (a Gemm's
    scalar or (1, N) bias becomes (N,), which insert_qdq quantizes)."""
    old = inits.get(bias_name)
    if old is None:
        raise BadModelError(
            f"node {node.name!r}: bias {bias_name!r} is not an initializer; accepted: a constant bias"
        )
    bias = numpy_helper.to_array(old)
    try:
        new = bias.astype(np.float64) - shift
    except ValueError:
        raise BadModelError(
            f"node {node.name!r}: bias {bias_name!r} of shape {bias.shape} does not broadcast with "
            f"{shift.size} output channels; accepted: a bias of one value per output channel"
        ) from None
    if new.size == shift.size:
        new = new.reshape(shift.size)
    new = new.astype(bias.dtype)
    if shared or new.shape != bias.shape:
        name = _unique(names, f"{bias_name}_corrected")
        tensor = numpy_helper.from_array(new, name)
        model.graph.initializer.append(tensor)
        inits[name] = tensor
        node.input[2] = name
        return
    old.CopyFrom(numpy_helper.from_array(new, bias_name))

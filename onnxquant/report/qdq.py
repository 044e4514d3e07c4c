"""Matching a Q/DQ model to its float model, on the graph-surgeon IR (`onnxquant.ir`).

Quantized tensors are found from the Q/DQ pattern, not from names: an activation T is quantized as
`[Mul(k) →] [Clip →] QuantizeLinear → DequantizeLinear` (a Clip, or a Max → Min with per-channel bounds,
and the equalizer x·k of a depthwise input, count as part of the pattern when each node's only consumer is
the next and its output is not a tensor of the float model; an equalized tensor's values are divided by k
to compare);
with per-channel widths (`--bit-alloc activations`) the code statistics pool the channels at the widest
channel's range, so a narrower channel's saturation is not counted. A weight is an integer constant feeding a
DequantizeLinear, or integer indices into a float codebook decoded by `[DequantizeLinear →] Cast → Gather
[→ Mul]` (APoT / k-means weights, passes/insert_codebook.py; the indices are its codes). The float
reference of an activation is the tensor of the same name in the float model; of a weight, the float model's
input at the same position of the same-named node.

A *layer* is a node of the quantized model (outside the Q/DQ patterns) that consumes a dequantized tensor.
Its quantized inputs and weight are what isolated sensitivity quantizes alone (`sensitivity.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxquant.errors import BadModelError
from onnxquant.ir import constant, import_graph, producer
from onnxquant.model import graph_inputs
from onnxquant.passes.insert_codebook import Codebook, codebook_weights
from onnxquant.quant import expand_blocks, qrange

CONTAINER_BITS = {
    TensorProto.INT8: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.INT16: 16,
    TensorProto.UINT16: 16,
    TensorProto.INT32: 32,
}
SIGNED = {TensorProto.INT8, TensorProto.INT4, TensorProto.INT16, TensorProto.INT32}
FUSED_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True, eq=False)
class QTensor:
    """One quantized tensor of the Q/DQ model."""

    name: str  # float tensor name (float model)
    kind: str  # "activation", "weight" or "bias"
    dequantized: str  # DequantizeLinear output in the quantized model
    codes: str  # QuantizeLinear output (activation) or integer initializer (weight)
    bits: int  # nominal width
    signed: bool
    qmin: int
    qmax: int
    zero_point: int  # activations: the code of 0.0 (weights: 0)
    container_bits: int
    chain: tuple[str, ...]  # names of the pattern's nodes in the quantized model: DQ[, Q[, Clip]]
    matched: bool  # the float model has the reference tensor
    is_input: bool = False  # a graph input (matches any model with the same interface)
    gain: np.ndarray | None = None  # k of a depthwise input's equalizer x·k (per channel, axis 1)

    def restore(self, dequantized: np.ndarray) -> np.ndarray:
        """The dequantized values in the float tensor's units (undoing an equalizer's x·k)."""
        if self.gain is None:
            return dequantized
        return dequantized / self.gain.reshape((1, -1) + (1,) * (np.ndim(dequantized) - 2))


@dataclass(frozen=True)
class Layer:
    """A node of the quantized model that consumes dequantized tensors."""

    name: str
    op_type: str
    index: int
    output: str
    inputs: tuple[str, ...]  # float names of its quantized activation inputs
    weight: str | None  # float name of its quantized weight
    weight_bits: int | None
    act_bits: int | None
    owners: tuple[str, ...]  # the node, then the producers of its quantized inputs (override targets)
    matched: bool  # the float model has this node with the same op type and output
    measured: str = ""  # float tensor where its accumulated error is measured (see `analyze`)
    measured_quant: str = ""  # the quantized model's counterpart of `measured`
    label: str = ""  # the name shown to people (see `layer_label`)


@dataclass
class QdqGraph:
    """Quantized tensors (by DequantizeLinear output) and layers of a Q/DQ model, matched to a float model."""

    tensors: dict[str, QTensor] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    float_tensors: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    weight_gains: dict[str, np.ndarray] = field(default_factory=dict)  # equalized depthwise weight -> k
    codebooks: dict[str, Codebook] = field(default_factory=dict)  # by decoded output: codebook weights
    quant_graph: gs.Graph | None = field(default=None, repr=False, compare=False)
    float_graph: gs.Graph | None = field(default=None, repr=False, compare=False)

    @property
    def activations(self) -> list[QTensor]:
        return [t for t in self.tensors.values() if t.kind == "activation"]

    @property
    def weights(self) -> list[QTensor]:
        return [t for t in self.tensors.values() if t.kind == "weight"]

    @property
    def matched(self) -> bool:
        """Some tensor beyond the shared graph inputs, or some layer, matches the float model."""
        return any(t.matched and not t.is_input for t in self.activations) or any(
            la.matched for la in self.layers
        )

    @cached_property
    def _quant_map(self) -> dict[str, gs.Tensor]:
        return self.quant_graph.tensors()

    @cached_property
    def _float_map(self) -> dict[str, gs.Tensor]:
        return self.float_graph.tensors()

    def float_weight(self, qt: QTensor) -> np.ndarray | None:
        """The float model's constant value of weight `qt`, or None when it has none."""
        return constant(self._float_map.get(qt.name)) if qt.matched else None

    def dequantize_weight(self, qt: QTensor) -> tuple[np.ndarray, np.ndarray]:
        """(integer codes, dequantized values) of a weight stored as codes → DequantizeLinear, in the float
        weight's units (an equalized depthwise weight, stored as W/k, is multiplied back by k)."""
        if qt.dequantized in self.codebooks:
            codes, values = self.codebooks[qt.dequantized].decode()
            return codes, self._restore_gain(qt, values)
        dq = producer(self._quant_map[qt.dequantized])
        stored = constant(dq.inputs[0])
        fp8 = stored.dtype.name.startswith("float8")  # FP8 values are their own codes
        codes = stored.astype(np.float64) if fp8 else stored.astype(np.int64)
        scale = constant(dq.inputs[1]).astype(np.float32)
        zp = constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
        zp = np.zeros_like(scale, np.int64) if zp is None else zp.astype(np.int64)
        if dq.attrs.get("block_size", 0):  # block-wise scales: one per block along the axis
            axis, size = dq.attrs.get("axis", 1) % codes.ndim, dq.attrs["block_size"]
            scale = expand_blocks(scale, axis, size, codes.shape[axis])
            zp = expand_blocks(zp, axis, size, codes.shape[axis])
        elif scale.ndim == 1 and codes.ndim > 1:
            shape = [1] * codes.ndim
            shape[dq.attrs.get("axis", 1)] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        values = ((codes - zp) * scale).astype(np.float32)
        return codes, self._restore_gain(qt, values)

    def _restore_gain(self, qt: QTensor, values: np.ndarray) -> np.ndarray:
        gain = self.weight_gains.get(qt.dequantized)
        if gain is not None:  # the Conv reads x·k, so its weights are stored as W/k
            values = values * gain.reshape((-1,) + (1,) * (values.ndim - 1))
        return values

    def side_arrays(self, qt: QTensor) -> list[np.ndarray]:
        """What a weight stores beside its codes: scale and zero point, or codebook and channel factors."""
        if qt.dequantized in self.codebooks:
            return self.codebooks[qt.dequantized].side_arrays()
        dq = producer(self._quant_map[qt.dequantized])
        return [v for v in (constant(x) for x in dq.inputs[1:]) if v is not None]


def _elem_type(values: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(values.dtype)


def analyze(quant_model: onnx.ModelProto, float_model: onnx.ModelProto) -> QdqGraph:
    """Find the quantized tensors and layers of `quant_model` and match them to `float_model`."""
    qg, fg = import_graph(quant_model), import_graph(float_model)
    float_nodes = {n.name: n for n in fg.nodes}
    out = QdqGraph(float_tensors=set(fg.tensors()), quant_graph=qg, float_graph=fg)
    inputs = {t.name for t in qg.inputs}
    chain_nodes: set[str] = set()
    for cb in codebook_weights(qg):
        qt = _codebook_pattern(cb, out.float_tensors, float_nodes)
        out.tensors[qt.dequantized], out.codebooks[qt.dequantized] = qt, cb
        chain_nodes.update(qt.chain)
    for dq in qg.nodes:
        if dq.op != "DequantizeLinear" or dq.name in chain_nodes:
            continue
        qt = _pattern(dq, out.float_tensors, float_nodes, inputs)
        if qt is not None:
            out.tensors[dq.outputs[0].name] = qt
            chain_nodes.update(qt.chain)

    by_root = {t.name: t for t in out.tensors.values() if t.kind == "activation"}
    index = 0
    for node in qg.nodes:
        if node.name in chain_nodes:
            continue
        quantized = [out.tensors[x.name] for x in node.inputs if x.name in out.tensors]
        if not any(q.kind in ("activation", "weight") for q in quantized):
            continue
        acts = [q for q in quantized if q.kind == "activation"]
        weights = [q for q in quantized if q.kind == "weight"]
        gains = [q.gain for q in acts if q.gain is not None]
        if gains and weights and node.op == "Conv":
            out.weight_gains[weights[0].dequantized] = gains[0]
        owners = [node.name]
        for q in acts:  # producers set an input's width too (output Q/DQ), through a fused Relu/Clip
            p = producer(out._quant_map[q.name])
            if p is not None and p.op in FUSED_ACTIVATIONS and p.inputs and producer(p.inputs[0]) is not None:
                p = p.i()
            if p is not None and p.name not in chain_nodes:
                owners.append(p.name)
        fnode = float_nodes.get(node.name)
        matched = (
            fnode is not None
            and fnode.op == node.op
            and len(fnode.inputs) == len(node.inputs)
            and bool(node.outputs)
            and node.outputs[0].name in out.float_tensors
        )
        measured, measured_quant = _measure_point(node.outputs[0], by_root, chain_nodes)
        out.layers.append(
            Layer(
                name=node.name,
                op_type=node.op,
                index=index,
                output=node.outputs[0].name,
                inputs=tuple(dict.fromkeys(q.name for q in acts)),
                weight=weights[0].name if weights else None,
                weight_bits=max((q.bits for q in weights), default=None),
                act_bits=max((q.bits for q in acts), default=None),
                owners=tuple(dict.fromkeys(owners)),
                matched=matched,
                measured=measured,
                measured_quant=measured_quant,
                label=layer_label(node.name, node.op, node.outputs[0].name),
            )
        )
        index += 1
    if out.tensors and not out.matched:
        out.notes.append(
            "no quantized tensor or layer of the quantized model matches the float model by name: "
            "it was not derived from this float model; reporting model outputs only"
        )
    elif not out.tensors:
        out.notes.append(
            "the quantized model has no QuantizeLinear/DequantizeLinear pattern; reporting model outputs only"
        )
    return out


def layer_label(node: str, op_type: str, output: str) -> str:
    """The name a user knows a layer by: its node name, unless that name was made up by a tool (ours
    `Add_162`, onnx-ir's `node_Add_162`, `Add.162`) for an unnamed node; then its output tensor's name, which
    the exporter wrote (`/layer1/Add_output_0`), unless that is a bare number too."""
    invented = re.fullmatch(rf"(node_)?{re.escape(op_type)}[._]\d+(_\d+)*", node) is not None
    if invented and output and not output.isdigit():
        return output
    return node


def _measure_point(output: gs.Tensor, by_root: dict[str, QTensor], chain_nodes: set[str]) -> tuple[str, str]:
    """Where a layer's accumulated error is measured: its output, or, when that output is quantized (directly
    or after a sole Relu/Clip), the quantized tensor. Fetching a tensor inside a Q/DQ group that ONNX Runtime
    fuses into an integer kernel would stop the fusion and change what is measured."""
    t = by_root.get(output.name)
    after = [n for n in output.outputs if n.name not in chain_nodes]
    if t is None and len(after) == 1 and after[0].op in FUSED_ACTIVATIONS and after[0].outputs:
        t = by_root.get(after[0].outputs[0].name)
    if t is not None:
        return t.name, t.dequantized
    return output.name, output.name


def _pattern(
    dq: gs.Node, float_tensors: set[str], float_nodes: dict[str, gs.Node], inputs: set[str]
) -> QTensor | None:
    """The quantized tensor a DequantizeLinear ends, or None when it is not one of ours."""
    scale = constant(dq.inputs[1]) if len(dq.inputs) > 1 else None
    if scale is None:
        return None
    zp_init = constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
    src = dq.inputs[0]
    codes = constant(src)
    if codes is not None:  # weight (or int32 bias) stored as integer codes
        elem = _elem_type(codes)
        kind = "bias" if elem == TensorProto.INT32 else "weight"
        container = CONTAINER_BITS.get(elem, 8)
        signed = elem in SIGNED
        if elem in (TensorProto.INT4, TensorProto.UINT4) or kind == "bias":
            bits = container
        else:  # widths without an ONNX type live in an 8-bit container: infer from the codes used
            c = codes.astype(np.int64)
            if signed:  # symmetric codes ±(2^(b−1) − 1); −2^(b−1) may appear when asymmetric
                bits = max(abs(int(c.min(initial=0))) - 1, int(c.max(initial=0)), 1).bit_length() + 1
            else:
                bits = max(int(c.max(initial=1)), 1).bit_length()
            bits = min(bits, container)
        qmin, qmax = qrange(container, signed)
        name, matched = _weight_float_name(dq, src.name, float_nodes, float_tensors)
        return QTensor(
            name=name,
            kind=kind,
            dequantized=dq.outputs[0].name,
            codes=src.name,
            bits=bits,
            signed=signed,
            qmin=qmin,
            qmax=qmax,
            zero_point=0,
            container_bits=container,
            chain=(dq.name,),
            matched=matched,
        )
    q = producer(src)
    if q is None or q.op != "QuantizeLinear":
        return None
    elem = _elem_type(zp_init) if zp_init is not None else TensorProto.UINT8
    container = CONTAINER_BITS.get(elem, 8)
    signed = elem in SIGNED
    qmin, qmax = qrange(container, signed)
    bits = container
    zp_all = np.zeros(1, np.int64) if zp_init is None else zp_init.astype(np.int64).ravel()
    zp = int(np.median(zp_all))  # per channel: the typical one (a Relu output's are all 0)
    chain = [dq.name, q.name]
    root = q.inputs[0]
    clipped = _clip_of(root, float_tensors)
    if clipped is not None:
        lo, hi, nodes, clip_input = clipped
        s = np.asarray(scale, np.float64).ravel()
        if np.size(lo) in (1, s.size) and np.size(hi) in (1, s.size):
            root = clip_input
            codes_lo = np.round(np.ravel(lo) / s) + zp_all
            codes_hi = np.round(np.ravel(hi) / s) + zp_all
            qmin, qmax = int(codes_lo.min()), int(codes_hi.max())  # per channel: the widest channel's range
            widths = np.ceil(np.log2(np.maximum(codes_hi - codes_lo + 1, 2)))
            bits = max(1, round(float(widths.mean())))
            chain.extend(nodes)
    gain = None
    equalizer = _equalizer_of(root, float_tensors)
    if equalizer is not None:
        gain, mul, root = equalizer
        chain.append(mul)
    return QTensor(
        name=root.name,
        kind="activation",
        dequantized=dq.outputs[0].name,
        codes=q.outputs[0].name,
        bits=bits,
        signed=signed,
        qmin=qmin,
        qmax=qmax,
        zero_point=zp,
        container_bits=container,
        chain=tuple(chain),
        matched=root.name in float_tensors,
        is_input=root.name in inputs,
        gain=gain,
    )


def _codebook_pattern(cb: Codebook, float_tensors: set[str], float_nodes: dict[str, gs.Node]) -> QTensor:
    """The weight a codebook form decodes: its indices are the codes, `bits` those of the codebook's size."""
    levels = int(cb.codebook.size)
    name, matched = _weight_float_name(
        cb.nodes[0], cb.indices.name.removesuffix("_indices"), float_nodes, float_tensors
    )
    return QTensor(
        name=name,
        kind="weight",
        dequantized=cb.output.name,
        codes=cb.indices.name,
        bits=max(1, (levels - 1).bit_length()),
        signed=False,
        qmin=0,
        qmax=levels - 1,
        zero_point=0,
        container_bits=CONTAINER_BITS.get(_elem_type(constant(cb.indices)), 8),
        chain=tuple(n.name for n in cb.nodes),
        matched=matched,
    )


def _equalizer_of(tensor: gs.Tensor, float_tensors: set[str]):
    """(k, Mul name, x) when `tensor` is a depthwise input's equalizer `x·k` (a Mul by a per-channel constant,
    used only by the Q/DQ pattern and not a tensor of the float model)."""
    node = producer(tensor)
    if node is None or node.op != "Mul" or len(tensor.outputs) != 1 or tensor.name in float_tensors:
        return None
    k = constant(node.inputs[1])
    if k is None or k.ndim < 2 or k.size != k.shape[1]:
        return None
    return k.astype(np.float32).ravel(), node.name, node.inputs[0]


def _clip_of(tensor: gs.Tensor, float_tensors: set[str]):
    """(lo, hi, node names, clipped input) when `tensor` is our clip to the codes' range: a Clip, or a Min of
    a Max with per-channel bounds, each node used only by the next and not a tensor of the float model."""

    def private(t: gs.Tensor) -> bool:
        return len(t.outputs) == 1 and t.name not in float_tensors

    node = producer(tensor)
    if node is None or not private(tensor):
        return None
    if node.op == "Clip" and len(node.inputs) == 3:
        lo, hi = constant(node.inputs[1]), constant(node.inputs[2])
        return None if lo is None or hi is None else (lo, hi, [node.name], node.inputs[0])
    low = producer(node.inputs[0]) if node.op == "Min" and len(node.inputs) == 2 else None
    if low is None or low.op != "Max" or len(low.inputs) != 2 or not private(node.inputs[0]):
        return None
    lo, hi = constant(low.inputs[1]), constant(node.inputs[1])
    return None if lo is None or hi is None else (lo, hi, [node.name, low.name], low.inputs[0])


def _weight_float_name(
    dq: gs.Node, codes_name: str, float_nodes: dict[str, gs.Node], float_tensors: set[str]
) -> tuple[str, bool]:
    """The float weight a DequantizeLinear of constant codes (or a codebook's last node) stands for: same
    node, same input position."""
    deq = dq.outputs[0]
    for node in deq.outputs:
        fnode = float_nodes.get(node.name)
        if fnode is None or fnode.op != node.op or len(fnode.inputs) != len(node.inputs):
            continue
        for x, fx in zip(node.inputs, fnode.inputs):
            if x is deq and fx.name in float_tensors:
                return fx.name, True
    return codes_name.removesuffix("_quantized"), False


def check_compatible(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    """Both models must take the same inputs and give the same outputs (names, element types, ranks)."""

    def sig(vis) -> dict[str, tuple]:
        out = {}
        for vi in vis:
            tt = vi.type.tensor_type
            dims = (
                tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                if tt.HasField("shape")
                else None
            )
            out[vi.name] = (tt.elem_type, dims)
        return out

    _refuse_quantized_reference(float_model, quant_model)
    for what, f, q in (
        ("inputs", sig(graph_inputs(float_model)), sig(graph_inputs(quant_model))),
        ("outputs", sig(float_model.graph.output), sig(quant_model.graph.output)),
    ):
        if set(f) != set(q):
            raise BadModelError(
                f"quantized model: {what} {sorted(q)} differ from the float model's {sorted(f)}; "
                "accepted: a quantized model converted from the float one"
            )
        for name in f:
            (fe, fd), (qe, qd) = f[name], q[name]
            if fe != qe or (
                fd is not None
                and qd is not None
                and (
                    len(fd) != len(qd)
                    or any(a is not None and b is not None and a != b for a, b in zip(fd, qd))
                )
            ):
                raise BadModelError(
                    f"quantized model: {what[:-1]} {name!r} is {_describe(qe, qd)} but {_describe(fe, fd)} "
                    "in the float model; accepted: a quantized model converted from the float one"
                )


def _refuse_quantized_reference(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    """The reference must be a float model: one holding Q/DQ nodes was quantized already, and the usual cause
    is the two models given in the wrong order."""
    qdq = ("QuantizeLinear", "DequantizeLinear")
    found = next((n for n in float_model.graph.node if n.op_type in qdq), None)
    if found is None:
        return
    swapped = not any(n.op_type in qdq for n in quant_model.graph.node)
    raise BadModelError(
        f"float model: holds {found.op_type} node {found.name or found.op_type!r}, so it is already quantized"
        + ("; the two models look swapped" if swapped else "")
        + "; accepted: the float model first, then the quantized (Q/DQ) model"
    )


def _describe(elem: int, dims) -> str:
    shape = "?" if dims is None else "[" + ",".join("N" if d is None else str(d) for d in dims) + "]"
    return f"{TensorProto.DataType.Name(elem).lower()} {shape}"

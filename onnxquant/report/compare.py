"""Matching a Q/DQ model to its float model, and the streaming (accumulated) comparison of the two.

Quantized tensors are found from the Q/DQ pattern, not from names: an activation T is quantized as
`[Clip →] QuantizeLinear → DequantizeLinear` (a Clip, or a Max → Min with per-channel bounds, counts as part of
the pattern when each node's only consumer is the next and its output is not a tensor of the float model); with
per-channel widths (`--bit-alloc activations`) the code statistics pool the channels at the widest channel's
range, so a narrower channel's saturation is not counted. A weight is an integer initializer
feeding a DequantizeLinear. The float reference of an activation is the tensor of the same name in the float
model; of a weight, the float model's input at the same position of the same-named node.

A *layer* is a node of the quantized model (outside the Q/DQ patterns) that consumes a dequantized tensor.
Its quantized inputs and weight are what isolated sensitivity quantizes alone (`sensitivity.py`).

Accumulated comparison (whole model quantized): both models run on every batch; per quantized activation T
the float T is compared with the quantized model's DequantizeLinear output, per layer the float and
quantized values of its output tensor (or of the quantized tensor it feeds, see `_measure_point`), per model
output the two outputs. Only running sums are kept
(`metrics.ErrorAccumulator`), so memory is one batch of activations whatever the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxquant.calib.engine import progress_iter
from onnxquant.errors import BadDataError, BadModelError
from onnxquant.model import graph_inputs, with_outputs
from onnxquant.quant import qrange
from onnxquant.report.metrics import (
    ClassAgreement,
    CodeHistogram,
    ErrorAccumulator,
    is_classifier_output,
)

log = logging.getLogger(__name__)

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


@dataclass
class QdqGraph:
    """Quantized tensors (by DequantizeLinear output) and layers of a Q/DQ model, matched to a float model."""

    tensors: dict[str, QTensor] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    float_tensors: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

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


def tensor_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return (
        {o for n in g.node for o in n.output if o}
        | {i.name for i in g.input}
        | {t.name for t in g.initializer}
    )


def _const(inits: Mapping[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


def analyze(quant_model: onnx.ModelProto, float_model: onnx.ModelProto) -> QdqGraph:
    """Find the quantized tensors and layers of `quant_model` and match them to `float_model`."""
    g = quant_model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                users.setdefault(i, []).append(n)
    float_names = tensor_names(float_model)
    float_nodes = {n.name: n for n in float_model.graph.node}
    out = QdqGraph(float_tensors=float_names)
    chain_nodes: set[str] = set()

    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        qt = _pattern(dq, inits, producer, users, float_names, quant_model, float_nodes)
        if qt is not None:
            out.tensors[dq.output[0]] = qt
            chain_nodes.update(qt.chain)

    by_root = {t.name: t for t in out.tensors.values() if t.kind == "activation"}
    index = 0
    for node in g.node:
        if node.name in chain_nodes:
            continue
        quantized = [(i, out.tensors[x]) for i, x in enumerate(node.input) if x in out.tensors]
        if not any(q.kind in ("activation", "weight") for _, q in quantized):
            continue
        acts = [q for _, q in quantized if q.kind == "activation"]
        weights = [q for _, q in quantized if q.kind == "weight"]
        owners = [node.name]
        for q in acts:  # producers set an input's width too (output Q/DQ), through a fused Relu/Clip
            p = producer.get(q.name)
            if p is not None and p.op_type in FUSED_ACTIVATIONS and p.input and p.input[0] in producer:
                p = producer[p.input[0]]
            if p is not None and p.name not in chain_nodes:
                owners.append(p.name)
        fnode = float_nodes.get(node.name)
        matched = (
            fnode is not None
            and fnode.op_type == node.op_type
            and len(fnode.input) == len(node.input)
            and bool(node.output)
            and node.output[0] in float_names
        )
        measured, measured_quant = _measure_point(node.output[0], users, by_root, chain_nodes)
        out.layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                index=index,
                output=node.output[0],
                inputs=tuple(dict.fromkeys(q.name for q in acts)),
                weight=weights[0].name if weights else None,
                weight_bits=max((q.bits for q in weights), default=None),
                act_bits=max((q.bits for q in acts), default=None),
                owners=tuple(dict.fromkeys(owners)),
                matched=matched,
                measured=measured,
                measured_quant=measured_quant,
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


def _measure_point(
    output: str, users, by_root: Mapping[str, QTensor], chain_nodes: set[str]
) -> tuple[str, str]:
    """Where a layer's accumulated error is measured: its output, or, when that output is quantized (directly
    or after a sole Relu/Clip), the quantized tensor. Fetching a tensor inside a Q/DQ group that ONNX Runtime
    fuses into an integer kernel would stop the fusion and change what is measured."""
    t = by_root.get(output)
    after = [n for n in users.get(output, []) if n.name not in chain_nodes]
    if t is None and len(after) == 1 and after[0].op_type in FUSED_ACTIVATIONS and after[0].output:
        t = by_root.get(after[0].output[0])
    if t is not None:
        return t.name, t.dequantized
    return output, output


def _pattern(
    dq: onnx.NodeProto,
    inits,
    producer,
    users,
    float_names: set[str],
    quant_model: onnx.ModelProto,
    float_nodes: Mapping[str, onnx.NodeProto],
) -> QTensor | None:
    """The quantized tensor a DequantizeLinear ends, or None when it is not one of ours."""
    scale = _const(inits, dq.input[1]) if len(dq.input) > 1 else None
    if scale is None:
        return None
    zp_init = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    src = dq.input[0]
    if src in inits:  # weight (or int32 bias) stored as integer codes
        codes_t = inits[src]
        elem = codes_t.data_type
        codes = numpy_helper.to_array(codes_t)
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
        name, matched = _weight_float_name(dq, src, users, float_nodes, float_names)
        return QTensor(
            name=name,
            kind=kind,
            dequantized=dq.output[0],
            codes=src,
            bits=bits,
            signed=signed,
            qmin=qmin,
            qmax=qmax,
            zero_point=0,
            container_bits=container,
            chain=(dq.name,),
            matched=matched,
        )
    q = producer.get(src)
    if q is None or q.op_type != "QuantizeLinear":
        return None
    elem = zp_init.data_type if zp_init is not None else TensorProto.UINT8
    container = CONTAINER_BITS.get(elem, 8)
    signed = elem in SIGNED
    qmin, qmax = qrange(container, signed)
    bits = container
    zp_all = np.zeros(1, np.int64) if zp_init is None else numpy_helper.to_array(zp_init).astype(np.int64).ravel()
    zp = int(np.median(zp_all))  # per channel: the typical one (a Relu output's are all 0)
    chain = [dq.name, q.name]
    root = q.input[0]
    clipped = _clip_of(root, producer, users, inits, float_names)
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
    return QTensor(
        name=root,
        kind="activation",
        dequantized=dq.output[0],
        codes=q.output[0],
        bits=bits,
        signed=signed,
        qmin=qmin,
        qmax=qmax,
        zero_point=zp,
        container_bits=container,
        chain=tuple(chain),
        matched=root in float_names,
        is_input=root in {i.name for i in quant_model.graph.input},
    )


def _clip_of(tensor: str, producer, users, inits, float_names: set[str]):
    """(lo, hi, node names, clipped input) when `tensor` is our clip to the codes' range: a Clip, or a Min of a
    Max with per-channel bounds, each node used only by the next and not a tensor of the float model."""

    def private(name: str) -> bool:
        return len(users.get(name, [])) == 1 and name not in float_names

    node = producer.get(tensor)
    if node is None or not private(tensor):
        return None
    if node.op_type == "Clip" and len(node.input) == 3:
        lo, hi = _const(inits, node.input[1]), _const(inits, node.input[2])
        return None if lo is None or hi is None else (lo, hi, [node.name], node.input[0])
    low = producer.get(node.input[0]) if node.op_type == "Min" and len(node.input) == 2 else None
    if low is None or low.op_type != "Max" or len(low.input) != 2 or not private(node.input[0]):
        return None
    lo, hi = _const(inits, low.input[1]), _const(inits, node.input[1])
    return None if lo is None or hi is None else (lo, hi, [node.name, low.name], low.input[0])


def _weight_float_name(dq, codes_name: str, users, float_nodes, float_names) -> tuple[str, bool]:
    """The float weight a DequantizeLinear of constant codes stands for: same node, same input position."""
    for node in users.get(dq.output[0], []):
        fnode = float_nodes.get(node.name)
        if fnode is None or fnode.op_type != node.op_type or len(fnode.input) != len(node.input):
            continue
        for i, x in enumerate(node.input):
            if x == dq.output[0] and fnode.input[i] in float_names:
                return fnode.input[i], True
    base = codes_name.removesuffix("_quantized")
    return base, False


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
                    "in the "
                    "float model; accepted: a quantized model converted from the float one"
                )


def _describe(elem: int, dims) -> str:
    shape = "?" if dims is None else "[" + ",".join("N" if d is None else str(d) for d in dims) + "]"
    return f"{TensorProto.DataType.Name(elem).lower()} {shape}"


def session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session whose idle threads sleep instead of spinning: between runs the report does
    numpy work on the same cores, which spinning threads would slow down."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types; the message says what
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BadModelError(f"ONNX Runtime cannot load the model ({first})") from exc


@dataclass
class Accumulated:
    """Running sums of the accumulated comparison, plus the cached subset for sensitivity."""

    samples: int = 0
    outputs: dict[str, ErrorAccumulator] = field(default_factory=dict)
    agreement: dict[str, ClassAgreement] = field(default_factory=dict)
    tensors: dict[str, ErrorAccumulator] = field(default_factory=dict)  # by DQ output name
    codes: dict[str, CodeHistogram] = field(default_factory=dict)  # by DQ output name
    layers: dict[str, ErrorAccumulator] = field(default_factory=dict)  # by layer name
    subset: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)


def accumulate(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    graph: QdqGraph,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    labels: np.ndarray | None = None,
    subset: int = 0,
    progress: bool = False,
) -> Accumulated:
    """Run both models over `data` batch by batch and accumulate the comparison (see the module docstring).

    The first `subset` samples' feeds and float outputs are kept for the isolated sensitivity runs.
    """
    inputs = [i.name for i in graph_inputs(float_model)]
    outputs = [o.name for o in float_model.graph.output]
    acts = [t for t in graph.activations if t.matched] if graph.matched else []
    layers = [la for la in graph.layers if la.matched] if graph.matched else []
    f_fetch = list(
        dict.fromkeys(
            [
                *outputs,
                *(t.name for t in acts if t.name not in inputs),
                *(la.measured for la in layers if la.measured not in inputs),
            ]
        )
    )
    q_fetch = list(
        dict.fromkeys(
            [
                *outputs,
                *(t.dequantized for t in graph.activations),
                *(t.codes for t in graph.activations),
                *(la.measured_quant for la in layers),
            ]
        )
    )
    f_sess = session(with_outputs(float_model, f_fetch))
    q_sess = session(with_outputs(quant_model, q_fetch))
    acc = Accumulated()
    acc.outputs = {o: ErrorAccumulator() for o in outputs}
    acc.tensors = {t.dequantized: ErrorAccumulator() for t in acts}
    acc.codes = {t.dequantized: CodeHistogram(t.signed, t.container_bits) for t in graph.activations}
    by_dq = {t.dequantized: acc.tensors[t.dequantized] for t in acts}
    acc.layers = {la.name: by_dq.get(la.measured_quant) or ErrorAccumulator() for la in layers}
    own = [la for la in layers if la.measured_quant not in by_dq]  # the others share a tensor's accumulator
    kept = 0

    def run(batch):
        missing = [i for i in inputs if i not in batch]
        if missing:
            raise BadDataError(
                f"data batch lacks model input(s) {', '.join(missing)}; accepted: batches with keys "
                f"{', '.join(inputs)}"
            )
        feed = {i: np.asarray(batch[i]) for i in inputs}
        f = dict(zip(f_fetch, f_sess.run(f_fetch, feed)))
        f.update(feed)
        return feed, f, dict(zip(q_fetch, q_sess.run(q_fetch, feed)))

    for feed, f, q in map(run, progress_iter(data, progress, "report: float vs quantized")):
        n = int(feed[inputs[0]].shape[0]) if inputs and feed[inputs[0]].ndim else 1
        batch_labels = None
        if labels is not None:
            if acc.samples + n > len(labels):
                raise BadDataError(
                    f"labels: {len(labels)} labels but the data has more samples; accepted: one "
                    "label per sample"
                )
            batch_labels = labels[acc.samples : acc.samples + n]
        for o in outputs:
            acc.outputs[o].update(f[o], q[o])
            if is_classifier_output(np.shape(f[o])):
                acc.agreement.setdefault(o, ClassAgreement()).update(f[o], q[o], batch_labels)
        for t in acts:
            acc.tensors[t.dequantized].update(f[t.name], q[t.dequantized])
        for t in graph.activations:
            acc.codes[t.dequantized].update(q[t.codes])
        for la in own:
            acc.layers[la.name].update(f[la.measured], q[la.measured_quant])
        if kept < subset:
            take = min(n, subset - kept)
            acc.subset.append(
                ({i: v[:take] for i, v in feed.items()}, {o: np.array(f[o][:take]) for o in outputs})
            )
            kept += take
        acc.samples += n
        del f, q
    if acc.samples == 0:
        raise BadDataError("report data is empty; accepted: at least one sample")
    if labels is not None and len(labels) != acc.samples:
        raise BadDataError(
            f"labels: {len(labels)} labels for {acc.samples} samples; accepted: one label per sample"
        )
    return acc

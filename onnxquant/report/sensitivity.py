"""Isolated sensitivity: quantize one layer alone and measure what it costs.

For a layer L (see `qdq.Layer`) the isolated model is the float model with only L's Q/DQ patterns copied
in from the quantized model: L's activation inputs go through their `[Clip →] QuantizeLinear →
DequantizeLinear`, its weight (and bias) come from their integer codes, everything else stays float. A copy of
L on the float inputs is added beside it, so one run gives three errors:

- at L's quantized inputs: the quantization error of each input tensor alone (isolated, per tensor);
- at L's output, against the float copy: the error L's quantization introduces ("where error enters");
- at the model outputs, against the float model: L's sensitivity (output SQNR with only L quantized).

Cost: one inference of the whole model per layer over the first `samples` samples of the data (their feeds
and float outputs are cached by the accumulated pass).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxquant.errors import BadModelError
from onnxquant.model import graph_inputs, make_session, opset_of
from onnxquant.progress import progress_iter
from onnxquant.report.metrics import ErrorAccumulator, Metrics
from onnxquant.report.qdq import Layer, QdqGraph

log = logging.getLogger(__name__)

PREFIX = "onnxquant_iso__"
REF_PREFIX = "onnxquant_iso_ref__"


@dataclass
class Isolated:
    """Isolated errors of one layer."""

    layer: str
    outputs: dict[str, Metrics] = field(default_factory=dict)  # model output -> metrics
    local: Metrics | None = None  # at the layer's own output
    inputs: dict[str, Metrics] = field(default_factory=dict)  # float input tensor -> its own Q/DQ error

    @property
    def sqnr_db(self) -> float:
        """The layer's sensitivity: the lowest output SQNR with only this layer quantized."""
        return min((m.sqnr_db for m in self.outputs.values()), default=float("nan"))


@dataclass
class IsolatedModel:
    model: onnx.ModelProto
    output: str  # the layer's output in the isolated model
    reference: str  # the float copy's output
    inputs: dict[str, str]  # float input tensor -> its dequantized counterpart in the isolated model


def isolated_model(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto, graph: QdqGraph, layer: Layer
) -> IsolatedModel | None:
    """The float model with only `layer`'s Q/DQ patterns inserted; None when the models differ there."""
    fnode = next((n for n in float_model.graph.node if n.name == layer.name), None)
    qnode = next((n for n in quant_model.graph.node if n.name == layer.name), None)
    if fnode is None or qnode is None or not layer.matched:
        return None
    q_nodes = {n.name: n for n in quant_model.graph.node}
    q_inits = {t.name: t for t in quant_model.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    g = model.graph
    taken = (
        {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    )

    def fresh(name: str, prefix: str = PREFIX) -> str:
        new, i = prefix + name, 1
        while new in taken:
            new, i = f"{prefix}{name}_{i}", i + 1
        taken.add(new)
        return new

    inserted: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    dq_inputs: dict[str, str] = {}
    new_inputs = list(fnode.input)
    for i, x in enumerate(qnode.input):
        qt = graph.tensors.get(x)
        if qt is None:
            continue
        if qt.kind == "activation" and fnode.input[i] != qt.name:
            return None
        chain = [q_nodes[name] for name in reversed(qt.chain)]  # Clip, Q, DQ in graph order
        for node in chain:
            if any(o in rename for o in node.output):  # shared pattern already copied (input used twice)
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = fresh(node.name)
            for j, inp in enumerate(node.input):
                if inp in rename:
                    copy.input[j] = rename[inp]
                elif inp in q_inits:
                    rename[inp] = fresh(inp)
                    t = onnx.TensorProto()
                    t.CopyFrom(q_inits[inp])
                    t.name = rename[inp]
                    g.initializer.append(t)
                    copy.input[j] = rename[inp]
            for j, out in enumerate(node.output):
                rename[out] = fresh(out)
                copy.output[j] = rename[out]
            inserted.append(copy)
        new_inputs[i] = rename[x]
        if qt.kind == "activation":
            dq_inputs[qt.name] = rename[x]

    ref = onnx.NodeProto()
    ref.CopyFrom(fnode)
    ref.name = fresh(fnode.name, REF_PREFIX)
    for j, out in enumerate(fnode.output):
        if out:
            ref.output[j] = fresh(out, REF_PREFIX)
    target = next(n for n in g.node if n.name == layer.name)
    for i, x in enumerate(new_inputs):
        target.input[i] = x
    nodes = list(g.node)
    at = nodes.index(target)
    nodes[at : at + 1] = [*inserted, target, ref]
    del g.node[:]
    g.node.extend(nodes)

    _align_opset(model, quant_model)
    real_inputs = {i.name for i in graph_inputs(model)}
    extra = [
        target.output[0],
        ref.output[0],
        *dq_inputs.values(),
        *(t for t in dq_inputs if t not in real_inputs),
    ]
    present = {o.name for o in g.output}
    for name in extra:
        if name not in present:
            g.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return IsolatedModel(model=model, output=target.output[0], reference=ref.output[0], inputs=dq_inputs)


def _align_opset(model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    """Q/DQ copied from the quantized model may need its (newer) opset, e.g. 21 for INT4 codes."""
    target = opset_of(quant_model)
    if opset_of(model) < target:
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = target
    model.ir_version = max(model.ir_version, quant_model.ir_version)


def run_isolated(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    graph: QdqGraph,
    subset: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    *,
    progress: bool = False,
) -> tuple[dict[str, Isolated], list[str]]:
    """Isolated errors of every matched layer on the cached `subset` of (feed, float outputs) batches."""
    results: dict[str, Isolated] = {}
    notes: list[str] = []
    if not subset:
        return results, notes
    outputs = [o.name for o in float_model.graph.output]
    skipped = []
    for layer in progress_iter(list(graph.layers), progress, "report: isolated sensitivity"):
        iso = isolated_model(float_model, quant_model, graph, layer)
        if iso is None:
            skipped.append(layer.name)
            continue
        fetch = list(dict.fromkeys([*outputs, iso.output, iso.reference, *iso.inputs.values(), *iso.inputs]))
        try:
            sess = make_session(iso.model)
        except BadModelError as exc:  # an isolated graph ORT refuses: report it, keep the rest of the report
            log.warning("layer %s: isolated model does not run (%s)", layer.name, exc)
            skipped.append(layer.name)
            continue
        out_acc = {o: ErrorAccumulator() for o in outputs}
        local = ErrorAccumulator()
        in_acc = {t: ErrorAccumulator() for t in iso.inputs}
        gains = {t.name: t for t in graph.activations if t.name in iso.inputs}
        for feed, ref_outputs in subset:
            fetch_now = [n for n in fetch if n not in feed]
            got = dict(zip(fetch_now, sess.run(fetch_now, dict(feed))))
            got.update(feed)
            for o in outputs:
                out_acc[o].update(ref_outputs[o], got[o])
            local.update(got[iso.reference], got[iso.output])
            for t, dq in iso.inputs.items():
                in_acc[t].update(got[t], gains[t].restore(got[dq]))
        results[layer.name] = Isolated(
            layer=layer.name,
            outputs={o: a.result() for o, a in out_acc.items()},
            local=local.result(),
            inputs={t: a.result() for t, a in in_acc.items()},
        )
    if skipped:
        notes.append(
            f"isolated sensitivity skipped for {len(skipped)} layer(s) not found alike in the float "
            f"model (e.g. {skipped[0]!r}); fold the float model with the same rules to compare them"
        )
    return results, notes

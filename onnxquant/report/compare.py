"""The streaming (accumulated) comparison of a Q/DQ model with its float model.

Whole model quantized: both models run on every batch; per quantized activation T (see `qdq.analyze`) the
float T is compared with the quantized model's DequantizeLinear output, per layer the float and quantized
values of its output tensor (or of the quantized tensor it feeds, see `qdq._measure_point`), per model output
the two outputs. Only running sums are kept (`metrics.ErrorAccumulator`), so memory is one batch of
activations whatever the number of samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxquant.calib.segments import DEFAULT_BUDGET, Job, SegmentedModel, model_inputs, run_paired
from onnxquant.errors import BadDataError
from onnxquant.model import graph_inputs
from onnxquant.progress import progress_iter
from onnxquant.report.metrics import ClassAgreement, CodeHistogram, ErrorAccumulator, is_classifier_output
from onnxquant.report.qdq import QdqGraph


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
    budget: int = DEFAULT_BUDGET,
) -> Accumulated:
    """Run both models over `data` batch by batch and accumulate the comparison (see the module docstring).

    The first `subset` samples' feeds and float outputs are kept for the isolated sensitivity runs. Both
    models run in segments of about `budget` bytes of compared tensors (`calib.segments.run_paired`).
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
    acc = Accumulated()
    acc.outputs = {o: ErrorAccumulator() for o in outputs}
    acc.tensors = {t.dequantized: ErrorAccumulator() for t in acts}
    acc.codes = {t.dequantized: CodeHistogram(t.signed, t.container_bits) for t in graph.activations}
    by_dq = {t.dequantized: acc.tensors[t.dequantized] for t in acts}
    acc.layers = {la.name: by_dq.get(la.measured_quant) or ErrorAccumulator() for la in layers}
    own = [la for la in layers if la.measured_quant not in by_dq]  # the others share a tensor's accumulator
    segmented: list[SegmentedModel | None] = []
    batch_labels = None
    kept_outputs: dict[str, np.ndarray] = {}

    def compare_output(name: str):
        def call(f, q):
            acc.outputs[name].update(f[name], q[name])
            if is_classifier_output(np.shape(f[name])):
                acc.agreement.setdefault(name, ClassAgreement()).update(f[name], q[name], batch_labels)
            kept_outputs[name] = f[name]

        return Job((name,), (name,), call)

    jobs = [compare_output(o) for o in outputs]
    jobs += [_pair(t.name, t.dequantized, acc.tensors[t.dequantized], t.restore) for t in acts]
    jobs += [Job((), (t.codes,), _codes(acc.codes[t.dequantized], t.codes)) for t in graph.activations]
    jobs += [_pair(la.measured, la.measured_quant, acc.layers[la.name]) for la in own]
    kept = 0
    for batch in progress_iter(data, progress, "report: float vs quantized"):
        feed = model_inputs(batch, inputs, "data batch")
        n = int(feed[inputs[0]].shape[0]) if inputs and feed[inputs[0]].ndim else 1
        batch_labels = None
        if labels is not None:
            if acc.samples + n > len(labels):
                raise BadDataError(
                    f"labels: {len(labels)} labels but the data has more samples; accepted: one "
                    "label per sample"
                )
            batch_labels = labels[acc.samples : acc.samples + n]
        if not segmented:
            segmented = [
                _segments(m, fetch, feed, budget)
                for m, fetch in ((float_model, f_fetch), (quant_model, q_fetch))
            ]
        run_paired(*segmented, feed, jobs)
        if kept < subset:
            take = min(n, subset - kept)
            if any(np.ndim(kept_outputs[o]) == 0 or len(kept_outputs[o]) != n for o in outputs):
                take = n  # an output whose axis 0 is not the batch (sequence first) is not cut per sample
            acc.subset.append(
                (
                    {i: v[:take] for i, v in feed.items()},
                    {o: np.array(kept_outputs[o][:take] if take < n else kept_outputs[o]) for o in outputs},
                )
            )
            kept += take
        kept_outputs.clear()
        acc.samples += n
    if acc.samples == 0:
        raise BadDataError("report data is empty; accepted: at least one sample")
    if labels is not None and len(labels) != acc.samples:
        raise BadDataError(
            f"labels: {len(labels)} labels for {acc.samples} samples; accepted: one label per sample"
        )
    return acc


def _segments(
    model: onnx.ModelProto, fetch: list[str], feed: Mapping[str, np.ndarray], budget: int
) -> SegmentedModel | None:
    produced = [n for n in fetch if n not in feed]
    return SegmentedModel(model, produced, feed, budget) if produced else None


def _pair(float_name: str, quant_name: str, into: ErrorAccumulator, restore=None) -> Job:
    def call(f, q):
        into.update(f[float_name], restore(q[quant_name]) if restore else q[quant_name])

    return Job((float_name,), (quant_name,), call)


def _codes(into: CodeHistogram, name: str):
    return lambda _f, q: into.update(q[name])

"""The accuracy diff report: what was compared, and `build_report`, which computes it.

A report holds, for the model outputs, each layer and each quantized tensor, the metrics of `metrics.py`
accumulated over all the data with the whole model quantized (`compare.py`) and isolated on a subset with one
layer quantized alone (`sensitivity.py`), code entropies, weights' stored and Huffman-coded sizes
(`storage.py`), and the calibration view (`calibview.py`) when
statistics are given. Layers are ranked by isolated sensitivity: the lowest output SQNR with only that layer
quantized. A report is immutable; asked for, its rule suggestion (`suggest.py`) is computed with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import onnx

from onnxquant import __version__
from onnxquant.errors import BadDataError, InternalError
from onnxquant.progress import note
from onnxquant.report.calibview import CalibView, calibration_view
from onnxquant.report.compare import accumulate
from onnxquant.report.metrics import CodeHistogram, Metrics, code_entropy, compare
from onnxquant.report.qdq import QdqGraph, analyze, check_compatible
from onnxquant.report.sensitivity import run_isolated
from onnxquant.report.storage import WeightSize, code_histogram, weight_size
from onnxquant.report.suggest import Suggestion, SuggestOptions, plan_suggestion
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)


def _m(m: Metrics | None) -> dict | None:
    return None if m is None else m.to_json()


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass(frozen=True)
class OutputResult:
    """One model output: error of the quantized model against the float one."""

    name: str
    metrics: Metrics
    top1_agreement: float | None = None
    accuracy_float: float | None = None
    accuracy_quant: float | None = None

    @property
    def sqnr_db(self) -> float:
        return self.metrics.sqnr_db

    def to_json(self) -> dict:
        return {
            "name": self.name,
            **self.metrics.to_json(),
            "top1_agreement": self.top1_agreement,
            "accuracy_float": self.accuracy_float,
            "accuracy_quant": self.accuracy_quant,
        }


@dataclass(frozen=True)
class TensorResult:
    """One quantized tensor (activation or weight)."""

    name: str
    kind: str
    bits: int
    signed: bool
    entropy: float
    clip_fraction: float | None
    accumulated: Metrics | None
    isolated: Metrics | None
    matched: bool
    size: WeightSize | None = None  # weights: stored and Huffman-coded size (report/storage.py)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "bits": self.bits,
            "signed": self.signed,
            "entropy_bits": self.entropy,
            "stored_bits_per_weight": self.size.stored_per_weight if self.size else None,
            "huffman_bits_per_weight": self.size.coded_per_weight if self.size else None,
            "clip_fraction": self.clip_fraction,
            "matched": self.matched,
            "accumulated": _m(self.accumulated),
            "isolated": _m(self.isolated),
        }


@dataclass(frozen=True)
class LayerResult:
    """One layer: errors at its output, and its isolated sensitivity at the model outputs."""

    name: str
    op_type: str
    index: int
    output: str
    inputs: tuple[str, ...]
    weight: str | None
    weight_bits: int | None
    act_bits: int | None
    owners: tuple[str, ...]
    label: str = ""  # the name the user knows it by (node name, or the exporter's output tensor name)
    measured: str = ""  # tensor of the accumulated metrics: the output, or the quantized tensor it feeds
    accumulated: Metrics | None = None  # at its output, whole model quantized
    isolated: Metrics | None = None  # at its output, only this layer quantized
    sensitivity: dict[str, Metrics] = field(default_factory=dict)  # model outputs, only this layer quantized

    @property
    def bits(self) -> int:
        return max(b for b in (self.weight_bits, self.act_bits, 0) if b is not None)

    @property
    def narrowest_bits(self) -> int:
        """The width of its narrowest quantized input (W4A8: 4), the one keeping it wider gains most on."""
        return min((b for b in (self.weight_bits, self.act_bits) if b is not None), default=0)

    @property
    def sensitivity_db(self) -> float | None:
        """Lowest model-output SQNR with only this layer quantized (None when not measured)."""
        if not self.sensitivity:
            return None
        return min(m.sqnr_db for m in self.sensitivity.values())

    @property
    def shown(self) -> str:
        """The layer's name for people (see `qdq.layer_label`)."""
        return self.label or self.name

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "label": self.shown,
            "op_type": self.op_type,
            "index": self.index,
            "output": self.output,
            "inputs": list(self.inputs),
            "weight": self.weight,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "owners": list(self.owners),
            "measured_at": self.measured,
            "accumulated": _m(self.accumulated),
            "isolated": _m(self.isolated),
            "sensitivity_sqnr_db": _num(self.sensitivity_db),
            "sensitivity": {o: m.to_json() for o, m in self.sensitivity.items()},
        }


@dataclass(frozen=True)
class Report:
    """What `build_report` found; derive variants with `dataclasses.replace` or `with_measured`."""

    samples: int
    sensitivity_samples: int
    outputs: tuple[OutputResult, ...]
    layers: tuple[LayerResult, ...]
    tensors: tuple[TensorResult, ...]
    calibration: dict[str, CalibView] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    matched: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    suggestion: Suggestion | None = None
    about: dict[str, str] = field(default_factory=dict)  # what was compared: models, settings, date, version

    def with_measured(self, sqnr: dict[str, float]) -> Report:
        """This report with its suggestion's output SQNR measured after converting with the suggested
        rules."""
        if self.suggestion is None:
            raise InternalError("with_measured: the report has no suggestion; build it with suggest=")
        return replace(self, suggestion=replace(self.suggestion, measured=dict(sqnr)))

    @property
    def ranked_by(self) -> str:
        return "sensitivity" if any(la.sensitivity for la in self.layers) else "accumulated"

    def worst(self, k: int | None = None) -> list[LayerResult]:
        """Layers from most to least harmful: by isolated output SQNR, else by accumulated SQNR."""
        if self.ranked_by == "sensitivity":
            key = [(la.sensitivity_db, la) for la in self.layers if la.sensitivity_db is not None]
        else:
            key = [(la.accumulated.sqnr_db, la) for la in self.layers if la.accumulated is not None]
        ranked = [la for v, la in sorted(key, key=lambda p: (p[0], p[1].index)) if not math.isnan(v)]
        return ranked if k is None else ranked[:k]

    def fails_under(self, db: float) -> list[str]:
        """One message per model output whose SQNR is below `db` (for --fail-under-sqnr)."""
        return [
            f"output {o.name}: SQNR {o.sqnr_db:.2f} dB is below {db:g} dB"
            for o in self.outputs
            if not o.sqnr_db >= db
        ]

    def output_sqnr(self) -> dict[str, float]:
        return {o.name: o.sqnr_db for o in self.outputs}

    def to_json(self) -> dict:
        doc = {
            "format": "onnxquant-report",
            "version": 1,
            "about": dict(self.about),
            "samples": self.samples,
            "sensitivity_samples": self.sensitivity_samples,
            "matched": self.matched,
            "notes": list(self.notes),
            "ranked_by": self.ranked_by,
            "seconds": self.seconds,
            "outputs": [o.to_json() for o in self.outputs],
            "worst": [la.name for la in self.worst(10)],
            "layers": [la.to_json() for la in self.layers],
            "tensors": [t.to_json() for t in self.tensors],
            "calibration": {t: v.to_json() for t, v in self.calibration.items()},
        }
        if self.suggestion is not None:
            doc["suggestion"] = self.suggestion.to_json()
        return doc


def _check_labels(labels, data) -> np.ndarray | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.dtype.kind not in "iub":
        raise BadDataError(
            f"labels: array of {arr.dtype} {arr.shape}; accepted: one integer class per sample (shape [N])"
        )
    n = getattr(data, "num_samples", None)
    if isinstance(n, int) and n != len(arr):
        raise BadDataError(f"labels: {len(arr)} labels for {n} samples; accepted: one label per sample")
    return arr.astype(np.int64)


def _samples(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return 1 if first is None or np.ndim(first) == 0 else len(first)


def build_report(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    data,
    *,
    labels: np.ndarray | None = None,
    sensitivity_samples: int = 64,
    stats: dict | None = None,
    table: CalibrationTable | None = None,
    suggest: SuggestOptions | None = None,
    progress: bool = False,
    about: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> Report:
    """Compare `quant_model` with the `float_model` it was converted from on `data` (re-iterable batches).

    `about`: what the caller knows of the comparison (`float_model`, `quant_model`: paths; `rules`, `data`);
    the report adds the widths found in the model, the calibration method of `table`, the date and the
    onnxquant version; `notes`: the caller's notes to show. `labels`: one class per sample, for accuracies
    of classifier-like outputs.
    `sensitivity_samples`: size of the subset for isolated sensitivity (0 skips it). `stats`/`table`: saved
    calibration statistics and the table used, for the calibration view. `suggest`: also plan a rule
    suggestion (`Report.suggestion`).
    """
    check_compatible(float_model, quant_model)
    labels = _check_labels(labels, data)
    if (
        isinstance(sensitivity_samples, bool)
        or not isinstance(sensitivity_samples, int)
        or sensitivity_samples < 0
    ):
        raise BadDataError(f"sensitivity samples {sensitivity_samples!r}; accepted: an integer >= 0")
    graph = analyze(quant_model, float_model)
    notes = [*notes, *graph.notes]
    _announce_cost(graph, data, sensitivity_samples, progress)
    seconds = {}
    t0 = time.perf_counter()
    acc = accumulate(
        float_model,
        quant_model,
        graph,
        data,
        labels=labels,
        subset=sensitivity_samples if graph.matched else 0,
        progress=progress,
    )
    seconds["accumulated"] = time.perf_counter() - t0
    isolated = {}
    if graph.matched and sensitivity_samples:
        t0 = time.perf_counter()
        isolated, iso_notes = run_isolated(float_model, quant_model, graph, acc.subset, progress=progress)
        notes += iso_notes
        seconds["sensitivity"] = time.perf_counter() - t0
    subset_n = sum(_samples(feed) for feed, _ in acc.subset)
    acc.subset.clear()

    outputs = []
    for name, a in acc.outputs.items():
        agree = acc.agreement.get(name)
        outputs.append(
            OutputResult(
                name=name,
                metrics=a.result(),
                top1_agreement=agree.agreement if agree else None,
                accuracy_float=agree.accuracy_float if agree else None,
                accuracy_quant=agree.accuracy_quant if agree else None,
            )
        )
    if labels is not None and not acc.agreement:
        notes.append("labels given, but no output is classifier-like ([N, C]): no accuracy computed")

    layers = [_layer_result(la, acc, isolated) for la in graph.layers]
    tensors = _tensor_results(graph, acc, isolated)
    calibration = {}
    if stats:
        specs = {}
        for t in graph.activations:
            entry = table.tensors.get(t.name) if table is not None else None
            if entry is not None and entry.axis is None:
                specs[t.name] = (int(entry.bits), bool(entry.signed))
            else:
                specs[t.name] = (t.bits, t.signed)
        calibration, cal_notes = calibration_view(stats, specs, table)
        notes += cal_notes
    elif graph.activations:
        notes.append(
            "calibration histograms not shown: no calibration statistics were given (save them with "
            "`onnxquant convert --save-stats FILE` and pass `onnxquant report --stats FILE`)"
        )
    report = Report(
        samples=acc.samples,
        sensitivity_samples=subset_n,
        outputs=tuple(outputs),
        layers=tuple(layers),
        tensors=tuple(tensors),
        calibration=calibration,
        notes=tuple(notes),
        matched=graph.matched,
        seconds=seconds,
        about=describe(about, graph, table),
    )
    if suggest is not None:
        report = replace(report, suggestion=plan_suggestion(report, suggest))
    log.info("report: %d samples, %d layers, %d quantized tensors", acc.samples, len(layers), len(tensors))
    return report


def _widths(tensors) -> str:
    """`4 bits ×5, 8 bits ×1` for the widths of `tensors`, or `none`."""
    counts: dict[int, int] = {}
    for t in tensors:
        counts[t.bits] = counts.get(t.bits, 0) + 1
    return ", ".join(f"{b} bits ×{n}" for b, n in sorted(counts.items())) or "none"


def describe(about: Mapping[str, str] | None, graph: QdqGraph, table: CalibrationTable | None) -> dict:
    """The report's header: the caller's facts (models, rules, data), then what the quantized model and the
    table say about the settings, the date and the onnxquant version."""
    out = {"float_model": "in memory", "quant_model": "in memory"}
    out.update({k: str(v) for k, v in (about or {}).items() if v is not None})
    out["weights"] = _widths(graph.weights)
    out["activations"] = _widths(graph.activations)
    out.setdefault("method", table.method if table is not None else "not recorded in the model")
    out["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out["onnxquant"] = __version__
    return out


def _announce_cost(graph: QdqGraph, data, sensitivity_samples: int, progress: bool) -> None:
    """Say what the report costs before running it: one pass over the data through both models, then one
    pass per layer over the sensitivity subset, and how to make it cheaper."""
    samples = getattr(data, "known_samples", None)
    isolated = len(graph.layers) if graph.matched and sensitivity_samples else 0
    text = (
        f"report: {1 + isolated} more passes: both models on {samples or 'all'} samples"
        + (
            f", then {isolated} isolated-sensitivity passes (one per layer) on {sensitivity_samples}"
            if isolated
            else ""
        )
        + "; cheaper: --max-samples N, and `onnxquant report --sensitivity-samples N` for the subset"
    )
    log.info("%s", text)
    note(text, progress)


def _layer_result(la, acc, isolated) -> LayerResult:
    iso = isolated.get(la.name)
    a = acc.layers.get(la.name)
    return LayerResult(
        name=la.name,
        op_type=la.op_type,
        index=la.index,
        output=la.output,
        inputs=la.inputs,
        weight=la.weight,
        weight_bits=la.weight_bits,
        act_bits=la.act_bits,
        owners=la.owners,
        label=la.label,
        measured=la.measured,
        accumulated=a.result() if a is not None else None,
        isolated=iso.local if iso else None,
        sensitivity=dict(iso.outputs) if iso else {},
    )


def _tensor_results(graph: QdqGraph, acc, isolated) -> list[TensorResult]:
    iso_inputs: dict[str, Metrics] = {}
    for la in graph.layers:
        iso = isolated.get(la.name)
        for t, m in iso.inputs.items() if iso else ():
            iso_inputs.setdefault(t, m)
    results = []
    for t in graph.activations:
        hist: CodeHistogram = acc.codes[t.dequantized]
        a = acc.tensors.get(t.dequantized)
        results.append(
            TensorResult(
                name=t.name,
                kind="activation",
                bits=t.bits,
                signed=t.signed,
                entropy=hist.entropy(),
                clip_fraction=hist.clip_fraction(t.qmin, t.qmax, t.zero_point),
                accumulated=a.result() if a is not None else None,
                isolated=iso_inputs.get(t.name),
                matched=t.matched,
            )
        )
    for t in graph.weights:
        codes, deq = graph.dequantize_weight(t)
        counts = code_histogram(codes)  # for the entropy and the Huffman size
        w = graph.float_weight(t)
        metrics = compare(w.astype(np.float32), deq) if w is not None and w.shape == deq.shape else None
        results.append(
            TensorResult(
                name=t.name,
                kind="weight",
                bits=t.bits,
                signed=t.signed,
                entropy=code_entropy(counts),
                clip_fraction=None,
                accumulated=metrics,
                isolated=metrics,
                matched=metrics is not None,
                size=weight_size(t.name, codes, graph.side_arrays(t), t.container_bits, counts),
            )
        )
    return results

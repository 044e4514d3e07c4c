"""The library entry points the CLI calls: fold, inspect, calibrate, convert (and report/validate).

Each takes and returns objects; files are read and written only by `model.py`, `tables.py` and the CLI.
The public functions also take what a notebook has at hand (see `api_inputs`): a model path or ModelProto,
a preset name, rule-file path or `Rules`, and data as a path, a `{input: array}` mapping, a bare array
(single-input models) or an iterable of batches. They check their arguments as the CLI checks its options and
raise the same `onnxquant.errors` exceptions with the same one-line messages.
"""

from __future__ import annotations

import gc
import logging
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from onnxquant import rules as rule_files
from onnxquant import tables as table_files
from onnxquant.api_inputs import DataLike, ModelLike, RulesLike, as_data, as_model, as_rules
from onnxquant.calib.allocation import allocated_range, channel_tensors
from onnxquant.calib.engine import collect_stats, compute_table
from onnxquant.calib.equalize import depthwise_input_range
from onnxquant.calib.methods import METHODS, WEIGHT_METHODS, collect_options
from onnxquant.calib.output_bias import correct_biases, measure_output_shift
from onnxquant.calib.pow2 import format_activation_entry
from onnxquant.calib.weight_table import BIAS_CORRECTION, weight_entries
from onnxquant.errors import (
    BadDataError,
    BadModelError,
    BadOptionError,
    InternalError,
)
from onnxquant.model import INT4_OPSET, model_bytes, opset_of, upgrade_opset
from onnxquant.passes import PASS_NAMES, Outcome, run_passes
from onnxquant.passes.canonicalize import NAME as CANONICALIZE
from onnxquant.passes.insert_qdq import PER_CHANNEL_OPSET, QdqSummary, format_opset, insert_qdq
from onnxquant.passes.plan import QuantPlan, plan_quantization
from onnxquant.report import Report, SuggestOptions, build_report
from onnxquant.rules import Rules
from onnxquant.rules.schema import BIAS_CORRECTIONS, EQUALIZE_LAYERS
from onnxquant.runtime.validate import validate as run_validation
from onnxquant.stages import gptq_rounded, require_data, smoothed
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)

Batches = Iterable[dict[str, np.ndarray]]
BIT_ALLOC = (None, "weights", "activations", "both")
DATA_HELP = "data=PATH (.npz, .npy, a directory), {input_name: array}, an array, or an iterable of those"
RECLAIM_BYTES = 64 * 2**20  # float weights worth a cycle collection once convert lets go of them


@dataclass
class ConvertResult:
    model: onnx.ModelProto
    float_model: onnx.ModelProto | None  # the folded float model; None with convert(keep_float_model=False)
    table: CalibrationTable
    plan: QuantPlan
    outcomes: list[Outcome]
    summary: QdqSummary
    stats: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def folded(self) -> list[Outcome]:
        """Applied BatchNorm folds and lowerings."""
        return [o for o in self.outcomes if o.applied and o.pass_name not in (CANONICALIZE, EQUALIZE_LAYERS)]

    @property
    def equalized(self) -> list[Outcome]:
        """Chains of layers whose channel ranges cross-layer equalization evened out."""
        return [o for o in self.outcomes if o.applied and o.pass_name == EQUALIZE_LAYERS]

    @property
    def canonicalized(self) -> list[Outcome]:
        """Applied canonicalizations (constant folding, bias and activation fusions)."""
        return [o for o in self.outcomes if o.applied and o.pass_name == CANONICALIZE]


_RULE_NAMES = {
    "pass_names": PASS_NAMES,
    "method_names": tuple(METHODS),
    "weight_method_names": tuple(WEIGHT_METHODS),
}


def load_rules(source: str | os.PathLike | None = None) -> Rules:
    """The rule file or preset `source` (None: the default preset), checked against this package's passes and
    calibration methods."""
    return rule_files.load_rules(source, **_RULE_NAMES)


def parse_rules(text: str, where: str, base_dir: str | os.PathLike | None = None) -> Rules:
    """Rules from YAML `text` (`where` names it in errors), checked as `load_rules` checks a file; an
    `extends: FILE` is relative to `base_dir` (default: the current directory)."""
    return rule_files.parse_rules(text, where, base_dir=base_dir, **_RULE_NAMES)


def resolve_rules(
    rules: RulesLike = None,
    *,
    bits: int | None = None,
    wbits: int | None = None,
    abits: int | None = None,
    method: str | None = None,
    wmethod: str | None = None,
) -> Rules:
    """`rules` (preset name, rule-file path, Rules or None for the default preset) with the global widths
    and methods replaced as the CLI's --bits/--wbits/--abits/--calib/--wcalib replace them."""
    if bits is not None and (wbits is not None or abits is not None):
        raise BadOptionError("use bits=N, or wbits=N and abits=N, not both")
    wbits, abits = (bits, bits) if bits is not None else (wbits, abits)
    for name, value, accepted in (("method", method, METHODS), ("wmethod", wmethod, WEIGHT_METHODS)):
        if value is not None and value not in accepted:
            raise BadOptionError(f"{name}={value!r}; accepted: {', '.join(accepted)}")
    return as_rules(rules, load_rules).with_cli(wbits=wbits, abits=abits, method=method, wmethod=wmethod)


def _check_method_options(options: dict) -> None:
    """The CLI's ranges for --percentile (50..100) and --bins (8 or more)."""
    percentile = options.get("percentile")
    if percentile is not None and not (
        isinstance(percentile, numbers.Real) and not isinstance(percentile, bool) and 50 <= percentile <= 100
    ):
        raise BadOptionError(f"percentile={percentile!r}; accepted: a number 50..100")
    bins = options.get("bins")
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 8):
        raise BadOptionError(f"bins={bins!r}; accepted: an integer >= 8")


QUANTIZED_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearAdd",
    "QLinearMul",
)


def refuse_quantized(model: onnx.ModelProto) -> None:
    """One line when `model` is already quantized (static, dynamic or integer-op form): a float model is
    needed, and quantizing codes a second time only adds error."""
    node = next((n for n in model.graph.node if n.op_type in QUANTIZED_OPS), None)
    if node is not None:
        raise BadModelError(
            f"model: already quantized (node {node.name!r} is a {node.op_type}); accepted: a float model"
        )


def subgraph_notes(model: onnx.ModelProto) -> list[str]:
    """A note for every control-flow node whose subgraphs hold nodes: those are left in float."""
    notes = []
    for node in model.graph.node:
        inner = sum(
            len(g.node)
            for a in node.attribute
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)
        )
        if inner:
            notes.append(
                f"node {node.name!r} ({node.op_type}): {inner} nodes in its subgraphs are not quantized"
            )
    return notes


def fold(model: ModelLike, rules: RulesLike = None) -> tuple[onnx.ModelProto, list[Outcome]]:
    """Run the rule file's rewrite passes; the returned outcomes say what was folded and what was refused."""
    model, rules = as_model(model), as_rules(rules, load_rules)
    refuse_quantized(model)
    return run_passes(model, rules.passes)


def _compute_inputs(model: onnx.ModelProto, plan: QuantPlan) -> tuple[str, ...]:
    """First inputs of the quantized Conv/Gemm nodes: their per-channel means drive bias correction."""
    quantized = {d.name for d in plan.nodes if d.quantize and d.weight and d.op_type in ("Conv", "Gemm")}
    return tuple(sorted({n.input[0] for n in model.graph.node if n.name in quantized}))


@dataclass
class Inspection:
    outcomes: list[Outcome]
    plan: QuantPlan


def inspect(model: ModelLike, rules: RulesLike = None) -> Inspection:
    """What would be folded and quantized, at which widths, and why not."""
    rules = as_rules(rules, load_rules)
    folded, outcomes = fold(model, rules)
    plan = plan_quantization(folded, rules)
    _warn_unmatched(plan)
    return Inspection(outcomes=outcomes, plan=plan)


def _warn_unmatched(plan: QuantPlan) -> None:
    """An override that matches no node is most likely a typo in a name glob: say which."""
    for override in plan.unmatched_overrides:
        log.warning("%s matches no node of the model", override)


def prepare(
    model: ModelLike, rules: RulesLike = None
) -> tuple[onnx.ModelProto, list[Outcome], QuantPlan, list[str]]:
    """Fold, upgrade the opset as the widths need (13 for per-channel, 21 for INT4), and plan."""
    rules = as_rules(rules, load_rules)
    folded, outcomes = fold(model, rules)
    plan = plan_quantization(folded, rules)
    notes = subgraph_notes(folded)
    for note in notes:
        log.warning("%s", note)
    needed = format_opset(plan)  # block-wise weights and FP8: 21 (passes/insert_qdq.py)
    target = max(INT4_OPSET if 4 in plan.weight_bits else PER_CHANNEL_OPSET, needed)
    if opset_of(folded) < target:
        try:
            folded = upgrade_opset(folded, target)
            notes.append(f"opset upgraded to {target}")
        except BadModelError as exc:
            if needed > PER_CHANNEL_OPSET:
                raise BadModelError(
                    f"model: its number formats (block-wise weights or FP8) need opset {needed}, and the "
                    f"conversion failed ({exc}); accepted: a model convertible to opset {needed}"
                ) from exc
            if target == PER_CHANNEL_OPSET:
                raise
            folded = upgrade_opset(folded, PER_CHANNEL_OPSET)
            notes.append(f"opset {INT4_OPSET} conversion failed: 4-bit values stored in 8-bit containers")
        plan = plan_quantization(folded, rules)
    _warn_unmatched(plan)
    return folded, outcomes, plan, notes


def calibrate(
    model: ModelLike,
    plan: QuantPlan | RulesLike = None,
    data: DataLike = None,
    *,
    progress: bool = False,
    bins: int = 2048,
    stats: dict | None = None,
    per_channel: tuple[str, ...] = (),
    allocate: bool = False,
    batch_size: int = 32,
    max_samples: int | None = None,
    **method_options,
) -> tuple[CalibrationTable, dict]:
    """Collect streaming statistics of the planned activations on `data` and turn them into a table.

    With rules (a preset name, a rule-file path, a Rules or None) instead of a `QuantPlan`, `model` is folded
    and planned first and the table also holds every quantized weight: what `onnxquant calibrate` writes.
    With a plan, `model` is the folded model it was made for (`prepare`).

    Tensors are grouped by their calibration method; `stats` (e.g. loaded with --load-stats) skips collection.
    A tensor calibrated on another's statistics (`plan.shared`) is not collected: its entry is the other's.
    `per_channel` tensors also get per-channel (axis 1) statistics, which bias correction needs. Depthwise
    inputs to equalize (`plan.equalized`) get per-channel symmetric ranges. `allocate`:
    every activation with a channel axis gets per-channel ranges and widths (ACIQ eq. 10–11) at its width on
    average.
    """
    _check_method_options({"bins": bins, **method_options})
    if not isinstance(plan, QuantPlan):
        folded, _, planned, _ = prepare(model, plan)
        source = as_data(data, folded, batch_size=batch_size, max_samples=max_samples)
        if source is None and stats is None:
            raise BadDataError("calibrate: no data; accepted: " + DATA_HELP)
        table, stats = calibrate(
            folded, planned, source, progress=progress, bins=bins, stats=stats, **method_options
        )
        return complete_table(folded, planned, table)[0], stats
    data = as_data(data, model, batch_size=batch_size, max_samples=max_samples)
    if not plan.activations:
        return CalibrationTable(method="none", bits=0), {}
    methods = {spec.method for spec in plan.activations.values()}
    allocated = channel_tensors(model, plan) if allocate else ()
    equalized = tuple(sorted(set(plan.equalized) - set(allocated)))
    if stats is None:
        sources = {plan.range_source(t) for t in plan.activations}
        channels = set(per_channel) | {plan.range_source(t) for t in (*allocated, *equalized)}
        channel_mad = {  # equalized inputs use per-channel min/max only
            plan.range_source(t) for t in allocated if METHODS[plan.activations[t].method].needs_moments
        }
        options = collect_options(methods)
        if any(s.scale == "pow2" for s in plan.activations.values()):
            options["histograms"] = True  # power-of-two scales are chosen on histograms (calib/pow2.py)
        stats = collect_stats(
            model,
            sorted(sources | channels),
            data,
            bins=bins,
            progress=progress,
            per_channel=sorted(channels),
            channel_mad=sorted(channel_mad),
            **options,
        )
        stats.update({t: stats[plan.range_source(t)] for t in plan.shared if plan.range_source(t) in stats})
    tensors = {}
    sources = {t: stats[plan.range_source(t)] for t in plan.activations if plan.range_source(t) in stats}
    for method in sorted(methods):
        specs = {
            t: (s.bits, s.symmetric)
            for t, s in plan.activations.items()
            if s.method == method and t not in allocated and t not in equalized and t in sources
        }
        tensors.update(compute_table(sources, specs, method, **method_options).tensors)
    weights = {t.name: t for t in model.graph.initializer}
    for t in (t for t in equalized if t in sources):
        spec, conv = plan.activations[t], next(d for d in plan.nodes if d.name == plan.equalized[t])
        weight = numpy_helper.to_array(weights[conv.weight])
        tensors[t] = depthwise_input_range(
            sources[t], spec.bits, spec.symmetric, spec.method, weight, **method_options
        )
    for t in (t for t in allocated if t in sources):
        tensors[t] = allocated_range(sources, t, plan.activations[t], method_options)
    for t in sorted(set(tensors) & set(plan.activations)):  # FP8 and power-of-two scales (calib/pow2.py)
        tensors[t] = format_activation_entry(tensors[t], plan.activations[t], sources.get(t))
    main = max(methods, key=lambda m: sum(s.method == m for s in plan.activations.values()))
    bits = max(s.bits for s in plan.activations.values())
    return CalibrationTable(method=main, bits=bits, tensors=tensors), stats


def convert(
    model: ModelLike,
    rules: RulesLike = None,
    *,
    data: DataLike = None,
    bits: int | None = None,
    wbits: int | None = None,
    abits: int | None = None,
    method: str | None = None,
    wmethod: str | None = None,
    table: CalibrationTable | str | os.PathLike | None = None,
    stats: dict | None = None,
    progress: bool = False,
    bias_correction: str | None = None,
    bit_alloc: str | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    keep_float_model: bool = True,
    **method_options,
) -> ConvertResult:
    """Fold, calibrate (or take `table`), and insert Q/DQ. The input model is not modified.

    `bits`/`wbits`/`abits`, `method`/`wmethod` replace the rules' global widths and methods (2..8 bits; the
    CLI's --bits, --calib, --wcalib); `table` is a CalibrationTable or a table file (JSON or TensorRT cache);
    `bias_correction` is None, "mean" or "full" (weights, ACIQ eq. 12-13) or "empirical" (each layer's
    measured output mean shift, calib/output_bias.py), else the rules'; `bit_alloc` (None, "weights",
    "activations" or "both") allocates widths per channel at the same average width (ACIQ eq. 10–11).
    `method_options`: `percentile` (50..100) and `bins` (>= 8), as the CLI's --percentile and --bins.
    The rules' low-bit stages run in this order: SmoothQuant after folding, GPTQ rounding of the weights
    after calibration, empirical bias correction on the Q/DQ model (then Q/DQ inserted again).

    `keep_float_model=False`: the result has no `float_model`, and convert holds no reference to the float
    model (given or folded) once the Q/DQ model exists, so a caller that holds none either (the CLI without
    --report) has its weights freed before the Q/DQ model is checked and saved: at that point a big model
    would otherwise be in memory twice over.
    """
    model = as_model(model)
    rules = resolve_rules(rules, bits=bits, wbits=wbits, abits=abits, method=method, wmethod=wmethod)
    _check_method_options(method_options)
    if isinstance(table, (str, os.PathLike)):
        table = table_files.load_table(table)
    data = as_data(data, model, batch_size=batch_size, max_samples=max_samples)
    bias_correction = bias_correction or rules.bias_correction
    if bias_correction not in (None, *BIAS_CORRECTIONS):
        raise BadOptionError(
            f"bias_correction={bias_correction!r}; accepted: None, {', '.join(BIAS_CORRECTIONS)}"
        )
    weight_correction = bias_correction if bias_correction in BIAS_CORRECTION else None
    if bit_alloc not in BIT_ALLOC:
        raise BadOptionError(f"bit_alloc={bit_alloc!r}; accepted: {', '.join(map(str, BIT_ALLOC))}")
    folded, outcomes, plan, notes = prepare(model, rules)
    if rules.smooth_quant is not None:
        if table is not None:
            raise BadOptionError(
                "convert: SmoothQuant with a calibration table: the table's ranges are of the unsmoothed "
                "graph; accepted: --smooth-quant (smooth_quant) with calibration data, or --table without it"
            )
        folded, plan, note = smoothed(folded, rules, data, progress)
        notes.append(note)
    codebook = any(d.quantize and d.weight and d.weights.levels != "uniform" for d in plan.nodes)
    if codebook and (weight_correction or bit_alloc in ("weights", "both")):
        raise BadOptionError(
            "convert: bias correction mean/full and weight bit allocation work on uniform levels, not on "
            "apot/kmeans codebooks; accepted: --levels uniform with them, or --bias-correction empirical"
        )
    gptq = any(d.quantize and d.weight and d.weights.rounding == "gptq" for d in plan.nodes)
    if gptq and weight_correction:
        raise BadOptionError(
            f"convert: bias_correction {weight_correction} corrects round-to-nearest weights, not GPTQ's; "
            "accepted: GPTQ (--gptq, weights.rounding gptq) with --bias-correction empirical or none"
        )
    for wanted, stage in (
        (gptq, "GPTQ rounding"),
        (bias_correction == "empirical", "empirical bias correction"),
    ):
        if wanted:
            require_data(data, stage)  # before calibrating, not after
    corrected_inputs = _compute_inputs(folded, plan) if weight_correction else ()
    if table is None:
        if data is None and stats is None and plan.activations:
            raise BadDataError(
                f"convert: {len(plan.activations)} activation tensors need calibration; "
                "accepted: --calib-data PATH, --calib-reader MODULE:FUNCTION or --table FILE"
            )
        table, stats = calibrate(
            folded,
            plan,
            data or [],
            progress=progress,
            stats=stats,
            per_channel=corrected_inputs,
            allocate=bit_alloc in ("activations", "both"),
            **method_options,
        )
    else:
        known = (
            {i.name for i in folded.graph.input}
            | {o for n in folded.graph.node for o in n.output}
            | {t.name for t in folded.graph.initializer}
        )
        table.check_tensors(known, required=plan.activations)
        table.check_shapes(folded)
    table, stats = complete_table(
        folded, plan, table, data=data, stats=stats, bias_correction=weight_correction, bit_alloc=bit_alloc
    )
    rounded = folded  # the float model the reports compare with stays `folded`
    if gptq:
        rounded, note = gptq_rounded(folded, plan, table, data, progress)
        notes.append(note)
    quant, summary = insert_qdq(rounded, plan, table)
    if bias_correction == "empirical":
        shifts = measure_output_shift(folded, quant, data, progress=progress)  # data checked above
        notes.append(f"empirical bias correction: {len(shifts)} layers' output mean shifts taken out")
        quant, summary = insert_qdq(correct_biases(rounded, shifts), plan, table)
    del rounded
    float_model = folded if keep_float_model else None
    reclaim = model_bytes(folded) >= RECLAIM_BYTES
    del model, folded
    if reclaim:  # graph-surgeon's node/tensor cycles hold the float weights and new codes until collected
        gc.collect()
    try:
        onnx.checker.check_model(quant, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not the user's: keep the traceback
        raise InternalError(f"quantized model fails onnx.checker: {exc}") from exc
    return ConvertResult(
        model=quant,
        float_model=float_model,
        table=table,
        plan=plan,
        outcomes=outcomes,
        summary=summary,
        stats=stats,
        notes=notes + summary.notes,
    )


def _warn_width_mismatch(plan: QuantPlan, table: CalibrationTable) -> None:
    """A table's weight entries win over the rules; say so where their (mean) width differs from the
    plan's."""
    differ = [
        d.weight
        for d in plan.nodes
        if d.quantize and d.weight and round(float(np.mean(table.tensors[d.weight].bits))) != d.weights.bits
    ]
    if differ:
        log.warning(
            "table: %d weight(s) keep the table's width, not the rules' (e.g. %s)", len(differ), differ[0]
        )


def complete_table(
    model: onnx.ModelProto,
    plan: QuantPlan,
    table: CalibrationTable,
    *,
    data: Batches | None = None,
    stats: dict | None = None,
    bias_correction: str | None = None,
    bit_alloc: str | None = None,
) -> tuple[CalibrationTable, dict | None]:
    """`table` with a weight entry for every quantized weight (calib.weight_table), unless it has them all
    already (a table written by onnxquant); entries in `table` win. Bias correction takes the per-channel
    means of the corrected layers' inputs from `stats`, collected on `data` when there are no stats."""
    if all(d.weight in table.tensors for d in plan.nodes if d.quantize and d.weight):
        _warn_width_mismatch(plan, table)
        return table, stats
    corrected_inputs = _compute_inputs(model, plan) if bias_correction else ()
    if corrected_inputs and stats is None:
        if data is None:
            raise BadDataError(
                "convert: --bias-correction needs calibration data for the input means; "
                "accepted: --calib-data PATH or --calib-reader MODULE:FUNCTION"
            )
        stats = collect_stats(model, corrected_inputs, data, histograms=False, per_channel=corrected_inputs)
    means = {t: stats[t].ch_mean for t in corrected_inputs if t in (stats or {}) and stats[t].per_channel}
    weights = weight_entries(
        model,
        plan,
        bit_alloc=bit_alloc in ("weights", "both"),
        bias_correction=bias_correction,
        input_means=means,
    )
    return replace(table, tensors={**weights, **table.tensors}), stats


def report(
    float_model: ModelLike,
    quant_model: ModelLike,
    data: DataLike,
    *,
    stats: dict | None = None,
    table: CalibrationTable | None = None,
    suggest: SuggestOptions | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    **options,
) -> Report:
    """Accuracy-diff report of `quant_model` against `float_model` on `data` (see onnxquant.report).

    With a `table` but statistics lacking histograms (minmax calibration), they are collected again so the
    calibration view can compare every method. With `suggest`, the report carries a rule-file suggestion.
    A float model given as a path is used as it is: fold it first (`fold`) when the quantized model was
    converted from a folded graph, as `convert` does.
    """
    float_model, quant_model = as_model(float_model, "float model"), as_model(quant_model, "quantized model")
    data = as_data(data, float_model, batch_size=batch_size, max_samples=max_samples)
    if data is None:
        raise BadDataError("report: no data to compare the models on; accepted: " + DATA_HELP)
    activations = sorted(t for t, e in table.tensors.items() if e.kind == "activation") if table else []
    if activations and (stats is None or not all(t in stats and stats[t].has_hist for t in activations)):
        stats = collect_stats(float_model, activations, data, histograms=True, moments=True)
    return build_report(float_model, quant_model, data, stats=stats, table=table, suggest=suggest, **options)


def measure_suggestion(
    report_result: Report, model: onnx.ModelProto, data: Batches, **convert_options
) -> Report:
    """`report_result` with its suggestion's output SQNR measured by converting `model` with the suggested
    rules."""
    improved = convert(model, report_result.suggestion.rules, data=data, **convert_options)
    after = build_report(improved.float_model, improved.model, data, sensitivity_samples=0)
    return report_result.with_measured(after.output_sqnr())


def validate(
    quant_model: ModelLike,
    data: DataLike,
    *,
    backend: str = "numpy",
    requant: str = "float",
    batch_size: int = 32,
    max_samples: int | None = None,
):
    """Run the integer plan of `quant_model` and ONNX Runtime side by side (see onnxquant.runtime)."""
    quant_model = as_model(quant_model, "quantized model")
    data = as_data(data, quant_model, batch_size=batch_size, max_samples=max_samples)
    if data is None:
        raise BadDataError("validate: no data to run the models on; accepted: " + DATA_HELP)
    return run_validation(quant_model, data, backend=backend, requant=requant)

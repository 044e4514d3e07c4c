"""The library entry points the CLI calls: fold, inspect, calibrate, convert (and report/validate).

Each takes and returns objects; files are read and written only by `model.py`, `tables.py` and the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from onnxquant import rules as rule_files
from onnxquant.calib.bitalloc import allocate_bits
from onnxquant.calib.engine import collect_stats, compute_table
from onnxquant.calib.equalize import depthwise_input_range
from onnxquant.calib.methods import METHODS, WEIGHT_METHODS, clip_range, collect_options
from onnxquant.calib.weight_table import BIAS_CORRECTION, weight_entries
from onnxquant.errors import (
    BadDataError,
    BadModelError,
    BadOptionError,
    BadRulesError,
    InternalError,
    OnnxQuantError,
)
from onnxquant.model import INT4_OPSET, opset_of, upgrade_opset
from onnxquant.passes import PASS_NAMES, Outcome, run_passes
from onnxquant.passes.canonicalize import NAME as CANONICALIZE
from onnxquant.passes.insert_qdq import PER_CHANNEL_OPSET, QdqSummary, insert_qdq
from onnxquant.passes.plan import QuantPlan, plan_quantization, tensor_shapes
from onnxquant.quant import MAX_BITS, MIN_BITS
from onnxquant.report import Report, SuggestOptions, build_report
from onnxquant.rules import Rules
from onnxquant.runtime.validate import validate as run_validation
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)

Batches = Iterable[dict[str, np.ndarray]]
BIT_ALLOC = (None, "weights", "activations", "both")


@dataclass
class ConvertResult:
    model: onnx.ModelProto
    float_model: onnx.ModelProto
    table: CalibrationTable
    plan: QuantPlan
    outcomes: list[Outcome]
    summary: QdqSummary
    stats: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def folded(self) -> list[Outcome]:
        """Applied BatchNorm folds and lowerings."""
        return [o for o in self.outcomes if o.applied and o.pass_name != CANONICALIZE]

    @property
    def canonicalized(self) -> list[Outcome]:
        """Applied canonicalizations (constant folding, bias and activation fusions)."""
        return [o for o in self.outcomes if o.applied and o.pass_name == CANONICALIZE]


_RULE_NAMES = {
    "pass_names": PASS_NAMES,
    "method_names": tuple(METHODS),
    "weight_method_names": tuple(WEIGHT_METHODS),
}


def load_rules(source=None) -> Rules:
    """The rule file or preset `source` (None: the default preset), checked against this package's passes and
    calibration methods."""
    return rule_files.load_rules(source, **_RULE_NAMES)


def parse_rules(text: str, where: str) -> Rules:
    """Rules from YAML `text` (`where` names it in errors), checked as `load_rules` checks a file."""
    return rule_files.parse_rules(text, where, **_RULE_NAMES)


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


def fold(model: onnx.ModelProto, rules: Rules) -> tuple[onnx.ModelProto, list[Outcome]]:
    """Run the rule file's rewrite passes; the returned outcomes say what was folded and what was refused."""
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


def inspect(model: onnx.ModelProto, rules: Rules) -> Inspection:
    """What would be folded and quantized, at which widths, and why not."""
    folded, outcomes = fold(model, rules)
    return Inspection(outcomes=outcomes, plan=plan_quantization(folded, rules))


def prepare(
    model: onnx.ModelProto, rules: Rules
) -> tuple[onnx.ModelProto, list[Outcome], QuantPlan, list[str]]:
    """Fold, upgrade the opset as the widths need (13 for per-channel, 21 for INT4), and plan."""
    folded, outcomes = fold(model, rules)
    plan = plan_quantization(folded, rules)
    notes = subgraph_notes(folded)
    for note in notes:
        log.warning("%s", note)
    target = INT4_OPSET if 4 in plan.weight_bits else PER_CHANNEL_OPSET
    if opset_of(folded) < target:
        try:
            folded = upgrade_opset(folded, target)
            notes.append(f"opset upgraded to {target}")
        except BadModelError:
            if target == PER_CHANNEL_OPSET:
                raise
            folded = upgrade_opset(folded, PER_CHANNEL_OPSET)
            notes.append(f"opset {INT4_OPSET} conversion failed: 4-bit values stored in 8-bit containers")
        plan = plan_quantization(folded, rules)
    return folded, outcomes, plan, notes


def calibrate(
    model: onnx.ModelProto,
    plan: QuantPlan,
    data: Batches,
    *,
    progress: bool = False,
    bins: int = 2048,
    stats: dict | None = None,
    per_channel: tuple[str, ...] = (),
    allocate: bool = False,
    **method_options,
) -> tuple[CalibrationTable, dict]:
    """Collect streaming statistics of the planned activations on `data` and turn them into a table.

    Tensors are grouped by their calibration method; `stats` (e.g. loaded with --load-stats) skips collection.
    A tensor calibrated on another's statistics (`plan.shared`) is not collected: its entry is the other's.
    `per_channel` tensors also get per-channel (axis 1) statistics, which bias correction needs. Depthwise
    inputs to equalize (`plan.equalized`) get per-channel symmetric ranges. `allocate`:
    every activation with a channel axis gets per-channel ranges and widths (ACIQ eq. 10–11) at its width on
    average.
    """
    if not plan.activations:
        return CalibrationTable(method="none", bits=0), {}
    methods = {spec.method for spec in plan.activations.values()}
    allocated = _channel_tensors(model, plan) if allocate else ()
    equalized = tuple(sorted(set(plan.equalized) - set(allocated)))
    if stats is None:
        sources = {plan.range_source(t) for t in plan.activations}
        channels = set(per_channel) | {plan.range_source(t) for t in (*allocated, *equalized)}
        channel_mad = {  # equalized inputs use per-channel min/max only
            plan.range_source(t) for t in allocated if METHODS[plan.activations[t].method].needs_moments
        }
        stats = collect_stats(
            model,
            sorted(sources | channels),
            data,
            bins=bins,
            progress=progress,
            per_channel=sorted(channels),
            channel_mad=sorted(channel_mad),
            **collect_options(methods),
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
        tensors[t] = _allocated_range(sources, t, plan.activations[t], method_options)
    main = max(methods, key=lambda m: sum(s.method == m for s in plan.activations.values()))
    bits = max(s.bits for s in plan.activations.values())
    return CalibrationTable(method=main, bits=bits, tensors=tensors), stats


def _channel_tensors(model: onnx.ModelProto, plan: QuantPlan) -> tuple[str, ...]:
    """Planned activations with a channel axis (rank >= 2 and more than one channel), in name order."""
    shapes = tensor_shapes(model)
    out, unknown = [], []
    for t in sorted(plan.activations):
        if t not in shapes:
            unknown.append(t)
            continue
        dims = shapes[t].dim
        if len(dims) >= 2 and not (dims[1].HasField("dim_value") and dims[1].dim_value == 1):
            out.append(t)
    if unknown:
        log.warning("bit allocation: shape unknown, kept per tensor: %s", ", ".join(unknown))
    return tuple(out)


def _allocated_range(stats: dict, tensor: str, spec, method_options: dict):
    """Per-channel range of `tensor` at per-channel widths allocated from its per-channel clipping ranges."""
    if not METHODS[spec.method].per_channel:
        raise BadRulesError(
            f"tensor {tensor}: per-channel bit allocation needs a per-channel method; "
            f"accepted: {', '.join(sorted(n for n, m in METHODS.items() if m.per_channel))} "
            f"(got {spec.method})"
        )
    try:
        lo, hi = clip_range(
            spec.method, stats[tensor], spec.bits, spec.symmetric, per_channel=True, **method_options
        )
    except OnnxQuantError as exc:
        raise type(exc)(f"tensor {tensor}: {exc}") from exc
    span = np.maximum(hi, 0) - np.minimum(lo, 0)  # dead (constant 0) channels: 0, so the fewest bits
    widths = allocate_bits(span, spec.bits, lo=MIN_BITS, hi=MAX_BITS)
    return compute_table(
        {tensor: stats[tensor]},
        {tensor: (widths, spec.symmetric)},
        spec.method,
        per_channel=[tensor],
        **method_options,
    ).tensors[tensor]


def convert(
    model: onnx.ModelProto,
    rules: Rules,
    *,
    data: Batches | None = None,
    table: CalibrationTable | None = None,
    stats: dict | None = None,
    progress: bool = False,
    bias_correction: str | None = None,
    bit_alloc: str | None = None,
    **method_options,
) -> ConvertResult:
    """Fold, calibrate (or take `table`), and insert Q/DQ. The input model is not modified.

    `bias_correction` is None, "mean" or "full"; `bit_alloc` (None, "weights", "activations" or "both")
    allocates widths per channel at the same average width (ACIQ eq. 10–11).
    """
    if bias_correction not in (None, *BIAS_CORRECTION):
        raise BadOptionError(
            f"bias_correction={bias_correction!r}; accepted: None, {', '.join(BIAS_CORRECTION)}"
        )
    if bit_alloc not in BIT_ALLOC:
        raise BadOptionError(f"bit_alloc={bit_alloc!r}; accepted: {', '.join(map(str, BIT_ALLOC))}")
    folded, outcomes, plan, notes = prepare(model, rules)
    corrected_inputs = _compute_inputs(folded, plan) if bias_correction else ()
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
    table, stats = complete_table(
        folded, plan, table, data=data, stats=stats, bias_correction=bias_correction, bit_alloc=bit_alloc
    )
    quant, summary = insert_qdq(folded, plan, table)
    try:
        onnx.checker.check_model(quant, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not the user's: keep the traceback
        raise InternalError(f"quantized model fails onnx.checker: {exc}") from exc
    return ConvertResult(
        model=quant,
        float_model=folded,
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
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    data: Batches,
    *,
    stats: dict | None = None,
    table: CalibrationTable | None = None,
    suggest: SuggestOptions | None = None,
    **options,
) -> Report:
    """Accuracy-diff report of `quant_model` against `float_model` on `data` (see onnxquant.report).

    With a `table` but statistics lacking histograms (minmax calibration), they are collected again so the
    calibration view can compare every method. With `suggest`, the report carries a rule-file suggestion.
    """
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


def validate(quant_model: onnx.ModelProto, data: Batches, *, backend: str = "numpy", requant: str = "float"):
    """Run the integer plan of `quant_model` and ONNX Runtime side by side (see onnxquant.runtime)."""
    return run_validation(quant_model, data, backend=backend, requant=requant)

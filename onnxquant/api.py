"""The library entry points the CLI calls: fold, inspect, calibrate, convert (and report/validate).

Each takes and returns objects; files are read and written only by `model.py`, `tables.py` and the CLI.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxquant.errors import BadDataError, BadModelError
from onnxquant.model import INT4_OPSET, opset_of, upgrade_opset
from onnxquant.passes import Outcome, run_passes
from onnxquant.passes.insert_qdq import PER_CHANNEL_OPSET, QdqSummary, insert_qdq
from onnxquant.passes.plan import QuantPlan, plan_quantization
from onnxquant.rules import Rules
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)

Batches = Iterable[dict[str, np.ndarray]]


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
        return [o for o in self.outcomes if o.applied]


def fold(model: onnx.ModelProto, rules: Rules) -> tuple[onnx.ModelProto, list[Outcome]]:
    """Run the rule file's rewrite passes; the returned outcomes say what was folded and what was refused."""
    return run_passes(model, rules.passes)


@dataclass
class Inspection:
    outcomes: list[Outcome]
    plan: QuantPlan


def inspect(model: onnx.ModelProto, rules: Rules) -> Inspection:
    """What would be folded and quantized, at which widths, and why not."""
    folded, outcomes = run_passes(model, rules.passes)
    return Inspection(outcomes=outcomes, plan=plan_quantization(folded, rules))


def prepare(model: onnx.ModelProto, rules: Rules) -> tuple[onnx.ModelProto, list[Outcome], QuantPlan, list[str]]:
    """Fold, upgrade the opset as the widths need (13 for per-channel, 21 for INT4), and plan."""
    folded, outcomes = run_passes(model, rules.passes)
    plan = plan_quantization(folded, rules)
    notes = []
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


def calibrate(model: onnx.ModelProto, plan: QuantPlan, data: Batches, *, progress: bool = False,
              bins: int = 2048, stats: dict | None = None, **method_options) -> tuple[CalibrationTable, dict]:
    """Collect streaming statistics of the planned activations on `data` and turn them into a table.

    Tensors are grouped by their calibration method; `stats` (e.g. loaded with --load-stats) skips collection.
    """
    from onnxquant.calib.engine import collect_stats, compute_table
    from onnxquant.calib.methods import collect_options

    if not plan.activations:
        return CalibrationTable(method="none", bits=0), {}
    methods = {spec.method for spec in plan.activations.values()}
    if stats is None:
        stats = collect_stats(model, sorted(plan.activations), data, bins=bins, progress=progress,
                              **collect_options(methods))
    tensors = {}
    for method in sorted(methods):
        specs = {t: (s.bits, s.symmetric) for t, s in plan.activations.items() if s.method == method}
        tensors.update(compute_table(stats, specs, method, **method_options).tensors)
    main = max(methods, key=lambda m: sum(s.method == m for s in plan.activations.values()))
    bits = max(s.bits for s in plan.activations.values())
    return CalibrationTable(method=main, bits=bits, tensors=tensors), stats


def convert(model: onnx.ModelProto, rules: Rules, *, data: Batches | None = None,
            table: CalibrationTable | None = None, progress: bool = False, bias_correction: str | None = None,
            **method_options) -> ConvertResult:
    """Fold, calibrate (or take `table`), and insert Q/DQ. The input model is not modified."""
    folded, outcomes, plan, notes = prepare(model, rules)
    stats = None
    if table is None:
        if data is None and plan.activations:
            raise BadDataError(f"convert: {len(plan.activations)} activation tensors need calibration; "
                               "accepted: --calib-data PATH, --calib-reader MODULE:FUNCTION or --table FILE")
        table, stats = calibrate(folded, plan, data or [], progress=progress, **method_options)
    else:
        missing = sorted(set(plan.activations) - set(table.tensors))
        if missing:
            notes.append(f"table has no entry for {len(missing)} tensors (e.g. {missing[0]!r}): left float")
    quant, summary = insert_qdq(folded, plan, table, bias_correction=bias_correction)
    try:
        onnx.checker.check_model(quant, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not the user's: keep the traceback
        raise RuntimeError(f"quantized model fails onnx.checker: {exc}") from exc
    return ConvertResult(model=quant, float_model=folded, table=table, plan=plan, outcomes=outcomes,
                         summary=summary, stats=stats, notes=notes + summary.notes)

"""Automatic mixed precision (`convert --target-sqnr`): the fewest layers kept at a higher width for every
output to reach a target SQNR on the calibration data, measured by converting, not only predicted."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from onnxquant.api import DATA_HELP, ConvertResult, convert, resolve_rules
from onnxquant.api_inputs import DataLike, ModelLike, RulesLike, as_data, as_model
from onnxquant.errors import BadDataError, BadOptionError
from onnxquant.report import SuggestOptions, build_report
from onnxquant.report.suggest import candidates, plan_suggestion


@dataclass(frozen=True)
class MixedPrecision:
    """What `convert_to_target` chose: the layers kept at `high_bits` and the output SQNR they measured.

    `tried` holds (number of kept layers, worst output SQNR on the calibration data) for every conversion."""

    target_sqnr: float
    high_bits: int
    layers: tuple[str, ...]
    nodes: tuple[str, ...]
    measured: dict[str, float]
    met: bool
    tried: tuple[tuple[int, float], ...]


def convert_to_target(
    model: ModelLike,
    rules: RulesLike = None,
    *,
    data: DataLike,
    target_sqnr: float,
    high_bits: int = 8,
    sensitivity_samples: int = 64,
    batch_size: int = 32,
    max_samples: int | None = None,
    **convert_options,
) -> tuple[ConvertResult, MixedPrecision]:
    """Convert, then keep the fewest layers at `high_bits` that bring every output to `target_sqnr` dB on
    `data` (automatic mixed precision).

    Layers are taken in the report's isolated-sensitivity order (`report.suggest`). The number k of kept
    layers starts at the report's prediction and is searched on measurements: doubled until the target is
    met, then bisected down to the smallest k that meets it (output SQNR grows with k in that order, nearly
    always; a non-monotone step can only make the result keep more layers than needed, never miss the
    target). Every conversion reuses the first one's calibration statistics. When even all layers at
    `high_bits` miss the target, that conversion is returned with `met` False.
    """
    model = as_model(model)
    data = as_data(data, model, batch_size=batch_size, max_samples=max_samples)
    if data is None:
        raise BadDataError(
            "convert: --target-sqnr needs calibration data to measure on; accepted: " + DATA_HELP
        )
    if not isinstance(target_sqnr, numbers.Real) or not np.isfinite(target_sqnr):
        raise BadOptionError(f"target_sqnr={target_sqnr!r}; accepted: a finite number of dB")
    widths = {
        k: convert_options.pop(k)
        for k in ("bits", "wbits", "abits", "method", "wmethod")
        if k in convert_options
    }
    rules = resolve_rules(rules, **widths)
    first = convert(model, rules, data=data, **convert_options)
    convert_options["stats"] = first.stats
    ranked = build_report(first.float_model, first.model, data, sensitivity_samples=sensitivity_samples)
    tried: list[tuple[int, float]] = []
    results: dict[int, tuple[ConvertResult, dict[str, float], object]] = {}

    def attempt(k: int) -> bool:
        suggestion = plan_suggestion(ranked, SuggestOptions(rules, k=k, high_bits=high_bits))
        result = first if k == 0 else convert(model, suggestion.rules, data=data, **convert_options)
        sqnr = build_report(result.float_model, result.model, data, sensitivity_samples=0).output_sqnr()
        results[k] = (result, sqnr, suggestion)
        tried.append((k, min(sqnr.values())))
        return min(sqnr.values()) >= target_sqnr

    count = len(candidates(ranked, high_bits))
    predicted = plan_suggestion(ranked, SuggestOptions(rules, target_sqnr=target_sqnr, high_bits=high_bits)).k
    failing, meeting, k = -1, None, 0
    while meeting is None and failing < count:
        if attempt(k):
            meeting = k
        else:
            failing, k = k, min(count, max(k + 1, predicted if k == 0 else 2 * k))
    while meeting is not None and meeting - failing > 1:
        middle = (failing + meeting) // 2
        failing, meeting = (failing, middle) if attempt(middle) else (middle, meeting)
    chosen = count if meeting is None else meeting
    result, sqnr, suggestion = results[chosen]
    return result, MixedPrecision(
        target_sqnr=float(target_sqnr),
        high_bits=high_bits,
        layers=suggestion.layers,
        nodes=suggestion.nodes,
        measured=sqnr,
        met=meeting is not None,
        tried=tuple(tried),
    )

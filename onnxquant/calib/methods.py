"""The explicit registry of activation calibration methods (it also feeds the CLI's --calib choices).

A method is a pure function `fn(stats, bits, symmetric, *, per_channel=False, **options) -> (lo, hi)`
returning the clipping range (floats, or per-channel arrays). Its `Method` record says what the statistics
must hold for it (histograms; per-bin sums for the Laplace b), whether it has a per-channel form, and which
options it takes. Quantization parameters come from the range through `TensorRange.from_range`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from onnxquant.calib.aciq import gauss, laplace
from onnxquant.calib.kl import kl
from onnxquant.calib.minmax import minmax
from onnxquant.calib.mse import mse
from onnxquant.calib.percentile import percentile
from onnxquant.calib.stats import TensorStats
from onnxquant.calib.weights import WEIGHT_METHODS
from onnxquant.errors import BadRulesError

MethodFn = Callable[..., tuple]


@dataclass(frozen=True)
class Method:
    """An activation calibration method and what it needs from the statistics."""

    name: str
    fn: MethodFn
    needs_histogram: bool = False
    needs_moments: bool = False  # the histogram's per-bin sums (Laplace b), maybe a pass 2
    per_channel: bool = False
    options: tuple[str, ...] = ()  # keyword options of `fn`


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("minmax", minmax, per_channel=True),
        Method("percentile", percentile, needs_histogram=True, options=("percentile",)),
        Method("mse", mse, needs_histogram=True),
        Method("laplace", laplace, needs_moments=True, per_channel=True),
        # σ comes from pass 1; the histogram is for the clip check (engine._no_worse_than_full_range)
        Method("gauss", gauss, needs_histogram=True, per_channel=True),
        Method("kl", kl, needs_histogram=True),
    )
}

__all__ = [
    "METHODS",
    "WEIGHT_METHODS",
    "Method",
    "check_options",
    "clip_range",
    "collect_options",
    "find_method",
]


def find_method(name: str) -> Method:
    """The registered method `name` (BadRulesError naming the accepted ones otherwise)."""
    if name not in METHODS:
        raise BadRulesError(f"unknown calibration method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]


def check_options(name: str, options: Mapping[str, object]) -> dict[str, object]:
    """The options method `name` takes from `options` (others' options ignored, unknown ones refused)."""
    known = {k for m in METHODS.values() for k in m.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BadRulesError(
            f"unknown calibration option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}"
        )
    return {k: options[k] for k in find_method(name).options if k in options and options[k] is not None}


def clip_range(
    name: str, stats: TensorStats, bits, symmetric: bool, *, per_channel: bool = False, **options
) -> tuple:
    """The clipping range of method `name` on `stats` with the options it takes from `options`."""
    opts = check_options(name, options)
    return find_method(name).fn(stats, bits, symmetric, per_channel=per_channel, **opts)


def collect_options(methods: Iterable[str]) -> dict[str, bool]:
    """Keyword arguments for `collect_stats` so that every method in `methods` has what it needs."""
    methods = set(methods)
    unknown = sorted(methods - set(METHODS))
    if unknown:
        raise BadRulesError(
            f"unknown calibration method(s) {', '.join(unknown)}; accepted: {', '.join(METHODS)}"
        )
    records = [METHODS[m] for m in methods]
    return {
        "histograms": any(m.needs_histogram for m in records),
        "moments": any(m.needs_moments for m in records),
    }

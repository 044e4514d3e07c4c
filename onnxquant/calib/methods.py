"""The explicit registry of activation calibration methods (it also feeds the CLI's --calib choices).

A method is a pure function `fn(stats, bits, symmetric, *, per_channel=False, **options) -> (lo, hi)`
returning the clipping range (floats, or per-channel arrays). Quantization parameters come from the range
through `TensorRange.from_range`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from onnxquant.calib.aciq import gauss, laplace
from onnxquant.calib.kl import kl
from onnxquant.calib.minmax import minmax
from onnxquant.calib.mse import mse
from onnxquant.calib.percentile import DEFAULT_PERCENTILE, percentile
from onnxquant.calib.weights import WEIGHT_METHODS  # noqa: F401  (re-exported for the CLI)
from onnxquant.errors import OnnxQuantError

MethodFn = Callable[..., tuple]

METHODS: dict[str, MethodFn] = {
    "minmax": minmax,
    "percentile": percentile,
    "mse": mse,
    "laplace": laplace,
    "gauss": gauss,
    "kl": kl,
}
NEEDS_HISTOGRAM: frozenset[str] = frozenset({"percentile", "mse", "kl"})
NEEDS_MOMENTS: frozenset[str] = frozenset({"laplace"})  # the histogram's per-bin sums (b), maybe a pass 2
PER_CHANNEL: frozenset[str] = frozenset({"minmax", "laplace", "gauss"})
OPTIONS: dict[str, dict[str, object]] = {"percentile": {"percentile": DEFAULT_PERCENTILE}}



def check_options(method: str, options: Mapping[str, object]) -> dict[str, object]:
    """The options `method` takes from `options` (others' options ignored, unknown ones refused)."""
    known = {k for opts in OPTIONS.values() for k in opts}
    unknown = sorted(set(options) - known)
    if unknown:
        raise OnnxQuantError(f"unknown calibration option(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(sorted(known))}")
    return {k: options[k] for k in OPTIONS.get(method, {}) if k in options and options[k] is not None}


def collect_options(methods: Iterable[str]) -> dict[str, bool]:
    """Keyword arguments for `collect_stats` so that every method in `methods` has what it needs."""
    methods = set(methods)
    unknown = sorted(methods - set(METHODS))
    if unknown:
        raise OnnxQuantError(f"unknown calibration method(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(METHODS)}")
    return {"histograms": bool(methods & NEEDS_HISTOGRAM), "moments": bool(methods & NEEDS_MOMENTS)}

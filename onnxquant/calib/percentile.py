"""Percentile calibration on the streamed histogram.

The p-th percentile is read from the cumulative histogram with linear interpolation inside the bin that
crosses p/100 of the total count, so it is within one bin width of the sample percentile. Symmetric and
one-sided tensors clip |x| at its p-th percentile t: range [max(min, −t), min(max, t)]. Two-sided tensors with
unsigned codes clip each side: [(100−p)-th, p-th] percentile of x.
"""

from __future__ import annotations

import numpy as np

from onnxquant.calib.stats import TensorStats
from onnxquant.errors import BadRulesError

DEFAULT_PERCENTILE = 99.99


def hist_percentile(counts: np.ndarray, first_edge: float, width: float, q: float) -> float:
    """The q-th percentile (0..100) of a histogram whose first bin starts at `first_edge`."""
    cdf = np.cumsum(counts, dtype=np.float64)
    total = cdf[-1]
    if total <= 0:
        return first_edge
    target = q / 100.0 * total
    k = int(min(np.searchsorted(cdf, target, side="left"), len(counts) - 1))
    before = cdf[k - 1] if k else 0.0
    frac = (target - before) / counts[k] if counts[k] else 1.0
    return float(first_edge + (k + min(max(frac, 0.0), 1.0)) * width)


def percentile(
    st: TensorStats,
    bits,
    symmetric: bool,
    *,
    per_channel: bool = False,
    percentile: float = DEFAULT_PERCENTILE,
):
    """Clip at the `percentile`-th percentile (of |x|, or of each side for two-sided unsigned tensors)."""
    if per_channel:
        raise BadRulesError("percentile calibration is per tensor only; per channel: minmax, laplace, gauss")
    if not 0 < percentile <= 100:
        raise BadRulesError(f"percentile={percentile}: accepted: a number in (0, 100], e.g. 99.99")
    w = st.bin_width
    if symmetric or st.one_sided:
        t = hist_percentile(st.abs_hist, 0.0, w, percentile)
        return max(st.min, -t), min(st.max, t)
    lo = hist_percentile(st.hist, -st.hist_range, w, 100.0 - percentile)
    hi = hist_percentile(st.hist, -st.hist_range, w, percentile)
    return max(st.min, lo), min(st.max, hi)

"""Streaming, mergeable per-tensor statistics for calibration.

Memory is bounded by the statistics themselves (a few scalars, one histogram, optional per-channel vectors),
never by the number of samples. Pass 1 is one scan of every batch in cache-sized chunks (`scan`):

- count n, min, max, Σx (float64 across chunks, so mean = Σx / n) and M2 = Σ(x − mean)² (σ² = M2 / n),
  chunk results combined with Chan et al.'s pairwise update; per channel (axis 1) the same when asked;
- for the histogram methods a signed histogram (`Histogram`) with an exact-zero bin, and for the Laplace b
  also the sum of the values in every bin.

b = Σ|x − m| / n = 2·Σ_{x>m}(x − m) / n is then exact from the per-bin sums except for the one bin that holds
the mean m, whose values are counted as if they sat at their average: the error is at most that bin's count
times its width. Where that bound exceeds MAD_TOLERANCE of b, and for per-channel b, a second pass adds
Σ|x − m| around the fixed pass-1 mean (`Pass2`).

The histogram (`onnxquant.calib.histogram`) lives on a power-of-two grid, so it needs no first pass for its
range and still does not depend on batch size or order.

Merging (`TensorStats.merge`) adds everything: min of mins, max of maxes, sums, M2 (Chan), histogram counts
and sums (on the coarser of the two grids). Pass-2 parts merge only when they were collected against the same
pass-1 mean, which gives the sharding protocol when a pass 2 is needed:

1. each shard: pass 1 only;  2. merge the pass-1 results;  3. each shard: pass 2 against the merged pass 1
(which also recomputes the shard's own pass-1 part);  4. merge the shard results.

The result equals one run over all the data (histograms exactly, moments up to float rounding). Without a
pass 2, steps 1 and 2 are all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from onnxquant.calib.histogram import Binner, Histogram, chunks, workspace
from onnxquant.errors import BadDataError, BadModelError, OnnxQuantError

DEFAULT_BINS = 2048
MAD_TOLERANCE = 1e-4  # largest error bound of a Laplace b taken from the histogram, relative to b


F32_MAX = float(np.finfo(np.float32).max)
HUGE = 1e30  # a tensor reaching this magnitude holds a mask or a sentinel, not a range to quantize


class NonFiniteError(BadDataError):
    """A batch holds NaN or Inf."""


def scan(x: np.ndarray, hist: Histogram | None = None) -> tuple[float, float, float, float]:
    """Min, max, sum and M2 = Σ(x − mean)² of the values of `x` (as float32), binned into `hist` on the way.

    One pass in cache-sized chunks; within a chunk sums are float32 (Σx pairwise, M2 a BLAS dot product of the
    deviations, both ~1e-7 relative), chunks are combined in float64.
    Raises NonFiniteError on NaN or Inf.
    """
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    counter = Binner(hist) if hist is not None else None
    buf = workspace()[0]
    lo, hi, n, total, m2 = np.float32(np.inf), np.float32(-np.inf), 0, 0.0, 0.0
    for c in chunks(flat):
        c_lo, c_hi = c.min(), c.max()
        if not (np.isfinite(c_lo) and np.isfinite(c_hi)) or max(-c_lo, c_hi) >= HUGE:
            raise NonFiniteError("NaN, Inf or a magnitude of 1e30 or more")
        lo, hi = min(lo, c_lo), max(hi, c_hi)
        c_sum = float(np.sum(c))
        centre = np.float32(c_sum / c.size)
        d = np.subtract(c, centre, out=buf[: c.size])
        if float(max(-c_lo, c_hi)) ** 2 * c.size >= F32_MAX:  # Σd² would overflow float32
            d = d.astype(np.float64)
        c_m2 = float(np.dot(d, d)) - c.size * (c_sum / c.size - float(centre)) ** 2
        m2 = combined_m2(n, total, m2, c.size, c_sum, c_m2)
        n, total = n + c.size, total + c_sum
        if counter is not None:
            counter.add(c, float(max(-c_lo, c_hi, 0)), negative=bool(c_lo < 0))
    if counter is not None:
        counter.flush()
    return float(lo), float(hi), total, m2


def combined_m2(n_a, sum_a, m2_a, n_b, sum_b, m2_b):
    """M2 of the union of two parts from each part's count, sum and M2 (Chan et al.; arrays per channel)."""
    if n_a == 0 or n_b == 0:
        return m2_a + m2_b
    delta = sum_b / n_b - sum_a / n_a
    return m2_a + m2_b + delta * delta * (n_a * n_b / (n_a + n_b))


@dataclass
class Pass2:
    """Pass-2 accumulators: Σ|x − m| around a fixed reference mean m (and per-channel means)."""

    ref_mean: float
    count: int = 0
    abs_dev: float = 0.0
    ch_ref_mean: np.ndarray | None = None
    ch_abs_dev: np.ndarray | None = None


@dataclass
class TensorStats:
    """Statistics of one tensor over the calibration set (pass 1 always, pass 2 when collected)."""

    count: int = 0
    min: float = np.inf
    max: float = -np.inf
    sum: float = 0.0
    m2: float = 0.0  # Σ(x − mean)²
    ch_count: int = 0  # elements per channel
    ch_min: np.ndarray | None = None
    ch_max: np.ndarray | None = None
    ch_sum: np.ndarray | None = None
    ch_m2: np.ndarray | None = None
    histogram: Histogram | None = None
    pass2: Pass2 | None = field(default=None)

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def amax(self) -> float:
        return float(max(-self.min, self.max, 0.0)) if self.count else 0.0

    @property
    def one_sided(self) -> bool:
        """True for non-negative tensors (e.g. after Relu)."""
        return bool(self.count) and self.min >= 0

    @property
    def per_channel(self) -> bool:
        return self.ch_min is not None

    @property
    def ch_mean(self) -> np.ndarray:
        self._need_channels()
        return self.ch_sum / self.ch_count

    def _need_channels(self) -> None:
        if self.ch_min is None:
            raise BadDataError("statistics lack per-channel values; collect them with per_channel")

    @property
    def mad(self) -> float:
        """Mean absolute deviation around the mean: the Laplace scale b (pass 2, or the histogram's sums)."""
        if self.pass2 is not None and self.pass2.count:
            return self.pass2.abs_dev / self.pass2.count
        if self.mad_needs_pass2:
            raise BadDataError(
                f"statistics lack the Laplace b: no pass 2, and no per-bin sums that give it to "
                f"{MAD_TOLERANCE:g}; collect it with moments"
            )
        return 2 * self.histogram.excess_above(self.mean)[0] / self.count if self.count else 0.0

    @property
    def mad_needs_pass2(self) -> bool:
        """True when the histogram's per-bin sums do not give b within MAD_TOLERANCE (or are missing)."""
        if self.histogram is None or self.histogram.sums is None:
            return True
        excess, bound = self.histogram.excess_above(self.mean)
        return bound > MAD_TOLERANCE * excess

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else 0.0

    @property
    def ch_mad(self) -> np.ndarray:
        self._need_channels()
        p = self.pass2
        if p is None or p.ch_abs_dev is None:
            raise BadDataError(
                "statistics lack per-channel deviations (Laplace b per channel); collect pass 2 "
                "with per_channel and moments"
            )
        return p.ch_abs_dev / (p.count // len(p.ch_abs_dev))

    @property
    def ch_std(self) -> np.ndarray:
        self._need_channels()
        return np.sqrt(np.maximum(self.ch_m2, 0.0) / self.ch_count)

    @property
    def has_hist(self) -> bool:
        return self.histogram is not None

    def _need_hist(self) -> Histogram:
        if self.histogram is None:
            raise BadDataError("statistics lack histograms; collect them with histograms")
        return self.histogram

    @property
    def hist(self) -> np.ndarray:
        """Signed histogram: 2·k counts of width `bin_width` over [−hist_range, hist_range], k >= bins."""
        return self._need_hist().signed(self.amax)

    @property
    def abs_hist(self) -> np.ndarray:
        """Histogram of |x|: k counts of width `bin_width` over [0, hist_range] (the fold of `hist`)."""
        h = self.hist
        n = h.size // 2
        return h[n:] + h[:n][::-1]

    @property
    def bin_width(self) -> float:
        return self._need_hist().width

    @property
    def hist_range(self) -> float:
        return self.hist.size // 2 * self.bin_width

    @property
    def zeros(self) -> int:
        """Exact zeros among the values."""
        return self._need_hist().zeros

    # ---- accumulation --------------------------------------------------------------------------------------
    def update_pass1(self, x: np.ndarray, channels: bool = False) -> None:
        """Add one batch to the pass-1 accumulators (`channels`: also per channel on axis 1)."""
        if x.size == 0:
            return
        lo, hi, total, m2 = scan(x, self.histogram)
        self.m2 = combined_m2(self.count, self.sum, self.m2, x.size, total, m2)
        self.count += int(x.size)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.sum += total
        if channels:
            axes = _other_axes(x)
            n = x.size // x.shape[1]
            cmin, cmax = x.min(axis=axes).astype(np.float64), x.max(axis=axes).astype(np.float64)
            csum = np.sum(x, axis=axes, dtype=np.float64)
            centre = _channel_view(csum / n, x.ndim).astype(np.float32)
            cm2 = np.sum(np.square(x.astype(np.float32, copy=False) - centre), axis=axes, dtype=np.float64)
            cm2 -= n * (csum / n - centre.reshape(-1)) ** 2  # M2 around the exact channel means
            if self.ch_min is None:
                self.ch_min, self.ch_max, self.ch_sum, self.ch_m2 = cmin, cmax, csum, cm2
            else:
                _same_channels(self.ch_min, cmin)
                self.ch_m2 = combined_m2(self.ch_count, self.ch_sum, self.ch_m2, n, csum, cm2)
                self.ch_min = np.minimum(self.ch_min, cmin)
                self.ch_max = np.maximum(self.ch_max, cmax)
                self.ch_sum = self.ch_sum + csum
            self.ch_count += n

    def start_pass2(self) -> Pass2:
        """Fresh pass-2 accumulators referenced to this object's pass-1 means."""
        p = Pass2(ref_mean=self.mean)
        if self.ch_min is not None:
            p.ch_ref_mean = self.ch_mean
            p.ch_abs_dev = np.zeros_like(p.ch_ref_mean)
        return p

    # ---- merging -------------------------------------------------------------------------------------------
    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of the union of both data sets (see the module docstring for the pass-2 rule)."""
        ch = {}
        if (self.ch_min is None) != (other.ch_min is None):
            raise BadDataError("cannot merge statistics with and without per-channel values")
        if (self.histogram is None) != (other.histogram is None):
            raise BadDataError("cannot merge statistics with and without histograms")
        if self.ch_min is not None:
            _same_channels(self.ch_min, other.ch_min)
            ch = {
                "ch_count": self.ch_count + other.ch_count,
                "ch_min": np.minimum(self.ch_min, other.ch_min),
                "ch_max": np.maximum(self.ch_max, other.ch_max),
                "ch_sum": self.ch_sum + other.ch_sum,
                "ch_m2": combined_m2(
                    self.ch_count, self.ch_sum, self.ch_m2, other.ch_count, other.ch_sum, other.ch_m2
                ),
            }
        hist = self.histogram.merge(other.histogram) if self.histogram is not None else None
        return TensorStats(
            count=self.count + other.count,
            min=min(self.min, other.min),
            max=max(self.max, other.max),
            sum=self.sum + other.sum,
            m2=combined_m2(self.count, self.sum, self.m2, other.count, other.sum, other.m2),
            **ch,
            histogram=hist,
            pass2=_merge_pass2(self.pass2, other.pass2),
        )


def update_pass2(p: Pass2, x: np.ndarray) -> None:
    """Add one batch to pass-2 accumulators `p` (absolute deviations, per tensor and per channel)."""
    if x.size == 0:
        return
    p.count += int(x.size)
    ref = np.float32(p.ref_mean)
    buf = workspace()[0]
    parts = [
        float(np.sum(np.abs(np.subtract(c, ref, out=buf[: c.size]))))
        for c in chunks(np.ascontiguousarray(x, np.float32))
    ]
    p.abs_dev += math.fsum(parts)
    if p.ch_ref_mean is not None:
        centre = _channel_view(p.ch_ref_mean, x.ndim).astype(np.float32)
        dc = np.abs(x.astype(np.float32, copy=False) - centre)
        p.ch_abs_dev = p.ch_abs_dev + np.sum(dc, axis=_other_axes(x), dtype=np.float64)


def _channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    """Per-channel vector `v` shaped to broadcast along axis 1 of an `ndim`-dimensional tensor."""
    return v.reshape([1, -1] + [1] * (ndim - 2))


def merge_all(a: dict[str, TensorStats], b: dict[str, TensorStats]) -> dict[str, TensorStats]:
    """Merge two statistics dicts over the same tensors."""
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise BadDataError(
            f"cannot merge statistics of different tensors: {', '.join(diff[:10])} "
            f"in only one of them; accepted: statistics collected for the same tensors"
        )
    out = {}
    for name, st in a.items():
        try:
            out[name] = st.merge(b[name])
        except OnnxQuantError as exc:
            raise type(exc)(f"tensor {name}: {exc}") from exc
    return out


def _merge_pass2(a: Pass2 | None, b: Pass2 | None) -> Pass2 | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise BadDataError("cannot merge statistics with and without pass 2")
    if (
        a.ref_mean != b.ref_mean
        or (a.ch_ref_mean is None) != (b.ch_ref_mean is None)
        or (a.ch_ref_mean is not None and not np.array_equal(a.ch_ref_mean, b.ch_ref_mean))
    ):
        raise BadDataError(
            "pass 2 of the two statistics used different pass-1 references; protocol: run "
            "pass 1 on every shard, merge, then pass 2 on every shard against the merged "
            "pass 1"
        )
    add = lambda u, v: None if u is None else u + v
    return Pass2(
        ref_mean=a.ref_mean,
        count=a.count + b.count,
        abs_dev=a.abs_dev + b.abs_dev,
        ch_ref_mean=a.ch_ref_mean,
        ch_abs_dev=add(a.ch_abs_dev, b.ch_abs_dev),
    )


def _other_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise BadModelError(f"per-channel statistics need a channel axis 1; the tensor has shape {x.shape}")
    return tuple(i for i in range(x.ndim) if i != 1)


def _same_channels(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise BadDataError(f"channel count changed: {a.shape[0]} vs {b.shape[0]}")


def stats_of(
    batches: Iterable[np.ndarray] | np.ndarray,
    *,
    bins: int = DEFAULT_BINS,
    per_channel: bool = False,
    histograms: bool = True,
    moments: bool = True,
) -> TensorStats:
    """Statistics of an array, or of a re-iterable of batches, as `engine.collect_stats` gathers them
    (`per_channel` with the per-channel b); no model, for tests and tools."""
    if isinstance(batches, np.ndarray):
        batches = [batches]
    st = TensorStats(histogram=Histogram.empty(bins, sums=moments) if histograms or moments else None)
    for x in batches:
        st.update_pass1(np.asarray(x), per_channel)
    if moments and (per_channel or st.mad_needs_pass2):
        p = st.start_pass2()
        for x in batches:
            update_pass2(p, np.asarray(x))
        st.pass2 = p
    return st

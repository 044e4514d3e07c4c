"""Streaming, mergeable per-tensor statistics for calibration.

Memory is bounded by the statistics themselves (a few scalars, one histogram, optional per-channel vectors),
never by the number of samples. Two passes:

- pass 1: count n, min, max and Σx (float64), so mean = Σx / n; per channel (axis 1) the same per channel.
- pass 2, with the pass-1 results fixed: the reference mean m and the histogram range A = max(|min|, |max|)
  are taken from pass 1, then Σ|x − m| (Laplace b = Σ|x − m| / n), Σ(x − m)² (σ² = Σ(x − m)² / n) and a
  signed histogram of 2·bins equal bins over [−A, A] (bin k holds x with ⌊x·bins/A⌋ = k − bins, x = A goes
  to the last bin). The histogram of |x| with `bins` bins over [0, A] (TensorRT's) is its fold:
  `abs_hist[k] = hist[bins + k] + hist[bins − 1 − k]`; for a non-negative tensor it is the upper half.

Because the histogram range is fixed before pass 2 starts, the histogram is a pure function of the data set:
it does not depend on batch size or order. Sums are float64, so moments agree to float rounding.

Merging (`TensorStats.merge`) adds everything: min of mins, max of maxes, sums and histogram counts. Pass-2
parts merge only when they were collected against the same pass-1 reference (same m, A and bins), which
gives the sharding protocol:

1. each shard: pass 1 only;  2. merge the pass-1 results;  3. each shard: pass 2 against the merged pass 1
(which also recomputes the shard's own pass-1 part);  4. merge the shard results.

The result equals one run over all the data (histograms exactly, moments up to float rounding).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from onnxquant.errors import OnnxQuantError

log = logging.getLogger(__name__)

DEFAULT_BINS = 2048


class NonFiniteError(OnnxQuantError):
    """A batch holds NaN or Inf."""


@dataclass
class Pass2:
    """Pass-2 accumulators, collected against a fixed reference mean and histogram range."""

    ref_mean: float
    hist_range: float
    bins: int
    moments: bool = True  # whether abs_dev / sq_dev (and per-channel ones) are accumulated
    count: int = 0
    abs_dev: float = 0.0
    sq_dev: float = 0.0
    hist: np.ndarray | None = None  # int64, 2·bins over [−hist_range, hist_range]
    zeros: int = 0  # exact zeros among the histogrammed values (e.g. clamped by a Relu)
    ch_ref_mean: np.ndarray | None = None
    ch_abs_dev: np.ndarray | None = None
    ch_sq_dev: np.ndarray | None = None


@dataclass
class TensorStats:
    """Statistics of one tensor over the calibration set (pass 1 always, pass 2 when collected)."""

    count: int = 0
    min: float = np.inf
    max: float = -np.inf
    sum: float = 0.0
    ch_count: int = 0  # elements per channel
    ch_min: np.ndarray | None = None
    ch_max: np.ndarray | None = None
    ch_sum: np.ndarray | None = None
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

    def _need_pass2(self) -> Pass2:
        if self.pass2 is None or self.pass2.count == 0:
            raise OnnxQuantError("statistics lack pass 2 (deviations, histogram); collect a second pass")
        return self.pass2

    def _need_channels(self) -> None:
        if self.ch_min is None:
            raise OnnxQuantError("statistics lack per-channel values; collect them with per_channel")

    def _need_moments(self) -> Pass2:
        p = self._need_pass2()
        if not p.moments:
            raise OnnxQuantError("statistics lack deviations (Laplace b, σ); collect pass 2 with moments")
        return p

    @property
    def mad(self) -> float:
        """Mean absolute deviation around the mean: the Laplace scale b."""
        p = self._need_moments()
        return p.abs_dev / p.count

    @property
    def std(self) -> float:
        p = self._need_moments()
        return float(np.sqrt(p.sq_dev / p.count))

    @property
    def ch_mad(self) -> np.ndarray:
        p = self._need_moments()
        if p.ch_abs_dev is None:
            self._need_channels()
            raise OnnxQuantError("statistics lack per-channel deviations; collect pass 2 with per_channel")
        return p.ch_abs_dev / (p.count // len(p.ch_abs_dev))

    @property
    def ch_std(self) -> np.ndarray:
        p = self._need_moments()
        if p.ch_sq_dev is None:
            raise OnnxQuantError("statistics lack per-channel deviations; collect pass 2 with per_channel")
        return np.sqrt(p.ch_sq_dev / (p.count // len(p.ch_sq_dev)))

    @property
    def has_hist(self) -> bool:
        return self.pass2 is not None and self.pass2.hist is not None

    @property
    def hist(self) -> np.ndarray:
        """Signed histogram: 2·bins counts over [−A, A]."""
        p = self._need_pass2()
        if p.hist is None:
            raise OnnxQuantError("statistics lack histograms; collect pass 2 with histograms")
        return p.hist

    @property
    def abs_hist(self) -> np.ndarray:
        """Histogram of |x|: bins counts over [0, A]."""
        h, n = self.hist, self.pass2.bins
        return h[n:] + h[:n][::-1]

    @property
    def hist_range(self) -> float:
        return self._need_pass2().hist_range

    # ---- accumulation --------------------------------------------------------------------------------------
    def update_pass1(self, x: np.ndarray, channels: bool = False) -> None:
        """Add one batch to the pass-1 accumulators (`channels`: also per channel on axis 1)."""
        if x.size == 0:
            return
        lo, hi = x.min(), x.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise NonFiniteError("NaN or Inf value")
        self.count += int(x.size)
        self.min = float(min(self.min, lo))
        self.max = float(max(self.max, hi))
        self.sum += float(np.sum(x, dtype=np.float64))
        if channels:
            axes = _other_axes(x)
            cmin, cmax = x.min(axis=axes).astype(np.float64), x.max(axis=axes).astype(np.float64)
            csum = np.sum(x, axis=axes, dtype=np.float64)
            if self.ch_min is None:
                self.ch_min, self.ch_max, self.ch_sum = cmin, cmax, csum
            else:
                _same_channels(self.ch_min, cmin)
                self.ch_min = np.minimum(self.ch_min, cmin)
                self.ch_max = np.maximum(self.ch_max, cmax)
                self.ch_sum = self.ch_sum + csum
            self.ch_count += x.size // x.shape[1]

    def start_pass2(self, bins: int, histograms: bool, moments: bool = True) -> Pass2:
        """Fresh pass-2 accumulators referenced to this object's pass-1 results."""
        p = Pass2(ref_mean=self.mean, hist_range=self.amax, bins=bins, moments=moments)
        if histograms:
            p.hist = np.zeros(2 * bins, np.int64)
        if self.ch_min is not None and moments:
            p.ch_ref_mean = self.ch_mean
            p.ch_abs_dev = np.zeros_like(p.ch_ref_mean)
            p.ch_sq_dev = np.zeros_like(p.ch_ref_mean)
        return p

    # ---- merging -------------------------------------------------------------------------------------------
    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of the union of both data sets (see the module docstring for the pass-2 rule)."""
        ch = {}
        if (self.ch_min is None) != (other.ch_min is None):
            raise OnnxQuantError("cannot merge statistics with and without per-channel values")
        if self.ch_min is not None:
            _same_channels(self.ch_min, other.ch_min)
            ch = {"ch_count": self.ch_count + other.ch_count, "ch_min": np.minimum(self.ch_min, other.ch_min),
                  "ch_max": np.maximum(self.ch_max, other.ch_max), "ch_sum": self.ch_sum + other.ch_sum}
        return TensorStats(count=self.count + other.count, min=min(self.min, other.min),
                           max=max(self.max, other.max), sum=self.sum + other.sum, **ch,
                           pass2=_merge_pass2(self.pass2, other.pass2))


def update_pass2(p: Pass2, x: np.ndarray) -> None:
    """Add one batch to pass-2 accumulators `p` (deviations, histogram, per-channel deviations)."""
    if x.size == 0:
        return
    p.count += int(x.size)
    if p.moments:
        d = x.astype(np.float32, copy=False) - np.float32(p.ref_mean)
        p.sq_dev += float(np.sum(np.square(d), dtype=np.float64))
        p.abs_dev += float(np.sum(np.abs(d, out=d), dtype=np.float64))
    if p.ch_ref_mean is not None:
        axes = _other_axes(x)
        shape = [1] * x.ndim
        shape[1] = -1
        dc = x.astype(np.float32, copy=False) - p.ch_ref_mean.astype(np.float32).reshape(shape)
        p.ch_abs_dev = p.ch_abs_dev + np.sum(np.abs(dc), axis=axes, dtype=np.float64)
        p.ch_sq_dev = p.ch_sq_dev + np.sum(np.square(dc), axis=axes, dtype=np.float64)
    if p.hist is not None:
        p.hist += histogram(x, p.hist_range, p.bins)
        p.zeros += int(x.size - np.count_nonzero(x))


def histogram(x: np.ndarray, hist_range: float, bins: int) -> np.ndarray:
    """Signed histogram of `x`: 2·bins equal bins over [−hist_range, hist_range], outside values clipped."""
    n = 2 * bins
    if hist_range <= 0:  # all zeros
        counts = np.zeros(n, np.int64)
        counts[bins] = x.size
        return counts
    y = x.astype(np.float32, copy=False).ravel() * np.float32(bins / hist_range)
    np.floor(y, out=y)
    np.clip(y, -bins, bins - 1, out=y)
    y += np.float32(bins)
    return np.bincount(y.astype(np.intp), minlength=n).astype(np.int64)


def bin_width(st: TensorStats) -> float:
    p = st._need_pass2()
    return p.hist_range / p.bins


def merge_all(a: dict[str, TensorStats], b: dict[str, TensorStats]) -> dict[str, TensorStats]:
    """Merge two statistics dicts over the same tensors."""
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise OnnxQuantError(f"cannot merge statistics of different tensors: {', '.join(diff[:10])} "
                             f"in only one of them; accepted: statistics collected for the same tensors")
    out = {}
    for name, st in a.items():
        try:
            out[name] = st.merge(b[name])
        except OnnxQuantError as exc:
            raise OnnxQuantError(f"tensor {name}: {exc}") from exc
    return out


def _merge_pass2(a: Pass2 | None, b: Pass2 | None) -> Pass2 | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise OnnxQuantError("cannot merge statistics with and without pass 2")
    if (a.ref_mean, a.hist_range, a.bins, a.moments) != (b.ref_mean, b.hist_range, b.bins, b.moments) or \
            (a.hist is None) != (b.hist is None) or (a.ch_ref_mean is None) != (b.ch_ref_mean is None) or \
            (a.ch_ref_mean is not None and not np.array_equal(a.ch_ref_mean, b.ch_ref_mean)):
        raise OnnxQuantError("pass 2 of the two statistics used different pass-1 references; protocol: run "
                             "pass 1 on every shard, merge, then pass 2 on every shard against the merged "
                             "pass 1")
    add = (lambda u, v: None if u is None else u + v)
    return Pass2(ref_mean=a.ref_mean, hist_range=a.hist_range, bins=a.bins, moments=a.moments,
                 count=a.count + b.count, abs_dev=a.abs_dev + b.abs_dev, sq_dev=a.sq_dev + b.sq_dev,
                 hist=add(a.hist, b.hist), zeros=a.zeros + b.zeros,
                 ch_ref_mean=a.ch_ref_mean, ch_abs_dev=add(a.ch_abs_dev, b.ch_abs_dev),
                 ch_sq_dev=add(a.ch_sq_dev, b.ch_sq_dev))


def _other_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise OnnxQuantError(f"per-channel statistics need a channel axis 1; the tensor has shape {x.shape}")
    return tuple(i for i in range(x.ndim) if i != 1)


def _same_channels(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise OnnxQuantError(f"channel count changed: {a.shape[0]} vs {b.shape[0]}")


def stats_of(batches: Iterable[np.ndarray] | np.ndarray, *, bins: int = DEFAULT_BINS,
             per_channel: bool = False, pass2: bool = True, histograms: bool = True,
             moments: bool = True) -> TensorStats:
    """Two-pass statistics of an array, or of a re-iterable of batches (no model; for tests and tools)."""
    if isinstance(batches, np.ndarray):
        batches = [batches]
    st = TensorStats()
    for x in batches:
        st.update_pass1(np.asarray(x), per_channel)
    if pass2:
        p = st.start_pass2(bins, histograms, moments)
        for x in batches:
            update_pass2(p, np.asarray(x))
        st.pass2 = p
    return st

"""Streaming, mergeable per-tensor statistics for calibration.

Memory is bounded by the statistics themselves (a few scalars, one histogram, optional per-channel vectors),
never by the number of samples. At most two passes:

- pass 1: count n, min, max and Σx (float64 across chunks), so mean = Σx / n; per channel (axis 1) the same
  per channel; and, for the histogram methods, a signed histogram (`Histogram`) with the exact-zero count.
- pass 2, only for the moment methods (laplace, gauss), with the pass-1 mean m fixed: Σ|x − m| (Laplace
  b = Σ|x − m| / n) and Σ(x − m)² (σ² = Σ(x − m)² / n), per tensor and, when asked, per channel.

The histogram lives on a power-of-two grid, so it needs no first pass for its range and still does not depend
on batch size or order. With n = 2·bins bins per side, its range R is the smallest power of two above every
|x| seen and w = R/n. Exact zeros (a Relu's clamped outputs) have a bin of their own; x ≠ 0 goes to the bin
of its sign at magnitude m = ⌈|x|/w⌉ (1..n, bin m holds (m−1)·w < |x| <= m·w). When a batch raises max|x|
past R, R doubles (as often as needed) and neighbouring magnitude bins merge. Because w only ever doubles,
⌈a/2⌉ = ⌈⌈a⌉/2⌉ holds exactly in floating point (|x|/w is a scaling by a power of two), so a merged histogram
equals the one binned directly on the final grid: the result is a pure function of the data set. Consumers
see it cropped to the k = ⌈max|x|/w⌉ magnitudes that cover max|x| (bins <= k <= 2·bins, so never coarser than
`bins` bins over [0, max|x|]) as a signed histogram of 2·k bins, zeros counted in the first positive bin; the
histogram of |x| (TensorRT's) is its exact fold `abs_hist[k] = hist[n + k] + hist[n − 1 − k]`.

Merging (`TensorStats.merge`) adds everything: min of mins, max of maxes, sums and histogram counts (on the
coarser of the two grids). Pass-2 parts merge only when they were collected against the same pass-1 mean,
which gives the sharding protocol for the moment methods:

1. each shard: pass 1 only;  2. merge the pass-1 results;  3. each shard: pass 2 against the merged pass 1
(which also recomputes the shard's own pass-1 part);  4. merge the shard results.

The result equals one run over all the data (histograms exactly, moments up to float rounding). Histogram
methods need only steps 1 and 2.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from onnxquant.errors import OnnxQuantError

log = logging.getLogger(__name__)

DEFAULT_BINS = 2048
CHUNK = 1 << 16  # elements per cache-sized block of a batch
LANES = 2  # neighbouring elements count into separate arrays, so a run of equal values (Relu zeros) does not
#            wait on one counter
SIGN_BIT = np.uint32(0x80000000)


class NonFiniteError(OnnxQuantError):
    """A batch holds NaN or Inf."""


def _chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    flat = x.reshape(-1)
    for i in range(0, flat.size, CHUNK):
        yield flat[i:i + CHUNK]


@dataclass
class Histogram:
    """Histogram on a power-of-two grid with an exact-zero bin (see the module docstring)."""

    bins: int  # requested resolution: at least this many bins over [0, max|x|]
    grid: float = 0.0  # R, a power of two above every |x| added; 0 while every value was 0
    counts: np.ndarray | None = None  # int64, 2·side + 1: index side + sign(x)·⌈|x|·side/R⌉

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(2 * self.side + 1, np.int64)

    @property
    def side(self) -> int:
        return 2 * self.bins

    @property
    def width(self) -> float:
        return self.grid / self.side

    @property
    def zeros(self) -> int:
        return int(self.counts[self.side])

    def add(self, x: np.ndarray) -> None:
        """Add the values of `x` (NonFiniteError on NaN or Inf)."""
        scan(x, self)

    def regrid(self, grid: float) -> None:
        """Coarsen to range `grid` (a power of two >= the current one) by merging bins."""
        if grid <= self.grid:
            return
        side = self.side
        if self.grid > 0:
            factor = round(grid / self.grid)
            signed = np.arange(2 * side + 1) - side
            target = side + np.sign(signed) * (-(-np.abs(signed) // factor))
            self.counts = np.bincount(target, weights=self.counts, minlength=2 * side + 1).astype(np.int64)
        self.grid = grid

    def merge(self, other: Histogram) -> Histogram:
        if self.bins != other.bins:
            raise OnnxQuantError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        a, b = Histogram(self.bins, self.grid, self.counts.copy()), \
            Histogram(other.bins, other.grid, other.counts.copy())
        a.regrid(b.grid)
        b.regrid(a.grid)
        return Histogram(self.bins, a.grid, a.counts + b.counts)

    def signed(self, amax: float) -> np.ndarray:
        """2·k counts of bins of `width` over [−k·width, k·width], the fewest k that cover max|x| = amax."""
        side = self.side
        k = 1 if self.grid == 0 else max(1, min(side, math.ceil(amax * side / self.grid)))
        h = self.counts[side - k:side + k + 1]
        return np.concatenate([h[:k], h[k:k + 1] + h[k + 1:k + 2], h[k + 2:]])


def scan(x: np.ndarray, hist: Histogram | None = None) -> tuple[float, float, float]:
    """Min, max and sum of the values of `x` (as float32), binned into `hist` on the way.

    One pass in cache-sized chunks; sums are float32 pairwise within a chunk and exact (fsum) across chunks.
    Raises NonFiniteError on NaN or Inf.
    """
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    counter = _Counter(hist) if hist is not None else None
    lo, hi, sums = np.float32(np.inf), np.float32(-np.inf), []
    for c in _chunks(flat):
        c_lo, c_hi = c.min(), c.max()
        if not (np.isfinite(c_lo) and np.isfinite(c_hi)):
            raise NonFiniteError("NaN or Inf value")
        lo, hi = min(lo, c_lo), max(hi, c_hi)
        sums.append(float(np.sum(c)))
        if counter is not None:
            counter.add(c, float(max(-c_lo, c_hi, 0)), negative=bool(c_lo < 0))
    if counter is not None:
        counter.flush()
    return float(lo), float(hi), math.fsum(sums)


class _Counter:
    """Bins chunks into a Histogram: element i counts into lane i mod LANES, lanes fold in on a regrid or flush."""

    def __init__(self, hist: Histogram) -> None:
        self.hist = hist
        self.step = 2 * hist.side + 1  # bins per lane
        self.offsets = _lane_offsets(hist.side)
        self.lanes: np.ndarray | None = None
        self.buf, self.idx, self.sign = _workspace()

    def add(self, c: np.ndarray, amax: float, negative: bool) -> None:
        """Bin chunk `c` (contiguous float32, all |c| <= amax; `negative`: some values are < 0)."""
        hist, side = self.hist, self.hist.side
        grid = _grid_above(amax)
        if grid > hist.grid:
            self.flush()
            hist.regrid(grid)
        if hist.grid == 0:
            hist.counts[side] += c.size
            return
        if self.lanes is None:
            self.lanes = _lanes(self.step)
        f, i = self.buf[:c.size], self.idx[:c.size]
        np.multiply(np.abs(c, out=f) if negative else c, np.float32(side / hist.grid), out=f)  # exact scale
        np.ceil(f, out=f)  # |x|·scale < side, so at most side
        if negative:  # f gets the sign bit of x
            sign = np.bitwise_and(c.view(np.uint32), SIGN_BIT, out=self.sign[:c.size])
            np.bitwise_or(f.view(np.uint32), sign, out=f.view(np.uint32))
        f += self.offsets[:c.size]
        np.copyto(i, f, casting="unsafe")
        np.add.at(self.lanes, i, 1)

    def flush(self) -> None:
        if self.lanes is not None:
            self.hist.counts += self.lanes.reshape(LANES, -1).sum(axis=0)
            self.lanes = None


_local = threading.local()


def _workspace() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's chunk buffers (values, bin indices, sign bits), allocated once: fresh pages cost faults."""
    if not hasattr(_local, "work"):
        _local.work = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.intp), np.empty(CHUNK, np.uint32)
    return _local.work


def _lanes(step: int) -> np.ndarray:
    """This thread's zeroed lane counts for histograms of `step` bins."""
    lanes = getattr(_local, "lanes", {}).get(step)
    if lanes is None:
        _local.lanes = {step: np.zeros(LANES * step, np.int64)}
        return _local.lanes[step]
    lanes.fill(0)
    return lanes


@cache
def _lane_offsets(side: int) -> np.ndarray:
    """float32, CHUNK: the sign origin (bin 0) of element i's lane, side + (i mod LANES)·(2·side + 1)."""
    return (side + np.arange(CHUNK) % LANES * (2 * side + 1)).astype(np.float32)


def _grid_above(amax: float) -> float:
    """The smallest power of two above `amax` (0 for 0)."""
    return 0.0 if amax <= 0 else math.ldexp(1.0, math.frexp(amax)[1])


@dataclass
class Pass2:
    """Pass-2 accumulators: deviations around a fixed reference mean (and per-channel means)."""

    ref_mean: float
    count: int = 0
    abs_dev: float = 0.0
    sq_dev: float = 0.0
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
            raise OnnxQuantError("statistics lack per-channel values; collect them with per_channel")

    def _need_moments(self) -> Pass2:
        if self.pass2 is None or self.pass2.count == 0:
            raise OnnxQuantError("statistics lack deviations (Laplace b, σ); collect pass 2 with moments")
        return self.pass2

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
        return self.histogram is not None

    def _need_hist(self) -> Histogram:
        if self.histogram is None:
            raise OnnxQuantError("statistics lack histograms; collect them with histograms")
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
        lo, hi, total = scan(x, self.histogram)
        self.count += int(x.size)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.sum += total
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

    def start_pass2(self) -> Pass2:
        """Fresh pass-2 accumulators referenced to this object's pass-1 means."""
        p = Pass2(ref_mean=self.mean)
        if self.ch_min is not None:
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
        if (self.histogram is None) != (other.histogram is None):
            raise OnnxQuantError("cannot merge statistics with and without histograms")
        if self.ch_min is not None:
            _same_channels(self.ch_min, other.ch_min)
            ch = {"ch_count": self.ch_count + other.ch_count, "ch_min": np.minimum(self.ch_min, other.ch_min),
                  "ch_max": np.maximum(self.ch_max, other.ch_max), "ch_sum": self.ch_sum + other.ch_sum}
        hist = self.histogram.merge(other.histogram) if self.histogram is not None else None
        return TensorStats(count=self.count + other.count, min=min(self.min, other.min),
                           max=max(self.max, other.max), sum=self.sum + other.sum, **ch, histogram=hist,
                           pass2=_merge_pass2(self.pass2, other.pass2))


def update_pass2(p: Pass2, x: np.ndarray) -> None:
    """Add one batch to pass-2 accumulators `p` (deviations, per-channel deviations)."""
    if x.size == 0:
        return
    p.count += int(x.size)
    ref = np.float32(p.ref_mean)
    buf = np.empty(CHUNK, np.float32)
    abs_parts, sq_parts = [], []
    for c in _chunks(x.astype(np.float32, copy=False)):
        d = np.subtract(c, ref, out=buf[:c.size])
        abs_parts.append(float(np.sum(np.abs(d))))
        sq_parts.append(float(np.sum(np.square(d, out=d))))
    p.sq_dev += math.fsum(sq_parts)
    p.abs_dev += math.fsum(abs_parts)
    if p.ch_ref_mean is not None:
        axes = _other_axes(x)
        shape = [1] * x.ndim
        shape[1] = -1
        dc = x.astype(np.float32, copy=False) - p.ch_ref_mean.astype(np.float32).reshape(shape)
        p.ch_abs_dev = p.ch_abs_dev + np.sum(np.abs(dc), axis=axes, dtype=np.float64)
        p.ch_sq_dev = p.ch_sq_dev + np.sum(np.square(dc), axis=axes, dtype=np.float64)


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
    if a.ref_mean != b.ref_mean or (a.ch_ref_mean is None) != (b.ch_ref_mean is None) or \
            (a.ch_ref_mean is not None and not np.array_equal(a.ch_ref_mean, b.ch_ref_mean)):
        raise OnnxQuantError("pass 2 of the two statistics used different pass-1 references; protocol: run "
                             "pass 1 on every shard, merge, then pass 2 on every shard against the merged "
                             "pass 1")
    add = (lambda u, v: None if u is None else u + v)
    return Pass2(ref_mean=a.ref_mean, count=a.count + b.count, abs_dev=a.abs_dev + b.abs_dev,
                 sq_dev=a.sq_dev + b.sq_dev, ch_ref_mean=a.ch_ref_mean,
                 ch_abs_dev=add(a.ch_abs_dev, b.ch_abs_dev), ch_sq_dev=add(a.ch_sq_dev, b.ch_sq_dev))


def _other_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise OnnxQuantError(f"per-channel statistics need a channel axis 1; the tensor has shape {x.shape}")
    return tuple(i for i in range(x.ndim) if i != 1)


def _same_channels(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise OnnxQuantError(f"channel count changed: {a.shape[0]} vs {b.shape[0]}")


def stats_of(batches: Iterable[np.ndarray] | np.ndarray, *, bins: int = DEFAULT_BINS,
             per_channel: bool = False, histograms: bool = True, moments: bool = True) -> TensorStats:
    """Statistics of an array, or of a re-iterable of batches (no model; for tests and tools)."""
    if isinstance(batches, np.ndarray):
        batches = [batches]
    st = TensorStats(histogram=Histogram(bins) if histograms else None)
    for x in batches:
        st.update_pass1(np.asarray(x), per_channel)
    if moments:
        p = st.start_pass2()
        for x in batches:
            update_pass2(p, np.asarray(x))
        st.pass2 = p
    return st

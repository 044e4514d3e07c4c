"""Streaming histograms on a power-of-two grid with an exact-zero bin.

The histogram needs no first pass for its range and still does not depend on batch size or order. With
n = 2·bins bins per side, its range R is the smallest power of two above every |x| seen and w = R/n. Exact
zeros (a Relu's clamped outputs) have a bin of their own; x ≠ 0 goes to the bin of its sign at magnitude
m = ⌈|x|/w⌉ (1..n, bin m holds (m−1)·w < |x| <= m·w). When a chunk raises max|x| past R, R doubles (as often
as needed) and neighbouring magnitude bins merge. Because w only ever doubles, ⌈a/2⌉ = ⌈⌈a⌉/2⌉ holds exactly
in floating point (|x|/w is a scaling by a power of two), so a merged histogram equals the one binned directly
on the final grid: the result is a pure function of the data set. Consumers see it cropped to the
k = ⌈max|x|/w⌉ magnitudes that cover max|x| (bins <= k <= 2·bins, so never coarser than `bins` bins over
[0, max|x|]) as a signed histogram of 2·k bins, zeros counted in the first positive bin; the histogram of |x|
(TensorRT's) is its exact fold `abs_hist[k] = hist[n + k] + hist[n − 1 − k]`.

For the Laplace b the histogram can also keep the sum of the values in every bin: Σ(x − m) over x > m is then
exact but for the one bin that straddles m (`Histogram.excess_above`).

Binning (`Binner`) runs over cache-sized chunks of float32 values; element i counts into lane i mod LANES, so
a run of equal values does not wait on one counter.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np

from onnxquant.errors import BadDataError, InternalError

CHUNK = 1 << 16  # elements per cache-sized block of a batch
LANES = 2  # neighbouring elements count into separate arrays, so a run of equal values (Relu zeros) does not
#            wait on one counter
SIGN_BIT = np.uint32(0x80000000)


def chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """The values of `x`, flattened, in blocks of CHUNK elements."""
    flat = x.reshape(-1)
    for i in range(0, flat.size, CHUNK):
        yield flat[i : i + CHUNK]


@dataclass
class Histogram:
    """Histogram on a power-of-two grid with an exact-zero bin (see the module docstring)."""

    bins: int  # requested resolution: at least this many bins over [0, max|x|]
    grid: float = 0.0  # R, a power of two above every |x| added; 0 while every value was 0
    counts: np.ndarray | None = None  # int64, 2·side + 1: index side + sign(x)·⌈|x|·side/R⌉
    sums: np.ndarray | None = None  # float64 like counts, the sum of each bin's values; None: not kept

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(2 * self.side + 1, np.int64)

    @classmethod
    def empty(cls, bins: int, sums: bool = False) -> Histogram:
        return cls(bins, sums=np.zeros(4 * bins + 1) if sums else None)

    @property
    def side(self) -> int:
        return 2 * self.bins

    @property
    def width(self) -> float:
        return self.grid / self.side

    @property
    def zeros(self) -> int:
        return int(self.counts[self.side])

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
            if self.sums is not None:
                self.sums = np.bincount(target, weights=self.sums, minlength=2 * side + 1)
        self.grid = grid

    def copy(self) -> Histogram:
        return Histogram(
            self.bins, self.grid, self.counts.copy(), None if self.sums is None else self.sums.copy()
        )

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both data sets (on the coarser grid)."""
        if self.bins != other.bins:
            raise BadDataError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        if (self.sums is None) != (other.sums is None):
            raise BadDataError("cannot merge histograms with and without per-bin sums")
        a, b = self.copy(), other.copy()
        a.regrid(b.grid)
        b.regrid(a.grid)
        return Histogram(self.bins, a.grid, a.counts + b.counts, None if a.sums is None else a.sums + b.sums)

    def excess_above(self, mean: float) -> tuple[float, float]:
        """Σ(x − mean) over the values above `mean`, from the per-bin sums, and a bound on its error.

        Bins wholly above `mean` count exactly; the one bin that straddles it counts as if its values sat at
        their average, which is short by at most its count times the bin width.
        """
        if self.sums is None:
            raise InternalError("excess_above on a histogram without per-bin sums")
        k = np.arange(-self.side, self.side + 1)
        lower = (
            np.where(k > 0, k - 1, k) * self.width
        )  # bin k holds lower < x <= upper (x > 0), lower <= x < upper
        upper = np.where(k < 0, k + 1, k) * self.width
        above = lower >= mean
        straddle = (lower < mean) & (mean < upper)
        n_mid, s_mid = int(self.counts[straddle].sum()), float(self.sums[straddle].sum())
        excess = float(self.sums[above].sum()) - mean * float(self.counts[above].sum())
        return excess + max(0.0, s_mid - mean * n_mid), n_mid * self.width

    def signed(self, amax: float) -> np.ndarray:
        """2·k counts of bins of `width` over [−k·width, k·width], the fewest k that cover max|x| = amax."""
        side = self.side
        k = 1 if self.grid == 0 else max(1, min(side, math.ceil(amax * side / self.grid)))
        h = self.counts[side - k : side + k + 1]
        return np.concatenate([h[:k], h[k : k + 1] + h[k + 1 : k + 2], h[k + 2 :]])


class Binner:
    """Bins chunks into a Histogram: element i counts into lane i mod LANES, lanes fold in on a regrid or
    flush."""

    def __init__(self, hist: Histogram) -> None:
        self.hist = hist
        self.step = 2 * hist.side + 1  # bins per lane
        self.offsets = _lane_offsets(hist.side)
        self.lanes: np.ndarray | None = None
        self.sum_lanes: np.ndarray | None = None
        self.buf, self.idx, self.sign, self.wide = workspace()

    def add(self, c: np.ndarray, amax: float, negative: bool) -> None:
        """Bin chunk `c` (contiguous float32, all |c| <= amax; `negative`: some values are < 0)."""
        hist, side = self.hist, self.hist.side
        grid = grid_above(amax)
        if grid > hist.grid:
            self.flush()
            hist.regrid(grid)
        if hist.grid == 0:
            hist.counts[side] += c.size
            return
        if self.lanes is None:
            self.lanes = _lanes(self.step, np.int64)
            self.sum_lanes = None if hist.sums is None else _lanes(self.step, np.float64)
        f, i = self.buf[: c.size], self.idx[: c.size]
        np.multiply(np.abs(c, out=f) if negative else c, np.float32(side / hist.grid), out=f)  # exact scale
        np.ceil(f, out=f)  # |x|·scale < side, so at most side
        if negative:  # f gets the sign bit of x
            sign = np.bitwise_and(c.view(np.uint32), SIGN_BIT, out=self.sign[: c.size])
            np.bitwise_or(f.view(np.uint32), sign, out=f.view(np.uint32))
        f += self.offsets[: c.size]
        np.copyto(i, f, casting="unsafe")
        np.add.at(self.lanes, i, 1)
        if self.sum_lanes is not None:
            wide = self.wide[: c.size]
            np.copyto(wide, c)
            np.add.at(self.sum_lanes, i, wide)

    def flush(self) -> None:
        """Fold the lanes into the histogram."""
        if self.lanes is not None:
            self.hist.counts += self.lanes.reshape(LANES, -1).sum(axis=0)
            if self.sum_lanes is not None:
                self.hist.sums += self.sum_lanes.reshape(LANES, -1).sum(axis=0)
            self.lanes = self.sum_lanes = None


_local = threading.local()


def workspace() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's chunk buffers (values, bin indices, sign bits, float64 values), allocated once: fresh
    pages cost page faults."""
    if not hasattr(_local, "work"):
        _local.work = (
            np.empty(CHUNK, np.float32),
            np.empty(CHUNK, np.intp),
            np.empty(CHUNK, np.uint32),
            np.empty(CHUNK, np.float64),
        )
    return _local.work


def _lanes(step: int, dtype) -> np.ndarray:
    """This thread's zeroed lane accumulators for histograms of `step` bins."""
    if not hasattr(_local, "lanes"):
        _local.lanes = {}
    lanes = _local.lanes.get((step, dtype))
    if lanes is None:
        lanes = _local.lanes[step, dtype] = np.zeros(LANES * step, dtype)
    else:
        lanes.fill(0)
    return lanes


@cache
def _lane_offsets(side: int) -> np.ndarray:
    """float32, CHUNK: the sign origin (bin 0) of element i's lane, side + (i mod LANES)·(2·side + 1)."""
    return (side + np.arange(CHUNK) % LANES * (2 * side + 1)).astype(np.float32)


def grid_above(amax: float) -> float:
    """The smallest power of two above `amax` (0 for 0)."""
    return 0.0 if amax <= 0 else math.ldexp(1.0, math.frexp(amax)[1])

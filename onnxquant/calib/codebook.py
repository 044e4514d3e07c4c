"""Non-uniform weight levels (APoT, k-means codebooks) and the Huffman size of quantized codes.

APoT (Li, Dong, Wang, "Additive Powers-of-Two Quantization", ICLR 2020). A level is a sum of n terms, each
chosen from its own small set {0} ∪ {2^−e}; the level set is normalized by its largest member, so levels
are dense near 0 and sparse near the clipping value, like the weights. A b-bit weight is a sign and a
(b−1)-bit magnitude (the paper's weight quantizer), so its level set is ±M with |M| = 2^(b−1) magnitudes:
  b=2: one term {0, 2^−1}                                    → M = {0, 1} (ternary)
  b=3: one term {0, 2^−1, 2^−2, 2^−3}                        → M = {0, 1/4, 1/2, 1} (powers of two)
  b=4: {0, 2^−1, 2^−2, 2^−4} + {0, 2^−3}                      → M = {0, .1, .2, .3, .4, .6, .8, 1}
  b=5: {0, 2^−1, 2^−3, 2^−5} + {0, 2^−2, 2^−4, 2^−6}          → 16 magnitudes (k=2, n=2 of the paper)
2^b − 1 distinct levels (±0 coincide). Per output channel c the levels are scaled by the clipping value α_c:
minmax takes α_c = max|W_c|; mse takes α_c = f·max|W_c|, f ∈ {1/100, ..., 1}, minimizing
Σ (W − α_c·Q(W/α_c))² over the level set itself (ties to the smallest f), evaluated exactly from the sorted
|W_c| and its prefix sums; the ACIQ methods (laplace, gauss) take their clipping range as α_c. Q rounds to
the nearest level (ties to the lower one) and saturates at ±1.

k-means weight sharing (Han, Mao, Dally, "Deep Compression", ICLR 2016): one codebook of k centroids per
weight tensor (k = `clusters`, default 2^b), linearly initialized c_j = min + j·(max − min)/(k − 1), then
Lloyd's iterations (assign each weight to its nearest centroid, ties to the lower; move each centroid to
the mean of its weights; an empty cluster keeps its centroid) until the assignment no longer changes (at
most `MAX_ITER`). In one dimension an assignment is a set of cuts at the midpoints between sorted
centroids, so each iteration works on the sorted distinct weights with counts and prefix sums: exact, and
deterministic. Tensors above `EXACT_LIMIT` elements run on a histogram of `HIST_BINS` equal bins instead,
each non-empty bin a point at the mean of its weights with its count; the weights themselves are then
assigned to the resulting centroids.

Huffman (Deep Compression's third stage; ACIQ's variable-length coding of bins): the code lengths l_s of the
histogram of a tensor's codes (heapq construction, ties broken by symbol order); the coded size is
Σ count_s·l_s bits. A tensor that uses a single code needs 0 bits per weight (Kraft: Σ 2^−l = 1 holds).
"""

from __future__ import annotations

import heapq

import numpy as np

from onnxquant.calib.weights import weight_range
from onnxquant.errors import BadModelError, BadRulesError

# exponents e of each term's set {0} ∪ {2^−e}, by magnitude bits b − 1 (the paper's construction)
APOT_TERMS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((1,),),
    2: ((1, 2, 3),),
    3: ((1, 2, 4), (3,)),
    4: ((1, 3, 5), (2, 4, 6)),
}
APOT_BITS = tuple(b + 1 for b in APOT_TERMS)
MSE_STEPS = 100
MAX_ITER = 300
EXACT_LIMIT = 2**22  # k-means on the exact distinct weights up to this many elements, else on a histogram
HIST_BINS = 2**16


def apot_magnitudes(bits: int) -> np.ndarray:
    """The sorted magnitudes (0 first, 1 last) of b-bit APoT weights."""
    if bits not in APOT_BITS:
        raise BadRulesError(
            f"levels apot at {bits} bits; accepted: bits {', '.join(map(str, APOT_BITS))} with APoT levels"
        )
    sums = np.zeros(1)
    for exponents in APOT_TERMS[bits - 1]:
        term = np.concatenate([[0.0], 2.0 ** -np.asarray(exponents, np.float64)])
        sums = (sums[:, None] + term[None, :]).ravel()
    sums = np.unique(sums)
    return sums / sums[-1]


def apot_levels(bits: int) -> np.ndarray:
    """The 2^b − 1 signed APoT levels of b-bit weights, ascending, in [−1, 1]."""
    m = apot_magnitudes(bits)
    return np.concatenate([-m[:0:-1], m])


def nearest_level(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index (int64) of the nearest of the ascending `levels` for each element of `x`; a value halfway
    between two levels goes to the lower one; values outside the levels saturate to the ends."""
    levels = np.asarray(levels, np.float64)
    mids = (levels[:-1] + levels[1:]) / 2
    return np.searchsorted(mids, np.asarray(x, np.float64), side="left").astype(np.int64)


def _rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    """`w` as a (C, K) float64 matrix, one row per channel along `axis` (one row when None)."""
    w = np.asarray(w, np.float64)
    return w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def apot_mse_factor(rows: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
    """Per row of `rows`, the f ∈ {1/MSE_STEPS, ..., 1} whose α = f·max|row| gives the smallest squared error
    of APoT rounding (magnitudes `magnitudes`, saturating at α); ties to the smallest f."""
    f = np.arange(1, MSE_STEPS + 1) / MSE_STEPS
    mids = (magnitudes[:-1] + magnitudes[1:]) / 2
    cuts = f[:, None] * mids[None, :]  # (F, M − 1): |w|/amax at or below cut j rounds to magnitude ≤ j
    level = f[:, None] * magnitudes[None, :]  # (F, M): the value of each magnitude at each f
    out = np.ones(rows.shape[0])
    for r, row in enumerate(rows):
        amax = np.abs(row).max(initial=0.0)
        if amax == 0:
            continue
        u = np.sort(np.abs(row) / amax)
        s1 = np.concatenate([[0.0], np.cumsum(u)])
        s2 = np.concatenate([[0.0], np.cumsum(u * u)])
        ends = np.searchsorted(u, cuts.ravel(), side="right").reshape(cuts.shape)
        bounds = np.concatenate([np.zeros((len(f), 1), np.int64), ends, np.full((len(f), 1), u.size)], axis=1)
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        n, t1, t2 = hi - lo, s1[hi] - s1[lo], s2[hi] - s2[lo]
        err = (t2 - 2 * level * t1 + level * level * n).sum(axis=1)
        out[r] = f[int(np.argmin(err))]
    return out


def apot_alpha(w: np.ndarray, axis: int | None, bits: int, method: str, name: str = "weight") -> np.ndarray:
    """Clipping value α per channel along `axis` (one entry when None) of b-bit APoT weights by `method`."""
    rows = _rows(w, axis)
    if rows.size == 0 or not np.isfinite(rows).all():
        raise BadModelError(f"tensor {name!r}: empty or non-finite weight; accepted: finite weights")
    amax = np.abs(rows).max(axis=1)
    if method == "minmax":
        return amax
    if method == "mse":
        return amax * apot_mse_factor(rows, apot_magnitudes(bits))
    lo, hi = weight_range(w, axis, bits, method, symmetric=True, name=name)
    return np.maximum(-np.ravel(lo), np.ravel(hi))


def apot_quantize(
    w: np.ndarray, axis: int | None, bits: int, method: str = "minmax", name: str = "weight"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices into `apot_levels(bits)` shaped like `w`, those levels, α per channel): W ≈ levels[i]·α_c."""
    levels = apot_levels(bits)
    alpha = apot_alpha(w, axis, bits, method, name)
    shape = [1] * np.ndim(w)
    if axis is not None:
        shape[axis] = -1
    a = alpha.reshape(shape) if axis is not None else alpha.reshape(())
    u = np.asarray(w, np.float64) / np.where(a > 0, a, 1.0)
    return nearest_level(np.clip(u, -1.0, 1.0), levels), levels, alpha


def _weighted_points(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ascending points, counts) standing for `values`: the distinct values, or above `EXACT_LIMIT` the
    means of the non-empty bins of a `HIST_BINS`-bin histogram."""
    v = np.asarray(values, np.float64).ravel()
    if v.size <= EXACT_LIMIT:
        points, counts = np.unique(v, return_counts=True)
        return points, counts.astype(np.float64)
    lo, hi = v.min(), v.max()
    bins = np.minimum(((v - lo) / (hi - lo) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    counts = np.bincount(bins, minlength=HIST_BINS).astype(np.float64)
    sums = np.bincount(bins, weights=v, minlength=HIST_BINS)
    used = counts > 0
    return sums[used] / counts[used], counts[used]


def lloyd(points: np.ndarray, counts: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Lloyd's iterations on ascending weighted 1-D `points` from ascending `centroids` until the assignment
    is stable (at most `MAX_ITER`); an empty cluster keeps its centroid."""
    c = np.asarray(centroids, np.float64).copy()
    s0 = np.concatenate([[0.0], np.cumsum(counts)])
    s1 = np.concatenate([[0.0], np.cumsum(counts * points)])
    ends = None
    for _ in range(MAX_ITER):
        cut = np.searchsorted(points, (c[:-1] + c[1:]) / 2, side="right")  # ties go to the lower centroid
        new_ends = np.concatenate([[0], cut, [points.size]])
        if ends is not None and np.array_equal(new_ends, ends):
            break
        ends = new_ends
        n = s0[ends[1:]] - s0[ends[:-1]]
        total = s1[ends[1:]] - s1[ends[:-1]]
        c = np.where(n > 0, total / np.where(n > 0, n, 1.0), c)
    return c


def kmeans_codebook(w: np.ndarray, clusters: int, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """(codebook of `clusters` ascending centroids, int64 indices shaped like `w`) by Deep Compression's
    linearly initialized k-means."""
    v = np.asarray(w, np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        raise BadModelError(f"tensor {name!r}: empty or non-finite weight; accepted: finite weights")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return np.full(clusters, lo), np.zeros(v.shape, np.int64)
    points, counts = _weighted_points(v)
    codebook = lloyd(points, counts, np.linspace(lo, hi, clusters))
    return codebook, nearest_level(v, codebook)


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of every symbol of the histogram `counts` (0 for unused symbols; 0 when a single
    symbol is used). The two lightest subtrees merge first; ties go to the one made (or listed) first. Each
    length is the depth of the symbol's leaf, read back from the parent of every merged node."""
    counts = np.asarray(counts).ravel()
    heap = [(int(c), s) for s, c in enumerate(counts) if c > 0]
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    made = counts.size
    while len(heap) > 1:
        (ca, a), (cb, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = made
        heapq.heappush(heap, (ca + cb, made))
        made += 1
    depth = {made - 1: 0} if parent else {}
    for child in sorted(parent, reverse=True):  # a parent is made after its children: parents first
        depth[child] = depth[parent[child]] + 1
    lengths = np.zeros(counts.size, np.int64)
    for s in np.nonzero(counts)[0]:
        lengths[s] = depth.get(int(s), 0)
    return lengths


def huffman_bits(counts: np.ndarray) -> int:
    """Σ count·length: the Huffman-coded size in bits of the codes whose histogram is `counts`."""
    counts = np.asarray(counts, np.int64).ravel()
    return int((counts * huffman_lengths(counts)).sum())


def code_counts(codes: np.ndarray) -> np.ndarray:
    """The histogram (counts of the used values) of integer `codes`."""
    return np.unique(np.asarray(codes).astype(np.int64).ravel(), return_counts=True)[1]

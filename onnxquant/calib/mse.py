"""MSE calibration: the clipping threshold minimizing the quantization MSE measured on the histogram.

Every bin is represented by its centre c with its count n. For a candidate range the centres are
fake-quantized exactly as the quantizer would (round half to even, saturate) and the cost is Σ n·(c − x̂(c))².
Symmetric and one-sided tensors use the |x| histogram with candidates t_i = i·w (i = 1..bins, w the bin width)
and 2^(b−1)−1 positive levels (2^b−1 for one-sided unsigned codes). Two-sided tensors with unsigned codes use
the signed histogram and candidates [f·min, f·max], f = i/bins, with scale (hi−lo)/(2^b−1) and an integer zero
point. Ties go to the smallest candidate. All candidates are evaluated vectorized (in row chunks).
"""

from __future__ import annotations

import numpy as np

from onnxquant.calib.stats import TensorStats
from onnxquant.errors import BadRulesError
from onnxquant.quant import fake_quantize, qparams_from_range

_CHUNK = 64


def _tail_sums(c: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Suffix sums of n, n·c and n·c² (index k: over bins k..end; one more entry, 0, at the end)."""

    def suffix(v: np.ndarray) -> np.ndarray:
        return np.concatenate([np.cumsum(v[::-1])[::-1], [0.0]])

    return suffix(n), suffix(n * c), suffix(n * c * c)


def _clipped_cost(sums, start: np.ndarray | int, value: np.ndarray, stop=None) -> np.ndarray:
    """Σ n·(c − value)² over bins start..stop−1 (all quantizing to `value`), from the suffix sums."""
    s0, s1, s2 = (x[start] - (x[stop] if stop is not None else 0.0) for x in sums)
    return s2 - 2 * value * s1 + value * value * s0


def mse_costs_symmetric(counts: np.ndarray, width: float, levels: int) -> np.ndarray:
    """Cost of each threshold t_i = i·width (i = 1..len(counts)) on the |x| histogram, `levels` codes > 0.

    Candidates go in ascending chunks; for a chunk only the bins below its largest threshold (plus one) are
    fake-quantized bin by bin, the bins above, which every candidate of the chunk saturates to t, come from
    suffix sums. Same costs as evaluating every bin, at about a quarter of the work."""
    n_bins = len(counts)
    nz = np.nonzero(counts)[0]
    c = (nz + 0.5) * width
    n = counts[nz].astype(np.float64)
    sums = _tail_sums(c, n)
    t = np.arange(1, n_bins + 1) * width
    costs = np.empty(n_bins)
    for s0 in range(0, n_bins, _CHUNK):
        tc = t[s0 : s0 + _CHUNK]
        s = (tc / levels)[:, None]
        inside = int(np.searchsorted(c, tc[-1] * (1 + 0.5 / levels) + width, side="right"))
        ci, ni = c[:inside], n[:inside]
        xq = s * np.minimum(np.rint(ci[None, :] / s), levels)
        costs[s0 : s0 + _CHUNK] = ((ci[None, :] - xq) ** 2 * ni[None, :]).sum(axis=1)
        costs[s0 : s0 + _CHUNK] += _clipped_cost(sums, inside, s[:, 0] * levels)
    return costs


def mse_costs_affine(
    counts: np.ndarray, first_edge: float, width: float, lo: float, hi: float, bits: int
) -> np.ndarray:
    """Cost of every range [f·lo, f·hi], f = i/n (i = 1..n, n = len(counts)//2), with unsigned b-bit codes.

    As in `mse_costs_symmetric`, the bins outside a chunk's widest range (by more than a bin), which every
    candidate of the chunk saturates to code 0 or 2^b − 1, come from suffix sums."""
    n_cand = len(counts) // 2
    nz = np.nonzero(counts)[0]
    c = first_edge + (nz + 0.5) * width
    n = counts[nz].astype(np.float64)
    sums = _tail_sums(c, n)
    f = np.arange(1, n_cand + 1) / n_cand
    qmax = (1 << bits) - 1
    costs = np.empty(n_cand)
    for s0 in range(0, n_cand, _CHUNK):
        clo, chi = min(lo, 0.0) * f[s0 : s0 + _CHUNK], max(hi, 0.0) * f[s0 : s0 + _CHUNK]
        s = np.maximum((chi - clo) / qmax, np.finfo(np.float64).tiny)[:, None]
        z = np.clip(np.rint(-clo[:, None] / s), 0, qmax)
        first = int(np.searchsorted(c, clo[-1] - s[-1, 0] - width, side="left"))
        last = int(np.searchsorted(c, chi[-1] + s[-1, 0] + width, side="right"))
        ci, ni = c[first:last], n[first:last]
        q = np.clip(np.rint(ci[None, :] / s) + z, 0, qmax)
        part = ((ci[None, :] - s * (q - z)) ** 2 * ni[None, :]).sum(axis=1)
        low, high = (s * (0 - z))[:, 0], (s * (qmax - z))[:, 0]
        costs[s0 : s0 + _CHUNK] = part + _clipped_cost(sums, 0, low, first) + _clipped_cost(sums, last, high)
    return costs


def range_error(st: TensorStats, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    """Σ n·(c − x̂(c))² over the signed histogram's bin centres c, x̂ quantized with the range [lo, hi]
    exactly as the quantizer will (`qparams_from_range`, round half to even, saturate); exact zeros cost
    nothing."""
    counts = st.hist.astype(np.float64)
    counts[counts.size // 2] -= st.zeros  # bin [0, w) holds the exact zeros, which every range represents
    nz = np.nonzero(counts)[0]
    c = -st.hist_range + (nz + 0.5) * st.bin_width
    xq = fake_quantize(c, qparams_from_range(lo, hi, bits, symmetric))
    return float(((c - xq.astype(np.float64)) ** 2 * counts[nz]).sum())


def mse(st: TensorStats, bits, symmetric: bool, *, per_channel: bool = False):
    """The range with the smallest histogram MSE for `bits`."""
    if per_channel:
        raise BadRulesError("mse calibration is per tensor only; per channel: minmax, laplace, gauss")
    if st.amax == 0:
        return 0.0, 0.0
    w = st.bin_width
    if symmetric or st.one_sided:
        levels = (1 << bits) - 1 if (st.one_sided and not symmetric) else (1 << (bits - 1)) - 1
        i = int(np.argmin(mse_costs_symmetric(st.abs_hist, w, levels)))
        t = (i + 1) * w
        return max(st.min, -t), min(st.max, t)
    costs = mse_costs_affine(st.hist, -st.hist_range, w, st.min, st.max, bits)
    f = (int(np.argmin(costs)) + 1) / (len(st.hist) // 2)
    return st.min * f, st.max * f

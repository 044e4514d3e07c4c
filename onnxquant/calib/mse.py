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

_CHUNK = 256


def mse_costs_symmetric(counts: np.ndarray, width: float, levels: int) -> np.ndarray:
    """Cost of each threshold t_i = i·width (i = 1..len(counts)) on the |x| histogram, `levels` codes > 0."""
    n_bins = len(counts)
    nz = np.nonzero(counts)[0]
    c = (nz + 0.5) * width
    n = counts[nz].astype(np.float64)
    t = np.arange(1, n_bins + 1) * width
    costs = np.empty(n_bins)
    for s0 in range(0, n_bins, _CHUNK):
        s = (t[s0 : s0 + _CHUNK] / levels)[:, None]
        xq = s * np.minimum(np.rint(c[None, :] / s), levels)
        costs[s0 : s0 + _CHUNK] = ((c[None, :] - xq) ** 2 * n[None, :]).sum(axis=1)
    return costs


def mse_costs_affine(
    counts: np.ndarray, first_edge: float, width: float, lo: float, hi: float, bits: int
) -> np.ndarray:
    """Cost of every range [f·lo, f·hi], f = i/n (i = 1..n, n = len(counts)//2), with unsigned b-bit codes."""
    n_cand = len(counts) // 2
    nz = np.nonzero(counts)[0]
    c = first_edge + (nz + 0.5) * width
    n = counts[nz].astype(np.float64)
    f = np.arange(1, n_cand + 1) / n_cand
    qmax = (1 << bits) - 1
    costs = np.empty(n_cand)
    for s0 in range(0, n_cand, _CHUNK):
        clo, chi = min(lo, 0.0) * f[s0 : s0 + _CHUNK], max(hi, 0.0) * f[s0 : s0 + _CHUNK]
        s = np.maximum((chi - clo) / qmax, np.finfo(np.float64).tiny)[:, None]
        z = np.clip(np.rint(-clo[:, None] / s), 0, qmax)
        q = np.clip(np.rint(c[None, :] / s) + z, 0, qmax)
        costs[s0 : s0 + _CHUNK] = ((c[None, :] - s * (q - z)) ** 2 * n[None, :]).sum(axis=1)
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

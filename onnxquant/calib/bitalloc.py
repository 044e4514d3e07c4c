"""Per-channel bit allocation (Banner et al., ACIQ, eq. 10–11).

With C channels at an average of M bits the budget is B = C·2^M quantization bins. Minimizing the total
quantization noise Σ α_i²/(3·B_i²) under Σ B_i = B gives B_i = α_i^(2/3) / Σ_j α_j^(2/3) · B, so
M_i = round(log2 B_i), clipped to [lo, hi]. The integer widths are then adjusted so that the mean width stays
within the budget (Σ M_i ≤ C·M): while over budget the channel rounded up the most (largest M_i − log2 B_i)
loses a bit; while a whole bit is left, the channel rounded down the most gains one. Ties go to the lower
index.
Example: α = [1, 2, 4, 8], M = 4 gives B_i = [7.03, 11.16, 17.71, 28.11] and M_i = [3, 4, 4, 5].
"""

from __future__ import annotations

import numpy as np

from onnxquant.errors import BadRulesError, InternalError


def bin_budget(alphas: np.ndarray, mean_bits: int) -> np.ndarray:
    """B_i, the real-valued number of bins of each channel (eq. 10)."""
    a = np.asarray(alphas, np.float64).ravel()
    if a.size == 0 or np.any(~np.isfinite(a)) or np.any(a < 0):
        raise InternalError("bit allocation needs finite, non-negative per-channel ranges")
    w = a ** (2.0 / 3.0)
    if w.sum() == 0:
        return np.full(a.size, 2.0**mean_bits)
    return w / w.sum() * a.size * 2.0**mean_bits


def allocate_bits(alphas: np.ndarray, mean_bits: int, lo: int = 1, hi: int = 8) -> np.ndarray:
    """Integer width per channel (eq. 11), mean width ≤ `mean_bits`, each within [lo, hi]."""
    if not lo <= mean_bits <= hi:
        raise BadRulesError(f"mean width {mean_bits} outside [{lo}, {hi}]")
    with np.errstate(divide="ignore"):
        ideal = np.log2(bin_budget(alphas, mean_bits))
    ideal = np.clip(ideal, lo - 1, hi + 1)  # zero-range channels: log2(0) = -inf
    bits = np.clip(np.rint(ideal), lo, hi).astype(np.int64)
    budget = bits.size * mean_bits
    while bits.sum() > budget:
        excess = np.where(bits > lo, bits - ideal, -np.inf)
        bits[int(np.argmax(excess))] -= 1
    while bits.sum() + 1 <= budget:
        deficit = np.where(bits < hi, ideal - bits, -np.inf)
        k = int(np.argmax(deficit))
        if not np.isfinite(deficit[k]):
            break
        bits[k] += 1
    return bits

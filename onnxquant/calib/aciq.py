"""ACIQ analytic clipping (Banner et al., "Post-training 4-bit quantization of convolutional networks for
rapid deployment").

Quantizing [−α, α] with 2^M levels costs clip_noise(α) + α²/(3·4^M) in expected MSE. Per distribution:

- Laplace(b): clip_noise = 2b²·e^(−α/b). Setting the derivative to 0 gives (α/b)·e^(α/b) = 3·4^M, so
  α*/b = W0(3·4^M) (principal branch of the Lambert W function).
- Gaussian(σ): clip_noise = (σ²+α²)(1−erf(α/(σ√2))) − √(2/π)·α·σ·e^(−α²/2σ²). Its derivative is
  2α·erfc(α/(σ√2)) − 2√(2/π)·σ·e^(−α²/2σ²); α*/σ is the root of that plus 2α/(3·4^M) (Brent's method).

b = mean |x − mean(x)| and σ = std(x) come from the streamed statistics. Ranges (as the ACIQ code does):

- two-sided tensor: [max(min, mean − α), min(max, mean + α)] with the M-bit α (M = bits);
- one-sided tensor (min ≥ 0, e.g. after Relu): [0, min(max, max(mean, 0) + α)]; with unsigned codes all 2^M
  levels cover [0, α], and the half-Laplace MSE at M bits equals half the symmetric (M+1)-bit MSE, so α is
  the (M+1)-bit α; with signed (symmetric) codes only half the levels are used and α is the M-bit α.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from onnxquant.calib.stats import TensorStats


def lambert_w(x: float) -> float:
    """W(x) for x > 0: the w with w·e^w = x, by Halley's iteration (converges in a few steps from log x)."""
    w = math.log(x) - math.log(math.log(x)) if x > math.e else x / math.e
    for _ in range(50):
        ew = math.exp(w)
        f = w * ew - x
        step = f / (ew * (w + 1) - (w + 2) * f / (2 * w + 2))
        w -= step
        if abs(step) <= 1e-15 * max(1.0, abs(w)):
            break
    return w


def bisect_root(f, lo: float, hi: float, tol: float = 1e-14) -> float:
    """The root of `f` in [lo, hi], where f changes sign once, to within `tol`."""
    f_lo = f(lo)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if (f(mid) > 0) == (f_lo > 0):
            lo, f_lo = mid, f(mid)
        else:
            hi = mid
    return 0.5 * (lo + hi)


@cache
def laplace_alpha(bits: int) -> float:
    """Optimal clipping α/b for a Laplace(b) tensor quantized to 2^bits levels: α = W(3·4^bits), from the
    objective's zero slope 2b·e^(−α/b) = 2α/(3·4^bits)."""
    return lambert_w(3.0 * 4.0**bits)


def laplace_objective(alpha: float, bits: int, b: float = 1.0) -> float:
    return 2 * b * b * math.exp(-alpha / b) + alpha * alpha / (3 * 4.0**bits)


def gauss_objective(alpha: float, bits: int, sigma: float = 1.0) -> float:
    a = alpha / sigma
    clip = (1 + a * a) * math.erfc(a / math.sqrt(2)) - math.sqrt(2 / math.pi) * a * math.exp(-a * a / 2)
    return sigma * sigma * clip + alpha * alpha / (3 * 4.0**bits)


@cache
def gauss_alpha(bits: int) -> float:
    """Optimal clipping α/σ for a Gaussian(σ) tensor quantized to 2^bits levels."""
    q = 1.0 / (3 * 4.0**bits)

    def slope(a: float) -> float:  # d/dα of the objective, divided by 2
        return a * math.erfc(a / math.sqrt(2)) - math.sqrt(2 / math.pi) * math.exp(-a * a / 2) + a * q

    return bisect_root(slope, 1e-6, 40.0)


ALPHA = {"laplace": laplace_alpha, "gauss": gauss_alpha}


def alpha_ratio(dist: str, bits) -> np.ndarray:
    """α/b (laplace) or α/σ (gauss) for `bits` (int or array)."""
    fn = ALPHA[dist]
    bits = np.asarray(bits, np.int64)
    return np.vectorize(lambda m: fn(int(m)), otypes=[np.float64])(bits)


def aciq_range(dist: str, mean, spread, lo, hi, bits, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Clipping range from the mean, the spread (b or σ) and the observed [lo, hi]; arrays broadcast."""
    mean, spread = np.asarray(mean, np.float64), np.asarray(spread, np.float64)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    bits = np.asarray(bits, np.int64)
    one_sided = lo >= 0
    m_bits = np.where(one_sided & (not symmetric), bits + 1, bits)
    alpha = alpha_ratio(dist, m_bits) * spread
    two_lo = np.maximum(lo, mean - alpha)
    two_hi = np.minimum(hi, mean + alpha)
    one_hi = np.minimum(hi, np.maximum(mean, 0) + alpha)
    return np.where(one_sided, 0.0, two_lo), np.where(one_sided, one_hi, two_hi)


def _calibrate(dist: str, st: TensorStats, bits, symmetric: bool, per_channel: bool):
    if per_channel:
        spread = st.ch_mad if dist == "laplace" else st.ch_std
        return aciq_range(dist, st.ch_mean, spread, st.ch_min, st.ch_max, bits, symmetric)
    spread = st.mad if dist == "laplace" else st.std
    lo, hi = aciq_range(dist, st.mean, spread, st.min, st.max, bits, symmetric)
    return float(lo), float(hi)


def laplace(st: TensorStats, bits, symmetric: bool, *, per_channel: bool = False):
    """ACIQ range assuming a Laplace distribution (b = mean absolute deviation)."""
    return _calibrate("laplace", st, bits, symmetric, per_channel)


def gauss(st: TensorStats, bits, symmetric: bool, *, per_channel: bool = False):
    """ACIQ range assuming a Gaussian distribution (σ = standard deviation)."""
    return _calibrate("gauss", st, bits, symmetric, per_channel)

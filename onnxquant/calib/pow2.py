"""Power-of-two scales: every scale 2^k, k an integer, so that a requantization is a shift.

Ristretto's dynamic fixed point (Gysel et al., 2018; after Courbariaux et al., "Training deep neural
networks with low precision multiplications", 2014) gives each layer's weights and activations a fractional
length fl: values are integers times 2^−fl. In affine terms that is a scale s = 2^k (k = −fl), with any zero
point. The product of the scales along an integer layer, s_x·s_w/s_y, is then 2^(k_x + k_w − k_y), and
integer-only hardware requantizes with one rounding shift instead of a multiplier.

The exponent is chosen to minimize the same error the free scale's method minimizes, measured exactly:
with s* the free scale (from the calibration method's clipping range), the candidates are
k ∈ {⌊log2 s*⌋ − 1, ⌊log2 s*⌋, ⌈log2 s*⌉, ⌈log2 s*⌉ + 1}, and each is scored by the squared error of the
values quantized with scale 2^k (round half to even, saturated, zero point re-derived from the clipping
range's low end for unsigned codes, clip(round(−lo / 2^k), 0, 2^b − 1)):
- weights: Σ (w − ŵ)² over each row (tensor, channel or block) of the weight itself;
- activations: Σ n·(c − ĉ)² over the bin centres c and counts n of the tensor's histogram (the measure of
  calib/mse.py). An entry without a histogram (per-channel activation ranges) takes the smallest candidate at
  least s*: the power of two that clips nothing the free scale kept.
The error of a scale is unimodal in practice, and the neighbours ±1 cover the case where clipping at 2^⌊·⌋
beats the rounding error at 2^⌈·⌉ by more than one step (tests/test_formats_pow2.py checks the choice
against every k by brute force). Ties go to the smaller k. Exponents are kept in −126..127 (normal float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from onnxquant.calib.fp8 import fp8_entry, fp8_fake_quantize, is_fp8
from onnxquant.calib.stats import TensorStats
from onnxquant.quant import qrange
from onnxquant.tables import TensorRange

MIN_EXPONENT, MAX_EXPONENT = -126, 127
NEIGHBOURS = 1  # candidates this far beyond floor and ceil of log2 of the free scale

FakeQuantize = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows (R, K), scales (R, 1)) -> values


def candidate_exponents(scale) -> np.ndarray:
    """(4, *shape) integer exponents: ⌊log2 s⌋ − 1, ⌊log2 s⌋, ⌈log2 s⌉, ⌈log2 s⌉ + 1 of each scale."""
    e = np.log2(np.asarray(scale, np.float64))
    lo, hi = np.floor(e), np.ceil(e)
    k = np.stack([lo - NEIGHBOURS, lo, hi, hi + NEIGHBOURS]).astype(np.int64)
    return np.clip(k, MIN_EXPONENT, MAX_EXPONENT)


def pow2(k) -> np.ndarray:
    """2^k as float32 (exact)."""
    return np.ldexp(np.float32(1.0), np.asarray(k, np.int64)).astype(np.float32)


def zero_points(lo, scale, bits: int, signed: bool) -> np.ndarray:
    """The zero point of unsigned codes whose range starts at `lo` (≤ 0) under `scale`; 0 for signed codes."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    if signed:
        return np.zeros(np.shape(lo), np.int64)
    return np.clip(np.rint(-lo / np.asarray(scale, np.float64)), 0, (1 << bits) - 1).astype(np.int64)


def int_fake_quantize(lo: np.ndarray, bits: int, signed: bool) -> FakeQuantize:
    """Fake quantization of rows with b-bit codes (zero point from each row's range low end `lo`)."""
    qmin, qmax = qrange(bits, signed)

    def fake(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
        s = scale.astype(np.float32)
        z = zero_points(np.reshape(lo, (-1, 1)), s, bits, signed)
        q = np.clip(np.rint(rows.astype(np.float32) / s).astype(np.int64) + z, qmin, qmax)
        return (q - z).astype(np.float64) * s

    return fake


def fp8_fake(fmt: str) -> FakeQuantize:
    def fake(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return fp8_fake_quantize(rows, scale.astype(np.float32), fmt).astype(np.float64)

    return fake


def best_exponents(
    rows: np.ndarray, free_scale: np.ndarray, fake: FakeQuantize, weights: np.ndarray | None = None
) -> np.ndarray:
    """Per row of `rows` (R, K), the candidate exponent whose scale 2^k gives the smallest Σ weight·(x − x̂)²
    (`weights` of shape (K,) or (R, K), default 1)."""
    rows = np.asarray(rows, np.float64)
    candidates = candidate_exponents(np.reshape(free_scale, (-1,)))  # (4, R)
    errors = np.stack(
        [
            (((rows - fake(rows, pow2(k)[:, None])) ** 2) * (1.0 if weights is None else weights)).sum(axis=1)
            for k in candidates
        ]
    )
    return np.take_along_axis(candidates, np.argmin(errors, axis=0)[None, :], axis=0)[0]


def _fake_for(entry: TensorRange) -> Callable[[np.ndarray], FakeQuantize]:
    """The fake quantizer of `entry`'s format for rows whose range low ends are `lo`."""
    if is_fp8(entry.format):
        return lambda lo: fp8_fake(entry.format)
    bits = int(np.max(entry.bits))
    return lambda lo: int_fake_quantize(lo, bits, entry.signed)


def _with_exponents(entry: TensorRange, k: np.ndarray) -> TensorRange:
    """`entry` with scales 2^k (the shape of its scale) and zero points re-derived from its `min`."""
    shape = np.shape(entry.scale)
    scale = pow2(np.reshape(k, shape))
    zero = zero_points(entry.min, scale, int(np.max(entry.bits)), entry.signed or is_fp8(entry.format))
    if not shape:
        return replace(entry, scale=float(scale), zero_point=int(zero))
    return replace(entry, scale=scale.astype(np.float64).tolist(), zero_point=zero.tolist())


def weight_rows(w: np.ndarray, entry: TensorRange) -> np.ndarray:
    """`w` as one row per scale of `entry`, in the order of its (flattened) scale: the whole tensor, one row
    per channel along `axis`, or one per block (the last block of each row padded with zeros, which every
    scale quantizes without error)."""
    w = np.asarray(w, np.float32)
    if entry.axis is None:
        return w.reshape(1, -1)
    if entry.block_size is None:
        return np.moveaxis(w, entry.axis, 0).reshape(w.shape[entry.axis], -1)
    moved = np.moveaxis(w, entry.axis, -1)
    n, size = moved.shape[-1], entry.block_size
    padded = np.zeros((*moved.shape[:-1], -(-n // size) * size), np.float32)
    padded[..., :n] = moved
    blocks = padded.reshape(*moved.shape[:-1], -1, size)  # (..., blocks, size), blocks along the last axis
    return np.moveaxis(blocks, -2, entry.axis).reshape(-1, size)


def pow2_weight_entry(entry: TensorRange, w: np.ndarray) -> TensorRange:
    """`entry` (a weight's, any granularity and format) with power-of-two scales minimizing each row's squared
    error on `w` itself."""
    rows = weight_rows(w, entry)
    lo = np.reshape(np.minimum(np.asarray(entry.min, np.float64), 0.0), (-1,))
    k = best_exponents(rows, np.asarray(entry.scale, np.float64), _fake_for(entry)(lo))
    return _with_exponents(entry, k)


def pow2_activation_entry(entry: TensorRange, stats: TensorStats | None) -> TensorRange:
    """`entry` (an activation's) with a power-of-two scale minimizing the histogram MSE of `stats`; without a
    histogram (or per channel), the smallest candidate at least the free scale."""
    free = np.asarray(entry.scale, np.float64)
    if entry.axis is not None or stats is None or not stats.has_hist or not stats.count:
        candidates = candidate_exponents(free)
        covering = np.where(pow2(candidates) >= free.astype(np.float32), candidates, MAX_EXPONENT).min(axis=0)
        return _with_exponents(entry, covering)
    counts = stats.hist.astype(np.float64)
    counts[counts.size // 2] -= stats.zeros  # exact zeros: every scale represents them (as mse.py)
    nz = np.nonzero(counts)[0]
    centres = -stats.hist_range + (nz + 0.5) * stats.bin_width
    lo = np.minimum(np.asarray([entry.min], np.float64), 0.0)
    k = best_exponents(centres[None, :], free.reshape(1), _fake_for(entry)(lo), counts[nz])
    return _with_exponents(entry, k)


def format_activation_entry(entry: TensorRange, spec, stats: TensorStats | None) -> TensorRange:
    """An activation's calibrated `entry` in the number format of its plan `spec` (passes/plan.py
    ActivationSpec): FP8 (scale amax / max), then power-of-two scales."""
    if is_fp8(spec.format) and entry.axis is None:
        entry = fp8_entry(entry, spec.format)
    if spec.scale == "pow2":
        entry = pow2_activation_entry(entry, stats)
    return entry

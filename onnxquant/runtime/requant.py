"""Requantization: mapping an int32 accumulator back to an 8-bit (or narrower) code.

Two modes, both vectorized over numpy int64 arrays:

* ``fixed`` — gemmlowp / TFLite, as integer-only hardware does it. A real multiplier ``d > 0`` becomes
  ``(M, shift)`` with ``d = M · 2^(shift − 31)``, ``M ∈ [2^30, 2^31)`` (``QuantizeMultiplier``: frexp, the
  mantissa rounded half away from zero). Then
  ``y = RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x · 2^max(shift,0), M), max(−shift,0))``,
  where ``SRDHM(a, b) = trunc((a·b + nudge) / 2^31)`` with nudge ``2^30`` (``1 − 2^30`` for negative
  products) and ``RDBPOT`` is an arithmetic shift that rounds half away from zero.
  Test vectors: 0.5 → (1073741824, 0); 1/3 → (1431655765, −1); 0.001 → (1099511628, −9);
  2.5 → (1342177280, 2).
  A power-of-two multiplier 2^k (mantissa exactly 2^30: every scale a power of two, calib/pow2.py) is
  applied as one exact shift instead, ``y = round_half_even(x · 2^k)`` (``shift_round_half_even``):
  the mantissa path would round twice (in the high multiply, then in the shift) and can miss by one LSB;
  rounding half to even makes the shift equal ONNX Runtime's float requantization, 2^k being exact in float32.
* ``float`` — ONNX Runtime's CPU kernels (MLAS ``MlasRequantizeOutput``): ``float32(acc) · scale`` in float32,
  clamped to the code range, rounded half to even, plus the zero point. ``scale`` itself is computed in
  float32 in the same order as ONNX Runtime (``s_x · s_w / s_y``).

The sub-byte helpers pack 4-bit codes two per byte (low nibble first, as ONNX INT4/UINT4 storage).
"""

from __future__ import annotations

import numpy as np

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
REQUANT_MODES = {
    "float": "float32 scale per channel, as ONNX Runtime's CPU kernels (bit-exact with them)",
    "fixed": "int32 multiplier and shift (gemmlowp / TFLite), as integer-only hardware",
}


def quantize_multiplier(d) -> tuple[np.ndarray, np.ndarray]:
    """(int32 mantissa M, shift) with ``d ≈ M · 2^(shift − 31)``; vectorized; d = 0 gives (0, 0)."""
    d = np.asarray(d, dtype=np.float64)
    mant, shift = np.frexp(d)
    q = np.sign(mant) * np.floor(np.abs(mant) * float(1 << 31) + 0.5)  # round half away from zero
    q = q.astype(np.int64)
    shift = shift.astype(np.int64)
    carry = np.abs(q) == (1 << 31)
    q = np.where(carry, q // 2, q)
    shift = np.where(carry, shift + 1, shift)
    tiny = shift < -31
    q = np.where(tiny, 0, q)
    shift = np.where(tiny, 0, shift)
    huge = shift > 30
    q = np.where(huge, INT32_MAX, q)
    shift = np.where(huge, 30, shift)
    q = np.where(d == 0, 0, q)
    shift = np.where(d == 0, 0, shift)
    return q.astype(np.int64), shift.astype(np.int64)


def _trunc_div_pot(x: np.ndarray, exponent: int) -> np.ndarray:
    """Division by 2^exponent truncating toward zero (C integer division)."""
    return np.where(x >= 0, x >> exponent, -((-x) >> exponent))


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values (given as any integer arrays)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = _trunc_div_pot(ab + nudge, 31)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: arithmetic right shift by `exponent`, rounding half away from zero."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift) -> np.ndarray:
    """TFLite MultiplyByQuantizedMultiplier; the left shift (shift > 0) saturates to int32."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = np.clip(x << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


POW2_MANTISSA = 1 << 30  # `quantize_multiplier`'s mantissa of an exact power of two


def shift_round_half_even(x, exponent) -> np.ndarray:
    """``x · 2^exponent`` rounded half to even, by shifts alone (left shifts saturate to int32)."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    left = np.clip(exponent, 0, 32)
    right = np.clip(-exponent, 0, 62)
    floor = x >> right
    remainder = x - (floor << right)
    half = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), 1 << 62)
    up = (remainder > half) | ((remainder == half) & (floor % 2 == 1))
    return np.clip((floor + up) << left, INT32_MIN, INT32_MAX)


def requant_fixed(acc, multiplier, shift, zero_point: int, lo: int, hi: int) -> np.ndarray:
    """Fixed-point requantization of int32 accumulators to codes in [lo, hi] (int64 result); power-of-two
    multipliers (mantissa `POW2_MANTISSA`, real multiplier 2^(shift − 1)) as one exact shift."""
    multiplier = np.asarray(multiplier)
    y = multiply_by_quantized_multiplier(acc, multiplier, shift)
    if np.any(multiplier == POW2_MANTISSA):
        exact = shift_round_half_even(acc, np.asarray(shift, np.int64) - 1)
        y = np.where(multiplier == POW2_MANTISSA, exact, y)
    return np.clip(y + int(zero_point), lo, hi)


def requant_float(acc, scale, zero_point: int, lo: int, hi: int) -> np.ndarray:
    """ONNX Runtime's float requantization: float32(acc)·scale, clamp, round half to even, + zero point."""
    acc = np.asarray(acc)
    v = acc.astype(np.int32).astype(np.float32) * np.asarray(scale, dtype=np.float32)
    v = np.clip(v, np.float32(lo - int(zero_point)), np.float32(hi - int(zero_point)))
    return np.rint(v).astype(np.int64) + int(zero_point)


def f32_scale(*factors, divide_by=None) -> np.ndarray:
    """Product of float32 factors left to right (then ``/ divide_by``), every step rounded to float32."""
    out = np.asarray(factors[0], dtype=np.float32)
    for f in factors[1:]:
        out = (out * np.asarray(f, dtype=np.float32)).astype(np.float32)
    if divide_by is not None:
        out = (out / np.asarray(divide_by, dtype=np.float32)).astype(np.float32)
    return out


def dequantize_f32(q, scale, zero_point) -> np.ndarray:
    """ONNX DequantizeLinear as ONNX Runtime computes it: float32(q − z) · s."""
    q = np.asarray(q, dtype=np.int64)
    return (q - np.asarray(zero_point, dtype=np.int64)).astype(np.float32) * np.asarray(
        scale, dtype=np.float32
    )


def quantize_f32(x, scale, zero_point, lo: int, hi: int) -> np.ndarray:
    """ONNX QuantizeLinear as ONNX Runtime computes it: round_half_even(x / s) + z, saturated (int64)."""
    v = np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point, dtype=np.int64)
    v = np.clip(v, (lo - z).astype(np.float32), (hi - z).astype(np.float32))
    return np.rint(v).astype(np.int64) + z


def requant_qdq(
    q, s_in, z_in, s_out, z_out, lo: int, hi: int, mode: str = "float", fixed: tuple | None = None
) -> np.ndarray:
    """Re-express codes under new (scale, zero point): QuantizeLinear(DequantizeLinear(q)) or fixed point.

    ``fixed`` is ``quantize_multiplier(s_in / s_out)``; computed when not given.
    """
    if mode == "float":
        return quantize_f32(dequantize_f32(q, s_in, z_in), s_out, z_out, lo, hi)
    if fixed is None:
        fixed = quantize_multiplier(np.float64(np.float32(s_in)) / np.float64(np.float32(s_out)))
    x = np.asarray(q, dtype=np.int64) - int(z_in)
    return requant_fixed(x, fixed[0], fixed[1], z_out, lo, hi)


def pack_int4(values) -> np.ndarray:
    """Pack 4-bit codes (int in [-8, 15]) two per byte along the flattened array, low nibble first."""
    flat = np.asarray(values, dtype=np.int64).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.int64)])
    nib = (flat & 0xF).astype(np.uint8)
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, count: int, signed: bool) -> np.ndarray:
    """Inverse of `pack_int4`: `count` codes as int64, sign-extended when `signed`."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(packed.size * 2, dtype=np.int64)
    out[0::2] = packed & 0xF
    out[1::2] = packed >> 4
    out = out[:count]
    if signed:
        out = np.where(out >= 8, out - 16, out)
    return out

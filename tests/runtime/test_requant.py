"""gemmlowp/TFLite fixed-point requantization, ONNX Runtime float requantization, int4 packing."""

from __future__ import annotations

import numpy as np
import pytest

from onnxquant.runtime import requant as R


@pytest.mark.parametrize(
    "d, expected",
    [(0.5, (1073741824, 0)), (1 / 3, (1431655765, -1)), (0.001, (1099511628, -9)), (2.5, (1342177280, 2))],
)
def test_quantize_multiplier_vectors(d: float, expected: tuple[int, int]) -> None:
    m, s = R.quantize_multiplier(d)
    assert (int(m), int(s)) == expected


def test_quantize_multiplier_vectorized_and_zero() -> None:
    m, s = R.quantize_multiplier(np.array([0.5, 1 / 3, 0.0, 1.0]))
    assert m.tolist() == [1073741824, 1431655765, 0, 1073741824]
    assert s.tolist() == [0, -1, 0, 1]


def test_srdhm_and_rdbpot_reference_values() -> None:
    int_min = -(1 << 31)
    assert R.saturating_rounding_doubling_high_mul(int_min, int_min) == (1 << 31) - 1
    # (a*b + 2^30) / 2^31 truncated toward zero
    assert R.saturating_rounding_doubling_high_mul(1 << 30, 1 << 30) == 1 << 29
    assert R.saturating_rounding_doubling_high_mul(-(1 << 30), 1 << 30) == -(1 << 29)
    assert R.saturating_rounding_doubling_high_mul(3, 1 << 30) == 2  # 1.5 rounds away from zero
    assert R.saturating_rounding_doubling_high_mul(-3, 1 << 30) == -1  # -1.5 + nudge, truncated
    x = np.array([5, -5, 6, -6, 7, -7, 4])
    assert R.rounding_divide_by_pot(x, 1).tolist() == [3, -3, 3, -3, 4, -4, 2]  # halves away from zero
    assert R.rounding_divide_by_pot(np.array([11, -11]), np.array([2, 2])).tolist() == [3, -3]


def test_multiply_by_quantized_multiplier_matches_real_product() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-(1 << 20), 1 << 20, 10000)
    for d in (0.000731, 0.0421, 0.5, 0.99, 1.7, 3.2):
        m, s = R.quantize_multiplier(d)
        got = R.multiply_by_quantized_multiplier(x, m, s)
        assert np.max(np.abs(got - x * d)) <= 0.5 + 1e-6 * np.max(np.abs(x * d)) + 1


def test_fixed_and_float_requant_agree_within_one_lsb() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = 64
        scale = rng.uniform(1e-5, 0.05, n).astype(np.float32)
        acc = rng.integers(-(1 << 24), 1 << 24, (512, n))
        zp = int(rng.integers(0, 256))
        flt = R.requant_float(acc, scale, zp, 0, 255)
        m, s = R.quantize_multiplier(scale.astype(np.float64))
        fix = R.requant_fixed(acc, m, s, zp, 0, 255)
        assert np.max(np.abs(flt - fix)) <= 1
        assert np.mean(flt != fix) < 0.01


def test_requant_float_is_float32_multiply_round_half_even() -> None:
    acc = np.array([1, 3, 5, -1, -3, 1000, -1000])
    got = R.requant_float(acc, np.float32(0.5), 10, 0, 255)
    assert got.tolist() == [10, 12, 12, 10, 8, 255, 0]
    # int32 -> float32 rounds: 2^24 + 1 is not representable
    assert (
        R.requant_float(np.array([(1 << 24) + 1]), np.float32(1.0), 0, -(1 << 31), (1 << 31) - 1)[0]
        == 1 << 24
    )


def test_quantize_dequantize_f32_round_trip() -> None:
    q = np.arange(256)
    x = R.dequantize_f32(q, np.float32(0.0371), 128)
    assert np.array_equal(R.quantize_f32(x, np.float32(0.0371), 128, 0, 255), q)
    assert np.array_equal(R.requant_qdq(q, 0.0371, 128, 0.0371, 128, 0, 255), q)
    fixed = R.requant_qdq(q, 0.02, 100, 0.05, 7, 0, 255, mode="fixed")
    assert np.max(np.abs(fixed - R.requant_qdq(q, 0.02, 100, 0.05, 7, 0, 255))) <= 1


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("count", [1, 7, 64])
def test_int4_pack_round_trip(signed: bool, count: int) -> None:
    rng = np.random.default_rng(count)
    values = rng.integers(-8, 8, count) if signed else rng.integers(0, 16, count)
    packed = R.pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
    assert np.array_equal(R.unpack_int4(packed, count, signed), values)
    if count >= 2:
        assert packed[0] == ((int(values[0]) & 0xF) | ((int(values[1]) & 0xF) << 4))

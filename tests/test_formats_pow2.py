"""Power-of-two scales: the exponent chosen among floor/ceil (±1) of log2 of the free scale is the best of
every exponent by brute force (weights: squared error on the weight; activations: on the histogram); a
converted model has only power-of-two scales; and `validate` stays bit-exact against ONNX Runtime, in fixed
point too, because a power-of-two requantization is one exact shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant import api
from onnxquant.calib.fp8 import fp8_round
from onnxquant.calib.pow2 import pow2_activation_entry
from onnxquant.calib.stats import stats_of
from onnxquant.calib.weight_table import weight_entry
from onnxquant.rules import QuantSpec
from onnxquant.runtime import requant as R
from onnxquant.tables import TensorRange

DIGITS = Path(__file__).resolve().parents[1] / "calib_data" / "digits"
EXPONENTS = range(-40, 12)  # every exponent the brute force tries


def int_error(v: np.ndarray, scale: float, lo: float, bits: int, symmetric: bool, counts=None) -> float:
    """Squared error of b-bit codes with `scale` (zero point from the range's low end `lo` when unsigned)."""
    if symmetric:
        qmin, qmax, z = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 0
    else:
        qmin, qmax = 0, 2**bits - 1
        z = int(np.clip(np.rint(-min(lo, 0.0) / scale), qmin, qmax))
    q = np.clip(np.rint(v.astype(np.float32) / np.float32(scale)) + z, qmin, qmax)
    err = (v.astype(np.float64) - (q - z) * scale) ** 2
    return float((err if counts is None else err * counts).sum())


def brute_force(error) -> int:
    """The exponent of smallest error; ties to the smaller exponent."""
    errors = [error(2.0**k) for k in EXPONENTS]
    return EXPONENTS[int(np.argmin(errors))]


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, granularity="per_channel", method="minmax", scale="pow2"),
        QuantSpec(bits=4, granularity="per_channel", method="mse", scale="pow2"),
        QuantSpec(bits=3, symmetric=False, granularity="per_tensor", method="minmax", scale="pow2"),
        QuantSpec(bits=4, granularity="per_block", block_size=8, method="minmax", scale="pow2"),
    ],
    ids=["int8-channel", "int4-channel-mse", "int3-asymmetric-tensor", "int4-block"],
)
def test_weight_exponents_are_the_brute_force_optimum(spec):
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((20, 6)) * np.exp2(rng.uniform(-6, 2, (1, 6)))).astype(np.float32)
    axis = {"per_channel": 1, "per_tensor": None, "per_block": 0}[spec.granularity]
    entry = weight_entry(w, axis, spec)
    if spec.granularity == "per_channel":  # one row per column
        rows = list(w.T)
    elif spec.granularity == "per_block":  # blocks of 8 rows (the last of 4) per column, scale shape (3, 6)
        rows = [w[8 * j : 8 * j + 8, c] for j in range(3) for c in range(6)]
    else:
        rows = [w.ravel()]
    scales = np.asarray(entry.scale, np.float64).ravel()
    lows = np.minimum(np.asarray(entry.min, np.float64).ravel(), 0.0)
    assert scales.size == len(rows)
    for row, scale, lo in zip(rows, scales, lows):
        best = brute_force(lambda s, row=row, lo=lo: int_error(row, s, lo, spec.bits, spec.symmetric))
        assert scale == 2.0**best


def test_fp8_weight_exponents_are_the_brute_force_optimum():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((4, 50)) * np.exp2(rng.uniform(-8, 3, (4, 1)))).astype(np.float32)
    spec = QuantSpec(bits=8, granularity="per_channel", format="fp8_e4m3", scale="pow2")
    entry = weight_entry(w, 0, spec)
    for row, scale in zip(w, entry.scale):
        best = brute_force(
            lambda s, row=row: float(
                ((row - fp8_round(row / np.float32(s), "fp8_e4m3").astype(np.float64) * s) ** 2).sum()
            )
        )
        assert scale == 2.0**best


@pytest.mark.parametrize("symmetric", [True, False])
def test_activation_exponent_is_the_brute_force_optimum_on_the_histogram(symmetric):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.laplace(0.3, 0.5, 20000), rng.normal(0, 6, 50)]).astype(np.float32)
    st = stats_of(x, bins=512)
    lo, hi = (-4.0, 4.0) if symmetric else (float(x.min()) * 0.6, float(x.max()) * 0.6)
    free = TensorRange.from_range(lo, hi, 4, symmetric, "mse")
    entry = pow2_activation_entry(free, st)
    counts = st.hist.astype(np.float64)
    counts[counts.size // 2] -= st.zeros
    centres = -st.hist_range + (np.arange(counts.size) + 0.5) * st.bin_width
    best = brute_force(lambda s: int_error(centres, s, free.min, 4, symmetric, counts))
    assert entry.scale == 2.0**best
    assert entry.zero_point == (0 if symmetric else int(np.clip(np.rint(-free.min / entry.scale), 0, 15)))


@pytest.fixture(scope="module")
def pow2_model():
    rules = api.resolve_rules("default", wbits=8, abits=8, method="mse").with_cli(pow2_scales=True)
    return api.convert(DIGITS / "model.onnx", rules, data=DIGITS / "calib.npz").model


def test_every_scale_of_the_converted_model_is_a_power_of_two(pow2_model: onnx.ModelProto):
    scales = [numpy_helper.to_array(t) for t in pow2_model.graph.initializer if t.name.endswith("_scale")]
    assert scales
    for s in scales:
        mantissa, _ = np.frexp(s.astype(np.float64))
        assert np.all(mantissa == 0.5), s


@pytest.mark.parametrize("requant", ["float", "fixed"])
def test_validate_is_bit_exact_on_a_power_of_two_model(pow2_model, requant, monkeypatch):
    data = {"input": np.load(DIGITS / "eval.npz")["input"][:64]}
    result = api.validate(pow2_model, data, requant=requant)
    convs = [c for c in result.nodes if c.op == "Conv"]
    assert result.passed and convs and all(c.differ == 0 for c in result.nodes), result.summary_lines()
    if requant == "fixed":  # the mantissa path (2^30, shift) rounds twice and misses by one LSB here
        monkeypatch.setattr(R, "POW2_MANTISSA", -1)
        double = api.validate(pow2_model, data, requant=requant)
        assert any(c.differ for c in double.nodes if c.op == "Conv")


def test_exact_shift_rounds_half_to_even():
    x = np.array([1, 2, 3, 5, 6, -1, -3, -5, 7, 100000])
    np.testing.assert_array_equal(R.shift_round_half_even(x, -1), np.rint(x / 2))
    np.testing.assert_array_equal(R.shift_round_half_even(x, -2), np.rint(x / 4))
    np.testing.assert_array_equal(R.shift_round_half_even(x, 3), x * 8)
    m, s = R.quantize_multiplier(0.25)
    assert m == R.POW2_MANTISSA
    np.testing.assert_array_equal(R.requant_fixed(x, m, s, 3, -(2**20), 2**20), np.rint(x / 4) + 3)

"""ACIQ: optimal clipping values against DESIGN.md's table, and ranges on sampled data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from onnxquant.calib.aciq import (
    aciq_range,
    gauss,
    gauss_alpha,
    gauss_objective,
    laplace,
    laplace_alpha,
    laplace_objective,
)
from onnxquant.calib.stats import MAD_TOLERANCE, stats_of

LAPLACE = [2.8307, 3.8972, 5.0286, 6.2048, 7.4131, 8.6456, 9.8968]  # M = 2..8 (DESIGN.md)
GAUSS = [1.7106, 2.1516, 2.5591, 2.9362, 3.2869, 3.6151, 3.9240]


@pytest.mark.parametrize("bits", range(2, 9))
def test_alpha_tables(bits):
    assert laplace_alpha(bits) == pytest.approx(LAPLACE[bits - 2], abs=1e-3)
    assert gauss_alpha(bits) == pytest.approx(GAUSS[bits - 2], abs=1e-3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_alphas_minimize_the_objectives(bits):
    for objective, alpha in ((laplace_objective, laplace_alpha), (gauss_objective, gauss_alpha)):
        res = optimize.minimize_scalar(
            lambda a, f=objective: f(a, bits), bounds=(0.05, 20), method="bounded", options={"xatol": 1e-9}
        )
        assert alpha(bits) == pytest.approx(res.x, abs=1e-5)
    # scale equivariance: α*(b) = b·α*(1)
    res = optimize.minimize_scalar(
        lambda a: laplace_objective(a, bits, b=2.5),
        bounds=(0.05, 60),
        method="bounded",
        options={"xatol": 1e-9},
    )
    assert res.x == pytest.approx(2.5 * laplace_alpha(bits), rel=1e-5)


def test_laplace_4_bits_on_laplace_samples():
    x = np.random.default_rng(1).laplace(0, 1, 1_000_000).astype(np.float32)
    st = stats_of(x, histograms=False)
    lo, hi = laplace(st, 4, True)
    amax = max(-lo, hi)
    assert amax == pytest.approx(5.03, rel=0.02)
    assert st.mad == pytest.approx(np.mean(np.abs(x - x.mean(dtype=np.float64))), rel=MAD_TOLERANCE)


def test_gauss_4_bits_on_gaussian_samples():
    x = np.random.default_rng(2).normal(0, 2, 1_000_000).astype(np.float32)
    lo, hi = gauss(stats_of(x, histograms=False), 4, True)
    assert max(-lo, hi) == pytest.approx(2 * 2.5591, rel=0.02)


@pytest.mark.parametrize("symmetric", [False, True])
def test_one_sided_range_uses_m_plus_1_bit_alpha_for_unsigned(symmetric):
    x = np.abs(np.random.default_rng(3).laplace(0, 1, 200_000)).astype(np.float32)
    x[0] = 100.0  # keep max out of the way
    st = stats_of(x, histograms=False)
    bits = 4
    m = bits if symmetric else bits + 1
    lo, hi = laplace(st, bits, symmetric)
    assert lo == 0.0
    assert hi == pytest.approx(max(st.mean, 0) + laplace_alpha(m) * st.mad, rel=1e-12)
    lo, hi = gauss(st, bits, symmetric)
    assert hi == pytest.approx(st.mean + gauss_alpha(m) * st.std, rel=1e-12)


def test_two_sided_range_is_centred_on_the_mean_and_clipped_to_the_data():
    lo, hi = aciq_range("laplace", 1.0, 1.0, -3.0, 100.0, 4, False)
    assert lo == -3.0 and hi == pytest.approx(1.0 + laplace_alpha(4))
    lo, hi = aciq_range("laplace", 0.0, 10.0, -1.0, 2.0, 4, True)
    assert (lo, hi) == (-1.0, 2.0)


def test_per_channel_laplace_with_per_channel_bits():
    rng = np.random.default_rng(4)
    x = (rng.laplace(0, 1, (500, 3, 20)) * np.array([0.5, 1.0, 4.0])[None, :, None]).astype(np.float32)
    st = stats_of([x[:200], x[200:]], per_channel=True, histograms=False)
    bits = np.array([3, 4, 5])
    lo, hi = laplace(st, bits, True, per_channel=True)
    ch = np.moveaxis(x, 1, 0).reshape(3, -1).astype(np.float64)
    mean = ch.mean(axis=1)
    b = np.abs(ch - mean[:, None]).mean(axis=1)
    np.testing.assert_allclose(st.ch_mean, mean, rtol=1e-9)
    np.testing.assert_allclose(st.ch_mad, b, rtol=1e-6)
    alpha = np.array([laplace_alpha(int(m)) for m in bits]) * b
    np.testing.assert_allclose(hi, np.minimum(ch.max(axis=1), mean + alpha), rtol=1e-6)
    np.testing.assert_allclose(lo, np.maximum(ch.min(axis=1), mean - alpha), rtol=1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_own_root_finders_match_scipy(bits):
    """laplace_alpha and gauss_alpha solve their equations without importing scipy (start-up time)."""
    from scipy import optimize, special

    assert laplace_alpha(bits) == pytest.approx(float(special.lambertw(3.0 * 4.0**bits).real), rel=1e-14)
    q = 1 / (3 * 4.0**bits)

    def slope(a):
        return a * math.erfc(a / math.sqrt(2)) - math.sqrt(2 / math.pi) * math.exp(-a * a / 2) + a * q

    assert gauss_alpha(bits) == pytest.approx(optimize.brentq(slope, 1e-6, 40.0, xtol=1e-14), abs=1e-13)

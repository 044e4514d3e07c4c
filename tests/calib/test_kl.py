"""KL (TensorRT entropy) calibration against an independent per-candidate reference."""

from __future__ import annotations

import numpy as np
import pytest

from onnxquant.calib.kl import kl, kl_divergences, kl_threshold_bins, levels
from onnxquant.calib.stats import stats_of

REFERENCE_BINS = 512


def reference_kl(counts: np.ndarray, nq: int) -> tuple[int, list[float]]:
    """Plain loop over candidates, following Migacz's pseudo-code (even group boundaries floor(j*i/nq))."""
    counts = counts.astype(np.float64)
    divergences = []
    for i in range(nq, len(counts) + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        q = np.zeros(i)
        for j in range(nq):
            lo, hi = j * i // nq, (j + 1) * i // nq
            nonzero = p[lo:hi] != 0
            if nonzero.sum():
                q[lo:hi][nonzero] = counts[lo:hi].sum() / nonzero.sum()
        if q.sum() == 0:
            divergences.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        if np.any(q[mask] == 0):
            divergences.append(np.inf)
            continue
        divergences.append(float(np.sum(p[mask] * np.log(p[mask] / q[mask]))))
    return nq + int(np.argmin(divergences)), divergences


def _data(dist: str, one_sided: bool, n: int = 200_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.laplace(0, 1, n) if dist == "laplace" else rng.normal(0, 1, n)
    return np.abs(x).astype(np.float32) if one_sided else x.astype(np.float32)


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("one_sided", [False, True])
def test_kl_matches_reference_index_for_index(dist, bits, one_sided):
    st = stats_of(_data(dist, one_sided), bins=REFERENCE_BINS)  # the reference loop is O(bins²)
    counts = st.abs_hist
    assert REFERENCE_BINS <= len(counts) <= 2 * REFERENCE_BINS
    nq = levels(bits, symmetric=not one_sided, one_sided=one_sided)  # one-sided tensors with unsigned codes
    assert nq == (2**bits if one_sided else 2 ** (bits - 1))
    ref_index, ref_div = reference_kl(counts, nq)
    div = kl_divergences(counts, nq)
    finite = np.isfinite(ref_div)
    assert np.array_equal(finite, np.isfinite(div))
    np.testing.assert_allclose(div[finite], np.asarray(ref_div)[finite], rtol=1e-7, atol=1e-12)
    assert kl_threshold_bins(counts, nq) == ref_index
    lo, hi = kl(st, bits, symmetric=not one_sided)
    t = ref_index * st.bin_width
    assert hi == pytest.approx(min(st.max, t))
    assert lo == pytest.approx(max(st.min, -t))


def test_kl_small_histogram_with_outliers_and_gaps():
    counts = np.array([5, 0, 3, 9, 0, 0, 2, 0, 1, 0, 0, 4, 0, 0, 0, 1], np.int64)
    for nq in (2, 4, 8):
        ref_index, ref_div = reference_kl(counts, nq)
        div = kl_divergences(counts, nq)
        np.testing.assert_allclose(div, ref_div, rtol=1e-9)
        assert kl_threshold_bins(counts, nq) == ref_index


def test_kl_threshold_grows_with_bits():
    st = stats_of(_data("laplace", False), bins=2048)
    t4, t8 = kl(st, 4, True)[1], kl(st, 8, True)[1]
    assert 0 < t4 < t8 <= st.max


def test_signed_codes_on_one_sided_tensor_use_half_the_levels():
    assert levels(8, symmetric=True, one_sided=True) == 128
    assert levels(8, symmetric=False, one_sided=True) == 256
    assert levels(4, symmetric=False, one_sided=False) == 8


def test_relu_zeros_do_not_drag_the_threshold_down():
    rng = np.random.default_rng(3)
    positive = np.abs(rng.laplace(0.0, 1.0, 200_000)).astype(np.float32)
    post_relu = np.concatenate([positive, np.zeros(300_000, np.float32)])
    with_zeros = stats_of(post_relu, bins=2048)
    assert with_zeros.zeros == 300_000
    for bits in (8, 4):
        nq = levels(bits, symmetric=False, one_sided=True)
        counts = with_zeros.abs_hist.astype(np.float64)
        counts[0] -= 300_000
        expected = kl_threshold_bins(counts, nq) * with_zeros.bin_width
        assert kl(with_zeros, bits, symmetric=False)[1] == pytest.approx(expected)
        assert expected > 0.25 * with_zeros.max  # a few-bin threshold is the failure this guards against


def test_coarse_discrete_data_keeps_its_full_range():
    pixels = np.random.default_rng(4).integers(0, 17, size=(64, 1, 8, 8)).astype(np.float32) / 16
    st = stats_of(pixels, bins=2048)
    assert kl(st, 8, symmetric=True) == (0.0, 1.0)
    assert kl(st, 4, symmetric=False) == (0.0, 1.0)

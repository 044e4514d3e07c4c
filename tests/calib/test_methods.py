"""Percentile, MSE, minmax and the method registry / compute_table."""

from __future__ import annotations

import numpy as np
import pytest

from onnxquant.calib.engine import compute_table
from onnxquant.calib.kl import kl
from onnxquant.calib.methods import METHODS, WEIGHT_METHODS, check_options, clip_range, collect_options
from onnxquant.calib.mse import mse, mse_costs_affine, mse_costs_symmetric
from onnxquant.calib.percentile import percentile
from onnxquant.calib.stats import stats_of
from onnxquant.errors import BadDataError, BadRulesError

BINS = 512


def _x(seed=0, n=100_000, shift=0.0):
    return (np.random.default_rng(seed).laplace(shift, 1, n)).astype(np.float32)


def test_registry_is_explicit_and_ordered():
    assert list(METHODS) == ["minmax", "percentile", "mse", "laplace", "gauss", "kl"]
    assert collect_options(["minmax"]) == {"histograms": False, "moments": False}
    assert collect_options(["laplace"]) == {"histograms": False, "moments": True}  # moments: per-bin sums
    assert collect_options(["gauss"]) == {"histograms": True, "moments": False}  # σ: pass 1; clip check
    assert collect_options(["kl"]) == {"histograms": True, "moments": False}
    assert collect_options(["laplace", "kl"]) == {"histograms": True, "moments": True}
    with pytest.raises(BadRulesError, match="accepted: minmax, percentile, mse, laplace, gauss, kl"):
        collect_options(["entropy"])
    with pytest.raises(BadRulesError, match="unknown calibration option"):
        check_options("kl", {"percentil": 99})
    assert check_options("kl", {"percentile": 99.9}) == {}
    assert check_options("percentile", {"percentile": 99.9}) == {"percentile": 99.9}
    assert [n for n, m in METHODS.items() if m.per_channel] == ["minmax", "laplace", "gauss"]
    assert [n for n, m in METHODS.items() if m.options] == ["percentile"]
    assert WEIGHT_METHODS == ("minmax", "laplace", "gauss", "mse")


def test_clip_range_passes_each_method_only_its_options():
    st = stats_of(_x(seed=5), bins=BINS)
    assert clip_range("percentile", st, 8, True, percentile=99.0) == percentile(st, 8, True, percentile=99.0)
    assert clip_range("kl", st, 8, True, percentile=99.0) == kl(st, 8, True)
    with pytest.raises(BadRulesError, match="unknown calibration method 'entropy'"):
        clip_range("entropy", st, 8, True)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(p):
    x = _x(shift=0.7)
    st = stats_of(x, bins=BINS)
    width = st.bin_width
    lo, hi = percentile(st, 8, True, percentile=p)
    t = np.percentile(np.abs(x), p)
    assert abs(hi - t) <= width and lo == -hi
    lo, hi = percentile(st, 8, False, percentile=p)  # two-sided, unsigned codes: each side
    assert abs(hi - np.percentile(x, p)) <= width
    assert abs(lo - np.percentile(x, 100 - p)) <= width
    with pytest.raises(BadRulesError, match="percentile"):
        percentile(st, 8, True, percentile=0)


def _reference_mse_symmetric(counts, width, levels):
    best, best_t = np.inf, None
    centres = (np.arange(len(counts)) + 0.5) * width
    for i in range(1, len(counts) + 1):
        t = i * width
        s = t / levels
        err = 0.0
        for c, n in zip(centres, counts):
            if n:
                err += n * (c - s * min(np.rint(c / s), levels)) ** 2
        if err < best:
            best, best_t = err, t
    return best_t


def _reference_mse_affine(counts, first, width, lo, hi, bits):
    best, best_range = np.inf, None
    nz = np.nonzero(counts)[0]
    centres, n = first + (nz + 0.5) * width, counts[nz]
    qmax = 2**bits - 1
    half = len(counts) // 2
    for i in range(1, half + 1):
        clo, chi = lo * i / half, hi * i / half
        s = (chi - clo) / qmax
        z = np.clip(np.rint(-clo / s), 0, qmax)
        q = np.clip(np.rint(centres / s) + z, 0, qmax)
        err = float(np.sum(n * (centres - s * (q - z)) ** 2))
        if err < best:
            best, best_range = err, (clo, chi)
    return best_range


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_matches_brute_force(bits):
    x = _x(seed=1, n=20_000)
    st = stats_of(x, bins=128)
    w = st.bin_width
    lo, hi = mse(st, bits, True)
    t = _reference_mse_symmetric(st.abs_hist, w, 2 ** (bits - 1) - 1)
    assert (lo, hi) == pytest.approx((max(st.min, -t), min(st.max, t)))
    xr = np.abs(x)
    sr = stats_of(xr, bins=128)
    wr = sr.bin_width
    _, hi = mse(sr, bits, False)  # one-sided, unsigned codes: 2^b - 1 levels
    assert hi == pytest.approx(min(sr.max, _reference_mse_symmetric(sr.abs_hist, wr, 2**bits - 1)))
    lo, hi = mse(st, bits, False)  # two-sided, unsigned codes
    ref = _reference_mse_affine(st.hist, -st.hist_range, w, st.min, st.max, bits)
    assert (lo, hi) == pytest.approx(ref)


def test_mse_prefers_clipping_at_low_bits():
    st = stats_of(_x(seed=2), bins=BINS)
    t4, t8 = mse(st, 4, True)[1], mse(st, 8, True)[1]
    assert t4 < t8 < st.amax


def test_compute_table_constant_zero_tensor_gets_valid_scale_and_note():
    st = stats_of(np.zeros((4, 3), np.float32), bins=64)
    for method in METHODS:
        table = compute_table({"z": st}, {"z": (8, True)}, method)
        entry = table.tensors["z"]
        assert entry.scale > 0 and np.isfinite(entry.scale)
        assert "constant" in entry.note


def test_compute_table_entries_and_errors():
    x = np.abs(_x(seed=3)).reshape(-1, 4)
    stats = {"a": stats_of(x, bins=BINS, per_channel=True), "b": stats_of(_x(seed=4), bins=BINS)}
    table = compute_table(stats, {"a": (4, False), "b": (8, True)}, "laplace")
    a, b = table.tensors["a"], table.tensors["b"]
    assert (a.signed, a.zero_point, a.bits, a.min) == (False, 0, 4, 0.0)
    assert (b.signed, b.zero_point, b.bits) == (True, 0, 8)
    assert table.bits == 8 and table.method == "laplace"
    pc = compute_table(stats, {"a": ([3, 4, 5, 4], False)}, "minmax", per_channel=["a"]).tensors["a"]
    assert pc.axis == 1 and pc.bits == [3, 4, 5, 4] and len(pc.scale) == 4
    np.testing.assert_allclose(pc.max, x.max(axis=0))
    with pytest.raises(BadRulesError, match="tensor a: kl calibration is per tensor only"):
        compute_table(stats, {"a": (4, False)}, "kl", per_channel=["a"])
    with pytest.raises(BadDataError, match="no statistics"):
        compute_table(stats, {"c": (4, False)}, "minmax")
    with pytest.raises(BadRulesError, match="unknown calibration method"):
        compute_table(stats, {"a": (4, False)}, "entropy")
    no_hist = {"b": stats_of(_x(), histograms=False, moments=False)}
    with pytest.raises(BadDataError, match="histogram"):
        compute_table(no_hist, {"b": (8, True)}, "kl")
    compute_table(no_hist, {"b": (8, True)}, "gauss")
    no_moments = {"b": stats_of(_x(), moments=False)}
    compute_table(no_moments, {"b": (8, True)}, "kl")
    with pytest.raises(BadDataError, match="moments"):
        compute_table(no_moments, {"b": (8, True)}, "laplace")


def _direct_error(x: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    """Σ (x − Q(x))² over the raw values, an independent check of the histogram estimate."""
    from onnxquant.quant import fake_quantize, qparams_from_range

    return float(((x - fake_quantize(x, qparams_from_range(lo, hi, bits, symmetric))) ** 2).sum())


def test_range_error_tracks_the_error_on_the_raw_values():
    from onnxquant.calib.mse import range_error

    x = _x()
    st = stats_of(x, bins=2048)
    for lo, hi in ((st.min, st.max), (-2.0, 2.0), (-0.5, 0.5)):
        estimate, direct = range_error(st, lo, hi, 8, True), _direct_error(x, lo, hi, 8, True)
        assert estimate == pytest.approx(direct, rel=0.05), (lo, hi)


def test_a_clip_that_adds_error_is_refused_and_one_that_helps_is_kept():  # engine._no_worse_than_full_range
    rng = np.random.default_rng(0)
    # a Gaussian bulk with a few large values that carry the signal: the 99th percentile cuts them off
    x = np.concatenate([rng.normal(0, 1, 200_000), rng.choice([-50.0, 50.0], 1000)]).astype(np.float32)
    st = {"x": stats_of(x, bins=2048)}
    _, hi = percentile(st["x"], 8, True, percentile=99.0)
    assert hi < 10  # the percentile alone clips every large value
    entry = compute_table(st, {"x": (8, True)}, "percentile", percentile=99.0).tensors["x"]
    assert entry.amax == pytest.approx(50.0, rel=1e-3)
    assert "not clipped" in entry.note
    # a Laplace tensor at 4 bits: ACIQ's clip lowers the error, and stays
    lap = {"l": stats_of(rng.laplace(0, 1, 200_000).astype(np.float32), bins=2048)}
    entry = compute_table(lap, {"l": (4, True)}, "laplace").tensors["l"]
    assert entry.amax < 0.5 * lap["l"].amax and entry.note is None


def _every_bin_symmetric(counts, width, levels):
    """The costs bin by bin, every candidate against every bin (the definition)."""
    nz = np.nonzero(counts)[0]
    c, n = (nz + 0.5) * width, counts[nz].astype(np.float64)
    s = (np.arange(1, len(counts) + 1) * width / levels)[:, None]
    return ((c - s * np.minimum(np.rint(c / s), levels)) ** 2 * n).sum(axis=1)


def _every_bin_affine(counts, first_edge, width, lo, hi, bits):
    nz = np.nonzero(counts)[0]
    c, n = first_edge + (nz + 0.5) * width, counts[nz].astype(np.float64)
    f = (np.arange(1, len(counts) // 2 + 1) / (len(counts) // 2))[:, None]
    qmax = (1 << bits) - 1
    clo, chi = min(lo, 0.0) * f, max(hi, 0.0) * f
    s = np.maximum((chi - clo) / qmax, np.finfo(np.float64).tiny)
    z = np.clip(np.rint(-clo / s), 0, qmax)
    q = np.clip(np.rint(c / s) + z, 0, qmax)
    return ((c - s * (q - z)) ** 2 * n).sum(axis=1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_costs_equal_the_bin_by_bin_definition(bits, seed):
    """The suffix-sum shortcut for saturated bins gives the definition's costs and the same choice."""
    rng = np.random.default_rng(seed)
    counts = np.floor(rng.laplace(0, 1, 700) ** 2 * 50 + rng.integers(0, 3, 700)) * (
        rng.uniform(size=700) > 0.2
    )
    counts = counts.astype(np.int64)
    levels = (1 << (bits - 1)) - 1
    fast, ref = mse_costs_symmetric(counts, 0.01, levels), _every_bin_symmetric(counts, 0.01, levels)
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-12 * ref.max())
    assert np.argmin(fast) == np.argmin(ref)
    fast = mse_costs_affine(counts, -3.0, 0.01, -2.5, 3.5, bits)
    ref = _every_bin_affine(counts, -3.0, 0.01, -2.5, 3.5, bits)
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-12 * ref.max())
    assert np.argmin(fast) == np.argmin(ref)

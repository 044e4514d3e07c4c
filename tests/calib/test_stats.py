"""Streaming statistics through ONNX Runtime: exactness, batch invariance, determinism, sharding."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxquant.calib.engine import collect_stats, compute_table, merge_stats
from onnxquant.calib.histogram import Histogram
from onnxquant.calib.methods import METHODS
from onnxquant.calib.stats import DEFAULT_BINS, MAD_TOLERANCE, TensorStats, scan, stats_of
from onnxquant.calib.stats_io import load_stats, save_stats
from onnxquant.errors import BadDataError, BadModelError, InternalError
from onnxquant.tables import dumps_json

MODEL = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 3, 5] x) => (float[N, 3, 5] y) {
  c = Constant <value = float[1] {0.25}> ()
  t1 = Sub(x, c)
  r = Relu(t1)
  k = Constant <value = float[1] {2.0}> ()
  y = Mul(r, k)
}
""")
TENSORS = ["x", "t1", "r", "y"]
SPECS = {"x": (8, True), "t1": (4, False), "r": (4, False), "y": (8, True)}
BINS = 256


def _samples(n=64, seed=0):
    return np.random.default_rng(seed).laplace(0, 1, (n, 3, 5)).astype(np.float32)


def _batches(x, size):
    return [{"x": x[i : i + size]} for i in range(0, len(x), size)]


def _tables(stats):
    return {m: compute_table(stats, SPECS, m) for m in METHODS}


def test_statistics_are_exact():
    x = _samples()
    stats = collect_stats(
        MODEL, TENSORS, _batches(x, 10), per_channel=["t1"], channel_mad=["t1"], bins=BINS, moments=True
    )
    t1 = (x - np.float32(0.25)).astype(np.float64)
    st = stats["t1"]
    assert st.count == t1.size and st.min == t1.min() and st.max == t1.max()
    assert st.mean == pytest.approx(t1.mean(), rel=1e-6)  # float32 partial sums, float64 across batches
    assert st.mad == pytest.approx(np.abs(t1 - t1.mean()).mean(), rel=MAD_TOLERANCE)
    assert st.std == pytest.approx(t1.std(), rel=1e-6)
    np.testing.assert_allclose(
        st.ch_mad, np.abs(t1 - t1.mean(axis=(0, 2))[:, None]).mean(axis=(0, 2)), rtol=1e-6
    )
    np.testing.assert_array_equal(st.ch_min, t1.min(axis=(0, 2)))
    np.testing.assert_allclose(st.ch_mean, t1.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(st.ch_std, t1.std(axis=(0, 2)), rtol=1e-5)
    grid = 2.0 ** (np.floor(np.log2(st.amax)) + 1)  # smallest power of two above max|x|
    width = grid / (2 * BINS)
    k = int(np.ceil(st.amax / width))  # bins per side that cover max|x|
    assert st.bin_width == width and st.hist_range == k * width and BINS <= k <= 2 * BINS
    m = np.ceil(np.abs(t1) / width).astype(int)  # magnitude bin, (m-1)·w < |x| <= m·w
    ref = np.bincount(np.where(t1 > 0, k + m - 1, np.where(t1 < 0, k - m, k)).ravel(), minlength=2 * k)
    np.testing.assert_array_equal(st.hist, ref)  # w is a power of two: |x|/w is exact
    assert st.zeros == np.count_nonzero(t1 == 0) and st.abs_hist.sum() == t1.size
    assert stats["r"].one_sided and stats["y"].max == pytest.approx(2 * stats["r"].max)


def test_minmax_needs_one_pass():
    calls = []

    class Counting(list):
        def __iter__(self):
            calls.append(1)
            return super().__iter__()

    stats = collect_stats(MODEL, TENSORS, Counting(_batches(_samples(), 8)), histograms=False)
    assert len(calls) == 1 and stats["x"].pass2 is None
    compute_table(stats, SPECS, "minmax")
    compute_table(stats, SPECS, "gauss")  # σ comes from pass 1
    stats = collect_stats(MODEL, TENSORS, Counting(_batches(_samples(), 8)), histograms=False, moments=True)
    assert len(calls) == 2 and all(st.pass2 is None for st in stats.values())  # b from the per-bin sums
    compute_table(stats, SPECS, "laplace")
    collect_stats(
        MODEL,
        TENSORS,
        Counting(_batches(_samples(), 8)),
        histograms=False,
        moments=True,
        per_channel=["t1"],
        channel_mad=["t1"],
    )
    assert len(calls) == 4  # the per-channel b needs a second pass


def test_batch_invariance_and_determinism():
    x = _samples()
    runs = {
        size: collect_stats(MODEL, TENSORS, _batches(x, size), bins=BINS, moments=True) for size in (1, 7, 32)
    }
    tables = {size: _tables(stats) for size, stats in runs.items()}
    for size in (7, 32):
        for name in TENSORS:
            np.testing.assert_array_equal(runs[size][name].hist, runs[1][name].hist)
        for method in METHODS:
            a, b = tables[size][method], tables[1][method]
            if method in ("laplace", "gauss"):  # moments: equal up to float32 rounding
                for name in TENSORS:
                    assert a.tensors[name].amax == pytest.approx(b.tensors[name].amax, rel=1e-6)
            else:
                assert dumps_json(a) == dumps_json(b), method
    again = _tables(collect_stats(MODEL, TENSORS, _batches(x, 7), bins=BINS, moments=True))
    for method in METHODS:
        assert dumps_json(again[method]) == dumps_json(tables[7][method])


def test_shards_merge_to_one_run(tmp_path):
    x = _samples(96, seed=5)
    shards = [_batches(x[:40], 8), _batches(x[40:41], 1), _batches(x[41:], 16)]
    opts = {"per_channel": ["t1"], "channel_mad": ["t1"], "bins": BINS, "moments": True}
    single = collect_stats(MODEL, TENSORS, _batches(x, 12), **opts)
    p1 = [collect_stats(MODEL, TENSORS, s, first_pass_only=True, **opts) for s in shards]
    for i, part in enumerate(p1):  # shards may travel as files
        save_stats(part, tmp_path / f"p1_{i}.npz")
    merged1 = merge_stats(*[load_stats(tmp_path / f"p1_{i}.npz") for i in range(3)])
    for method in ("minmax", "percentile", "mse", "kl"):  # one pass is enough for these
        a, b = compute_table(merged1, SPECS, method), compute_table(single, SPECS, method)
        assert dumps_json(a) == dumps_json(b)
    p2 = [collect_stats(MODEL, TENSORS, s, pass1=merged1, **opts) for s in shards]
    merged = merge_stats(*p2)
    for name in TENSORS:
        a, b = merged[name], single[name]
        assert (a.count, a.min, a.max) == (b.count, b.min, b.max)
        np.testing.assert_array_equal(a.hist, b.hist)
        assert a.mad == pytest.approx(b.mad, rel=1e-6) and a.std == pytest.approx(b.std, rel=1e-6)
    np.testing.assert_allclose(merged["t1"].ch_mad, single["t1"].ch_mad, rtol=1e-6)
    for method in ("minmax", "percentile", "mse", "kl"):
        a, b = compute_table(merged, SPECS, method), compute_table(single, SPECS, method)
        assert dumps_json(a) == dumps_json(b)
    for method in ("laplace", "gauss"):
        a, b = compute_table(merged, SPECS, method), compute_table(single, SPECS, method)
        for name in TENSORS:
            assert a.tensors[name].amax == pytest.approx(b.tensors[name].amax, rel=1e-6)
    with pytest.raises(BadDataError, match="protocol"):  # pass 2 against different references
        merge_stats({"t1": p2[0]["t1"]}, {"t1": collect_stats(MODEL, TENSORS, shards[1], **opts)["t1"]})
    with pytest.raises(BadDataError, match="exceed the pass-1 range"):
        collect_stats(MODEL, TENSORS, _batches(x * 10, 8), pass1=merged1, **opts)


def test_save_load_stats_round_trip(tmp_path):
    stats = collect_stats(
        MODEL,
        TENSORS,
        _batches(_samples(), 16),
        per_channel=["t1"],
        channel_mad=["t1"],
        bins=BINS,
        moments=True,
    )
    save_stats(stats, tmp_path / "s.npz")
    back = load_stats(tmp_path / "s.npz")
    for m in METHODS:
        assert dumps_json(compute_table(back, SPECS, m)) == dumps_json(compute_table(stats, SPECS, m))
    np.testing.assert_array_equal(back["t1"].pass2.ch_abs_dev, stats["t1"].pass2.ch_abs_dev)
    np.testing.assert_array_equal(back["t1"].ch_m2, stats["t1"].ch_m2)
    np.testing.assert_array_equal(back["r"].histogram.sums, stats["r"].histogram.sums)
    assert back["r"].m2 == stats["r"].m2 and back["r"].mad == stats["r"].mad
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BadDataError, match="bad.npz: not a statistics file"):
        load_stats(tmp_path / "bad.npz")


def test_bad_data_is_rejected_with_names():
    x = _samples(20)
    x[13, 1, 2] = np.nan
    with pytest.raises(BadDataError, match=r"tensor x: NaN or Inf at sample 13"):
        collect_stats(MODEL, TENSORS, _batches(x, 4))
    with pytest.raises(BadModelError, match="nope"):
        collect_stats(MODEL, ["r", "nope"], _batches(_samples(), 4))
    with pytest.raises(BadDataError, match="lacks model input"):
        collect_stats(MODEL, ["r"], [{"z": _samples()}])
    with pytest.raises(InternalError, match="re-iterable"):  # the CLI always passes a DataSource
        collect_stats(MODEL, ["r"], iter(_batches(_samples(), 4)), per_channel=["r"], channel_mad=["r"])
    with pytest.raises(BadDataError, match="empty"):
        collect_stats(MODEL, ["r"], [])


def test_progress_bar_goes_to_stderr(capsys):
    collect_stats(MODEL, ["r"], _batches(_samples(), 16), progress=True, bins=BINS, channel_mad=["r"])
    out = capsys.readouterr()
    assert out.out == "" and "calibration pass 1" in out.err and "calibration pass 2" in out.err


def test_histogram_folding_and_edges():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], np.float32)
    st = stats_of(x, bins=2)  # grid 4 (power of two above 2), 4 bins of width 1 per side
    assert st.histogram.grid == 4.0 and st.bin_width == 1.0 and st.zeros == 1
    assert st.histogram.counts.tolist() == [0, 0, 1, 2, 1, 2, 1, 0, 0]  # -4..-1, zero, 1..4
    assert st.hist.tolist() == [1, 2, 3, 1] and st.hist_range == 2.0  # 2 bins per side cover |x| <= 2
    a = np.abs(x)
    assert st.abs_hist.tolist() == [np.sum(a <= 1), np.sum((a > 1) & (a <= 2))] == [5, 2]
    assert stats_of(a, bins=2).abs_hist.tolist() == [5, 2]


@pytest.mark.parametrize("bins", [64, 6])  # 6: bin widths are not powers of two
def test_histogram_regrid_equals_binning_on_the_final_grid(bins):
    rng = np.random.default_rng(3)
    parts = [rng.laplace(0, s, 1000).astype(np.float32) for s in (0.01, 0.3, 0.05, 40.0, 2.0)]
    grown = TensorStats(histogram=Histogram(bins))
    for p in parts:  # the grid grows from 2^-4 to 2^9 on the way
        grown.update_pass1(p)
    x, side = np.concatenate(parts), 2 * bins
    direct = Histogram(
        bins,
        512.0,
        np.bincount(
            side + np.sign(x).astype(int) * np.ceil(np.abs(x) * np.float32(side / 512.0)).astype(int),
            minlength=2 * side + 1,
        ),
    )
    np.testing.assert_array_equal(grown.histogram.counts, direct.counts)
    assert grown.histogram.grid == 512.0 and 256 <= grown.amax < 512
    one_batch = Histogram(bins)  # one batch whose chunks grow the grid from the smallest part's
    scan(np.concatenate([np.repeat(parts[0], 70), *parts[1:]]), one_batch)
    np.testing.assert_array_equal(
        one_batch.counts - direct.counts,
        np.bincount(
            side
            + np.sign(parts[0]).astype(int)
            * np.ceil(np.abs(parts[0]) * np.float32(side / 512.0)).astype(int),
            minlength=2 * side + 1,
        )
        * 69,
    )
    reverse = TensorStats(histogram=Histogram(bins))
    for p in parts[::-1]:
        reverse.update_pass1(p)
    np.testing.assert_array_equal(reverse.histogram.counts, direct.counts)
    a, b = stats_of(parts[:2], bins=bins, moments=False), stats_of(parts[2:], bins=bins, moments=False)
    np.testing.assert_array_equal(a.merge(b).histogram.counts, direct.counts)
    with pytest.raises(BadDataError, match="histograms of"):
        a.merge(stats_of(parts[2:], bins=2 * bins, moments=False))


@pytest.mark.parametrize("kind", ["laplace", "relu", "offset"])
def test_laplace_b_from_the_histogram_sums_is_within_its_bound(kind):
    rng = np.random.default_rng(11)
    x = {
        "laplace": rng.laplace(0.3, 1.0, 300_000),
        "relu": np.maximum(rng.normal(0, 1, 300_000), 0),
        "offset": rng.normal(1000.0, 1.0, 300_000),
    }[kind].astype(np.float32)
    exact = np.abs(x - x.mean(dtype=np.float64)).mean(dtype=np.float64)
    one_pass = TensorStats()
    one_pass.histogram = Histogram.empty(DEFAULT_BINS, sums=True)
    for part in (x[:123_457], x[123_457:]):
        one_pass.update_pass1(part)
    excess, bound = one_pass.histogram.excess_above(one_pass.mean)
    assert abs(2 * excess / x.size - exact) <= 2 * bound / x.size + 1e-12 * exact
    assert one_pass.std == pytest.approx(x.astype(np.float64).std(), rel=1e-6)
    if kind == "offset":  # bins of 1000/4096 against b = 0.8: the bound is loose, so a second pass runs
        assert one_pass.mad_needs_pass2 and stats_of(x).pass2 is not None
        with pytest.raises(BadDataError, match="pass 2"):
            _ = one_pass.mad
        assert stats_of(x).mad == pytest.approx(exact, rel=1e-6)
    else:
        assert not one_pass.mad_needs_pass2 and one_pass.mad == pytest.approx(exact, rel=MAD_TOLERANCE)
        assert stats_of(x).pass2 is None


def test_m2_of_huge_but_finite_values_does_not_overflow():
    """Values near 1e25 are below the mask threshold but their squares overflow float32."""
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, _, m2 = scan(x)
    ref = float(((x.astype(np.float64) - x.astype(np.float64).mean()) ** 2).sum())
    assert abs(m2 / ref - 1) < 1e-6

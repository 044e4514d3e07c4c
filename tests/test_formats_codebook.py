"""APoT and k-means codebook weights (calib/codebook.py, passes/insert_codebook.py): level sets against the
paper's construction, rounding against brute force, k-means against a hand-written Lloyd iteration, the
Gather graph against a numpy forward in ONNX Runtime, the report's reading of it, and validate's refusal."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from onnxquant import api
from onnxquant.calib import codebook as cbk
from onnxquant.cli import main
from onnxquant.errors import BadModelError
from onnxquant.model import make_session, with_outputs
from onnxquant.passes.insert_codebook import codebook_weights
from onnxquant.passes.insert_qdq import insert_qdq
from onnxquant.report import render_html, render_text
from onnxquant.report.core import build_report
from onnxquant.tables import CalibrationTable

DEMO = Path("calib_data/digits")


def paper_magnitudes(magnitude_bits: int) -> np.ndarray:
    """APoT's levels as the paper defines them, written out independently: for B = k·n magnitude bits,
    Σ_{i<n} p_i with p_i ∈ {0, 2^−i, 2^−(i+n), ..., 2^−(i+(2^k−2)n)} (k = 2), normalized by the maximum;
    B = 3 uses the paper's uneven split {0, 2^−1, 2^−2, 2^−4} + {0, 2^−3}; B = 1 is ternary."""
    if magnitude_bits == 1:
        sums = {0.0, 1.0}
    elif magnitude_bits == 3:
        sums = {a + b for a in (0, 2**-1, 2**-2, 2**-4) for b in (0, 2**-3)}
    else:
        k, n = 2, magnitude_bits // 2
        terms = [[0.0] + [2.0 ** -(i + j * n) for j in range(2**k - 1)] for i in range(n)]
        sums = {0.0}
        for term in terms:
            sums = {s + t for s in sums for t in term}
    values = np.array(sorted(sums))
    return values / values.max()


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_apot_levels_are_the_papers(bits):
    m = paper_magnitudes(bits - 1)
    assert m.size == 2 ** (bits - 1)
    np.testing.assert_allclose(cbk.apot_magnitudes(bits), m, rtol=0, atol=1e-15)
    levels = cbk.apot_levels(bits)
    assert levels.size == 2**bits - 1
    np.testing.assert_allclose(levels, np.concatenate([-m[::-1], m[1:]]), rtol=0, atol=1e-15)


def test_apot_4bit_levels_are_designs():
    design = [0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]  # DESIGN.md
    np.testing.assert_allclose(cbk.apot_magnitudes(4), design, atol=1e-12)


def test_apot_refuses_other_widths():
    with pytest.raises(Exception, match="accepted: bits 2, 3, 4, 5"):
        cbk.apot_levels(6)


def test_nearest_level_is_brute_force():
    rng = np.random.default_rng(1)
    for levels in (cbk.apot_levels(4), cbk.apot_levels(5), np.sort(rng.normal(size=13))):
        x = rng.normal(scale=0.7, size=5000)
        ref = np.abs(x[:, None] - levels[None, :]).argmin(axis=1)
        np.testing.assert_array_equal(cbk.nearest_level(x, levels), ref)


def brute_apot(w: np.ndarray, alpha: np.ndarray, bits: int) -> np.ndarray:
    """Reference rounding: the nearest of α_c·levels for every element of row c (rows = output channels)."""
    grid = alpha[:, None, None] * paper_levels(bits)[None, None, :]
    rows = w.reshape(w.shape[0], -1)
    pick = np.abs(rows[:, :, None] - grid).argmin(axis=2)
    return np.take_along_axis(np.broadcast_to(grid, (*rows.shape, grid.shape[-1])), pick[..., None], 2)[
        ..., 0
    ]


def paper_levels(bits: int) -> np.ndarray:
    m = paper_magnitudes(bits - 1)
    return np.concatenate([-m[::-1], m[1:]])


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_apot_minmax_rounding_is_the_nearest_scaled_level(bits):
    rng = np.random.default_rng(bits)
    w = rng.laplace(size=(6, 4, 3, 3)) * rng.uniform(0.1, 3, size=(6, 1, 1, 1))
    idx, levels, alpha = cbk.apot_quantize(w, 0, bits, "minmax")
    np.testing.assert_allclose(alpha, np.abs(w).reshape(6, -1).max(axis=1))
    got = (levels[idx] * alpha[:, None, None, None]).reshape(6, -1)
    np.testing.assert_allclose(got, brute_apot(w, alpha, bits), rtol=1e-12, atol=1e-12)


def test_apot_mse_clipping_is_the_brute_force_optimum():
    rng = np.random.default_rng(7)
    w = rng.laplace(size=(5, 300)) * rng.uniform(0.5, 2, size=(5, 1))
    w[0, 0] = 25.0  # an outlier clipping should cut
    _, _, alpha = cbk.apot_quantize(w, 0, 4, "mse")
    amax = np.abs(w).max(axis=1)
    for c in range(5):
        errors = []
        for f in np.arange(1, 101) / 100:
            a = np.array([f * amax[c]])
            errors.append(((w[c] - brute_apot(w[c : c + 1], a, 4)[0]) ** 2).sum())
        chosen = ((w[c] - brute_apot(w[c : c + 1], alpha[c : c + 1], 4)[0]) ** 2).sum()
        assert chosen <= min(errors) * (1 + 1e-9)
    assert alpha[0] < amax[0]  # the outlier is clipped


def lloyd_reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's k-means written plainly: linear init, assign by argmin, move to the means, stop when
    the assignment repeats; an empty cluster keeps its centroid."""
    c = np.linspace(x.min(), x.max(), k)
    assign = None
    for _ in range(300):
        new = np.abs(x[:, None] - c[None, :]).argmin(axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            if np.any(assign == j):
                c[j] = x[assign == j].mean()
    return c, np.abs(x[:, None] - c[None, :]).argmin(axis=1)


@pytest.mark.parametrize(("seed", "k"), [(0, 4), (1, 16), (2, 16), (3, 32)])
def test_kmeans_is_lloyd_with_linear_init(seed, k):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.laplace(scale=0.05, size=2500), rng.normal(0.3, 0.02, size=300)])
    ref_c, ref_i = lloyd_reference(x, k)
    codebook, idx = cbk.kmeans_codebook(x, k)
    np.testing.assert_allclose(codebook, ref_c, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(idx, ref_i)


def test_kmeans_on_a_histogram_is_deterministic_and_close(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.laplace(scale=0.05, size=40000)
    exact, _ = cbk.kmeans_codebook(x, 16)
    monkeypatch.setattr(cbk, "EXACT_LIMIT", 1000)
    a, ia = cbk.kmeans_codebook(x, 16)
    b, ib = cbk.kmeans_codebook(x, 16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ia, ib)
    sse = ((x - a[ia]) ** 2).sum()
    sse_exact = ((x - exact[cbk.nearest_level(x, exact)]) ** 2).sum()
    assert sse <= sse_exact * 1.01


GEMM = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16] x) => (float[N, 6] y) {
  y = Gemm <transB = 1> (x, w, b)
}
"""


def gemm_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(GEMM)
    w = (rng.laplace(size=(6, 16)) * rng.uniform(0.05, 2, size=(6, 1))).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return model


def weight_only(model: onnx.ModelProto, **rule_options) -> onnx.ModelProto:
    """`model` with only its weights on codebooks: no activation entries, so activations stay float."""
    granularity = rule_options.pop("granularity", "per_channel")
    rules = api.resolve_rules(None).with_cli(**rule_options)
    rules = replace(rules, weights=replace(rules.weights, granularity=granularity))
    folded, _, plan, _ = api.prepare(model, rules)
    quant, _ = insert_qdq(folded, plan, CalibrationTable(method="minmax", bits=8))
    onnx.checker.check_model(quant, full_check=True)
    return quant


def reference_weight(w: np.ndarray, levels: str, bits: int, granularity: str, clusters=None) -> np.ndarray:
    """The decoded weight from the independent references above (Gemm transB: rows are output channels)."""
    alpha = np.abs(w).max(axis=1) if granularity == "per_channel" else np.full(w.shape[0], np.abs(w).max())
    if levels == "apot":
        return brute_apot(w.astype(np.float64), alpha, bits).reshape(w.shape)
    if granularity == "per_tensor":
        c, i = lloyd_reference(w.astype(np.float64).ravel(), clusters)
        return c[i].reshape(w.shape)
    c, i = lloyd_reference((w / alpha[:, None]).astype(np.float64).ravel(), clusters)
    return c[i].reshape(w.shape) * alpha[:, None]


@pytest.mark.parametrize(
    ("levels", "bits", "granularity", "clusters"),
    [
        ("apot", 4, "per_channel", None),
        ("apot", 3, "per_tensor", None),
        ("kmeans", 4, "per_tensor", None),
        ("kmeans", 8, "per_channel", 16),
    ],
)
def test_onnx_runtime_runs_the_numpy_forward(levels, bits, granularity, clusters):
    model = gemm_model()
    quant = weight_only(model, wbits=bits, levels=levels, clusters=clusters, granularity=granularity)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    ref_w = reference_weight(w, levels, bits, granularity, clusters or 2**bits)
    x = np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)
    got = make_session(quant).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x.astype(np.float64) @ ref_w.T + b, rtol=1e-4, atol=1e-5)
    (cb,) = codebook_weights(quant)
    assert cb.codebook.size == (2**bits - 1 if levels == "apot" else clusters or 2**bits)
    assert (cb.scale is not None) == (granularity == "per_channel")


def test_indices_use_the_smallest_type():
    types = {}
    for wbits, clusters in ((4, None), (8, 16), (5, None)):
        quant = weight_only(gemm_model(), wbits=wbits, levels="kmeans", clusters=clusters)
        (cb,) = codebook_weights(quant)
        stored = next(t for t in quant.graph.initializer if t.name == cb.indices.name)
        types[(wbits, clusters)] = stored.data_type
    # 4-bit widths move the model to opset 21 (UINT4); 8-bit rules keep opset 13 (UINT8); 32 levels: UINT8
    assert types == {(4, None): TensorProto.UINT4, (8, 16): TensorProto.UINT8, (5, None): TensorProto.UINT8}


@pytest.fixture(scope="module")
def demo_codebook():
    calib = np.load(DEMO / "calib.npz")["input"][:48]
    rules = api.resolve_rules(None, wbits=4, abits=8).with_cli(levels="kmeans", clusters=16)
    return api.convert(str(DEMO / "model.onnx"), rules, data=calib), calib


def test_onnx_runtime_does_not_requantize_codebook_weights(demo_codebook):
    """ONNX Runtime's optimizer quantizes a constant float Conv weight behind a dequantized input to int8 per
    tensor; the codebook's decode must stay out of its reach (same outputs with and without optimizations)."""
    result, calib = demo_codebook
    optimized = make_session(result.model).run(None, {"input": calib})[0]
    plain = make_session(result.model, optimize=False).run(None, {"input": calib})[0]
    err = ((optimized - plain) ** 2).sum() / (plain**2).sum()
    assert err < 1e-6, err


def test_decoded_weights_are_kmeans_of_the_normalized_channels(demo_codebook):
    result, calib = demo_codebook
    floats = {t.name: numpy_helper.to_array(t) for t in result.float_model.graph.initializer}
    (cb,) = [c for c in codebook_weights(result.model) if c.indices.name == "conv2.weight_indices"]
    got = make_session(with_outputs(result.model, [cb.output.name])).run([cb.output.name], {"input": calib})[
        0
    ]
    w = floats["conv2.weight"].reshape(floats["conv2.weight"].shape[0], -1)
    ref = reference_weight(w, "kmeans", 4, "per_channel", 16)
    np.testing.assert_allclose(got.reshape(w.shape), ref, rtol=1e-5, atol=1e-7)


def test_report_reads_codebook_layers_and_sizes(demo_codebook):
    result, calib = demo_codebook
    report = build_report(result.float_model, result.model, [{"input": calib[:16]}], sensitivity_samples=8)
    layers = {la.name: la for la in report.layers}
    assert all(layers[n].weight == f"{n}.weight" and layers[n].weight_bits == 4 for n in ("conv1", "fc"))
    assert all(layers[n].sensitivity for n in ("conv1", "conv2", "fc"))
    weights = {t.name: t for t in report.tensors if t.kind == "weight"}
    assert set(weights) == {"conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight", "fc.weight"}
    (cb,) = [c for c in codebook_weights(result.model) if c.indices.name == "conv4.weight_indices"]
    idx, _ = cb.decode()
    size = weights["conv4.weight"].size
    n, channels = idx.size, idx.shape[0]
    assert size.stored_bits == n * 4 + 32 * (16 + channels)  # UINT4 indices, codebook, per-channel factors
    assert size.huffman_bits == cbk.huffman_bits(np.unique(idx, return_counts=True)[1])
    assert result.plan.equalized  # conv3 is depthwise: it reads x·k, its decoded weight is W/k
    assert all(t.accumulated.sqnr_db > 15 for t in weights.values()), weights
    page, text = render_html(report), render_text(report)
    storage = re.search(r'<section id="storage">(.*?)</section>', page).group(1)
    assert storage.count("<tr><td") == 5 and f"{size.stored_per_weight:.2f}" in storage
    assert f"{size.stored_per_weight:.2f}/{size.coded_per_weight:.2f}" in text or "conv4" not in text
    assert "weights stored: " in text and "Huffman-coded" in text


def test_validate_refuses_codebook_models_in_one_line(demo_codebook, tmp_path):
    result, calib = demo_codebook
    with pytest.raises(BadModelError, match="integer runtime does not apply to codebook weights"):
        api.validate(result.model, calib[:4])
    path = tmp_path / "kmeans.onnx"
    onnx.save(result.model, path)
    shutil.copy(DEMO / "eval.npz", tmp_path / "eval.npz")
    out = CliRunner().invoke(main, ["validate", str(path), "--data", str(tmp_path / "eval.npz")])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output


def test_convert_summary_says_stored_and_huffman_bits(tmp_path):
    out = tmp_path / "apot.onnx"
    result = CliRunner().invoke(
        main,
        ["convert", str(DEMO / "model.onnx"), "--wbits", "4", "--levels", "apot"]
        + ["--calib-data", str(DEMO / "calib.npz"), "--max-samples", "32", "-o", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "weights stored: 4." in result.output and "Huffman-coded" in result.output
    assert "codebook weights: 5 decoded by Gather" in result.output and "compute in float" in result.output

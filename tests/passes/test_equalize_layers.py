"""Cross-layer equalization (Nagel et al. 2019, section 4.1): ONNX Runtime gives the original outputs, each
equalized pair ends with equal per-channel ranges (checked against numpy reductions written here from the
weight layouts), refusals leave the weights alone, and 8-bit weight quantization loses less afterwards."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant.passes import PASS_NAMES, run_passes

HEAD = '<ir_version: 8, opset_import: ["" : 13]>\n'
PASS = "equalize_layers"


def spread(shape, seed: int, axis: int = 0) -> np.ndarray:
    """Normal weights whose slices along `axis` differ in scale by up to 10^3."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-3.5, 3.5, shape[axis]))
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return (rng.normal(0, 1, shape) * scale.reshape(bshape)).astype(np.float32)


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def equalize(tools, model: onnx.ModelProto):
    """Run the pass through the driver; the rewrite must compute what the original computed."""
    rewritten, outcomes = run_passes(model, [PASS])
    tools.assert_equivalent(model, rewritten, tol=1e-5)
    return weights_of(rewritten), outcomes


def conv_out_ranges(w: np.ndarray) -> np.ndarray:
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def conv_in_ranges(w: np.ndarray, group: int = 1) -> np.ndarray:
    """max|W| over input channel i: filter position i for group 1; for depthwise, filters i·m … i·m+m−1."""
    if group == 1:
        return np.abs(w).transpose(1, 0, *range(2, w.ndim)).reshape(w.shape[1], -1).max(axis=1)
    return np.abs(w).reshape(group, -1).max(axis=1)


def assert_same_ranges(r1: np.ndarray, r2: np.ndarray, tol: float) -> None:
    np.testing.assert_allclose(r1, r2, rtol=tol)


# -- equivalence and equal ranges -------------------------------------------------------------------------
CONV_RELU_CONV = (
    HEAD
    + """
g (float[N, 3, 8, 8] x) => (float[N, 5, 8, 8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (a)
    y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
}"""
)


def conv_relu_conv(tools):
    rng = np.random.default_rng(3)
    weights = {
        "w1": spread((6, 3, 3, 3), 1),
        "b1": rng.normal(0, 1, 6).astype(np.float32),
        "w2": spread((5, 6, 3, 3), 2, axis=1),
        "b2": rng.normal(0, 1, 5).astype(np.float32),
    }
    return tools.build(CONV_RELU_CONV, weights), weights


def test_conv_relu_conv_matches_the_papers_formula(tools):
    model, before = conv_relu_conv(tools)
    after, outcomes = equalize(tools, model)
    assert [(o.nodes, o.applied) for o in outcomes] == [(("Conv_0", "Conv_2"), True)]
    # s_i = sqrt(r1_i / r2_i); W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i (section 4.1)
    s = np.sqrt(conv_out_ranges(before["w1"]) / conv_in_ranges(before["w2"]))
    np.testing.assert_allclose(after["w1"], before["w1"] / s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(after["b1"], before["b1"] / s, rtol=1e-6)
    np.testing.assert_allclose(after["w2"], before["w2"] * s[None, :, None, None], rtol=1e-6)
    np.testing.assert_array_equal(after["b2"], before["b2"])
    r1, r2 = conv_out_ranges(after["w1"]), conv_in_ranges(after["w2"])
    assert_same_ranges(r1, r2, 1e-6)
    assert_same_ranges(r1, np.sqrt(conv_out_ranges(before["w1"]) * conv_in_ranges(before["w2"])), 1e-6)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_pointwise_depthwise_pointwise_chain_converges(tools, multiplier):
    """MobileNet's block: the depthwise Conv is the L2 of the first pair and the L1 of the second."""
    c, m = 4, 4 * multiplier
    text = (
        HEAD
        + f"""
    g (float[N, 3, 6, 6] x) => (float[N, 5, 6, 6] y) {{
        a = Conv (x, w1, b1)
        r = Relu (a)
        d = Conv <group = {c}, pads = [1, 1, 1, 1]> (r, dw, db)
        q = Relu (d)
        y = Conv (q, w3)
    }}"""
    )
    rng = np.random.default_rng(5)
    weights = {
        "w1": spread((c, 3, 1, 1), 1),
        "b1": rng.normal(0, 1, c).astype(np.float32),
        "dw": spread((m, 1, 3, 3), 2),
        "db": rng.normal(0, 1, m).astype(np.float32),
        "w3": spread((5, m, 1, 1), 3, axis=1),
    }
    model = tools.build(text, weights)
    after, outcomes = equalize(tools, model)
    assert [(o.nodes, o.applied) for o in outcomes] == [(("Conv_0", "Conv_2", "Conv_4"), True)]
    assert_same_ranges(conv_out_ranges(after["w1"]), conv_in_ranges(after["dw"], group=c), 1e-5)
    assert_same_ranges(conv_out_ranges(after["dw"]), conv_in_ranges(after["w3"]), 1e-6)


@pytest.mark.parametrize(
    "between, extra",
    [
        ("r = MaxPool <kernel_shape = [2, 2], pads = [1, 1, 1, 1], strides = [1, 1]> (a)", {}),
        ("r = LeakyRelu <alpha = 0.1> (a)", {}),
        ("p = PRelu (a, slope)\n r = Identity (p)", {"slope": np.linspace(-0.5, 0.5, 6).reshape(6, 1, 1)}),
        ("r = Clip (a, zero, )", {"zero": np.array(0.0)}),
        ("r = Identity (a)", {}),
    ],
    ids=["maxpool", "leakyrelu", "prelu-identity", "clip-no-max", "identity"],
)
def test_homogeneous_ops_between_convs(tools, between, extra):
    text = (
        HEAD
        + f"""
    g (float[N, 3, 8, 8] x) => (float[N, 5, H, W] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        {between}
        y = Conv (r, w2)
    }}"""
    )
    weights = {
        "w1": spread((6, 3, 3, 3), 1),
        "b1": np.random.default_rng(2).normal(0, 1, 6).astype(np.float32),
        "w2": spread((5, 6, 3, 3), 3, axis=1),
        **{k: v.astype(np.float32) for k, v in extra.items()},
    }
    model = tools.build(text, weights)
    after, outcomes = equalize(tools, model)
    assert [o.applied for o in outcomes] == [True]
    assert_same_ranges(conv_out_ranges(after["w1"]), conv_in_ranges(after["w2"]), 1e-6)


@pytest.mark.parametrize("trans_b1, trans_b2", [(1, 0), (0, 1)])
def test_gemm_relu_gemm_with_transB(tools, trans_b1, trans_b2):
    text = (
        HEAD
        + f"""
    g (float[N, 6] x) => (float[N, 4] y) {{
        a = Gemm <transB = {trans_b1}, beta = 0.5> (x, w1, c1)
        r = Relu (a)
        y = Gemm <transB = {trans_b2}> (r, w2, c2)
    }}"""
    )
    w1 = spread((6, 8), 1, axis=1)  # [K, N]: output feature j is column j
    w2 = spread((8, 4), 2, axis=0)  # [K, N]: input feature i is row i
    weights = {
        "w1": w1.T.copy() if trans_b1 else w1,
        "c1": np.array([0.3], np.float32),  # broadcast over the features, and scaled by beta
        "w2": w2.T.copy() if trans_b2 else w2,
        "c2": np.ones(4, np.float32),
    }
    model = tools.build(text, weights)
    after, outcomes = equalize(tools, model)
    assert [o.applied for o in outcomes] == [True]
    a1 = after["w1"].T if trans_b1 else after["w1"]
    a2 = after["w2"].T if trans_b2 else after["w2"]
    assert_same_ranges(np.abs(a1).max(axis=0), np.abs(a2).max(axis=1), 1e-6)
    assert after["c1"].shape == (8,)


def test_matmul_chain_on_3d_activations(tools):
    text = (
        HEAD
        + """
    g (float[N, 5, 6] x) => (float[N, 5, 3] y) {
        a = MatMul (x, w1)
        r = Relu (a)
        b = MatMul (r, w2)
        q = LeakyRelu <alpha = 0.2> (b)
        y = MatMul (q, w3)
    }"""
    )
    weights = {"w1": spread((6, 8), 1, axis=1), "w2": spread((8, 7), 2), "w3": spread((7, 3), 3)}
    model = tools.build(text, weights)
    after, outcomes = equalize(tools, model)
    assert [(o.nodes, o.applied) for o in outcomes] == [(("MatMul_0", "MatMul_2", "MatMul_4"), True)]
    assert_same_ranges(np.abs(after["w1"]).max(axis=0), np.abs(after["w2"]).max(axis=1), 1e-5)
    assert_same_ranges(np.abs(after["w2"]).max(axis=0), np.abs(after["w3"]).max(axis=1), 1e-6)


def test_zero_range_channel_keeps_scale_one(tools):
    model, weights = conv_relu_conv(tools)
    w1 = weights["w1"].copy()
    w1[2] = 0.0  # a dead filter: s would be 0
    w2 = weights["w2"].copy()
    w2[:, 4] = 0.0  # an unread channel: s would be inf
    model = tools.build(CONV_RELU_CONV, {**weights, "w1": w1, "w2": w2})
    after, _ = equalize(tools, model)
    assert np.isfinite(after["w1"]).all() and np.isfinite(after["w2"]).all()
    np.testing.assert_array_equal(after["w1"][4], w1[4])
    np.testing.assert_array_equal(after["w2"][:, 2], w2[:, 2])
    np.testing.assert_array_equal(after["b1"][[2, 4]], weights["b1"][[2, 4]])


# -- refusals ---------------------------------------------------------------------------------------------
REFUSED = {
    "relu6": (
        """a = Conv (x, w1)
        r = Clip (a, zero, six)
        y = Conv (r, w2)""",
        "y",
        "ReLU6",
    ),
    "read-twice": (
        """a = Conv (x, w1)
        r = Relu (a)
        c = Conv (r, w2)
        e = Relu (r)
        y = Add (c, e)""",
        "y",
        "Relu output 'r' has 2 consumers",
    ),
    "graph-output": (
        """a = Conv (x, w1)
        r = Relu (a)
        y = Conv (r, w2)""",
        "y, r",
        "'r' is a graph output",
    ),
    "grouped": (
        """a = Conv (x, w1)
        r = Relu (a)
        y = Conv <group = 2> (r, w2g)""",
        "y",
        "not depthwise",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_leave_weights_unchanged(tools, case):
    body, outputs, reason = REFUSED[case]
    out_decl = ", ".join(f"float[N, 6, 4, 4] {name}" for name in outputs.split(", "))
    text = HEAD + f"g (float[N, 6, 4, 4] x) => ({out_decl}) {{\n        {body}\n    }}"
    weights = {
        "w1": spread((6, 6, 1, 1), 1),
        "w2": spread((6, 6, 1, 1), 2, axis=1),
        "w2g": spread((6, 3, 1, 1), 2, axis=1),
        "zero": np.array(0.0, np.float32),
        "six": np.array(6.0, np.float32),
    }
    weights = {k: v for k, v in weights.items() if k in body}
    model = tools.build(text, weights)
    rewritten, outcomes = run_passes(model, [PASS])
    assert [(o.nodes, o.applied) for o in outcomes] == [(("Conv_0", "Conv_2"), False)]
    assert reason in outcomes[0].reason
    for name, value in weights_of(rewritten).items():
        np.testing.assert_array_equal(value, weights[name])


def test_not_in_the_default_passes_but_registered():
    assert PASS in PASS_NAMES
    assert PASS_NAMES.index(PASS) > PASS_NAMES.index("fold_bn_conv")


# -- the point of it: less weight quantization error ------------------------------------------------------
def fake_quant(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric 8-bit quantize-dequantize, per tensor (axis None) or per slice along `axis`."""
    others = None if axis is None else tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=others, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def forward(x: np.ndarray, w: dict[str, np.ndarray], quantized: bool) -> np.ndarray:
    """Gemm → Relu → Gemm in numpy: W1 quantized per output channel, W2 per tensor."""
    w1 = fake_quant(w["w1"], axis=1) if quantized else w["w1"]
    w2 = fake_quant(w["w2"], axis=None) if quantized else w["w2"]
    return np.maximum(x @ w1 + w["c1"], 0) @ w2 + w["c2"]


def test_badly_scaled_channel_quantizes_better_after_equalization(tools):
    text = (
        HEAD
        + """
    g (float[N, 16] x) => (float[N, 8] y) {
        a = Gemm (x, w1, c1)
        r = Relu (a)
        y = Gemm (r, w2, c2)
    }"""
    )
    rng = np.random.default_rng(7)
    w1, c1 = rng.normal(0, 1, (16, 12)), rng.normal(0, 1, 12)
    w2, c2 = rng.normal(0, 1, (12, 8)), rng.normal(0, 1, 8)
    w1[:, 0] *= 100.0  # one output channel of L1 ×100, the next layer compensating: the same function
    c1[0] *= 100.0
    w2[0] /= 100.0
    weights = {k: v.astype(np.float32) for k, v in {"w1": w1, "c1": c1, "w2": w2, "c2": c2}.items()}
    model = tools.build(text, weights)
    after, _ = equalize(tools, model)
    x = rng.normal(0, 1, (256, 16))
    ref = forward(x, weights, quantized=False)

    def error(w):
        return np.sqrt(np.mean((forward(x, w, quantized=True) - ref) ** 2))

    before_err, after_err = error(weights), error(after)
    assert after_err < before_err / 5, (before_err, after_err)

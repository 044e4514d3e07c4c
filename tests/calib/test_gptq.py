"""GPTQ: im2col rows against a loop and ONNX Runtime (grouped and depthwise Convs too), streaming Hessians,
the published properties of the algorithm (diagonal H is round-to-nearest, lazy blocks change nothing), a
grouped layer rounded as its groups alone, lower layer-output error than round-to-nearest at 4 bits, and codes
that survive Q/DQ insertion unchanged (an equalized depthwise Conv's included)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxquant import api
from onnxquant.calib import gptq, hessian
from onnxquant.calib.gptq import apply_gptq, gptq_codes
from onnxquant.calib.hessian import (
    HessianStats,
    Layer,
    accumulate,
    collect_hessians,
    describe_layer,
    layer_rows,
)
from onnxquant.model import make_session, with_outputs


def loop_rows(x, kernel, pads, strides, dilations) -> np.ndarray:
    """im2col by definition: one row per (sample, output position), columns (channel, kernel offset)."""
    n, c, *spatial = x.shape
    dims = len(kernel)
    out = [
        (spatial[i] + pads[i] + pads[i + dims] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in range(dims)
    ]
    rows = []
    for b in range(n):
        for pos in itertools.product(*(range(o) for o in out)):
            row = []
            for ch in range(c):
                for off in itertools.product(*(range(k) for k in kernel)):
                    at = [pos[i] * strides[i] - pads[i] + off[i] * dilations[i] for i in range(dims)]
                    inside = all(0 <= at[i] < spatial[i] for i in range(dims))
                    row.append(x[(b, ch, *at)] if inside else 0.0)
            rows.append(row)
    return np.asarray(rows)


def one_node_model(op: str, x_shape, w: np.ndarray, **attrs) -> onnx.ModelProto:
    """x -> op(x, w) -> y, with an unknown output shape."""
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model, optimize=False).run(None, {"x": x.astype(np.float32)})[0]


CONV_CASES = [  # kernel, pads (begins, ends), strides, dilations, input spatial shape
    ((3, 3), (1, 1, 1, 1), (1, 1), (1, 1), (6, 5)),
    ((2, 3), (1, 0, 2, 1), (2, 1), (2, 1), (7, 6)),
    ((3, 2), (0, 2, 1, 0), (1, 3), (1, 2), (5, 8)),
    ((3,), (2, 1), (2,), (2,), (9,)),  # 1-D
]


@pytest.mark.parametrize("kernel, pads, strides, dilations, spatial", CONV_CASES)
def test_conv_rows_equal_a_loop_and_reproduce_onnx_runtime_conv(kernel, pads, strides, dilations, spatial):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, *spatial)).astype(np.float32)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    attrs = {"pads": list(pads), "strides": list(strides), "dilations": list(dilations)}
    model = one_node_model("Conv", x.shape, w, **attrs)
    layer = describe_layer(model.graph.node[0], w.shape)
    assert isinstance(layer, Layer) and layer.view.k == w[0].size
    rows = layer_rows(x, layer.view)
    np.testing.assert_array_equal(rows, loop_rows(x, kernel, pads, strides, dilations))
    y = run(model, x)  # (N, Cout, *out): rows @ W.reshape(Cout, K).T are its values, channels last
    expected = np.moveaxis(y, 1, -1).reshape(-1, w.shape[0])
    np.testing.assert_allclose(rows @ w.reshape(w.shape[0], -1).T, expected, rtol=1e-5, atol=1e-5)


def test_gemm_and_matmul_rows_reproduce_onnx_runtime():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 5)).astype(np.float32)  # transA: A is (K=6, M=5)
    b = rng.standard_normal((6, 4)).astype(np.float32)  # (K, N), no transB
    gemm = one_node_model("Gemm", a.shape, b, transA=1)
    layer = describe_layer(gemm.graph.node[0], b.shape)
    assert layer.k_first and layer.view.k == 6
    np.testing.assert_allclose(layer_rows(a, layer.view) @ b, run(gemm, a), rtol=1e-5, atol=1e-5)
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)  # MatMul: every leading axis is a row
    matmul = one_node_model("MatMul", x.shape, b)
    layer = describe_layer(matmul.graph.node[0], b.shape)
    np.testing.assert_allclose(layer_rows(x, layer.view) @ b, run(matmul, x).reshape(-1, 4), rtol=1e-5)


GROUPED_CASES = [  # groups, input channels per group, output channels per group, kernel, pads
    (2, 3, 2, (3, 3), (1, 0, 1, 2)),  # group 2
    (3, 1, 2, (3, 3), (1, 1, 1, 1)),  # depthwise, channel multiplier 2
    (4, 1, 1, (5,), (2, 2)),  # 1-D depthwise
]


@pytest.mark.parametrize("groups, cin_g, cout_g, kernel, pads", GROUPED_CASES)
def test_grouped_conv_rows_are_each_groups_own_rows_and_reproduce_onnx_runtime(
    groups, cin_g, cout_g, kernel, pads
):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, groups * cin_g, *(7,) * len(kernel))).astype(np.float32)
    w = rng.standard_normal((groups * cout_g, cin_g, *kernel)).astype(np.float32)
    model = one_node_model("Conv", x.shape, w, group=groups, pads=list(pads))
    layer = describe_layer(model.graph.node[0], w.shape)
    assert isinstance(layer, Layer) and layer.view.groups == groups and layer.view.k == w[0].size
    rows = layer_rows(x, layer.view)
    y = np.moveaxis(run(model, x), 1, -1).reshape(-1, len(w))  # (rows, Cout)
    ones = (1,) * len(kernel)
    k = layer.view.k
    for g in range(groups):
        block = rows[:, g * k : (g + 1) * k]
        alone = loop_rows(x[:, g * cin_g : (g + 1) * cin_g], kernel, pads, ones, ones)
        np.testing.assert_array_equal(block, alone)
        np.testing.assert_array_equal(hessian.grouped_rows(x, layer.view)[g], alone)
        w_g = w[g * cout_g : (g + 1) * cout_g].reshape(cout_g, -1)
        np.testing.assert_allclose(block @ w_g.T, y[:, g * cout_g : (g + 1) * cout_g], rtol=1e-5, atol=1e-5)


def test_bad_groups_and_same_padded_convs_are_refused_with_a_reason():
    grouped = helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=3)
    assert "group=3" in describe_layer(grouped, (4, 2, 3, 3))
    same = helper.make_node("Conv", ["x", "w"], ["y"], name="c", auto_pad="SAME_UPPER")
    assert "auto_pad" in describe_layer(same, (4, 2, 3, 3))


def test_streamed_hessian_over_three_batches_equals_the_one_shot_hessian(monkeypatch):
    rng = np.random.default_rng(2)
    kernel, pads, strides, dilations = (3, 2), (1, 0, 0, 1), (2, 1), (1, 2)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], name="c", pads=pads, strides=strides, dilations=dilations
    )
    view = describe_layer(node, (5, 3, *kernel)).view
    batches = [rng.standard_normal((n, 3, 7, 6)) for n in (3, 1, 4)]
    rows = loop_rows(np.concatenate(batches), kernel, pads, strides, dilations)
    expected = 2 * rows.T @ rows / len(rows)
    monkeypatch.setattr(hessian, "CHUNK", 40)  # a few samples per chunk: the chunked sums are exercised too
    streamed, parts = HessianStats.empty(view.k), []
    for x in batches:
        accumulate(streamed, x, view)
        parts.append(HessianStats.empty(view.k))
        accumulate(parts[-1], x, view)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for stats in (streamed, merged):
        assert stats.rows == len(rows)
        np.testing.assert_allclose(stats.hessian()[0], expected, rtol=1e-12, atol=1e-12)


def test_streamed_grouped_hessians_equal_each_groups_one_shot_hessian(monkeypatch):
    rng = np.random.default_rng(12)
    kernel, pads = (3, 3), (1, 1, 0, 1)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=pads, group=3)
    view = describe_layer(node, (6, 2, *kernel)).view  # 6 input channels in 3 groups of 2
    batches = [rng.standard_normal((n, 6, 5, 6)) for n in (2, 3, 1)]
    x = np.concatenate(batches)
    monkeypatch.setattr(hessian, "CHUNK", 50)
    streamed, parts = HessianStats.empty(view.k, view.groups), []
    for batch in batches:
        accumulate(streamed, batch, view)
        parts.append(HessianStats.empty(view.k, view.groups))
        accumulate(parts[-1], batch, view)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for g in range(3):
        rows = loop_rows(x[:, 2 * g : 2 * g + 2], kernel, pads, (1, 1), (1, 1))
        for stats in (streamed, merged):
            assert stats.xtx.shape == (3, 18, 18) and stats.rows == len(rows)
            np.testing.assert_allclose(stats.hessian()[g], 2 * rows.T @ rows / len(rows), rtol=1e-12)


def rtn(w, s, z, lo, hi):
    return np.clip(np.rint(w / s[:, None]) + z[:, None], lo, hi).astype(np.int64)


def symmetric_grid(w: np.ndarray, bits: int = 4):
    """Per-row min/max symmetric scales and the signed code range."""
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(w).max(axis=1) / qmax
    return s, np.zeros(len(w), np.int64), -qmax - 1, qmax


def test_a_diagonal_hessian_gives_round_to_nearest_and_blocks_change_nothing():
    """With H diagonal the inverse's Cholesky factor is diagonal: no error is passed on (OBQ on uncorrelated
    inputs is round-to-nearest). Lazy batch updates reorder the same arithmetic (GPTQ, section 3)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 40))
    s, z, lo, hi = symmetric_grid(w)
    h = np.diag(rng.uniform(0.5, 3.0, 40))
    for act_order in (True, False):
        np.testing.assert_array_equal(
            gptq_codes(w, h, s, z, lo, hi, act_order=act_order), rtn(w, s, z, lo, hi)
        )
    x = rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40))
    h = 2 * x.T @ x / len(x)
    reference = gptq_codes(w, h, s, z, lo, hi, block=1)
    for block in (7, 16, 128):
        np.testing.assert_array_equal(gptq_codes(w, h, s, z, lo, hi, block=block), reference)


def test_inverse_cholesky_factor_equals_the_cholesky_of_the_damped_inverse():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((400, 300)) @ rng.standard_normal((300, 300))  # K = 300: the halving path runs
    h = 2 * x.T @ x / len(x)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(300)
    reference = np.linalg.cholesky(np.linalg.inv(damped)).T  # upper U with UᵀU = H⁻¹, by definition
    u = gptq.inverse_cholesky_upper(h, 0.01)
    assert np.array_equal(u, np.triu(u))
    np.testing.assert_allclose(u, reference, rtol=0, atol=1e-9 * np.abs(reference).max())


def test_dead_inputs_get_the_zero_code_and_codes_stay_in_range():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 12)) + 0.3
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    x[:, [2, 7]] = 0.0
    h = 2 * x.T @ x / len(x)
    lo_w, hi_w = w.min(), w.max()
    s, z = (hi_w - lo_w) / 15, int(np.rint(-lo_w / ((hi_w - lo_w) / 15)))  # per tensor, unsigned 4 bit
    codes = gptq_codes(w, h, s, z, 0, 15)
    assert codes.min() >= 0 and codes.max() <= 15
    assert (codes[:, [2, 7]] == z).all()


def correlated(rng, shape, mix_axis=1) -> np.ndarray:
    """Gaussian data whose channels (axis `mix_axis`) are strongly correlated."""
    z = rng.standard_normal(shape)
    c = shape[mix_axis]
    mix = np.eye(c) + 0.8 * rng.standard_normal((c, c)) / np.sqrt(c) + 1.0 / np.sqrt(c)
    return np.moveaxis(np.moveaxis(z, mix_axis, -1) @ mix, -1, mix_axis).astype(np.float32)


def layer_mse(model_of, w_float, w_hat, x) -> float:
    """Mean squared difference of the layer outputs, both run in ONNX Runtime."""
    return float(np.mean((run(model_of(w_float), x) - run(model_of(w_hat), x)) ** 2))


@pytest.mark.parametrize("groups, per_group, k", [(2, 5, 18), (6, 2, 9), (1, 4, 30)])
def test_grouped_codes_are_each_group_rounded_alone_on_its_own_hessian(groups, per_group, k):
    """The batched rounding of G groups equals G separate GPTQ runs (group 2, depthwise with channel
    multiplier 2, and the ungrouped stack of one), and the error proxy is the sum of the groups'."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((groups * per_group, k))
    hs = []
    for _ in range(groups):
        x = rng.standard_normal((300, k)) @ rng.standard_normal((k, k)) * rng.uniform(0.1, 10)
        x[:, rng.integers(k)] = 0.0  # a dead input in every group, at a different place
        hs.append(2 * x.T @ x / len(x))
    hs = np.stack(hs)
    s, z, lo, hi = symmetric_grid(w)
    codes = gptq_codes(w, hs, s, z, lo, hi, block=4)
    assert not np.array_equal(codes, rtn(w, s, z, lo, hi))
    proxy = 0.0
    for g in range(groups):
        at = slice(g * per_group, (g + 1) * per_group)
        alone = gptq_codes(w[at], hs[g], s[at], z[at], lo, hi, block=4)
        np.testing.assert_array_equal(codes[at], alone)
        proxy += gptq.error_proxy(w[at], alone * s[at, None], hs[g])
    assert gptq.error_proxy(w, codes * s[:, None], hs) == pytest.approx(proxy, rel=1e-12)


def smooth_images(rng, shape, width: int = 4) -> np.ndarray:
    """Noise box-blurred over `width`×`width` pixels: neighbouring pixels strongly correlated."""
    n, c, hgt, wid = shape
    z = rng.standard_normal((n, c, hgt + width - 1, wid + width - 1))
    windows = np.lib.stride_tricks.sliding_window_view(z, (width, width), axis=(2, 3))
    return (windows.mean(axis=(-2, -1)) * width).astype(np.float32)


@pytest.mark.parametrize("op", ["Gemm", "Conv", "depthwise"])
def test_4bit_gptq_lowers_the_layer_output_error_below_round_to_nearest(op):
    rng = np.random.default_rng(5)
    if op == "Gemm":
        x, w = correlated(rng, (512, 48)), rng.standard_normal((16, 48)).astype(np.float32)
        attrs = {"transB": 1}
    elif op == "Conv":
        x, w = correlated(rng, (16, 6, 8, 8)), rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
        attrs = {"pads": [1, 1, 1, 1]}
    else:  # depthwise 5x5: the correlation is between neighbouring pixels of one channel
        x, w = smooth_images(rng, (16, 8, 12, 12)), rng.standard_normal((8, 1, 5, 5)).astype(np.float32)
        attrs = {"pads": [2, 2, 2, 2], "group": 8}
        op = "Conv"

    def model_of(weight):
        return one_node_model(op, x.shape, weight, **attrs)

    layer = describe_layer(model_of(w).graph.node[0], w.shape)
    stats = HessianStats.empty(layer.view.k, layer.view.groups)
    accumulate(stats, x, layer.view)
    w2d = w.reshape(len(w), -1).astype(np.float64)
    s, z, lo, hi = symmetric_grid(w2d)
    s = s.astype(np.float32).astype(np.float64)
    codes = gptq_codes(w2d, stats.hessian(), s, z, lo, hi)
    assert codes.min() >= lo and codes.max() <= hi
    nearest = rtn(w2d, s, z, lo, hi)
    assert not np.array_equal(codes, nearest)
    gptq_w, rtn_w = ((c * s[:, None]).reshape(w.shape) for c in (codes, nearest))
    gptq_mse, rtn_mse = layer_mse(model_of, w, gptq_w, x), layer_mse(model_of, w, rtn_w, x)
    assert gptq_mse < 0.8 * rtn_mse, (gptq_mse, rtn_mse)


CONV_GEMM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 6, 6] x) => (float[N, 5] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, wc, bc)
  r = Relu (c)
  f = Flatten (r)
  y = Gemm <transB = 1> (f, wg, bg)
}
"""


def conv_gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    model = onnx.parser.parse_model(CONV_GEMM)
    for name, shape in (("wc", (4, 3, 3, 3)), ("bc", (4,)), ("wg", (5, 144)), ("bg", (5,))):
        value = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def weight_codes(quant: onnx.ModelProto, node_name: str) -> np.ndarray:
    """The stored codes of the weight a node of the Q/DQ model reads through its DequantizeLinear."""
    writers = {o: n for n in quant.graph.node for o in n.output}
    node = next(n for n in quant.graph.node if n.name == node_name)
    dq = writers[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    stored = next(t for t in quant.graph.initializer if t.name == dq.input[0])
    return numpy_helper.to_array(stored).astype(np.int64)


def test_convert_after_apply_gptq_stores_the_gptq_codes_and_runs():
    model = conv_gemm_model()
    x = correlated(np.random.default_rng(7), (160, 3, 6, 6))  # the Gemm needs rows >= its 144 inputs
    batches = [{"x": x[i : i + 16]} for i in range(0, len(x), 16)]
    rules = api.resolve_rules(None, wbits=4)
    folded, _, plan, _ = api.prepare(model, rules)
    table, _ = api.calibrate(folded, plan, {"x": x})
    table, _ = api.complete_table(folded, plan, table)
    before = folded.SerializeToString()
    tuned, results = apply_gptq(folded, plan, table, batches, budget=1)  # budget=1: one pass per layer
    assert folded.SerializeToString() == before  # the input model is not modified
    conv, gemm = (next(n for n in folded.graph.node if n.op_type == op) for op in ("Conv", "Gemm"))
    assert [r.node for r in results] == [conv.name, gemm.name] and not any(r.skipped for r in results)
    assert all(r.gptq_error < r.rtn_error for r in results)

    result = api.convert(tuned, data={"x": x}, wbits=4, table=table)
    f = make_session(with_outputs(folded, [gemm.input[0]])).run([gemm.input[0]], {"x": x})[0]
    for node, rows in ((conv, layer_rows(x, describe_layer(conv, (4, 3, 3, 3)).view)), (gemm, f)):
        weight = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == node.input[1]))
        rows = np.asarray(rows, np.float64)
        p = table.tensors[node.input[1]].qparams()
        expected = gptq_codes(
            weight.reshape(len(weight), -1),
            2 * rows.T @ rows / len(rows),
            p.scale,
            p.zero_point,
            p.qmin,
            p.qmax,
        )
        np.testing.assert_array_equal(weight_codes(result.model, node.name).reshape(expected.shape), expected)
    y = make_session(result.model).run(None, {"x": x})[0]
    assert y.shape == (160, 5) and np.isfinite(y).all()


def test_a_layer_with_fewer_calibration_rows_than_inputs_keeps_round_to_nearest():
    model = conv_gemm_model()
    x = correlated(np.random.default_rng(7), (48, 3, 6, 6))  # the Gemm sees 48 rows for 144 inputs
    folded, _, plan, _ = api.prepare(model, api.resolve_rules(None, wbits=4))
    table, _ = api.complete_table(folded, plan, api.calibrate(folded, plan, {"x": x})[0])
    tuned, results = apply_gptq(folded, plan, table, [{"x": x}])
    conv, gemm = results
    assert conv.skipped is None and "48 calibration rows for 144 inputs" in gemm.skipped
    weights = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    np.testing.assert_array_equal(
        weights[gemm.weight],
        numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == gemm.weight)),
    )


def test_collect_hessians_budget_groups_give_the_same_sums():
    model = conv_gemm_model()
    x = correlated(np.random.default_rng(8), (20, 3, 6, 6))
    batches = [{"x": x[:7]}, {"x": x[7:]}]
    layers = [describe_layer(n, (4, 3, 3, 3) if n.op_type == "Conv" else (5, 144)) for n in model.graph.node]
    layers = [layer for layer in layers if isinstance(layer, Layer)]
    one_pass = collect_hessians(model, layers, batches)
    per_layer = collect_hessians(model, layers, batches, budget=1)
    f = make_session(with_outputs(model, ["f"])).run(["f"], {"x": x})[0].astype(np.float64)
    np.testing.assert_allclose(one_pass[layers[1].node].hessian()[0], 2 * f.T @ f / len(f), rtol=1e-9)
    for layer in layers:
        assert one_pass[layer.node].rows == per_layer[layer.node].rows
        np.testing.assert_array_equal(one_pass[layer.node].xtx, per_layer[layer.node].xtx)


PW_DW_PW = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 10, 10] x) => (float[N, 4, 10, 10] y) {
  a = Conv (x, w1, b1)
  d = Conv <group = 8, pads = [1, 1, 1, 1]> (a, wd, bd)
  r = Relu (d)
  y = Conv (r, w2, b2)
}
"""


def pw_dw_pw_model() -> onnx.ModelProto:
    """Pointwise → depthwise 3x3 → pointwise; the first layer's channels spread 30× in range, so the default
    preset equalizes the depthwise input per channel."""
    rng = np.random.default_rng(14)
    model = onnx.parser.parse_model(PW_DW_PW)
    spread = np.geomspace(0.1, 3.0, 8).astype(np.float32)
    values = {
        "w1": rng.standard_normal((8, 3, 1, 1)) * spread[:, None, None, None],
        "b1": rng.standard_normal(8) * 0.1,
        "wd": rng.standard_normal((8, 1, 3, 3)),
        "bd": rng.standard_normal(8) * 0.1,
        "w2": rng.standard_normal((4, 8, 1, 1)) / spread[None, :, None, None],
        "b2": rng.standard_normal(4) * 0.1,
    }
    for name, value in values.items():
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return model


def sqnr(reference: np.ndarray, value: np.ndarray) -> float:
    reference, value = (np.asarray(v, np.float64) for v in (reference, value))
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - value) ** 2)))


def test_convert_with_gptq_rounds_an_equalized_depthwise_conv_on_its_group_hessians():
    model = pw_dw_pw_model()
    rng = np.random.default_rng(15)
    x = smooth_images(rng, (32, 3, 10, 10))
    held_out = smooth_images(rng, (32, 3, 10, 10))
    rules = api.resolve_rules(None)
    gptq_result = api.convert(model, rules.with_cli(rounding="gptq"), data={"x": x}, wbits=4)
    nearest_result = api.convert(model, rules, data={"x": x}, wbits=4)
    folded = gptq_result.float_model
    dw = next(n for n in folded.graph.node if n.input[1] == "wd")
    assert gptq_result.plan.equalized.get(dw.input[0]) == dw.name  # the depthwise input is equalized
    assert gptq_result.table.tensors[dw.input[0]].axis == 1  # ... and kept per channel by calibration

    a = make_session(with_outputs(folded, [dw.input[0]])).run([dw.input[0]], {"x": x})[0]
    rows = loop_rows(a.astype(np.float64), (3, 3), (1, 1, 1, 1), (1, 1), (1, 1))  # all 8 channels' patches
    hs = np.stack([2 * r.T @ r / len(r) for r in np.split(rows, 8, axis=1)])  # one 9x9 Hessian per channel
    wd = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "wd"))
    p = gptq_result.table.tensors["wd"].qparams()
    expected = gptq_codes(wd.reshape(8, 9), hs, p.scale, p.zero_point, p.qmin, p.qmax)
    stored = weight_codes(gptq_result.model, dw.name).reshape(8, 9)
    np.testing.assert_array_equal(stored, expected)
    assert not np.array_equal(stored, weight_codes(nearest_result.model, dw.name).reshape(8, 9))

    reference = make_session(model).run(None, {"x": held_out})[0]
    with_gptq, without = (
        make_session(r.model).run(None, {"x": held_out})[0] for r in (gptq_result, nearest_result)
    )
    assert sqnr(reference, with_gptq) > sqnr(reference, without) + 1.0, (
        sqnr(reference, with_gptq),
        sqnr(reference, without),
    )

"""SmoothQuant (onnxquant.calib.smooth): the float function is unchanged in ONNX Runtime, the per-channel
maxima of activation and weight rows meet at α = 0.5, the scales equal the paper's formula computed here
from ONNX Runtime's activations, and W8A8 output SQNR improves on a model with activation outlier channels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.api import convert
from onnxquant.calib.smooth import MAX_SCALE, MIN_SCALE, predicted_error, smooth, smoothing_scale
from onnxquant.errors import BadDataError, BadOptionError
from onnxquant.model import make_session, with_outputs

K = 16
OUTLIERS = (1, 5, 11)


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _weight(rng: np.random.Generator, shape) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _fvi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def transformer_block(
    outlier: float = 1.0, gamma=None, weights=None, residual: bool = True, seed: int = 0
) -> onnx.ModelProto:
    """x → LayerNorm → Q, K, V projections (MatMul + bias Add) → softmax(Q·Kᵀ)·V → output projection →
    residual Add (without `residual`, the projection is the output). The LayerNorm's gamma is `outlier`
    times larger on the OUTLIERS channels and the projections' rows of those channels `outlier` times
    smaller: the plain block's function, with activation outliers as real transformers have them."""
    rng = np.random.default_rng(seed)
    if gamma is None:
        gamma = 1.0 + 0.1 * rng.standard_normal(K)
        gamma[list(OUTLIERS)] *= outlier
    w = weights or {n: _weight(rng, (K, K)) for n in ("wq", "wk", "wv", "wo")}
    for n in ("wq", "wk", "wv") if weights is None else ():
        w[n][list(OUTLIERS)] /= outlier
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln")]
    inits = [_const("gamma", gamma), _const("beta", 0.1 * rng.standard_normal(K))]
    for p in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["ln", f"w{p}"], [f"{p}_mm"], name=f"{p}_proj"),
            helper.make_node("Add", [f"{p}_mm", f"b{p}"], [p], name=f"{p}_bias"),
        ]
        inits += [_const(f"w{p}", w[f"w{p}"]), _const(f"b{p}", 0.1 * rng.standard_normal(K))]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["att"], name="pv"),
        helper.make_node("MatMul", ["att", "wo"], ["o_mm"], name="o_proj"),
        helper.make_node("Add", ["o_mm", "bo"], ["o" if residual else "y"], name="o_bias"),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["x", "o"], ["y"], name="residual"))
    inits += [_const("wo", w["wo"]), _const("bo", 0.1 * rng.standard_normal(K))]
    return _model(nodes, [_fvi("x", ["N", 6, K])], [_fvi("y", ["N", 6, K])], inits)


def gemm_model(seed: int = 0) -> onnx.ModelProto:
    """Gemms: x (graph input) → Gemm(transB) → Relu → Gemm(transB) with C → Gemm, the Relu's output also a
    graph output; a second input t read by a Gemm with transA (contracted axis 0)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "c2"], ["y1"], alpha=0.7, beta=1.3, transB=1, name="fc2"),
        helper.make_node("Gemm", ["y1", "w3"], ["z"], name="fc3"),
        helper.make_node("Gemm", ["t", "w4"], ["u"], transA=1, name="fc_t"),
    ]
    inits = [
        _const("w1", _weight(rng, (10, 12))),
        _const("c1", _weight(rng, 10)),
        _const("w2", _weight(rng, (7, 10))),
        _const("c2", _weight(rng, 7)),
        _const("w3", _weight(rng, (7, 5))),
        _const("w4", _weight(rng, (8, 3))),
    ]
    inputs = [_fvi("x", ["N", 12]), _fvi("t", [8, 6])]
    outputs = [_fvi("z", ["N", 5]), _fvi("r", ["N", 10]), _fvi("u", [6, 3])]
    return _model(nodes, inputs, outputs, inits)


def chain_model(seed: int = 0) -> onnx.ModelProto:
    """Producers that absorb 1/s: a Mul by a constant, a MatMul + bias Add, a Div by a constant; and a
    LayerNorm whose output a residual Add also reads (1/s cannot go into it: a Mul is inserted)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Mul", ["cm", "x"], ["p"], name="scale_mul"),
        helper.make_node("MatMul", ["p", "wa"], ["h_mm"], name="mm_a"),
        helper.make_node("Add", ["ba", "h_mm"], ["h"], name="add_a"),
        helper.make_node("MatMul", ["h", "wb"], ["g"], name="mm_b"),
        helper.make_node("Div", ["g", "cd"], ["d"], name="scale_div"),
        helper.make_node("MatMul", ["d", "wc"], ["e"], name="mm_c"),
        helper.make_node("LayerNormalization", ["e", "gamma"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "wd"], ["f"], name="mm_d"),
        helper.make_node("Add", ["ln", "f"], ["y"], name="residual"),
    ]
    inits = [
        _const("cm", 1.0 + rng.random(8)),
        _const("wa", _weight(rng, (8, 8))),
        _const("ba", _weight(rng, 8)),
        _const("wb", _weight(rng, (8, 8))),
        _const("cd", 0.5 + rng.random(8)),
        _const("wc", _weight(rng, (8, 8))),
        _const("gamma", 1.0 + rng.random(8)),
        _const("wd", _weight(rng, (8, 8))),
    ]
    return _model(nodes, [_fvi("x", ["N", 3, 8])], [_fvi("y", ["N", 3, 8])], inits)


def _data(model: onnx.ModelProto, batches: int = 4, n: int = 5, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Random batches with a few channels of each input ×8 (activation outliers from the start)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        batch = {}
        for vi in model.graph.input:
            dims = [d.dim_value or n for d in vi.type.tensor_type.shape.dim]
            x = rng.standard_normal(dims).astype(np.float32)
            x[..., 0] *= 8.0
            batch[vi.name] = x
        out.append(batch)
    return out


def _outputs(model: onnx.ModelProto, batches, names=None) -> dict[str, np.ndarray]:
    """Every batch's values of `names` (default: the graph outputs), concatenated along axis 0."""
    names = names or [o.name for o in model.graph.output]
    session = make_session(with_outputs(model, names))
    runs = [session.run(names, b) for b in batches]
    return {n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _readers(model: onnx.ModelProto, names) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name in names]


def _axes(node: onnx.NodeProto) -> tuple[int, int]:
    """(the activation's contracted axis, the weight's row axis) of a MatMul/Gemm reader."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    return (-2 if a.get("transA") else -1), (1 if a.get("transB") else 0)


def _absmax(x: np.ndarray, axis: int) -> np.ndarray:
    axis %= x.ndim
    return np.abs(x).max(axis=tuple(k for k in range(x.ndim) if k != axis)).astype(np.float64)


def _channel_max(model: onnx.ModelProto, batches, name: str, axis: int) -> np.ndarray:
    """max|x| per channel along `axis` of tensor `name`, batch by batch (a transA input has no batch axis)."""
    session = make_session(with_outputs(model, [name]))
    return np.max([_absmax(session.run([name], b)[0], axis) for b in batches], axis=0)


MODELS = {"transformer": transformer_block, "gemm": gemm_model, "chain": chain_model}


@pytest.fixture(scope="module", params=sorted(MODELS))
def smoothed(request):
    model = MODELS[request.param]()
    data = _data(model)
    out, results = smooth(model, data, alpha=0.5)
    return model, data, out, results, request.param


def test_float_function_is_unchanged(smoothed):
    model, _, out, results, _ = smoothed
    assert any(r.applied for r in results)
    onnx.checker.check_model(out, full_check=True)
    held_out = _data(model, seed=7)
    before, after = _outputs(model, held_out), _outputs(out, held_out)
    for name, ref in before.items():
        assert np.max(np.abs(after[name] - ref)) <= 1e-5 * np.max(np.abs(ref)), name


def test_activation_and_weight_maxima_meet_at_half(smoothed):
    """At α = 0.5, max|X'_j| = max|W'_j| = √(max|X_j|·max|W_j|) for every smoothed channel."""
    _, data, out, results, _ = smoothed
    weights = _initializers(out)
    for r in (r for r in results if r.applied):
        readers = _readers(out, r.readers)
        axis, _ = _axes(readers[0])
        x_max = _channel_max(out, data, readers[0].input[0], axis)
        w_max = np.max([_absmax(weights[n.input[1]], _axes(n)[1] - 2) for n in readers], axis=0)
        np.testing.assert_allclose(x_max, w_max, rtol=1e-5, err_msg=r.tensor)


def test_where_the_inverse_scale_goes(smoothed):
    """Folds leave the node count alone; an inserted Mul feeds only the smoothed readers."""
    model, _, out, results, kind = smoothed
    inserted = [n for n in out.graph.node if n.name not in {m.name for m in model.graph.node}]
    applied = {r.tensor: r for r in results if r.applied}
    expected = {
        "transformer": {"att"},  # ln: folded into the LayerNorm; att: produced by a MatMul of activations
        "gemm": {"x", "r", "t"},  # graph inputs, and a Relu whose output is also a graph output
        "chain": {"ln"},  # the residual Add reads ln too
    }[kind]
    assert {n.input[0] for n in inserted} == expected and all(n.op_type == "Mul" for n in inserted)
    assert set(applied) >= expected
    for mul in inserted:
        readers = [n for n in out.graph.node if mul.output[0] in n.input]
        assert {n.name for n in readers} == set(applied[mul.input[0]].readers)


def test_layernorm_output_read_by_an_add_keeps_its_value():
    model = chain_model()
    data = _data(model)
    out, _ = smooth(model, data)
    residual = next(n for n in out.graph.node if n.name == "residual")
    assert residual.input[0] == "ln"
    before, after = _outputs(model, data, ["ln"])["ln"], _outputs(out, data, ["ln"])["ln"]
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.8])
def test_scales_follow_the_formula(alpha):
    """s_j = max|X_j|^α / max|W_j|^(1−α), computed here from ONNX Runtime's activations and the original
    weights; a channel of X that is all zero and a weight row that is all zero both give s = 1."""
    rng = np.random.default_rng(5)
    gamma = 1.0 + 0.1 * rng.standard_normal(K)
    gamma[3] = 0.0
    weights = {n: _weight(rng, (K, K)) for n in ("wq", "wk", "wv", "wo")}
    for n in ("wq", "wk", "wv"):
        weights[n][7] = 0.0
    model = transformer_block(gamma=gamma, weights=weights)
    beta = next(t for t in model.graph.initializer if t.name == "beta")
    beta.CopyFrom(_const("beta", np.where(np.arange(K) == 3, 0.0, numpy_helper.to_array(beta))))
    data = _data(model)
    _, results = smooth(model, data, alpha=alpha)
    acts = _outputs(model, data, ["ln", "att"])
    refs = {
        "ln": (acts["ln"], np.max([np.abs(weights[n]).max(axis=1) for n in ("wq", "wk", "wv")], axis=0)),
        "att": (acts["att"], np.abs(weights["wo"]).max(axis=1)),
    }
    by_tensor = {r.tensor: r for r in results}
    assert set(by_tensor) == set(refs)
    for name, (x, w_rows) in refs.items():
        x_max, w_max = np.abs(x).reshape(-1, K).max(axis=0).astype(np.float64), w_rows.astype(np.float64)
        ref = np.ones(K)
        live = (x_max > 0) & (w_max > 0)
        ref[live] = np.clip(x_max[live] ** alpha / w_max[live] ** (1 - alpha), MIN_SCALE, MAX_SCALE)
        np.testing.assert_allclose(by_tensor[name].scale, ref, rtol=1e-5, err_msg=name)
    assert by_tensor["ln"].scale[3] == 1.0 and by_tensor["ln"].scale[7] == 1.0


def test_alpha_zero_and_one_move_everything_to_one_side():
    """α = 0: s = 1/max|W_j|, so every smoothed weight row's maximum becomes 1; α = 1: s = max|X_j|, so
    every smoothed activation channel's maximum becomes 1."""
    model = transformer_block(outlier=20.0)
    data = _data(model)
    zero, _ = smooth(model, data, alpha=0.0)
    w = _initializers(zero)
    rows = np.max([np.abs(w[n]).max(axis=1) for n in ("wq", "wk", "wv")], axis=0)
    np.testing.assert_allclose(rows, 1.0, rtol=1e-6)
    one, _ = smooth(model, data, alpha=1.0)
    np.testing.assert_allclose(_channel_max(one, data, "ln", -1), 1.0, rtol=1e-5)


def test_activation_times_activation_is_skipped():
    """ln feeds both a constant-weight MatMul and ln·lnᵀ: the tensor is left alone."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "w"], ["q"], name="proj"),
        helper.make_node("Transpose", ["ln"], ["lt"], perm=[0, 2, 1], name="t"),
        helper.make_node("MatMul", ["ln", "lt"], ["gram"], name="gram"),
    ]
    inits = [_const("gamma", 1.0 + rng.random(K)), _const("w", _weight(rng, (K, 4)))]
    model = _model(
        nodes, [_fvi("x", ["N", 5, K])], [_fvi("q", ["N", 5, 4]), _fvi("gram", ["N", 5, 5])], inits
    )
    before = model.SerializeToString()
    out, results = smooth(model, _data(model))
    assert [(r.tensor, r.applied) for r in results] == [("ln", False)]
    assert "gram" in results[0].how
    assert out.SerializeToString() == before


def test_input_model_is_not_modified():
    model = chain_model()
    before = model.SerializeToString()
    out, results = smooth(model, _data(model))
    assert sum(r.applied for r in results) == 4
    assert model.SerializeToString() == before and out.SerializeToString() != before


def test_bad_alpha_and_empty_data():
    model = chain_model()
    for alpha in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(BadOptionError, match="alpha"):
            smooth(model, _data(model), alpha=alpha)
    with pytest.raises(BadDataError, match="empty"):
        smooth(model, [])


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2))


def test_smoothing_raises_w8a8_output_sqnr_with_outlier_channels():
    """Three LayerNorm channels ×50: one per-tensor activation scale leaves the rest few codes; after
    smoothing (α = 0.5) the W8A8 model's output SQNR is more than 3 dB higher."""
    model = transformer_block(outlier=50.0, residual=False)
    calib, held_out = _data(model, batches=8, seed=3), _data(model, batches=4, seed=4)
    smoothed, _ = smooth(model, calib)
    ref = _outputs(model, held_out)["y"]
    gains = []
    for m in (model, smoothed):
        quant = convert(m, None, data=calib, bits=8, method="minmax").model
        gains.append(_sqnr(ref, _outputs(quant, held_out)["y"]))
    assert gains[1] - gains[0] > 3.0, gains


def _fake_quantize(v: np.ndarray, step: np.ndarray) -> np.ndarray:
    return np.round(v / step) * step


@pytest.mark.parametrize("outlier", [1.0, 30.0])
def test_predicted_error_matches_simulated_rounding(outlier):
    """`predicted_error` against a simulation: X/s per tensor and s·W per column fake-quantized at 6 bits,
    the output error power measured; the prediction (÷12 per value, per row) is within 35 % (uniform
    rounding noise is a model)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4000, 32))
    x[:, :2] *= outlier
    w = rng.standard_normal((32, 16))
    x_max, x_square = np.abs(x).max(axis=0), (x**2).mean(axis=0)
    for s in (np.ones(32), smoothing_scale(x_max, np.abs(w).max(axis=1), 0.5)):
        xs, ws = x / s, w * s[:, None]
        x_step = 2 * np.abs(xs).max() / (2**6 - 1)
        w_step = np.abs(ws).max(axis=0) / (2**5 - 1)
        error = _fake_quantize(xs, x_step) @ _fake_quantize(ws, w_step) - x @ w
        measured = float((error**2).sum(axis=1).mean())
        predicted = predicted_error(x_max, x_square, [w], s, (6, 6)) / 12
        assert abs(predicted / measured - 1) < 0.35, (predicted, measured)


def test_with_widths_only_activations_whose_predicted_error_drops_are_smoothed():
    plain = transformer_block(outlier=1.0, residual=False)
    outliers = transformer_block(outlier=50.0, residual=False)
    _, plain_results = smooth(plain, _data(plain), alpha=0.0, widths=(8, 8))  # every weight row's max to 1
    _, outlier_results = smooth(outliers, _data(outliers), widths=(8, 8))
    assert plain_results and all("predicted output error" in r.how for r in plain_results)
    ln_output = next(r for r in outlier_results if len(r.readers) == 3)  # the Q, K, V projections' input
    assert ln_output.applied

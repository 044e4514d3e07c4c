"""Empirical bias correction: the measured per-channel output shift of each quantized layer against a numpy
reference, and the shift left after correcting the biases and inserting Q/DQ again."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from onnxquant.api import convert
from onnxquant.calib.output_bias import correct_biases, measure_output_shift
from onnxquant.errors import BadModelError
from onnxquant.model import make_session
from onnxquant.passes.insert_qdq import insert_qdq
from onnxquant.quant import fake_quantize

SIDE = 5
LAYERS = {"conv1": "x", "conv2": "r1", "fc": "f"}  # layer -> its float input


def _weights(trans_b: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    fc = rng.normal(0, 0.2, (6, 5 * SIDE * SIDE))
    return {
        "w1": rng.normal(0, 0.5, (4, 3, 3, 3)),
        "b1": rng.normal(0, 0.1, 4),
        "w2": rng.normal(0, 0.5, (5, 4, 3, 3)),
        "w3": fc if trans_b else fc.T,
        "b3": rng.normal(0, 0.1, 6),
    }


def _model(trans_b: int = 1, opset: int = 17) -> onnx.ModelProto:
    """x → Conv(bias) → Relu → Conv(no bias) → Flatten → Gemm(bias)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=trans_b),
    ]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in _weights(trans_b).items()]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _data(batches=(8, 8, 8, 8), seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, (sum(batches), 3, SIDE, SIDE)).astype(np.float32)  # a non-zero input mean
    edges = np.cumsum((0, *batches))
    return [{"x": x[a:b]} for a, b in pairwise(edges)]


@pytest.fixture(scope="module", params=[1, 0], ids=["transB", "plainB"])
def converted(request):
    return convert(_model(request.param), None, data=_data(), wbits=4), request.param


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """A 3×3 convolution with padding 1, stride 1, written out (float64)."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(padded, w.shape[2:], axis=(2, 3))  # (N, C, H, W, kh, kw)
    y = np.einsum("nchwij,ocij->nohw", windows, w)
    return y if b is None else y + b[None, :, None, None]


def _bias_lsb(table, layer: str, weight: str) -> np.ndarray:
    """s_x · s_w per output channel: one step of the layer's int32 bias."""
    return float(table.tensors[LAYERS[layer]].qparams().scale) * table.tensors[weight].qparams().scale


def _reference_shifts(table, trans_b: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """E[L_q(x) − L(x)] per output channel, float inputs from a numpy forward pass of the float model, the
    input fake-quantized with the table's parameters, the weights with their entries, the bias rounded to
    s_x·s_w."""
    w = {k: v.astype(np.float32).astype(np.float64) for k, v in _weights(trans_b).items()}

    def fq(tensor: str, value: np.ndarray) -> np.ndarray:
        return fake_quantize(value.astype(np.float32), table.tensors[tensor].qparams()).astype(np.float64)

    def qbias(layer: str, weight: str, b: np.ndarray) -> np.ndarray:
        lsb = _bias_lsb(table, layer, weight).astype(np.float64)
        return np.rint(b / lsb) * lsb

    x = x.astype(np.float64)
    r1 = np.maximum(_conv(x, w["w1"], w["b1"]), 0)
    f = _conv(r1, w["w2"], None).reshape(len(x), -1)
    fc_w = w["w3"] if trans_b else w["w3"].T  # (6, K)
    fc_wq = fq("w3", w["w3"]) if trans_b else fq("w3", w["w3"]).T
    pairs = {
        "conv1": (
            _conv(fq("x", x), fq("w1", w["w1"]), qbias("conv1", "w1", w["b1"])),
            _conv(x, w["w1"], w["b1"]),
        ),
        "conv2": (_conv(fq("r1", r1), fq("w2", w["w2"]), None), _conv(r1, w["w2"], None)),
        "fc": (fq("f", f) @ fc_wq.T + qbias("fc", "w3", w["b3"]), f @ fc_w.T + w["b3"]),
    }
    return {
        k: np.moveaxis(yq - y, 1, 0).reshape(yq.shape[1], -1).mean(axis=1) for k, (yq, y) in pairs.items()
    }


def _all_x() -> np.ndarray:
    return np.concatenate([b["x"] for b in _data()])


def test_measured_shift_matches_a_numpy_reference(converted):
    result, trans_b = converted
    shifts = measure_output_shift(result.float_model, result.model, _data())
    reference = _reference_shifts(result.table, trans_b, _all_x())
    assert set(shifts) == set(LAYERS)
    for layer, expected in reference.items():
        np.testing.assert_allclose(shifts[layer], expected, rtol=1e-4, atol=1e-5, err_msg=layer)
    assert max(np.abs(s).max() for s in shifts.values()) > 1e-2  # 4-bit weights: a shift worth correcting


def test_streaming_mean_does_not_depend_on_batching_or_segments(converted):
    result, _ = converted
    even = measure_output_shift(result.float_model, result.model, _data())
    uneven = measure_output_shift(result.float_model, result.model, _data((5, 27)))
    segmented = measure_output_shift(result.float_model, result.model, _data(), budget=1)  # a node a segment
    for layer in LAYERS:
        np.testing.assert_allclose(uneven[layer], even[layer], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(segmented[layer], even[layer], rtol=1e-6, atol=1e-7)


def _corrected(result):
    shifts = measure_output_shift(result.float_model, result.model, _data())
    quant, _ = insert_qdq(correct_biases(result.float_model, shifts), result.plan, result.table)
    return shifts, quant


def test_corrected_layers_are_left_within_one_bias_step(converted):
    result, _ = converted
    shifts, quant = _corrected(result)
    after = measure_output_shift(result.float_model, quant, _data())  # against the original float model
    for layer, weight in (("conv1", "w1"), ("conv2", "w2"), ("fc", "w3")):
        lsb = _bias_lsb(result.table, layer, weight)
        assert np.abs(shifts[layer]).max() > 10 * lsb.max(), layer  # there was something to correct
        assert np.all(np.abs(after[layer]) <= lsb * 1.001 + 1e-6), (layer, after[layer] / lsb)


def _output_mean_error(float_model, quant_model) -> np.ndarray:
    x = _all_x()
    f = make_session(float_model).run(None, {"x": x})[0]
    q = make_session(quant_model).run(None, {"x": x})[0]
    return (q.astype(np.float64) - f).mean(axis=0)


def test_model_output_mean_error_shrinks(converted):
    result, _ = converted
    _, quant = _corrected(result)
    before = _output_mean_error(result.float_model, result.model)
    after = _output_mean_error(result.float_model, quant)
    assert np.linalg.norm(after) < 0.6 * np.linalg.norm(before), (before, after)


def test_a_layer_without_bias_gets_an_int32_bias(converted):
    result, _ = converted
    shifts = measure_output_shift(result.float_model, result.model, _data())
    fixed = correct_biases(result.float_model, shifts)
    conv2 = next(n for n in fixed.graph.node if n.name == "conv2")
    inits = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    assert len(conv2.input) == 3 and inits[conv2.input[2]].dtype == np.float32
    np.testing.assert_allclose(inits[conv2.input[2]], -shifts["conv2"], rtol=1e-6)
    b1 = inits[next(n for n in fixed.graph.node if n.name == "conv1").input[2]]
    np.testing.assert_allclose(b1, _weights(1)["b1"].astype(np.float32) - shifts["conv1"], rtol=1e-5)

    quant, _ = insert_qdq(fixed, result.plan, result.table)
    qinits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    producer = {o: n for n in quant.graph.node for o in n.output}
    bias_dq = producer[next(n for n in quant.graph.node if n.name == "conv2").input[2]]
    assert bias_dq.op_type == "DequantizeLinear"
    assert qinits[bias_dq.input[0]].dtype == np.int32
    np.testing.assert_allclose(qinits[bias_dq.input[1]], _bias_lsb(result.table, "conv2", "w2"), rtol=1e-6)


def test_unquantized_input_and_matmul_are_skipped(converted):
    result, _ = converted
    table = replace(result.table, tensors={k: v for k, v in result.table.tensors.items() if k != "r1"})
    quant, _ = insert_qdq(result.float_model, result.plan, table)
    assert set(measure_output_shift(result.float_model, quant, _data())) == {"conv1", "fc"}

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 1, (3, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.normal(1, 1, (8, 3)).astype(np.float32)}]
    mm = convert(model, None, data=data, wbits=4)
    assert any(n.op_type == "DequantizeLinear" for n in mm.model.graph.node)
    assert measure_output_shift(mm.float_model, mm.model, data) == {}


@pytest.mark.parametrize(
    ("opset", "options"),
    [(13, {"wbits": 8}), (17, {"wbits": 4, "abits": 4})],
    ids=["opset13-axes-attribute", "4bit-activations-clipped"],
)
def test_other_opsets_and_activation_chains(opset, options):
    result = convert(_model(opset=opset), None, data=_data(), **options)
    assert (result.model.opset_import[0].version < 18) == (opset == 13)
    shifts = measure_output_shift(result.float_model, result.model, _data())
    reference = _reference_shifts(result.table, 1, _all_x())
    for layer, expected in reference.items():
        np.testing.assert_allclose(shifts[layer], expected, rtol=1e-4, atol=1e-5, err_msg=layer)
    _, quant = _corrected(result)
    after = measure_output_shift(result.float_model, quant, _data())
    for layer, weight in (("conv1", "w1"), ("conv2", "w2"), ("fc", "w3")):
        lsb = _bias_lsb(result.table, layer, weight)
        assert np.all(np.abs(after[layer]) <= lsb * 1.001 + 1e-6), (layer, after[layer] / lsb)


def _half_model() -> onnx.ModelProto:
    """Two float16 Convs sharing a bias, one Conv without bias, a Gemm with a (1, N) bias."""
    rng = np.random.default_rng(4)

    def init(name, shape):
        return numpy_helper.from_array(rng.normal(0, 1, shape).astype(np.float16), name)

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["a"], name="a"),
        helper.make_node("Conv", ["x", "w", "b"], ["b_out"], name="b"),
        helper.make_node("Conv", ["x", "w"], ["c"], name="c"),
        helper.make_node("Gemm", ["v", "g", "gb"], ["d"], name="d"),
    ]
    graph = helper.make_graph(
        nodes,
        "half",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 3, 3]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT16, [1, 4]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, 3, 3, 3]) for n in ("a", "b_out", "c")]
        + [helper.make_tensor_value_info("d", TensorProto.FLOAT16, [1, 5])],
        [init("w", (3, 2, 1, 1)), init("b", (3,)), init("g", (4, 5)), init("gb", (1, 5))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_correct_biases_keeps_dtypes_and_leaves_shared_biases_alone():
    model = _half_model()
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shifts = {"a": np.array([0.5, -1.0, 2.0]), "c": np.array([1.0, 2.0, 3.0]), "d": np.arange(5.0)}
    fixed = correct_biases(model, shifts)
    inits = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    node = {n.name: n for n in fixed.graph.node}
    a_bias = inits[node["a"].input[2]]
    assert a_bias.dtype == np.float16
    np.testing.assert_array_equal(a_bias, (original["b"].astype(np.float64) - shifts["a"]).astype(np.float16))
    np.testing.assert_array_equal(inits[node["b"].input[2]], original["b"])  # the other reader keeps it
    assert inits[node["c"].input[2]].dtype == np.float16
    np.testing.assert_array_equal(inits[node["c"].input[2]], -shifts["c"].astype(np.float16))
    d_bias = inits[node["d"].input[2]]
    assert d_bias.shape == (5,) and d_bias.dtype == np.float16
    np.testing.assert_array_equal(d_bias, (original["gb"][0] - shifts["d"]).astype(np.float16))
    onnx.checker.check_model(fixed, full_check=True)
    assert {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer} == {
        k: v.tolist() for k, v in original.items()
    }  # the input model is not modified


def test_correct_biases_refuses_unknown_layers_and_wrong_lengths():
    model = _half_model()
    with pytest.raises(BadModelError, match="'nope'"):
        correct_biases(model, {"nope": np.zeros(3)})
    with pytest.raises(BadModelError, match="'a'.*4 values for 3 output channels"):
        correct_biases(model, {"a": np.zeros(4)})

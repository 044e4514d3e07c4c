"""Weight-only quantization (placement `weights`, `--weight-only`): DQ on constant weights and nothing else,
no calibration data, outputs equal to a float model holding hand-rounded weights, and ONNX Runtime's fusion of
block-wise int4 weights into MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxquant import api
from onnxquant.cli import main
from onnxquant.model import make_session

RNG = np.random.default_rng(11)


def model_with_weights(k: int = 64, n: int = 16) -> onnx.ModelProto:
    """a = x·W1 (a constant weight), b = Conv(y, W2), c = a·z (no constant weight)."""
    w1 = RNG.standard_normal((k, n)).astype(np.float32)
    w2 = RNG.standard_normal((4, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm"),
            helper.make_node("Conv", ["y", "w2"], ["b"], name="conv"),
            helper.make_node("MatMul", ["a", "z"], ["c"], name="mm_act"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [n, 3]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, 4, 4]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(n: int = 5) -> dict[str, np.ndarray]:
    return {
        "x": RNG.standard_normal((n, 64)).astype(np.float32),
        "y": RNG.standard_normal((n, 8, 6, 6)).astype(np.float32),
        "z": RNG.standard_normal((16, 3)).astype(np.float32),
    }


def rounded(w: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Symmetric round to nearest with one scale max|w|/qmax per slice along `axis`."""
    qmax = 2 ** (bits - 1) - 1
    others = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=others, keepdims=True) / qmax).astype(np.float32)
    return (np.clip(np.rint(w / scale), -qmax - 1, qmax) * scale).astype(np.float32)


def test_weights_only_get_dq_and_no_data_is_needed():
    model = model_with_weights()
    rules = api.resolve_rules("default", wbits=4).with_cli(weight_only=True)
    result = api.convert(model, rules)  # no calibration data: nothing to calibrate
    ops = [n.op_type for n in result.model.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 2
    assert not result.plan.activations
    decision = next(d for d in result.plan.nodes if d.name == "mm_act")
    assert (
        not decision.quantize and decision.reason == "weight-only placement: no constant weight to quantize"
    )
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    del reference.graph.initializer[:]
    reference.graph.initializer.extend(
        [
            numpy_helper.from_array(rounded(weights["w1"], 1, 4), "w1"),
            numpy_helper.from_array(rounded(weights["w2"], 0, 4), "w2"),
        ]
    )
    feed = feeds()
    wanted = make_session(reference, optimize=False).run(None, feed)
    for want, got in zip(wanted, make_session(result.model, optimize=False).run(None, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_onnx_runtime_fuses_blockwise_int4_weights_into_matmulnbits(tmp_path):
    rules = api.resolve_rules("default", wbits=4).with_cli(weight_only=True, block_size=32)
    result = api.convert(model_with_weights(), rules)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    # its default accuracy level 4 would also round the MatMul's input to int8 (dynamic W4A8)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    fused = ort.InferenceSession(
        result.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    optimized = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "MatMulNBits" in optimized and optimized.count("MatMul") == 1  # a·z stays a float MatMul
    feed = feeds()
    unfused = make_session(result.model, optimize=False).run(None, feed)
    for want, got in zip(unfused, fused.run(None, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cli_weight_only_without_calibration_data(tmp_path):
    source, out = tmp_path / "m.onnx", tmp_path / "m.w4.onnx"
    onnx.save(model_with_weights(), source)
    run = CliRunner().invoke(main, ["convert", str(source), "--wbits", "4", "--weight-only", "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert "weights quantized: 2 at 4 bits" in run.output and "activations quantized: none" in run.output
    stored = {t.name: t.data_type for t in onnx.load(out).graph.initializer}
    assert stored["w1_quantized"] == TensorProto.INT4

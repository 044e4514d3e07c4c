"""What validate compared: float fallbacks on an output's path, already quantized models, Resize `sizes`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from rt_nets import conv_net, quantize

from onnxquant.cli import main
from onnxquant.errors import BadModelError
from onnxquant.runtime import validate
from onnxquant.runtime.validate import Comparison, ValidationResult


def _fallback_head_model() -> onnx.ModelProto:
    """conv_net quantized on its Convs only: the Gemm head reads a DequantizeLinear and runs in float."""
    rng = np.random.default_rng(0)
    return quantize(
        conv_net(channels=4, size=8),
        rng.random((8, 3, 8, 8)).astype(np.float32),
        op_types_to_quantize=["Conv"],
    )


def test_output_through_a_float_fallback_is_reported_not_judged_bit_exact() -> None:
    q = _fallback_head_model()
    data = [{"x": np.random.default_rng(1).random((2, 3, 8, 8)).astype(np.float32)}]
    result = validate(q, data)
    lines = result.summary_lines()
    logits = next(line for line in lines if line.lstrip().startswith("output") and "logits" in line)
    assert "float fallback node(s) (Gemm 'fc'" in logits and "not judged bit-exact" in logits
    assert result.passed, "\n".join(lines)
    verdict = lines[-1]
    assert verdict.startswith("PASSED (float requant: bit-exact at all ")
    assert "output and" not in verdict and "every integer node and output" not in verdict
    assert "not judged: 1 output(s) computed through float fallback nodes (logits max |diff|" in verdict
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["outputs"][0]["judged"] is False
    assert doc["outputs"][0]["through_float_fallback"][0] == "Gemm 'fc'"


def _result(output: Comparison, node_differ: int = 0) -> ValidationResult:
    node = Comparison("conv1", "Conv", "c1q", "integer", count=10, differ=node_differ, max_lsb=node_differ)
    return ValidationResult("numpy", "float", 2, [node], [output], [])


def test_a_differing_float_fallback_output_does_not_fail_exact_integer_nodes() -> None:
    """The LSTM case: integer nodes bit-exact, only the output behind a float fallback differs."""
    out = Comparison("y", "LSTM", "y", "output", "abs", count=4500, differ=3827, max_lsb=1, max_abs=0.02)
    out.through_float = ("LSTM 'lstm'",)
    result = _result(out)
    assert result.passed
    verdict = result.summary_lines()[-1]
    assert verdict == (
        "PASSED (float requant: bit-exact at all 1 integer/quantize node(s); not judged: 1 output(s) "
        "computed through float fallback nodes (y max |diff| 0.02))"
    )
    assert not _result(out, node_differ=1).passed


def test_an_integer_output_that_differs_still_fails() -> None:
    out = Comparison("y", "DequantizeLinear", "y", "output", count=8, differ=1, max_lsb=1)
    result = _result(out)
    assert not result.passed
    assert result.summary_lines()[-1] == (
        "FAILED (float requant: bit-exact at all 1 integer/quantize node(s) and 1 integer output(s))"
    )


def _qlinear_conv_model() -> onnx.ModelProto:
    """x → QuantizeLinear → QLinearConv → DequantizeLinear: quantized in operator form, no Q/DQ around it."""
    inits = [
        numpy_helper.from_array(np.float32(0.02), "sx"),
        numpy_helper.from_array(np.uint8(0), "zx"),
        numpy_helper.from_array(np.ones((2, 3, 1, 1), np.uint8), "w"),
        numpy_helper.from_array(np.float32(0.01), "sw"),
        numpy_helper.from_array(np.uint8(0), "zw"),
        numpy_helper.from_array(np.float32(0.05), "sy"),
        numpy_helper.from_array(np.uint8(0), "zy"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
        helper.make_node(
            "QLinearConv", ["xq", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["yq"], name="conv_quant"
        ),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dqy"),
    ]
    graph = helper.make_graph(
        nodes,
        "qop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _zero_scale_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    q = quantize(conv_net(channels=4, size=8), rng.random((8, 3, 8, 8)).astype(np.float32))
    scale = next(t for t in q.graph.initializer if t.name == "a3_scale")  # the residual Add's output
    scale.CopyFrom(numpy_helper.from_array(np.float32(0), scale.name))
    return q


@pytest.mark.parametrize("requant", ["float", "fixed"])
def test_zero_scale_is_one_bad_model_error(requant: str) -> None:
    data = [{"x": np.ones((1, 3, 8, 8), np.float32)}]
    with pytest.raises(BadModelError, match=r"scale 'a3_scale' holds 0; accepted: positive finite scales"):
        validate(_zero_scale_model(), data, requant=requant)


def test_operator_form_model_is_refused_in_one_line(tmp_path) -> None:
    data = [{"x": np.ones((1, 3, 4, 4), np.float32)}]
    with pytest.raises(BadModelError, match="'conv_quant' is QLinearConv, an already quantized operator"):
        validate(_qlinear_conv_model(), data)
    onnx.save(_qlinear_conv_model(), tmp_path / "q.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((2, 3, 4, 4), np.float32))
    before = (tmp_path / "q.onnx").read_bytes()
    result = CliRunner().invoke(
        main, ["validate", str(tmp_path / "q.onnx"), "--data", str(tmp_path / "d.npz")]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        (
            "error: qop: node 'conv_quant' is QLinearConv, an already quantized operator (QOperator format); "
            "accepted: a QDQ model (onnxquant convert, or onnxruntime quantize_static with QuantFormat.QDQ)"
        )
    ]
    assert (tmp_path / "q.onnx").read_bytes() == before


def _resize_with_sizes_model() -> onnx.ModelProto:
    """Conv → Resize whose `sizes` is Concat(Shape(c)[0:2], [16, 16]) (the ViT/segmentation-head idiom)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((2, 4, 1, 1)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([2], np.int64), "s2"),
        numpy_helper.from_array(np.array([16, 16], np.int64), "hw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Shape", ["c"], ["sh"], name="shape"),
        helper.make_node("Slice", ["sh", "s0", "s2"], ["nc"], name="slice"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0, name="cat"),
        helper.make_node("Resize", ["c", "", "", "sizes"], ["r"], mode="linear", name="resize"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "resize_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 16, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_resize_with_computed_sizes_validates() -> None:
    rng = np.random.default_rng(0)
    q = quantize(_resize_with_sizes_model(), rng.random((8, 3, 8, 8)).astype(np.float32))
    result = validate(q, [{"x": rng.random((2, 3, 8, 8)).astype(np.float32)}])
    assert result.passed, "\n".join(result.summary_lines())
    assert {c.name for c in result.nodes} >= {"conv", "conv2"}
    assert result.outputs[0].count == 2 * 2 * 16 * 16

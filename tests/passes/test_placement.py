"""Placement follows what ONNX Runtime computes in integer: Q/DQ on the float inputs of quantized ops only,
no Q/DQ on an output that only a float op reads, and an Add left float when its output is read in float."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxquant import api
from onnxquant.errors import BadRulesError
from onnxquant.model import infer_shapes, make_session, with_outputs
from onnxquant.passes.plan import ATTENTION_REASON, plan_quantization

BLOCK = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y, float[N, 8] z) {
  h = MatMul (x, w1)
  r = Add (x, h)
  y = LayerNormalization <axis = -1> (r, gamma, beta)
  a = Add (h, x)
  b = Relu (a)
  c = MatMul (b, w2)
  d = HardSwish (c)
  z = MatMul (d, w3)
}
"""


def parsed(text: str, shapes: dict[str, tuple[int, ...]], seed: int = 0, **constants) -> onnx.ModelProto:
    """`text` with random normal float32 initializers of `shapes` and the `constants`, shapes inferred."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    arrays = {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in shapes.items()}
    for name, value in {**arrays, **constants}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    return infer_shapes(model)


def block() -> onnx.ModelProto:
    return parsed(BLOCK, {"w1": (8, 8), "w2": (8, 8), "w3": (8, 8), "gamma": (8,), "beta": (8,)})


def optimized_ops(model: onnx.ModelProto, path) -> list[str]:
    """The op types of `model` after ONNX Runtime's optimizations (its QDQ fusions)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(path).graph.node]


CONV_WEIGHTS = {"w1": (6, 3, 3, 3), "b1": (6,), "w2": (4, 6, 3, 3), "b2": (4,)}


def test_ort_placement_quantizes_what_runs_in_integer():
    plan = plan_quantization(block(), api.load_rules("default"))
    decisions = {d.name: d for d in plan.nodes}
    adds = [d for d in plan.nodes if d.op_type == "Add"]
    residual_before_norm = next(d for d in adds if d.name == "Add_1")
    assert not residual_before_norm.quantize and residual_before_norm.reason == "its output is read in float"
    assert next(d for d in adds if d.name == "Add_3").quantize  # Add → Relu → MatMul: an integer chain
    assert set(plan.activations) == {"x", "h", "b", "d"}  # not r (read by LayerNorm) nor c (by HardSwish)
    assert decisions["Relu_4"].quantize  # fused into the Add before it


def test_tensorrt_placement_quantizes_only_residual_adds_a_conv_feeds():
    plan = plan_quantization(block(), api.load_rules("tensorrt"))
    assert not any(d.quantize for d in plan.nodes if d.op_type == "Add")  # MatMul blocks: no epilogue fusion
    assert set(plan.activations) == {"x", "b", "d"}


CONV_HARDSWISH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  h = HardSwish (c)
  y = Conv <pads = [1, 1, 1, 1]> (h, w2, b2)
}
"""


def test_integer_preset_quantizes_compute_outputs_read_in_float(tmp_path):
    """`quantize_outputs` (the `integer` preset): c, read only by HardSwish, gets Q/DQ too, so ONNX Runtime
    runs the first Conv as QLinearConv; with the default preset that Conv runs in float."""
    model = parsed(CONV_HARDSWISH, CONV_WEIGHTS)
    assert set(plan_quantization(model, api.load_rules("default")).activations) == {"x", "h"}
    assert set(plan_quantization(model, api.load_rules("integer")).activations) == {"x", "c", "h"}
    data = {"x": np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    kernels = {
        preset: optimized_ops(
            api.convert(model, api.load_rules(preset), data=data).model, tmp_path / preset
        ).count("QLinearConv")
        for preset in ("default", "integer")
    }
    assert kernels == {"default": 0, "integer": 1}  # the last Conv's output is a graph output: float


def test_quantize_outputs_names_compute_ops_only(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("quantize_outputs: [Conv, HardSwish]\n")
    with pytest.raises(BadRulesError, match="key 'quantize_outputs' is 'HardSwish'; accepted: Conv, "):
        api.load_rules(str(path))


POST_NORM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y) {
  n = LayerNormalization <axis = -1> (x, gamma, beta)
  h = MatMul (n, w)
  y = Add (n, h)
}
"""


def test_a_float_reader_of_a_quantized_tensor_keeps_its_float_value():
    """A post-LayerNorm block (BERT): the LayerNorm output feeds the next MatMul (quantized) and the residual
    Add (read in float); only the MatMul reads the DequantizeLinear, the Add adds the exact float value."""
    model = parsed(POST_NORM, {"gamma": (8,), "beta": (8,), "w": (8, 8)}, seed=2)
    x = np.random.default_rng(3).normal(0, 1, (16, 8)).astype(np.float32)
    result = api.convert(model, api.load_rules("default"), data={"x": x})
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    assert "n" in add.input and "h" in add.input
    assert set(result.plan.activations) == {"n"}
    n_float = make_session(with_outputs(model, ["n"]), optimize=False).run(["n"], {"x": x})[0]
    h, y = make_session(with_outputs(result.model, ["h"]), optimize=False).run(["h", "y"], {"x": x})
    np.testing.assert_array_equal(y, n_float + h)


ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6, 8] x) => (float[N, 6, 8] y) {
  q = MatMul (x, wq)
  k = MatMul (x, wk)
  v = MatMul (x, wv)
  kt = Transpose <perm = [0, 2, 1]> (k)
  s = MatMul (q, kt)
  p = Softmax <axis = -1> (s)
  pr = Reshape (p, shape)
  y = MatMul (pr, v)
}
"""


def test_attention_probabilities_stay_float():
    """probabilities · V (across a Reshape) stays float with its reason; Q·Kᵀ and the projections do not."""
    shapes = {"wq": (8, 8), "wk": (8, 8), "wv": (8, 8)}
    model = parsed(ATTENTION, shapes, seed=3, shape=np.array([0, 6, 6], np.int64))
    for preset in ("default", "tensorrt"):
        plan = plan_quantization(model, api.load_rules(preset))
        decisions = {d.name: d for d in plan.nodes if d.op_type == "MatMul"}
        probabilities_v = decisions.pop("MatMul_7")
        assert not probabilities_v.quantize and probabilities_v.reason == ATTENTION_REASON
        assert all(d.quantize for d in decisions.values())
        assert "p" not in plan.activations and "pr" not in plan.activations and "q" in plan.activations


CONV_SILU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  s = Sigmoid (c)
  m = Mul (c, s)
  y = Conv <pads = [1, 1, 1, 1]> (m, w2, b2)
}
"""


def test_integer_preset_runs_a_silu_in_integer(tmp_path):
    """A SiLU (Conv → Sigmoid, Mul): the `integer` preset quantizes the Sigmoid and the Mul too, and ONNX
    Runtime runs the block as QLinearConv, QLinearSigmoid and QLinearMul; the default keeps it float."""
    model = parsed(CONV_SILU, CONV_WEIGHTS, seed=4)
    data = {"x": np.random.default_rng(5).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    ops = {
        preset: optimized_ops(api.convert(model, api.load_rules(preset), data=data).model, tmp_path / preset)
        for preset in ("default", "integer")
    }
    for op in ("QLinearConv", "QLinearSigmoid", "QLinearMul"):
        assert op in ops["integer"] and op not in ops["default"], (op, ops)

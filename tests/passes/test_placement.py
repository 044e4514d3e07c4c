"""Placement follows what ONNX Runtime computes in integer: Q/DQ on the float inputs of quantized ops only,
no Q/DQ on an output that only a float op reads, and an Add left float when its output is read in float."""

from __future__ import annotations

import numpy as np
import onnx

from onnxquant import api
from onnxquant.model import infer_shapes
from onnxquant.passes.plan import plan_quantization

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


def block() -> onnx.ModelProto:
    model = onnx.parser.parse_model(BLOCK)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (8, 8)), ("w2", (8, 8)), ("w3", (8, 8)), ("gamma", (8,)), ("beta", (8,))):
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 1, shape).astype(np.float32), name)
        )
    return infer_shapes(model)


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

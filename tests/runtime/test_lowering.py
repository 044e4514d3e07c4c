"""Lowering: patterns, constant folding of weights, activation clamps, fallbacks and overflow refusal."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from rt_nets import const as _c
from rt_nets import conv_net, int4_conv_net, qdq_input, quantize, single_input_model

from onnxquant.errors import BadModelError
from onnxquant.runtime import lower, validate
from onnxquant.runtime.numpy_backend import NumpyBackend


def test_model_without_qdq_is_refused() -> None:
    with pytest.raises(BadModelError, match="no QuantizeLinear/DequantizeLinear"):
        lower(conv_net())


def test_float_fallback_is_reported_and_still_exact() -> None:
    rng = np.random.default_rng(0)
    model = conv_net(channels=4, size=8)
    relu2 = next(n for n in model.graph.node if n.name == "relu2")
    relu2.op_type = "Sin"  # no integer kernel and not quantized by quantize_static
    q = quantize(model, rng.random((8, 3, 8, 8)).astype(np.float32))
    plan = lower(q)
    status = {s.node: s for s in plan.status}
    assert status["relu2"].kind == "float" and "no integer kernel for Sin" in status["relu2"].reason
    assert status["conv1"].kind == "integer"
    assert any("float  Sin 'relu2'" in line for line in plan.report_lines())
    result = validate(q, [{"x": rng.random((2, 3, 8, 8)).astype(np.float32)}])
    assert result.passed, "\n".join(result.summary_lines())
    assert any("Sin 'relu2'" in line for line in result.summary_lines())


def test_accumulator_overflow_is_refused() -> None:
    nodes, inits = qdq_input(zp=0)
    inits += [
        _c("w", np.full((4, 2, 3, 3), 127, np.int8)),
        _c("sw", np.float32(0.01)),
        _c("zw", np.int8(0)),
        _c("b", np.full(4, (1 << 31) - 1000, np.int32)),
        _c("sb", np.float32(0.02 * 0.01)),
        _c("zb", np.int32(0)),
        _c("sy", np.float32(1.0)),
        _c("zy", np.uint8(0)),
    ]
    nodes += [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"]),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"]),
    ]
    plan = lower(single_input_model(nodes, inits, [1, 4, 4, 4]))
    conv = next(s for s in plan.status if s.node == "conv")
    assert conv.kind == "float"
    assert "int32 accumulator could overflow" in conv.reason and "K=18" in conv.reason


def test_clip_chain_float_weights_and_bias_int4_weights() -> None:
    """Conv → Relu → Clip (4-bit range in a uint8 container), weights float → Q(int4) → DQ, float bias."""
    rng = np.random.default_rng(1)
    sy = np.float32(0.05)
    inits_x = qdq_input(scale=0.01)
    nodes, inits = inits_x
    inits += [
        _c("w", rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.3),
        _c("sw", np.array([0.05, 0.04, 0.06], np.float32)),
        _c("bias", rng.standard_normal(3).astype(np.float32) * 0.1),
        _c("lo", np.float32(0.0)),
        _c("hi", np.float32(15 * sy)),
        _c("sy", sy),
        _c("zy", np.uint8(0)),
    ]
    zw4 = helper.make_tensor("zw4", TensorProto.INT4, [3], [0, 0, 0])
    inits.append(zw4)
    nodes += [
        helper.make_node("QuantizeLinear", ["w", "sw", "zw4"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw4"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Clip", ["r", "lo", "hi"], ["cl"], name="clip"),
        helper.make_node("QuantizeLinear", ["cl", "sy", "zy"], ["cq"], name="q"),
        helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"]),
    ]
    model = single_input_model(nodes, inits, [1, 3, 6, 6], opset=21)
    plan = lower(model)
    step = next(s for s in plan.steps if s.name == "conv")
    assert step.nodes == ["conv", "relu", "clip", "q"]
    assert (step.requant.lo, step.requant.hi) == (0, 15) and step.w_bits == 4
    assert int(np.abs(step.w).max()) <= 8
    x = {"x": rng.random((1, 2, 6, 6)).astype(np.float32) * 2}
    env = NumpyBackend().run(plan, x)
    assert 0 <= env["cq"].min() and env["cq"].max() <= 15
    result = validate(model, [x])
    conv = next(c for c in result.nodes if c.name == "conv")
    assert conv.max_lsb <= 1  # ONNX Runtime runs this one in float (int4 weights): rounding may differ


def test_conv_transpose_matches_float_semantics_within_one_lsb() -> None:
    rng = np.random.default_rng(2)
    nodes, inits = qdq_input(scale=0.01, zp=10)
    inits += [
        _c("w", rng.integers(-100, 100, (2, 3, 3, 3)).astype(np.int8)),
        _c("sw", np.float32(0.003)),
        _c("zw", np.int8(0)),
        _c("sy", np.float32(0.02)),
        _c("zy", np.uint8(128)),
    ]
    nodes += [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
        helper.make_node(
            "ConvTranspose",
            ["xd", "wd"],
            ["c"],
            strides=[2, 2],
            pads=[1, 1, 0, 0],
            output_padding=[1, 1],
            name="deconv",
        ),
        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"]),
    ]
    model = single_input_model(nodes, inits, [1, 3, 13, 13])
    plan = lower(model)
    assert next(s for s in plan.status if s.node == "deconv").kind == "integer"
    result = validate(model, [{"x": rng.random((1, 2, 6, 6)).astype(np.float32)}])
    deconv = next(c for c in result.nodes if c.name == "deconv")
    assert deconv.count == 3 * 13 * 13 and deconv.max_lsb <= 1


def test_constant_weights_are_folded_and_plan_serializes() -> None:
    rng = np.random.default_rng(3)
    q = quantize(conv_net(channels=4, size=8), rng.random((8, 3, 8, 8)).astype(np.float32))
    plan = lower(q)
    kinds = {s.node: s.kind for s in plan.status}
    weight_dq = [
        n.name
        for n in q.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in {i.name for i in q.graph.initializer}
    ]
    assert weight_dq and all(kinds[n] == "constant" for n in weight_dq)
    assert all(set(d) == {"node", "op", "kind", "step", "reason"} for d in plan.to_json())
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    conv1 = next(s for s in plan.integer_steps() if s.name == "conv1")
    conv1_node = next(n for n in q.graph.node if n.name == "conv1")
    w1 = next(
        n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv1_node.input[1]
    )
    assert (
        np.array_equal(conv1.w, inits[w1.input[0]]) and conv1.w.dtype == np.int64
    )  # the int8 codes, as int64
    assert not set(plan.constants) & {n.output[0] for n in q.graph.node if n.name in weight_dq}


def test_w4a4_model_runs_integer_within_one_lsb_of_onnxruntime() -> None:
    model = int4_conv_net()
    plan = lower(model)
    steps = {s.name: s for s in plan.integer_steps()}
    assert set(steps) == {"conv1", "conv2"}
    assert all(s.w_bits == 4 and s.x_range == (0, 15) for s in steps.values())
    result = validate(model, [{"x": np.random.default_rng(0).random((2, 3, 10, 10)).astype(np.float32)}])
    assert all(c.max_lsb <= 1 for c in result.nodes)  # ONNX Runtime has no int4 kernels: it runs float

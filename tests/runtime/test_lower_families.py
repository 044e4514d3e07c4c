"""One unit test (or a few) per lowering family module: base, gemm, add, pool, move; hand-built QDQ models."""

from __future__ import annotations

import numpy as np
from onnx import helper
from rt_nets import const, qdq_input, single_input_model

from onnxquant.runtime import lower, validate
from onnxquant.runtime import plan as P
from onnxquant.runtime.lower import LOWERINGS, add, gemm, move, pool

RNG = np.random.default_rng(7)
X = [{"x": RNG.random((1, 2, 6, 6)).astype(np.float32)}]


def _status(plan: P.Plan, name: str) -> P.NodeStatus:
    return next(s for s in plan.status if s.node == name)


def _qdq(src: str, out: str, s: str = "sy", z: str = "zy") -> list:
    return [
        helper.make_node("QuantizeLinear", [src, s, z], [out + "q"]),
        helper.make_node("DequantizeLinear", [out + "q", s, z], [out]),
    ]


def test_lowerings_table_is_the_union_of_the_family_ops() -> None:
    families = {op: fam.lower for fam in (gemm, add, pool, move) for op in fam.OPS}
    assert LOWERINGS == families


def test_base_refuses_a_shared_intermediate() -> None:
    nodes, inits = qdq_input()
    inits += [const("sy", np.float32(0.05)), const("zy", np.uint8(0))]
    nodes += [
        helper.make_node("MaxPool", ["xd"], ["p"], kernel_shape=[2, 2], name="pool"),
        *_qdq("p", "pd"),
        helper.make_node("Relu", ["p"], ["r"], name="relu"),
        *_qdq("r", "rd"),
        helper.make_node("Add", ["pd", "rd"], ["y"], name="sum"),
    ]
    plan = lower(single_input_model(nodes, inits, [1, 2, 5, 5]))
    assert _status(plan, "pool").kind == "float"
    assert _status(plan, "pool").reason == "'p' has 2 consumers, expected one"


def test_gemm_transposed_weight_alpha_and_bias() -> None:
    w = RNG.integers(-60, 60, (3, 72)).astype(np.int8)  # transB: (N, K)
    nodes, inits = qdq_input(scale=0.01, zp=5)
    inits += [
        const("w", w),
        const("sw", np.float32(0.004)),
        const("zw", np.int8(0)),
        const("b", [0.1, -0.2, 0.3], np.float32),
        const("sy", np.float32(0.03)),
        const("zy", np.uint8(100)),
        const("shape", np.array([1, 72], np.int64)),
    ]
    nodes += [
        helper.make_node("Reshape", ["x", "shape"], ["xf"], name="flat_x"),
        helper.make_node("QuantizeLinear", ["xf", "sx", "zx"], ["xfq"]),
        helper.make_node("DequantizeLinear", ["xfq", "sx", "zx"], ["xfd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
        helper.make_node("Gemm", ["xfd", "wd", "b"], ["g"], transB=1, alpha=0.5, name="fc"),
        *_qdq("g", "y"),
    ]
    nodes = nodes[2:]  # the input goes straight to Reshape; xd is unused
    plan = lower(single_input_model(nodes, inits, [1, 3]))
    step = next(s for s in plan.integer_steps() if s.name == "fc")
    assert isinstance(step, P.GemmStep) and step.w.shape == (72, 3) and np.array_equal(step.w, w.T)
    s_acc = 0.5 * np.float64(np.float32(0.01)) * np.float64(np.float32(0.004))
    assert np.array_equal(step.bias, np.rint(np.array([0.1, -0.2, 0.3], np.float32) / s_acc).astype(np.int64))
    assert step.x_zp == 5 and step.requant.zero_point == 100
    result = validate(single_input_model(nodes, inits, [1, 3]), X)
    assert result.passed, "\n".join(result.summary_lines())


def test_gemm_refuses_weights_quantized_along_the_input_channels() -> None:
    nodes, inits = qdq_input()
    inits += [
        const("w", RNG.integers(-9, 9, (4, 2, 1, 1)).astype(np.int8)),
        const("sw", [0.01, 0.02], np.float32),
        const("zw", [0, 0], np.int8),
        const("sy", np.float32(0.05)),
        const("zy", np.uint8(0)),
    ]
    nodes += [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
        *_qdq("c", "y"),
    ]
    plan = lower(single_input_model(nodes, inits, [1, 4, 6, 6]))
    assert "per channel along axis 1, not the output channels" in _status(plan, "conv").reason


def test_add_with_constant_operand_and_relu() -> None:
    nodes, inits = qdq_input(scale=0.02, zp=3)
    inits += [
        const("c", np.full((1, 2, 1, 1), 40, np.uint8)),
        const("sc", np.float32(0.01)),
        const("zc", np.uint8(0)),
        const("sy", np.float32(0.03)),
        const("zy", np.uint8(20)),
    ]
    nodes += [
        helper.make_node("DequantizeLinear", ["c", "sc", "zc"], ["cd"]),
        helper.make_node("Add", ["xd", "cd"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        *_qdq("r", "y"),
    ]
    model = single_input_model(nodes, inits, [1, 2, 6, 6])
    step = next(s for s in lower(model).integer_steps() if s.name == "add")
    assert isinstance(step, P.AddStep) and step.nodes[:2] == ["add", "relu"]
    assert step.inputs == ["xq", "add::const1"] and np.array_equal(
        step.const["add::const1"], np.full((1, 2, 1, 1), 40)
    )
    assert (step.lo, step.hi) == (20, 255)  # Relu: codes below Q(0) = z_y are clipped
    result = validate(model, X)
    assert result.passed, "\n".join(result.summary_lines())


def test_pool_global_max_lowered_and_dilated_average_refused() -> None:
    nodes, inits = qdq_input(scale=0.02, zp=3)
    inits += [const("sy", np.float32(0.05)), const("zy", np.uint8(7))]
    nodes += [
        helper.make_node("GlobalMaxPool", ["xd"], ["g"], name="gmax"),
        *_qdq("g", "gd"),
        helper.make_node("AveragePool", ["gd"], ["y"], kernel_shape=[1, 1], dilations=[2, 2], name="avg"),
    ]
    model = single_input_model(nodes, inits, [1, 2, 1, 1], opset=19)
    plan = lower(model)
    step = next(s for s in plan.integer_steps() if s.name == "gmax")
    assert isinstance(step, P.PoolStep) and step.attrs == {} and step.out == (np.float32(0.05), 7)
    assert _status(plan, "avg").reason == "dilated AveragePool is not lowered"
    result = validate(model, X)
    assert result.passed, "\n".join(result.summary_lines())


def test_move_concat_requantizes_and_refuses_a_variable_shape() -> None:
    nodes, inits = qdq_input(scale=0.02, zp=3)
    inits += [
        const("s2", np.float32(0.04)),
        const("z2", np.uint8(9)),
        const("sy", np.float32(0.03)),
        const("zy", np.uint8(1)),
    ]
    nodes += [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        *_qdq("r", "rd", "s2", "z2"),
        helper.make_node("Concat", ["xd", "rd"], ["c"], axis=1, name="cat"),
        *_qdq("c", "cd"),
        helper.make_node("Shape", ["cd"], ["shp"], name="shape"),
        helper.make_node("Reshape", ["cd", "shp"], ["y"], name="reshape"),
    ]
    model = single_input_model(nodes, inits, [1, 4, 6, 6])
    plan = lower(model)
    step = next(s for s in plan.integer_steps() if s.name == "cat")
    assert isinstance(step, P.MoveStep) and step.attrs == {"axis": 1}
    assert step.srcs == [(np.float32(0.02), 3), (np.float32(0.04), 9)] and step.out == (np.float32(0.03), 1)
    assert _status(plan, "reshape").reason == "Reshape shape is not constant"
    result = validate(model, X)
    assert result.passed, "\n".join(result.summary_lines())

"""Canonicalization (onnxscript folding and fusions): one tiny model per rule, run before and after in ONNX
Runtime, plus the cases that must be left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant import api
from onnxquant.passes.canonicalize import canonicalize
from onnxquant.passes.plan import plan_quantization


def head(opset: int = 17) -> str:
    return f'<ir_version: {10 if opset >= 21 else 8}, opset_import: ["" : {opset}]>\n'


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def scalars(**values) -> dict[str, np.ndarray]:
    return {k: np.array(v, np.float32) for k, v in values.items()}


def canon(model: onnx.ModelProto, tools, scale: float = 3.0, applied: bool = True):
    """Canonicalize; check the input is not mutated, the result is valid, outputs agree, nodes are named."""
    before = model.SerializeToString()
    out, outcomes = canonicalize(model)
    assert model.SerializeToString() == before, "input model was mutated"
    assert all(o.pass_name == "canonicalize" and o.applied and o.reason for o in outcomes)
    if not applied:
        return out, outcomes
    assert out is not model and outcomes
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    names = [n.name for n in out.graph.node]
    assert all(names) and len(set(names)) == len(names)
    feeds = {k: (v * scale).astype(v.dtype) for k, v in tools.random_feeds(model).items()}
    for a, b in zip(tools.run(model, feeds), tools.run(out, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    return out, outcomes


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    (found,) = [n for n in model.graph.node if n.op_type == op]
    return found


CONV_ADD = """
    g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        s = Reshape (v, shape)
        y = Add (c, s)
    }"""


def test_conv_add_behind_reshape_folds_into_bias(tools):
    w = {"w": rand((4, 3, 3, 3), 1), "b": rand(4, 2), "v": rand(4, 3), "shape": np.array([1, 4, 1, 1])}
    model = tools.build(head() + CONV_ADD, w)
    out, outcomes = canon(model, tools)
    assert tools.op_types(out) == ["Conv"]
    conv = node(out, "Conv")
    np.testing.assert_allclose(init(out, conv.input[2]), w["b"] + w["v"], rtol=1e-6)
    assert conv.name == "Conv_0" and conv.output == ["y"]
    assert [o.reason for o in outcomes] == [
        "folded 1 constant or no-op nodes",
        "fused Add 'Add_2' (bias) into Conv 'Conv_0'",
    ]
    assert outcomes[1].nodes == ("Conv_0", "Add_2")


def test_conv_without_bias_constant_first(tools):
    text = """
    g (float[N, 2, 5, 5] x) => (float[N, 4, 3, 3] y) {
        c = Conv (x, w)
        y = Add (v, c)
    }"""
    w = {"w": rand((4, 2, 3, 3), 1), "v": rand((4, 1, 1), 2)}
    out, _ = canon(tools.build(head() + text, w), tools)
    assert tools.op_types(out) == ["Conv"]
    np.testing.assert_allclose(init(out, node(out, "Conv").input[2]), w["v"].reshape(4))


def test_convtranspose_grouped_add(tools):
    text = """
    g (float[N, 4, 5, 5] x) => (float[N, 6, 10, 10] y) {
        c = ConvTranspose <group = 2, strides = [2, 2]> (x, w)
        y = Add (c, v)
    }"""
    w = {"w": rand((4, 3, 2, 2), 1), "v": rand((1, 6, 1, 1), 2)}
    out, _ = canon(tools.build(head() + text, w), tools)
    assert tools.op_types(out) == ["ConvTranspose"]
    np.testing.assert_allclose(init(out, node(out, "ConvTranspose").input[2]), w["v"].reshape(6))


def test_gemm_add_with_beta(tools):
    text = """
    g (float[N, 5] x) => (float[N, 3] y) {
        c = Gemm <transB = 1, beta = 0.5> (x, w, b)
        y = Add (c, v)
    }"""
    w = {"w": rand((3, 5), 1), "b": rand(3, 2), "v": rand((1, 3), 3)}
    out, _ = canon(tools.build(head() + text, w), tools)
    gemm = node(out, "Gemm")
    assert tools.op_types(out) == ["Gemm"] and all(a.name != "beta" for a in gemm.attribute)
    np.testing.assert_allclose(init(out, gemm.input[2]), 0.5 * w["b"] + w["v"].reshape(3), rtol=1e-6)


def test_matmul_add_becomes_gemm_only_for_a_constant_bias(tools):
    text = """
    g (float[N, 5] x, float[N, 3] r) => (float[N, 3] y, float[N, 3] z) {
        m = MatMul (x, w)
        y = Add (m, v)
        n = MatMul (x, w2)
        z = Add (n, r)
    }"""
    model = tools.build(head() + text, {"w": rand((5, 3), 1), "v": rand(3, 2), "w2": rand((5, 3), 3)})
    out, _ = canon(model, tools)
    assert sorted(tools.op_types(out)) == ["Add", "Gemm", "MatMul"]  # the residual Add stays


def test_matmul_add_rank3_is_kept(tools):
    text = """
    g (float[N, 4, 5] x) => (float[N, 4, 3] y) {
        m = MatMul (x, w)
        y = Add (m, v)
    }"""
    model = tools.build(head() + text, {"w": rand((5, 3), 1), "v": rand(3, 2)})
    out, outcomes = canon(model, tools, applied=False)
    assert out is model and outcomes == []


HARDSWISH = """
    g (float[N, 3, 4] x) => (float[N, 3, 4] y) {
        t = Add (x, three)
        h = Clip (t, zero, six)
        m = Mul (x, h)
        y = Div (m, six)
    }"""
HS = scalars(three=3.0, zero=0.0, six=6.0)


def test_hardswish_add_clip_mul_div(tools):
    out, outcomes = canon(tools.build(head(14) + HARDSWISH, HS), tools)
    assert tools.op_types(out) == ["HardSwish"] and not out.graph.initializer
    assert outcomes[-1].reason == "fused Add/Clip/Mul/Div into HardSwish 'Div_3'"
    assert outcomes[-1].nodes == ("Add_0", "Clip_1", "Mul_2", "Div_3")


def test_hardswish_not_fused_when_a_constant_is_overridable(tools):
    text = HARDSWISH.replace("(float[N, 3, 4] x)", "(float[N, 3, 4] x, float six)")
    model = tools.build(head(14) + text, HS)
    out, outcomes = canonicalize(model)  # onnxscript's rule alone would fuse it
    assert out is model and outcomes == []


def test_hardswish_needs_opset_14(tools):
    out, _ = canon(tools.build(head(13) + HARDSWISH, HS), tools)
    assert "HardSwish" not in tools.op_types(out) and tools.op_types(out)[-1] == "Mul"  # Div → Mul only
    assert out.opset_import[0].version == 13


def test_hardswish_from_hardsigmoid(tools):
    text = """
    g (float[N, 8] x) => (float[N, 8] y) {
        h = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)
        y = Mul (h, x)
    }"""
    out, _ = canon(tools.build(head(14) + text, {}), tools)
    assert tools.op_types(out) == ["HardSwish"]


def test_hardswish_mul_by_sixth(tools):
    text = """
    g (float[N, 8] x) => (float[N, 8] y) {
        t = Add (three, x)
        h = Clip (t, zero, six)
        m = Mul (h, x)
        y = Mul (m, sixth)
    }"""
    out, _ = canon(tools.build(head(17) + text, {**HS, **scalars(sixth=1 / 6)}), tools)
    assert tools.op_types(out) == ["HardSwish"]


@pytest.mark.parametrize(
    "body,values",
    [
        ("t = Add (x, three)\n c = Clip (t, zero, six)\n y = Div (c, six)", HS),
        ("m = Mul (x, a)\n t = Add (m, half)\n y = Clip (t, zero, one)", scalars(a=1 / 6, half=0.5)),
        ("m = Div (x, six)\n t = Add (half, m)\n y = Clip (t, zero, one)", scalars(six=6.0, half=0.5)),
        ("m = Mul (x, a)\n t = Add (m, b)\n y = Clip (t, zero, one)", scalars(a=0.2, b=0.4)),
    ],
    ids=["div-clip", "clip-affine", "clip-div-affine", "clip-affine-0.2"],
)
def test_hardsigmoid(tools, body, values):
    text = f"g (float[N, 8] x) => (float[N, 8] y) {{\n {body}\n}}"
    values = {**values, **scalars(zero=0.0, one=1.0)}
    used = {k: v for k, v in values.items() if k in body}
    out, _ = canon(tools.build(head(13) + text, used), tools)
    assert tools.op_types(out) == ["HardSigmoid"]
    alpha = next(a.f for a in out.graph.node[0].attribute if a.name == "alpha")
    assert alpha == pytest.approx(values.get("a", 1 / 6), rel=1e-6)


def test_div_by_constant_becomes_mul(tools):
    text = """
    g (float[N, 4] x, int64[N, 4] i) => (float[N, 4] y, float[N, 4] z, int64[N, 4] k) {
        y = Div (x, d)
        z = Div (x, dz)
        k = Div (i, di)
    }"""
    w = {"d": np.array([2.0, -4.0, 0.5, 3.0], np.float32), "dz": np.array([1.0, 0.0, 2.0, 3.0], np.float32)}
    model = tools.build(head() + text, {**w, "di": np.array(3, np.int64)})
    out, outcomes = canon(model, tools)
    assert tools.op_types(out) == ["Mul", "Div", "Div"]  # a zero divisor and an integer Div are kept
    np.testing.assert_allclose(init(out, node(out, "Mul").input[1]), 1 / w["d"])
    assert outcomes[0].reason == "replaced Div 'Div_0' by a constant with a Mul by its reciprocal"


ERF_GELU = """
    g (float[N, 16] x) => (float[N, 16] y) {
        d = Div (x, root2)
        e = Erf (d)
        p = Add (e, one)
        m = Mul (x, p)
        y = Mul (m, half)
    }"""
GELU = scalars(root2=np.sqrt(2.0), one=1.0, half=0.5)


def test_erf_gelu_at_opset_20(tools):
    out, outcomes = canon(tools.build(head(20) + ERF_GELU, GELU), tools)
    assert tools.op_types(out) == ["Gelu"]
    assert outcomes[-1].reason == "fused Div/Erf/Add/Mul/Mul into Gelu 'Mul_4'"


def test_erf_gelu_half_first_with_mul_by_inverse_root(tools):
    text = """
    g (float[N, 16] x) => (float[N, 16] y) {
        h = Mul (half, x)
        d = Mul (x, inv)
        e = Erf (d)
        p = Add (one, e)
        y = Mul (h, p)
    }"""
    out, _ = canon(tools.build(head(20) + text, {**GELU, **scalars(inv=1 / np.sqrt(2.0))}), tools)
    assert tools.op_types(out) == ["Gelu"]


def test_erf_gelu_kept_below_opset_20(tools):
    out, _ = canon(tools.build(head(17) + ERF_GELU, GELU), tools)
    assert "Gelu" not in tools.op_types(out) and "Erf" in tools.op_types(out)


def test_shape_arithmetic_folds(tools):
    text = """
    g (float[2, 3, 4] x) => (float[2, 12] y) {
        s = Shape (x)
        i = Gather <axis = 0> (s, zero)
        u = Unsqueeze (i, axes)
        shape = Concat <axis = 0> (u, minus1)
        f = Cast <to = 1> (v)
        r = Reshape (x, shape)
        y = Add (r, f)
    }"""
    w = {
        "zero": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
        "v": np.arange(12, dtype=np.float64),
    }
    out, outcomes = canon(tools.build(head() + text, w), tools)
    assert tools.op_types(out) == ["Reshape", "Add"]
    assert outcomes[0].reason == "folded 5 constant or no-op nodes"
    assert init(out, node(out, "Add").input[1]).dtype == np.float32


def test_nothing_to_do_returns_the_same_object(tools):
    text = """
    g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }"""
    model = tools.build(head() + text, {"w": rand((4, 3, 3, 3)), "b": rand(4)})
    out, outcomes = canonicalize(model)
    assert out is model and outcomes == []


def test_spatially_varying_add_is_not_fused(tools):
    text = """
    g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Add (c, v)
    }"""
    for shape in [(1, 4, 6, 6), (1, 1, 6, 1), (6,)]:
        model = tools.build(head() + text, {"w": rand((4, 3, 3, 3)), "b": rand(4), "v": rand(shape)})
        out, outcomes = canonicalize(model)
        assert out is model and outcomes == [], shape


@pytest.mark.parametrize("case", ["graph_output", "second_consumer", "overridable"])
def test_conv_add_not_fused_when_conv_output_is_used_or_constant_overridable(tools, case):
    outputs = "float[N, 4, 6, 6] y" + (", float[N, 4, 6, 6] c" if case == "graph_output" else "")
    inputs = "float[N, 3, 6, 6] x" + (", float[1, 4, 1, 1] v" if case == "overridable" else "")
    add = (
        "y0 = Add (c, v)\n z = Relu (c)\n y = Add (y0, z)" if case == "second_consumer" else "y = Add (c, v)"
    )
    text = f"""
    g ({inputs}) => ({outputs}) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        {add}
    }}"""
    model = tools.build(head() + text, {"w": rand((4, 3, 3, 3)), "v": rand((1, 4, 1, 1))})
    out, outcomes = canonicalize(model)
    assert out is model and outcomes == []


def test_unnamed_nodes_and_stale_value_info(tools):
    model = tools.build(
        head() + CONV_ADD, {"w": rand((4, 3, 3, 3)), "b": rand(4), "v": rand(4), "shape": [1, 4, 1, 1]}
    )
    for n in model.graph.node:
        n.name = ""
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    out, outcomes = canon(model, tools)
    assert [n.name for n in out.graph.node] == ["Conv_0"] and not out.graph.value_info
    assert outcomes[1].nodes == ("Conv_0", "Add_2")


def test_constant_nodes_as_operands(tools):
    """PyTorch writes scalar operands as Constant nodes; they match like initializers and are then dropped."""
    text = """
    g (float[N, 16] x) => (float[N, 16] y) {
        root2 = Constant <value = float {1.4142135}> ()
        one = Constant <value = float {1.0}> ()
        half = Constant <value = float {0.5}> ()
        d = Div (x, root2)
        e = Erf (d)
        p = Add (e, one)
        m = Mul (x, p)
        y = Mul (m, half)
    }"""
    out, outcomes = canon(tools.build(head(20) + text, {}), tools)
    assert tools.op_types(out) == ["Gelu"] and outcomes[0].nodes[0] == "Div_3"


def test_library_failure_returns_the_model_with_a_refusal(tools, monkeypatch):
    import onnxquant.passes.canonicalize as module

    def broken(opset):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(module, "_rules", broken)
    model = tools.build(head() + HARDSWISH, HS)
    out, outcomes = canonicalize(model)
    assert out is model and [(o.applied, o.reason) for o in outcomes] == [
        (False, "skipped: onnxscript failed (RuntimeError: boom)")
    ]


def test_no_ops_are_removed_but_graph_outputs_kept(tools):
    text = """
    g (float[N, 4] x) => (float[N, 4] y, float[N, 4] b) {
        a = Add (x, zero)
        b = Mul (one, a)
        c = Dropout (b)
        y = Relu (c)
    }"""
    out, outcomes = canon(tools.build(head() + text, scalars(zero=0.0, one=1.0)), tools)
    assert tools.op_types(out) == ["Identity", "Relu"] and node(out, "Relu").input == ["x"]
    assert "removed no-op Add 'Add_0'" in [o.reason for o in outcomes]


def test_new_bias_name_avoids_existing_tensor_names(tools):
    text = """
    g (float[N, 2, 5, 5] x) => (float[N, 4, 3, 3] y) {
        c = Conv (x, w)
        a = Add (c, v)
        Conv_0_bias = Relu (a)
        y = Sigmoid (Conv_0_bias)
    }"""
    out, _ = canon(tools.build(head() + text, {"w": rand((4, 2, 3, 3)), "v": rand((4, 1, 1))}), tools)
    assert node(out, "Conv").input[2] == "Conv_0_bias_1"


CAFFE_BN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
  s = Sub (c, mean)
  m = Mul (s, scale)
  a = Add (m, shift)
  y = Relu (a)
}
"""


def test_a_batchnorm_written_as_sub_mul_add_folds_into_the_conv(tools):
    rng = np.random.default_rng(0)
    model = tools.build(
        CAFFE_BN,
        {
            "w": rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32),
            "b": rng.normal(0, 1, 4).astype(np.float32),
            "mean": rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32),
            "scale": rng.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32),
            "shift": rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32),
        },
    )
    out, outcomes = canonicalize(model)
    tools.assert_equivalent(model, out)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    assert any("(scale) into Conv" in o.reason for o in outcomes)


TF_BLOCK = """
    g (float[N, 6, 6, 3] x) => (float[N, 6, 6, 4] y) {
        t0 = Transpose <perm = [0, 3, 1, 2]> (x)
        c = Conv <pads = [1, 1, 1, 1]> (t0, w)
        t1 = Transpose <perm = [0, 2, 3, 1]> (c)
        a = Add (t1, b)
        s = Sub (a, mean)
        m = Mul (s, scale)
        r = Relu (m)
        t2 = Transpose <perm = [0, 3, 1, 2]> (r)
        c2 = Conv (t2, w2)
        t3 = Transpose <perm = [0, 2, 3, 1]> (c2)
        z = Clip (t3, lo, hi)
        y = Add (z, r)
    }"""


def test_tensorflow_layout_transposes_cancel_and_the_affine_folds_into_the_conv(tools):
    """A tf2onnx-style block (NHWC around each Conv, bias and BatchNorm affine in NHWC, a residual read of the
    activation): the Transposes travel below the element-wise ops, inverse pairs cancel, and the affine then
    folds into the Conv."""
    weights = {
        "w": rand((4, 3, 3, 3), 1),
        "b": rand(4, 2),
        "mean": rand((1, 1, 4), 3),  # rank 3 against the rank-4 Transpose: padded, then permuted
        "scale": np.abs(rand(4, 4)) + 0.5,
        "w2": rand((4, 4, 1, 1), 5),
        **scalars(lo=-1.0, hi=2.0),
    }
    model = tools.build(head() + TF_BLOCK, weights)
    out, outcomes = canon(model, tools)
    assert tools.op_types(out) == ["Transpose", "Conv", "Relu", "Conv", "Clip", "Add", "Transpose"]
    moved = next(o for o in outcomes if "Transposes" in o.reason)
    assert moved.reason.endswith(": 4 → 2 Transposes")
    assert {"Transpose_2", "Add_3", "Relu_6", "Clip_10"} <= set(moved.nodes)
    assert any(o.reason == "fused Mul 'Mul_5' (scale) into Conv 'Conv_1'" for o in outcomes)
    plan = plan_quantization(out, api.load_rules("default"))  # the moved tensors keep their float type
    assert [d.quantize for d in plan.nodes if d.op_type == "Conv"] == [True, True]


def test_transpose_stops_at_a_non_elementwise_op_and_constants_are_permuted(tools):
    """Constant-first Sub and Div, a constant varying along two axes, and a MatMul that ends the travel: the
    one Transpose moves below the element-wise ops and stays one."""
    text = (
        head()
        + """
    g (float[N, 3, 5] x) => (float[N, 5, 2] y) {
        t = Transpose <perm = [0, 2, 1]> (x)
        a = Sub (c1, t)
        d = Div (a, c2)
        s = Sigmoid (d)
        y = MatMul (s, w)
    }"""
    )
    weights = {"c1": rand((5, 3), 1), "c2": np.abs(rand((1, 3), 2)) + 0.5, "w": rand((3, 2), 3)}
    model = tools.build(text, weights)
    out, _ = canon(model, tools)
    assert tools.op_types(out) == ["Sub", "Mul", "Sigmoid", "Transpose", "MatMul"]


def test_a_transpose_read_twice_by_non_elementwise_ops_stays_one_transpose(tools):
    text = (
        head()
        + """
    g (float[N, 3, 4] x) => (float[N, 4, 2] y, float[N, 4, 3] z) {
        t = Transpose <perm = [0, 2, 1]> (x)
        y = MatMul (t, w)
        z = Softmax <axis = -1> (t)
    }"""
    )
    model = tools.build(text, {"w": rand((3, 2), 1)})
    out, outcomes = canonicalize(model)
    assert out is model and outcomes == []


def test_a_transpose_pair_around_an_activation_with_attributes_cancels(tools):
    text = (
        head()
        + """
    g (float[N, 3, 5] x) => (float[N, 3, 5] y) {
        t = Transpose <perm = [0, 2, 1]> (x)
        a = LeakyRelu <alpha = 0.2> (t)
        c = Clip (a, lo)
        y = Transpose <perm = [0, 2, 1]> (c)
    }"""
    )
    model = tools.build(text, scalars(lo=-0.1))
    out, _ = canon(model, tools)
    assert tools.op_types(out) == ["LeakyRelu", "Clip"]
    assert node(out, "LeakyRelu").attribute[0].f == np.float32(0.2)

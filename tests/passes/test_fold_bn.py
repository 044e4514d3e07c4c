"""BN folding passes, each checked by running the original and folded graphs in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxquant.passes import run_passes

FOLDS = ["fold_conv_bn", "fold_convtranspose_bn", "fold_gemm_bn", "fold_bn_conv"]


def head(opset: int = 13) -> str:
    return f'<ir_version: {10 if opset >= 21 else 8}, opset_import: ["" : {opset}]>\n'


def rand(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).normal(0, 0.5, shape).astype(dtype)


def fold(model, names=FOLDS):
    before = model.SerializeToString()
    folded, outcomes = run_passes(model, names)
    assert model.SerializeToString() == before, "input model was mutated"
    return folded, outcomes


def conv_bn(tools, group=1, bias=True, opset=13, cin=4, cout=4, dtype=np.float32, elem="float"):
    b = ", b" if bias else ""
    text = (
        head(opset)
        + f"""
    g ({elem}[N, {cin}, 7, 7] x) => ({elem}[N, {cout}, 7, 7] y) {{
        c = Conv <group = {group}, pads = [1, 1, 1, 1]> (x, w{b})
        y = BatchNormalization <epsilon = 0.001> (c, bn_g, bn_b, bn_m, bn_v)
    }}"""
    )
    weights = {"w": rand((cout, cin // group, 3, 3), 1, dtype), **tools.bn_weights("bn", cout, 2, dtype)}
    if bias:
        weights["b"] = rand((cout,), 3, dtype)
    return tools.build(text, weights)


@pytest.mark.parametrize("opset", [11, 13, 21])
@pytest.mark.parametrize("group,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4)], ids=["dense", "group2", "dw"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_bn(tools, opset, group, cin, cout, bias):
    model = conv_bn(tools, group, bias, opset, cin, cout)
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["Conv"]
    assert [o.applied for o in outcomes] == [True] and outcomes[0].nodes == ("BatchNormalization_1", "Conv_0")
    assert len(folded.graph.node[0].input) == 3  # a bias was added when missing
    assert folded.opset_import == model.opset_import and folded.ir_version == model.ir_version
    tools.assert_equivalent(model, folded)


def test_dynamic_batch_preserved(tools):
    model = conv_bn(tools)
    folded, _ = fold(model)
    for vi in (folded.graph.input[0], folded.graph.output[0]):
        assert vi.type.tensor_type.shape.dim[0].dim_param == "N"
    tools.assert_equivalent(model, folded, batch=1)
    tools.assert_equivalent(model, folded, batch=3)


def test_float16_weights_keep_dtype(tools):
    model = conv_bn(tools, dtype=np.float16, elem="float16")
    folded, outcomes = fold(model)
    assert outcomes[0].applied
    assert {t.data_type for t in folded.graph.initializer} == {onnx.TensorProto.FLOAT16}
    tools.assert_equivalent(model, folded, tol=1e-2)


def test_conv_bn_bn_chain(tools):
    text = (
        head()
        + """
    g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        z = BatchNormalization (c, a_g, a_b, a_m, a_v)
        y = BatchNormalization (z, b_g, b_b, b_m, b_v)
    }"""
    )
    model = tools.build(
        text, {"w": rand((4, 3, 3, 3), 1), **tools.bn_weights("a", 4, 2), **tools.bn_weights("b", 4, 3)}
    )
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["Conv"] and all(o.applied for o in outcomes) and len(outcomes) == 2
    tools.assert_equivalent(model, folded)


@pytest.mark.parametrize("group", [1, 2])
def test_convtranspose_bn(tools, group):
    text = (
        head()
        + f"""
    g (float[N, 4, 5, 5] x) => (float[N, 6, 11, 11] y) {{
        c = ConvTranspose <group = {group}, strides = [2, 2]> (x, w, b)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }}"""
    )
    model = tools.build(
        text, {"w": rand((4, 6 // group, 3, 3), 1), "b": rand((6,), 2), **tools.bn_weights("bn", 6, 3)}
    )
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["ConvTranspose"] and outcomes[0].pass_name == "fold_convtranspose_bn"
    tools.assert_equivalent(model, folded)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn(tools, trans_b):
    text = (
        head()
        + f"""
    g (float[N, 8] x) => (float[N, 6] y) {{
        c = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> (x, w, b)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }}"""
    )
    w = rand((6, 8) if trans_b else (8, 6), 1)
    model = tools.build(text, {"w": w, "b": rand((6,), 2), **tools.bn_weights("bn", 6, 3)})
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["Gemm"] and outcomes[0].applied
    tools.assert_equivalent(model, folded)


def test_gemm_without_c(tools):
    text = (
        head()
        + """
    g (float[N, 8] x) => (float[N, 6] y) {
        c = Gemm <transA = 1> (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    text = text.replace("float[N, 8] x", "float[8, N] x")
    model = tools.build(text, {"w": rand((8, 6), 1), **tools.bn_weights("bn", 6, 3)})
    folded, _ = fold(model)
    assert tools.op_types(folded) == ["Gemm"]
    tools.assert_equivalent(model, folded)


def test_matmul_2d_bn(tools):
    text = (
        head()
        + """
    g (float[N, 8] x) => (float[N, 6] y) {
        c = MatMul (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    model = tools.build(text, {"w": rand((8, 6), 1), **tools.bn_weights("bn", 6, 3)})
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["MatMul", "Add"] and outcomes[0].applied
    tools.assert_equivalent(model, folded)


def test_matmul_3d_output_refused(tools):
    text = (
        head()
        + """
    g (float[N, 5, 8] x) => (float[N, 5, 6] y) {
        c = MatMul (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    model = tools.build(text, {"w": rand((8, 6), 1), **tools.bn_weights("bn", 5, 3)})
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["MatMul", "BatchNormalization"]
    [refusal] = [o for o in outcomes if o.pass_name == "fold_gemm_bn"]
    assert not refusal.applied and "3-D" in refusal.reason and "feature axis" in refusal.reason
    tools.assert_equivalent(model, folded)


def bn_conv(tools, pads: int, zero_shift: bool = False, group: int = 1, auto_pad: str = ""):
    pad_attr = f'auto_pad = "{auto_pad}"' if auto_pad else f"pads = [{pads}, {pads}, {pads}, {pads}]"
    out = 7 if pads or auto_pad else 5
    text = (
        head()
        + f"""
    g (float[N, 4, 7, 7] x) => (float[N, 6, {out}, {out}] y) {{
        z = BatchNormalization (x, bn_g, bn_b, bn_m, bn_v)
        y = Conv <group = {group}, {pad_attr}> (z, w, b)
    }}"""
    )
    weights = {
        "w": rand((6, 4 // group, 3, 3), 1),
        "b": rand((6,), 2),
        **tools.bn_weights("bn", 4, 3, zero_shift=zero_shift),
    }
    return tools.build(text, weights)


@pytest.mark.parametrize("group", [1, 2])
def test_bn_conv_without_padding(tools, group):
    model = bn_conv(tools, pads=0, group=group)
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["Conv"]
    assert [(o.pass_name, o.applied) for o in outcomes] == [("fold_bn_conv", True)]
    tools.assert_equivalent(model, folded)


@pytest.mark.parametrize("auto_pad", ["", "SAME_UPPER"])
def test_bn_conv_with_padding_refused(tools, auto_pad):
    model = bn_conv(tools, pads=1, auto_pad=auto_pad)
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["BatchNormalization", "Conv"]
    [refusal] = outcomes
    assert refusal.pass_name == "fold_bn_conv" and not refusal.applied and "padding" in refusal.reason
    tools.assert_equivalent(model, folded)


def test_bn_conv_with_padding_and_zero_shift(tools):
    model = bn_conv(tools, pads=1, zero_shift=True)
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == ["Conv"] and outcomes[0].applied
    tools.assert_equivalent(model, folded)


def test_conv_output_with_second_consumer_refused(tools):
    text = (
        head()
        + """
    g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] r) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
        r = Relu (c)
    }"""
    )
    model = tools.build(text, {"w": rand((4, 3, 3, 3), 1), **tools.bn_weights("bn", 4, 2)})
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == tools.op_types(model)
    [refusal] = outcomes
    assert not refusal.applied and refusal.reason == "Conv output 'c' has 2 consumers"
    tools.assert_equivalent(model, folded)


def test_conv_output_that_is_graph_output_refused(tools):
    text = (
        head()
        + """
    g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] c) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    model = tools.build(text, {"w": rand((4, 3, 3, 3), 1), **tools.bn_weights("bn", 4, 2)})
    folded, outcomes = fold(model)
    assert "graph output" in outcomes[0].reason and not outcomes[0].applied
    tools.assert_equivalent(model, folded)


def test_shared_conv_weight_refused(tools):
    text = (
        head()
        + """
    g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] y2) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
        c2 = Conv <pads = [1, 1, 1, 1]> (x, w)
        y2 = BatchNormalization (c2, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    model = tools.build(text, {"w": rand((4, 4, 3, 3), 1), **tools.bn_weights("bn", 4, 2)})
    folded, outcomes = fold(model)
    assert tools.op_types(folded) == tools.op_types(model)
    conv_refusals = [o for o in outcomes if o.pass_name == "fold_conv_bn"]
    assert len(conv_refusals) == 2
    assert all(not o.applied and "'w' is shared" in o.reason for o in conv_refusals)
    tools.assert_equivalent(model, folded)


def test_bn_params_not_constant_refused(tools):
    text = (
        head()
        + """
    g (float[N, 3, 5, 5] x, float[4] gamma) => (float[N, 4, 5, 5] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, gamma, bn_b, bn_m, bn_v)
    }"""
    )
    weights = tools.bn_weights("bn", 4, 2)
    del weights["bn_g"]
    model = tools.build(text, {"w": rand((4, 3, 3, 3), 1), **weights})
    folded, outcomes = fold(model, FOLDS + ["bn_to_affine"])
    assert tools.op_types(folded) == ["Conv", "BatchNormalization"]
    assert {o.reason for o in outcomes} == {"BN scale 'gamma' is not a constant initializer"}


def test_conv_output_read_inside_subgraph_refused(tools):
    text = (
        head()
        + """
    g (float[N, 3, 5, 5] x, bool cond) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] o) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    model = onnx.parser.parse_model(text)
    out = onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)
    branches = [
        onnx.helper.make_graph([onnx.helper.make_node("Identity", ["c"], ["t"])], b, [], [out])
        for b in ("then", "else")
    ]
    model.graph.node.append(
        onnx.helper.make_node(
            "If", ["cond"], ["o"], name="if", then_branch=branches[0], else_branch=branches[1]
        )
    )
    model = tools.build(
        onnx.printer.to_text(model), {"w": rand((4, 3, 3, 3), 1), **tools.bn_weights("bn", 4, 2)}
    )
    folded, outcomes = fold(model)
    assert [o.reason for o in outcomes] == ["Conv output 'c' has 3 consumers"]  # BN and each branch's reader
    assert tools.op_types(folded) == tools.op_types(model)


def test_initializer_that_is_also_an_input_refused(tools):
    model = conv_bn(tools)
    model.graph.input.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4, 3, 3]))
    _, outcomes = fold(model)
    assert not outcomes[0].applied and "also a graph input" in outcomes[0].reason

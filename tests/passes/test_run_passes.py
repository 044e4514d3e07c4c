"""The pass driver: registry, unknown names, dry runs, reasons for BNs left alone, bn_to_affine."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxquant.errors import BadRulesError
from onnxquant.model import infer_shapes
from onnxquant.passes import PASS_NAMES, PASSES, UNFOLDED, run_passes

HEAD = '<ir_version: 8, opset_import: ["" : 13]>\n'

RELU_BN = (
    HEAD
    + """
g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    r = Relu (c)
    z = BatchNormalization (r, bn_g, bn_b, bn_m, bn_v)
    y = Relu (z)
}"""
)


def relu_bn(tools):
    w = np.random.default_rng(1).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    return tools.build(RELU_BN, {"w": w, **tools.bn_weights("bn", 4, 2)})


def test_registry():
    assert PASS_NAMES == (
        "canonicalize",
        "fold_conv_bn",
        "fold_convtranspose_bn",
        "fold_gemm_bn",
        "fold_bn_conv",
        "bn_to_affine",
        "equalize_layers",
    )
    assert all(p.description for p in PASSES)


def test_unknown_pass_name(tools):
    with pytest.raises(
        BadRulesError, match=r"'fold_everything'.*accepted: canonicalize, fold_conv_bn, .*affine"
    ):
        run_passes(relu_bn(tools), ["fold_conv_bn", "fold_everything"])


def test_bn_after_relu_not_foldable(tools):
    model = relu_bn(tools)
    folded, outcomes = run_passes(model, [n for n in PASS_NAMES if n != "bn_to_affine"])
    assert tools.op_types(folded) == tools.op_types(model)
    [o] = outcomes
    assert o.pass_name == UNFOLDED and not o.applied and o.nodes == ("BatchNormalization_2",)
    assert o.reason.startswith("BN after Relu: ") and "enable bn_to_affine" in o.reason
    tools.assert_equivalent(model, folded)


def test_bn_to_affine_lowers_bn_after_relu(tools):
    model = relu_bn(tools)
    folded, outcomes = run_passes(model, PASS_NAMES)
    assert tools.op_types(folded) == ["Conv", "Relu", "Mul", "Add", "Relu"]
    assert [(o.pass_name, o.applied) for o in outcomes] == [("bn_to_affine", True)]
    scale = next(t for t in folded.graph.initializer if t.name.endswith("_scale"))
    assert list(scale.dims) == [4, 1, 1]
    assert any(v.name == "z_scaled" for v in folded.graph.value_info)
    tools.assert_equivalent(model, folded)


def test_bn_to_affine_on_2d_input(tools):
    text = (
        HEAD
        + """
    g (float[N, 6] x) => (float[N, 6] y) {
        r = Relu (x)
        y = BatchNormalization (r, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    model = tools.build(text, tools.bn_weights("bn", 6, 2))
    folded, _ = run_passes(model, ["bn_to_affine"])
    assert tools.op_types(folded) == ["Relu", "Mul", "Add"]
    tools.assert_equivalent(model, folded)


def test_bn_to_affine_after_refused_fold(tools):
    text = (
        HEAD
        + """
    g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] r) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
        r = Relu (c)
    }"""
    )
    w = np.random.default_rng(1).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    model = tools.build(text, {"w": w, **tools.bn_weights("bn", 4, 2)})
    folded, outcomes = run_passes(model, ["fold_conv_bn", "bn_to_affine"])
    assert [(o.pass_name, o.applied) for o in outcomes] == [("fold_conv_bn", False), ("bn_to_affine", True)]
    assert "BatchNormalization" not in tools.op_types(folded)
    tools.assert_equivalent(model, folded)


def test_disabled_pass_is_named(tools):
    text = (
        HEAD
        + """
    g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    w = np.zeros((4, 3, 3, 3), np.float32)
    model = tools.build(text, {"w": w, **tools.bn_weights("bn", 4, 2)})
    _, outcomes = run_passes(model, ["fold_gemm_bn"])
    assert [o.reason for o in outcomes] == ["BN after Conv: fold_conv_bn is not enabled"]


def test_dry_run_reports_without_rewriting(tools):
    model = relu_bn(tools)
    before = model.SerializeToString()
    same, dry = run_passes(model, PASS_NAMES, dry_run=True)
    assert same is model and model.SerializeToString() == before
    _, real = run_passes(model, PASS_NAMES)
    assert dry == real


def test_training_mode_bn_refused(tools):
    text = (
        HEAD.replace("13", "15")
        + """
    g (float[N, 4] x) => (float[N, 4] y) {
        y, rm, rv = BatchNormalization <training_mode = 1> (x, bn_g, bn_b, bn_m, bn_v)
    }"""
    )
    model = tools.build(text, tools.bn_weights("bn", 4, 2))
    folded, outcomes = run_passes(model, ["bn_to_affine"])
    assert [o.reason for o in outcomes] == ["BN is in training mode (training_mode=1)"]
    assert tools.op_types(folded) == ["BatchNormalization"]


def test_metadata_and_value_info_kept(tools):
    text = (
        HEAD
        + """
    g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        z = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
        y = Relu (z)
    }"""
    )
    w = np.random.default_rng(1).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    model = infer_shapes(tools.build(text, {"w": w, **tools.bn_weights("bn", 4, 2)}))
    model.producer_name, model.doc_string = "pytorch", "a doc"
    onnx.helper.set_model_props(model, {"author": "me"})
    assert {v.name for v in model.graph.value_info} == {"c", "z"}
    folded, _ = run_passes(model, ["fold_conv_bn"])
    assert (folded.producer_name, folded.doc_string) == ("pytorch", "a doc")
    assert [(p.key, p.value) for p in folded.metadata_props] == [("author", "me")]
    assert [v.name for v in folded.graph.value_info] == ["z"]
    assert {t.name for t in folded.graph.initializer} == {"w", "Conv_0_bias"}
    tools.assert_equivalent(model, folded)


def test_node_naming_never_renames_a_uniquely_named_user_node(tools):
    text = (
        HEAD
        + """
    g (float[N, 4] x) => (float[N, 4] y) {
        r = Relu (x)
        z = BatchNormalization (r, bn_g, bn_b, bn_m, bn_v)
        y = Relu (z)
    }"""
    )
    model = tools.build(text, tools.bn_weights("bn", 4, 2))
    model.graph.node[2].name = "Relu_0"  # the name the unnamed first Relu would get by default
    folded, outcomes = run_passes(model, ["bn_to_affine"])
    assert [n.name for n in folded.graph.node] == [
        "Relu_0_1",
        "BatchNormalization_1_mul",
        "BatchNormalization_1_add",
        "Relu_0",
    ]
    assert outcomes[0].nodes == ("BatchNormalization_1",)
    tools.assert_equivalent(model, folded)

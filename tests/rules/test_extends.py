"""Rule files extend a preset: partial files change only what they say, overrides append, cycles refused."""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant import api
from onnxquant.errors import BadRulesError
from onnxquant.rules import dump_rules

DEFAULT_PASSES = ("canonicalize", "fold_conv_bn", "fold_convtranspose_bn", "fold_gemm_bn", "fold_bn_conv")


def write(path, text):
    path.write_text(text)
    return path


def test_a_file_of_overrides_alone_keeps_the_default_preset(tmp_path):
    rules = api.load_rules(write(tmp_path / "r.yaml", "overrides: [{match: {op_type: Gemm}, skip: true}]"))
    default = api.load_rules("default")
    assert rules.passes == DEFAULT_PASSES == default.passes
    assert rules.quantize_ops == default.quantize_ops and "GlobalAveragePool" in rules.quantize_ops
    assert (rules.weights, rules.activations, rules.placement) == (
        default.weights,
        default.activations,
        default.placement,
    )
    assert rules.depthwise_inputs == "per_channel" and len(rules.overrides) == 1
    assert not rules.for_node("fc", "Gemm", frozenset()).quantize


def test_extends_a_preset_with_fields_replaced_one_by_one(tmp_path):
    rules = api.load_rules(write(tmp_path / "r.yaml", "extends: tensorrt\nactivations: {bits: 4}"))
    assert (rules.placement, rules.activations.bits, rules.activations.symmetric) == ("tensorrt", 4, True)
    assert rules.activations.method == "kl" and rules.passes == DEFAULT_PASSES


def test_the_tensorrt_preset_is_the_default_with_its_differences():
    trt = api.load_rules("tensorrt")
    assert trt.placement == "tensorrt" and trt.quantize_ops == (
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Add",
    )
    assert (trt.activations.bits, trt.activations.symmetric, trt.activations.method) == (8, True, "kl")
    assert (trt.weights.bits, trt.weights.granularity, trt.weights.method) == (8, "per_channel", "minmax")
    assert trt.passes == DEFAULT_PASSES and trt.depthwise_inputs == "per_channel" and trt.overrides == ()


def test_extends_a_file_relative_to_it_and_overrides_append(tmp_path):
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "sub" / "base.yaml",
        "extends: tensorrt\noverrides: [{match: {name: a}, weights: {bits: 4}}]",
    )
    child = write(
        tmp_path / "child.yaml",
        "extends: sub/base.yaml\nweights: {bits: 6}\noverrides: [{match: {name: a}, weights: {bits: 5}}]",
    )
    rules = api.load_rules(child)
    assert rules.placement == "tensorrt" and rules.weights.bits == 6
    assert [ov.weights for ov in rules.overrides] == [{"bits": 4}, {"bits": 5}]
    assert rules.for_node("a", "Conv", frozenset()).weights.bits == 5  # the file's own override wins
    assert rules.for_node("b", "Conv", frozenset()).weights.bits == 6
    assert "base.yaml override 1" in rules.overrides[0].describe(0, rules.source)


def test_an_extends_cycle_names_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: b.yaml")
    write(tmp_path / "b.yaml", "extends: a.yaml")
    with pytest.raises(BadRulesError) as err:
        api.load_rules(a)
    message = str(err.value)
    assert "key 'extends' makes a cycle" in message and "a.yaml -> " in message and "b.yaml -> " in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("extends: nowhere.yaml", "key 'extends' is 'nowhere.yaml': no such file"),
        ("extends: [default]", "key 'extends' is ['default']; accepted: default, tensorrt, integer, none"),
    ],
)
def test_a_bad_extends_is_one_line(tmp_path, text, expected):
    with pytest.raises(BadRulesError, match=re.escape(expected)):
        api.load_rules(write(tmp_path / "r.yaml", text))


def test_dumped_rules_read_back_the_same_whatever_the_presets_hold(tmp_path):
    rules = api.load_rules(
        write(tmp_path / "r.yaml", "extends: tensorrt\noverrides: [{match: {position: first}, skip: true}]")
    )
    text = dump_rules(rules)
    assert text.startswith("extends: none\n")
    assert api.parse_rules(text, "again.yaml") == rules.__class__(
        **{**rules.__dict__, "source": "again.yaml"}
    )


def test_per_channel_activations_in_an_override_are_refused(tmp_path):
    path = write(
        tmp_path / "r.yaml", "overrides: [{match: {name: c}, activations: {granularity: per_channel}}]"
    )
    with pytest.raises(BadRulesError) as err:
        api.load_rules(path)
    assert str(err.value) == (
        f"{path}: key 'overrides[0].activations.granularity' is 'per_channel'; accepted: per_tensor "
        "(per-channel activation ranges: --bit-alloc activations, or depthwise_inputs: per_channel)"
    )


def tiny_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3] x) => (float[N, 2] y) { y = Gemm <transB = 1> (x, w, b) }"""
    )
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((2, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(2, np.float32), "b"),
        ]
    )
    model.graph.node[0].name = "fc"
    return model


def test_an_override_matching_no_node_is_a_warning_naming_it(tmp_path, caplog):
    path = write(
        tmp_path / "r.yaml",
        "overrides: [{match: {name: 'haed*'}, skip: true}, {match: {op_type: Gemm}, weights: {bits: 4}}]",
    )
    x = np.random.default_rng(1).standard_normal((16, 3)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="onnxquant"):
        result = api.convert(tiny_model(), path, data={"x": x}, method="minmax")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{path} override 1 (name 'haed*') matches no node of the model" in warnings
    assert not any("override 2" in w for w in warnings)
    assert result.summary.weights[4] == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxquant"):
        api.inspect(tiny_model(), path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} override 1 (name 'haed*') matches no node of the model"
    ]

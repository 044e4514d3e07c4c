"""Rule files: presets, validation errors naming file and key, override order, CLI precedence."""

from __future__ import annotations

import pytest

from onnxquant.calib.methods import METHODS, WEIGHT_METHODS
from onnxquant.errors import BadOptionError, BadRulesError
from onnxquant.passes import PASS_NAMES
from onnxquant.rules import loader

NAMES = {"pass_names": PASS_NAMES, "method_names": tuple(METHODS), "weight_method_names": WEIGHT_METHODS}


def load_rules(source=None):
    return loader.load_rules(source, **NAMES)


def parse_rules(text, where):
    return loader.parse_rules(text, where, **NAMES)


FIRST_LAST_8 = """
weights: {bits: 4}
activations: {bits: 4, method: laplace}
overrides:
  - match: {position: first}
    weights: {bits: 8}
    activations: {bits: 8}
  - match: {position: last}
    weights: {bits: 8}
  - match: {name: "head*"}
    skip: true
  - match: {op_type: Gemm, name: "head_keep"}
    skip: false
"""


def test_presets_load_with_their_placements():
    default, trt = load_rules("default"), load_rules("tensorrt")
    assert (default.placement, default.activations.symmetric, default.weights.granularity) == (
        "ort",
        False,
        "per_channel",
    )
    assert (trt.placement, trt.activations.symmetric, trt.activations.bits) == ("tensorrt", True, 8)
    assert "fold_conv_bn" in default.passes and "Add" in trt.quantize_ops


def test_overrides_apply_in_order_and_cli_overrides_globals():
    rules = parse_rules(FIRST_LAST_8, "r.yaml")
    first = rules.for_node("conv1", "Conv", frozenset({"first"}))
    assert (first.weights.bits, first.activations.bits, first.activations.method) == (8, 8, "laplace")
    middle = rules.for_node("conv2", "Conv", frozenset())
    assert (middle.weights.bits, middle.activations.bits, middle.quantize) == (4, 4, True)
    last = rules.for_node("fc", "Gemm", frozenset({"last"}))
    assert (last.weights.bits, last.activations.bits) == (8, 4)
    head = rules.for_node("head_conv", "Conv", frozenset())
    assert not head.quantize and "override 3" in head.reason and "r.yaml" in head.reason
    assert rules.for_node("head_keep", "Gemm", frozenset()).quantize
    cli = rules.with_cli(wbits=6, abits=5, method="kl")
    assert cli.for_node("conv2", "Conv", frozenset()).weights.bits == 6
    assert cli.for_node("conv2", "Conv", frozenset()).activations.method == "kl"
    assert cli.for_node("conv1", "Conv", frozenset({"first"})).weights.bits == 8


def test_op_types_outside_quantize_ops_stay_float_with_reason():
    rules = load_rules("tensorrt")
    decision = rules.for_node("sm", "Softmax", frozenset())
    assert not decision.quantize and decision.reason == "op type Softmax not in quantize_ops"


@pytest.mark.parametrize(
    "text, key, accepted",
    [
        ("wieghts: {bits: 4}", "wieghts", "placement, depthwise_inputs, passes"),
        ("weights: {bits: 9}", "weights.bits", "2..8"),
        ("weights: {bits: 0}", "weights.bits", "2..8"),
        ("weights: {bits: four}", "weights.bits", "2..8"),
        ("weights: {symmetric: maybe}", "weights.symmetric", "true, false"),
        ("weights: {granularity: per_row}", "weights.granularity", "per_channel, per_tensor"),
        ("weights: {method: kl}", "weights.method", "minmax, laplace, gauss, mse"),
        ("activations: {method: magic}", "activations.method", "minmax"),
        ("activations: {granularity: per_channel}", "activations.granularity", "per_tensor"),
        ("placement: onnx", "placement", "ort, tensorrt"),
        ("passes: [fold_everything]", "passes", "fold_conv_bn"),
        ("passes: fold_conv_bn", "passes", "list of strings"),
        ("overrides: [{skip: true}]", "overrides[0].match", "name, op_type, position"),
        ("overrides: [{match: {position: middle}}]", "overrides[0].match.position", "first, last"),
        ("overrides: [{match: {nmae: x}}]", "overrides[0].match.nmae", "name, op_type, position"),
        ("overrides: [{match: {name: x}, skip: yes please}]", "overrides[0].skip", "true, false"),
        ("overrides: [{match: {name: x}, weights: {bits: 1}}]", "overrides[0].weights.bits", "2..8"),
        ("weights: {rounding: stochastic}", "weights.rounding", "nearest, gptq"),
        ("activations: {rounding: gptq}", "activations.rounding", "nearest"),
        ("overrides: [{match: {name: x}, activations: {rounding: gptq}}]", "activations.rounding", "nearest"),
        ("smooth_quant: 1.5", "smooth_quant", "0..1"),
        ("smooth_quant: yes", "smooth_quant", "0..1"),
        ("bias_correction: always", "bias_correction", "mean, full, empirical"),
        ("weights: {granularity: per_row}", "weights.granularity", "per_block"),
        ("weights: {block_size: 1}", "weights.block_size", "2..65536"),
        ("weights: {format: fp4}", "weights.format", "int, fp8_e4m3, fp8_e5m2"),
        ("weights: {format: fp8_e4m3, bits: 4}", "weights", "stores 8 bits, not 4"),
        ("activations: {levels: kmeans}", "activations.levels", "uniform"),
        ("weights: {levels: apot, granularity: per_block}", "weights", "accepted: int"),
        ("weights: {scale: log}", "weights.scale", "float, pow2"),
        ("weights: {clusters: 1000}", "weights.clusters", "2..256"),
        ("weights: {rounding: gptq, levels: kmeans}", "weights", "gptq on uniform int levels"),
        ("weights: {rounding: gptq, granularity: per_block}", "weights", "gptq per channel or per tensor"),
    ],
)
def test_bad_rule_files_name_file_key_and_choices(tmp_path, text, key, accepted):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BadRulesError) as err:
        load_rules(path)
    message = str(err.value)
    assert str(path) in message and key in message and accepted in message and "\n" not in message


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("weights: {bits: 4\nactivations: [")
    with pytest.raises(BadRulesError, match=r"broken.yaml: not valid YAML at line \d"):
        load_rules(path)
    with pytest.raises(BadRulesError, match="rule file not found"):
        load_rules(tmp_path / "none.yaml")


def test_accepted_names_come_from_the_caller():
    text = "extends: none\npasses: [fold_x]\nactivations: {method: mine}\nweights: {method: theirs}"
    rules = loader.parse_rules(
        text, "r.yaml", pass_names=("fold_x",), method_names=("mine",), weight_method_names=("theirs",)
    )
    assert (rules.passes, rules.activations.method, rules.weights.method) == (("fold_x",), "mine", "theirs")
    with pytest.raises(BadRulesError, match="key 'passes' is 'fold_conv_bn'; accepted: fold_x"):
        loader.parse_rules(
            "{extends: none, passes: [fold_conv_bn]}",
            "r.yaml",
            pass_names=("fold_x",),
            method_names=(),
            weight_method_names=(),
        )


LOW_BIT = """
passes: [canonicalize, fold_conv_bn, equalize_layers]
smooth_quant: 0.6
bias_correction: empirical
weights: {bits: 4, rounding: gptq}
overrides:
  - match: {position: last}
    weights: {rounding: nearest}
"""


def test_low_bit_stages_are_rule_keys_and_cli_flags():
    rules = parse_rules(LOW_BIT, "r.yaml")
    assert (rules.smooth_quant, rules.bias_correction, rules.weights.rounding) == (0.6, "empirical", "gptq")
    assert rules.for_node("head", "Gemm", frozenset({"last"})).weights.rounding == "nearest"
    assert rules.for_node("c1", "Conv", frozenset()).weights.rounding == "gptq"
    assert parse_rules(loader.dump_rules(rules), "again.yaml").__dict__ | {"source": ""} == rules.__dict__ | {
        "source": ""
    }
    plain = load_rules("default")
    assert (plain.smooth_quant, plain.bias_correction, plain.weights.rounding) == (None, None, "nearest")
    cli = plain.with_cli(rounding="gptq", smooth_quant=0.5, bias_correction="empirical", equalize_layers=True)
    assert (cli.weights.rounding, cli.smooth_quant, cli.bias_correction) == ("gptq", 0.5, "empirical")
    assert cli.passes == (*plain.passes, "equalize_layers")
    assert cli.with_cli(equalize_layers=True).passes == cli.passes  # named once
    with pytest.raises(BadOptionError, match="smooth_quant=2; accepted: a number 0..1"):
        plain.with_cli(smooth_quant=2)
    with pytest.raises(BadOptionError, match="rounding='up'; accepted: nearest, gptq"):
        plain.with_cli(rounding="up")


def test_number_formats_are_rule_keys_and_cli_flags():
    rules = parse_rules("weights: {granularity: per_block, block_size: 64, bits: 4, scale: pow2}", "r.yaml")
    assert (rules.weights.granularity, rules.weights.block_size, rules.weights.scale) == (
        "per_block",
        64,
        "pow2",
    )
    assert parse_rules(loader.dump_rules(rules), "again.yaml").weights == rules.weights
    plain = load_rules("default")
    cli = plain.with_cli(weight_format="fp8_e4m3", activation_format="fp8_e4m3", pow2_scales=True)
    assert (cli.weights.format, cli.activations.format, cli.activations.scale) == (
        "fp8_e4m3",
        "fp8_e4m3",
        "pow2",
    )
    assert plain.with_cli(block_size=32, wbits=4).weights.granularity == "per_block"
    assert plain.with_cli(levels="kmeans", clusters=16).weights.clusters == 16
    with pytest.raises(BadOptionError, match="weights: format fp8_e5m2 stores 8 bits, not 4"):
        plain.with_cli(wbits=4, weight_format="fp8_e5m2")
    override = parse_rules(
        "weights: {format: fp8_e4m3}\noverrides: [{match: {name: c1}, weights: {bits: 4}}]", "o.yaml"
    )
    with pytest.raises(
        BadRulesError, match="o.yaml override 1 .*node c1: weights: format fp8_e4m3 stores 8 bits"
    ):
        override.for_node("c1", "Conv", frozenset())

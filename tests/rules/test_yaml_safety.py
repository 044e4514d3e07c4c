"""Rule-file YAML is read within budgets: alias bombs and deep nesting are one line, echoed values short."""

from __future__ import annotations

import pytest

from onnxquant import api
from onnxquant.errors import BadRulesError

LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
)  # i: 10^9 strings once expanded


def bomb(key_line: str) -> str:
    return "_anchors: {\n" + LAUGHS.replace("\n", ",\n") + "}\n" + key_line


@pytest.mark.parametrize(
    "key_line",
    [
        "quantize_ops: *i",
        "weights: {bits: *i}",
        "placement: *i",
        "overrides: [{match: *i}]",
        "passes: *i",
    ],
)
def test_a_billion_laughs_is_refused_in_one_short_line(tmp_path, key_line):
    path = tmp_path / "laughs.yaml"
    path.write_text(bomb(key_line))
    assert path.stat().st_size < 1000
    with pytest.raises(BadRulesError) as err:
        api.load_rules(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused: expands to more than 100000 nodes through anchors")
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize(
    "text", ["[" * 100_000 + "]" * 100_000, "a:\n" + "".join(" " * i + "- \n" for i in range(1, 5000))]
)
def test_a_document_nested_deep_is_one_line_not_a_recursion_error(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(BadRulesError) as err:
        api.load_rules(path)
    assert str(err.value).startswith(f"{path}: refused: nested deeper than 32 levels at line ")


def test_values_echoed_in_messages_are_cut_to_about_80_characters(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("placement: [" + ", ".join(["CONV_LAYER_NAME"] * 2000) + "]\n")
    with pytest.raises(BadRulesError) as err:
        api.load_rules(path)
    message = str(err.value)
    assert message.startswith(f"{path}: key 'placement' is ['CONV_LAYER_NAME', ")
    assert message.endswith("; accepted: ort, tensorrt, weights") and len(message) < len(str(path)) + 140


def test_a_control_character_is_one_line_naming_its_position(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"passes: [fold_conv_bn]\n\x0f\n")
    with pytest.raises(BadRulesError) as exc:
        api.load_rules(path)
    assert str(exc.value) == f"{path}: not valid YAML (character #x000f at position 23; only printable text)"

"""--suggest-rules: the override it writes, converted with, improves the output SQNR (digits demo, W4A4)."""

from __future__ import annotations

import importlib.resources
import itertools

import pytest
import yaml
from report_models import convert, digits_converted, digits_data, digits_model

from onnxquant.errors import OnnxQuantError
from onnxquant.report import build_report, plan_suggestion, predict_output_sqnr, render_text, suggest_rules
from onnxquant.report.suggest import glob_escape
from onnxquant.rules import parse_rules

DEFAULT_RULES = importlib.resources.files("onnxquant.rules").joinpath("presets/default.yaml").read_text()


@pytest.fixture(scope="module")
def w4a4_report():
    r = digits_converted(4, 4)
    return build_report(r.float_model, r.model, digits_data("calib"), sensitivity_samples=64)


def _measured_sqnr(rules_text: str) -> float:
    r = convert(digits_model(), digits_data("calib"), 4, 4, rules_text=rules_text)
    return build_report(r.float_model, r.model, digits_data("eval"), sensitivity_samples=0).outputs[0].sqnr_db


def test_suggested_rules_improve_output_sqnr(w4a4_report):
    before = _measured_sqnr(DEFAULT_RULES)
    sug = plan_suggestion(w4a4_report, DEFAULT_RULES, target_sqnr=w4a4_report.outputs[0].sqnr_db + 6)
    assert sug.met and 1 <= sug.k < len(w4a4_report.layers)
    assert sug.layers == [la.name for la in w4a4_report.worst(sug.k)]
    assert sug.predicted["logits"] >= sug.target_sqnr
    rules = parse_rules(sug.rules, "suggested")  # a complete rule file: the base plus the overrides
    assert rules.passes == parse_rules(DEFAULT_RULES, "default").passes
    assert [o.match.name for o in rules.overrides] == sug.nodes
    after = _measured_sqnr(sug.rules)
    assert after > before + 3, (before, after, sug.layers)
    sug.measured = {"logits": after}
    assert sug.gain_db["logits"] == pytest.approx(after - sug.before["logits"])
    w4a4_report.suggestion = sug
    try:
        assert "measured" in render_text(w4a4_report)
        assert w4a4_report.to_json()["suggestion"]["gain_db"]["logits"] > 0
    finally:
        w4a4_report.suggestion = None


def test_k_given_and_overrides_only(w4a4_report):
    text = suggest_rules(w4a4_report, None, k=2)
    doc = yaml.safe_load(text)
    assert set(doc) == {"overrides"}
    worst = [la.name for la in w4a4_report.worst(2)]
    assert [o["match"]["name"] for o in doc["overrides"]][:1] == worst[:1]
    assert all(o["weights"] == {"bits": 8} and o["activations"] == {"bits": 8} for o in doc["overrides"])
    assert text.startswith("# onnxquant --suggest-rules")
    # k = 0 keeps nothing; the prediction at k = 0 is the measured SQNR
    assert yaml.safe_load(suggest_rules(w4a4_report, None, k=0))["overrides"] == []
    assert predict_output_sqnr(w4a4_report, 0)["logits"] == pytest.approx(w4a4_report.outputs[0].sqnr_db)
    curve = plan_suggestion(w4a4_report, None, k=1).curve
    assert all(b["logits"] >= a["logits"] for a, b in itertools.pairwise(curve))  # monotone in k


def test_bad_suggestion_requests(w4a4_report):
    with pytest.raises(OnnxQuantError, match="give the number of layers k or a target"):
        suggest_rules(w4a4_report, None)
    with pytest.raises(OnnxQuantError, match="high bits"):
        suggest_rules(w4a4_report, None, k=1, high_bits=9)
    r = digits_converted(4, 4)
    no_sens = build_report(r.float_model, r.model, digits_data(), sensitivity_samples=0)
    with pytest.raises(OnnxQuantError, match="needs isolated sensitivity"):
        suggest_rules(no_sens, None, target_sqnr=30)


def test_glob_escape():
    import fnmatch

    for name in ("/layer1/0/conv1/Conv", "a[0]*b?", "plain"):
        assert fnmatch.fnmatchcase(name, glob_escape(name))
    assert not fnmatch.fnmatchcase("a0xb?", glob_escape("a[0]*b?"))

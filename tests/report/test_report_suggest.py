"""--suggest-rules: the override it writes, converted with, improves the output SQNR (digits demo, W4A4)."""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools

import pytest
import yaml
from report_models import convert, digits_converted, digits_data, digits_model, preset

from onnxquant.errors import BadRulesError
from onnxquant.report import SuggestOptions, build_report, plan_suggestion, predict_output_sqnr, render_text
from onnxquant.report.suggest import glob_escape


@pytest.fixture(scope="module")
def w4a4_report():
    r = digits_converted(4, 4)
    return build_report(r.float_model, r.model, digits_data("calib"), sensitivity_samples=64)


def _measured_sqnr(rules) -> float:
    r = convert(digits_model(), digits_data("calib"), 4, 4, rules=rules)
    return build_report(r.float_model, r.model, digits_data("eval"), sensitivity_samples=0).outputs[0].sqnr_db


def test_suggested_rules_improve_output_sqnr(w4a4_report):
    base = preset()
    before = _measured_sqnr(base)
    sug = plan_suggestion(w4a4_report, SuggestOptions(base, target_sqnr=w4a4_report.outputs[0].sqnr_db + 6))
    assert sug.met and 1 <= sug.k < len(w4a4_report.layers)
    assert list(sug.layers) == [la.name for la in w4a4_report.worst(sug.k)]
    assert sug.predicted["logits"] >= sug.target_sqnr
    # the base rules with one override per node appended, derived without touching the base
    assert sug.rules.passes == base.passes and sug.rules.overrides[: len(base.overrides)] == base.overrides
    added = sug.rules.overrides[len(base.overrides) :]
    assert [o.match.name for o in added] == [glob_escape(n) for n in sug.nodes]
    assert all(o.weights == {"bits": 8} and o.activations == {"bits": 8} for o in added)
    after = _measured_sqnr(sug.rules)
    assert after > before + 3, (before, after, sug.layers)
    # the rule file written: a comment, then the same rules as YAML
    text = sug.rules_text()
    assert text.startswith("# onnxquant --suggest-rules: keep the")
    doc = yaml.safe_load(text)
    assert doc["passes"] == list(base.passes)
    assert [o["match"]["name"] for o in doc["overrides"]] == [o.match.name for o in sug.rules.overrides]


def test_build_report_computes_the_suggestion_and_the_report_is_immutable(w4a4_report):
    r = digits_converted(4, 4)
    options = SuggestOptions(preset(), k=2)
    rep = build_report(r.float_model, r.model, digits_data("calib"), sensitivity_samples=64, suggest=options)
    assert rep.suggestion == plan_suggestion(rep, options)
    assert rep.suggestion.k == 2 and list(rep.suggestion.layers) == [la.name for la in rep.worst(2)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.suggestion = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.suggestion.measured = {}
    measured = rep.with_measured({"logits": rep.outputs[0].sqnr_db + 5})
    assert rep.suggestion.measured is None  # the original is unchanged
    assert measured.suggestion.gain_db["logits"] == pytest.approx(5)
    assert "measured" in render_text(measured) and "measured" not in render_text(rep)
    assert measured.to_json()["suggestion"]["gain_db"]["logits"] == pytest.approx(5)
    assert w4a4_report.suggestion is None and "suggestion" not in w4a4_report.to_json()


def test_k_given_and_curve(w4a4_report):
    sug = plan_suggestion(w4a4_report, SuggestOptions(preset(), k=2))
    worst = [la.name for la in w4a4_report.worst(2)]
    assert sug.nodes[:1] == tuple(worst[:1])
    # k = 0 keeps nothing; the prediction at k = 0 is the measured SQNR
    assert plan_suggestion(w4a4_report, SuggestOptions(preset(), k=0)).rules.overrides == preset().overrides
    assert predict_output_sqnr(w4a4_report, 0)["logits"] == pytest.approx(w4a4_report.outputs[0].sqnr_db)
    curve = plan_suggestion(w4a4_report, SuggestOptions(preset(), k=1)).curve
    assert len(curve) > 2 and all(
        b["logits"] >= a["logits"] for a, b in itertools.pairwise(curve)
    )  # monotone


def test_bad_suggestion_requests():
    with pytest.raises(BadRulesError, match="give the number of layers k or a target"):
        SuggestOptions(preset())
    with pytest.raises(BadRulesError, match="high bits"):
        SuggestOptions(preset(), k=1, high_bits=9)
    with pytest.raises(BadRulesError, match="k=-1"):
        SuggestOptions(preset(), k=-1)
    r = digits_converted(4, 4)
    with pytest.raises(BadRulesError, match="needs isolated sensitivity"):
        build_report(
            r.float_model,
            r.model,
            digits_data(),
            sensitivity_samples=0,
            suggest=SuggestOptions(preset(), target_sqnr=30),
        )


def test_glob_escape():
    for name in ("/layer1/0/conv1/Conv", "a[0]*b?", "plain"):
        assert fnmatch.fnmatchcase(name, glob_escape(name))
    assert not fnmatch.fnmatchcase("a0xb?", glob_escape("a[0]*b?"))

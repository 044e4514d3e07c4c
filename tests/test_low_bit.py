"""The low-bit recovery stages through `convert` (each stage's own math is tested beside its module).

Rule keys and CLI flags switch them on, they raise the output SQNR measured with ONNX Runtime, the float model
a report compares with stays the unrounded one, and combinations that cannot work are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxquant import api
from onnxquant.cli import main
from onnxquant.errors import BadDataError, BadOptionError
from onnxquant.model import make_session

DIGITS = Path(__file__).resolve().parents[1] / "calib_data" / "digits"


def sqnr(float_model, quant_model, arrays: dict) -> float:
    f_sess, q_sess = make_session(float_model), make_session(quant_model)
    feed = {i.name: arrays[i.name] for i in f_sess.get_inputs()}
    f = f_sess.run(None, feed)[0].astype(np.float64)
    q = q_sess.run(None, feed)[0].astype(np.float64)
    return float(10 * np.log10((f**2).sum() / ((f - q) ** 2).sum()))


def w3a8(**stages):
    rules = api.resolve_rules("default", wbits=3, abits=8, method="minmax").with_cli(**stages)
    return api.convert(DIGITS / "model.onnx", rules, data=DIGITS / "calib.npz")


@pytest.fixture(scope="module")
def held_out():
    return dict(np.load(DIGITS / "eval.npz"))


def test_gptq_and_empirical_bias_correction_each_raise_held_out_sqnr(held_out):
    plain, gptq = w3a8(), w3a8(rounding="gptq")
    both = w3a8(rounding="gptq", bias_correction="empirical")
    reference = api.fold(DIGITS / "model.onnx")[0]
    scores = [sqnr(reference, r.model, held_out) for r in (plain, gptq, both)]
    assert scores[1] > scores[0] + 1.0 and scores[2] > scores[1] + 0.3, scores
    assert "GPTQ rounded" in " ".join(gptq.notes) and "bias correction" in " ".join(both.notes)
    for result in (gptq, both):  # reports compare with the float weights, not GPTQ's rounded ones
        weights = {t.name: numpy_helper.to_array(t) for t in result.float_model.graph.initializer}
        for t in reference.graph.initializer:
            np.testing.assert_array_equal(weights[t.name], numpy_helper.to_array(t))


def test_cle_keeps_the_float_function_and_is_listed_apart_from_folds(held_out):
    result = w3a8(equalize_layers=True)
    assert result.equalized and all(o.pass_name == "equalize_layers" for o in result.equalized)
    assert not any(o.pass_name == "equalize_layers" for o in result.folded)
    reference = api.fold(DIGITS / "model.onnx")[0]
    assert sqnr(reference, result.float_model, held_out) > 100  # same function, float rounding only


def test_rule_file_keys_turn_the_stages_on(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("weights: {bits: 3, rounding: gptq}\nbias_correction: empirical\n")
    out = tmp_path / "m.onnx"
    args = ["convert", DIGITS / "model.onnx", "--rules", rules, "--calib", "minmax"]
    result = CliRunner().invoke(
        main, [str(a) for a in [*args, "--calib-data", DIGITS / "calib.npz", "-o", out]]
    )
    assert result.exit_code == 0, result.output
    assert "note: GPTQ rounded" in result.output and "note: empirical bias correction" in result.output


@pytest.mark.parametrize(
    ("stages", "options", "error", "pattern"),
    [
        ({"smooth_quant": 0.5}, {"table": "table"}, BadOptionError, "SmoothQuant with a calibration table"),
        (
            {"rounding": "gptq"},
            {"bias_correction": "mean"},
            BadOptionError,
            "corrects round-to-nearest weights",
        ),
        ({"rounding": "gptq"}, {"table": "table"}, BadDataError, "GPTQ rounding needs calibration data"),
        (
            {"bias_correction": "empirical"},
            {"table": "table"},
            BadDataError,
            "empirical bias correction needs",
        ),
        ({"levels": "kmeans"}, {"bias_correction": "mean"}, BadOptionError, "not on apot/kmeans codebooks"),
        ({"levels": "apot"}, {"bit_alloc": "weights"}, BadOptionError, "not on apot/kmeans codebooks"),
    ],
)
def test_combinations_that_cannot_work_are_one_line(stages, options, error, pattern):
    base = w3a8()
    if options.get("table") == "table":
        options = {**options, "table": base.table}
    rules = api.resolve_rules("default", wbits=3, abits=8, method="minmax").with_cli(**stages)
    data = None if "table" in options else DIGITS / "calib.npz"
    with pytest.raises(error, match=pattern) as err:
        api.convert(DIGITS / "model.onnx", rules, data=data, **options)
    assert "\n" not in str(err.value)

"""Automatic mixed precision (`convert --target-sqnr`): the fewest layers kept at a higher width, measured."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from onnxquant.cli import main
from onnxquant.mixed_precision import convert_to_target
from onnxquant.model import make_session

sys.path.insert(0, str(Path(__file__).parent / "report"))
import report_models as rm

DIGITS = Path(__file__).resolve().parents[1] / "calib_data" / "digits"


def ort_sqnr(float_model, quant_model, data) -> float:
    """Output SQNR over `data` computed with ONNX Runtime, independently of the report."""
    f_sess, q_sess = make_session(float_model), make_session(quant_model)
    signal = noise = 0.0
    for batch in data:
        feed = {i.name: batch[i.name] for i in f_sess.get_inputs()}
        f, q = f_sess.run(None, feed)[0].astype(np.float64), q_sess.run(None, feed)[0].astype(np.float64)
        signal, noise = signal + (f**2).sum(), noise + ((f - q) ** 2).sum()
    return 10 * np.log10(signal / noise)


def convert_to(target: float):
    data = rm.digits_data("calib")
    result, mixed = convert_to_target(
        rm.digits_model(), rm.preset(), data=data, target_sqnr=target, wbits=3, abits=8, method="minmax"
    )
    return data, result, mixed


def test_the_fewest_layers_in_sensitivity_order_that_reach_the_target():
    data, result, mixed = convert_to(22.0)
    tried = dict(mixed.tried)
    k = len(mixed.layers)
    assert mixed.met and 0 < k < 5
    assert tried[k] >= 22.0 and tried[k - 1] < 22.0  # one layer fewer was measured to miss it
    assert abs(ort_sqnr(result.float_model, result.model, data) - mixed.measured["logits"]) < 0.01
    assert result.summary.weights == Counter({8: k, 3: 5 - k})
    assert tried[0] < 22.0  # plain W3A8 misses it: the target is a real constraint


def test_a_target_met_without_help_keeps_every_layer_narrow():
    _, result, mixed = convert_to(5.0)
    assert mixed.met and mixed.layers == () and mixed.tried[0][0] == 0
    assert result.summary.weights == Counter({3: 5})


def test_an_unreachable_target_keeps_every_layer_and_says_not_met(tmp_path):
    out = tmp_path / "m.onnx"
    args = ["convert", DIGITS / "model.onnx", "--wbits", "3", "--abits", "8", "--calib", "minmax"]
    args += ["--calib-data", DIGITS / "calib.npz", "--target-sqnr", "200", "-o", out]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "target SQNR 200 dB NOT met even with every layer kept" in result.output
    assert "5 layer(s) at 8 bits" in result.output and out.is_file()

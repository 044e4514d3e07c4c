"""Weight entries of the calibration table (calib.weight_table) as Q/DQ insertion writes them: bias correction
against a hand computation of ACIQ eq. 12–13, and a table read back from JSON reproducing the model bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant import api
from onnxquant.calib.methods import METHODS, WEIGHT_METHODS
from onnxquant.calib.weight_table import weight_entries
from onnxquant.errors import InternalError
from onnxquant.model import load_model, make_session
from onnxquant.passes import PASS_NAMES
from onnxquant.passes.insert_qdq import insert_qdq
from onnxquant.quant import dequantize, quantize
from onnxquant.rules import loader
from onnxquant.tables import CalibrationTable, TensorRange, dumps_json, loads_json

NAMES = {"pass_names": PASS_NAMES, "method_names": tuple(METHODS), "weight_method_names": WEIGHT_METHODS}

CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 6, 6] x) => (float[N, 4, 4, 4] y) {
  y = Conv (x, w, b)
}
"""


def conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(CONV)
    w = rng.laplace(0.05, 0.3, (4, 3, 3, 3)).astype(np.float32)  # heavy tails: 4-bit ACIQ clips them
    b = rng.normal(0, 0.1, 4).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return onnx.shape_inference.infer_shapes(model)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("mode", ["mean", "full"])
def test_bias_correction_matches_eq_12_13(mode):
    model, x = conv_model(), np.random.default_rng(1).normal(0.5, 1.0, (16, 3, 6, 6)).astype(np.float32)
    rules = loader.load_rules("default", **NAMES).with_cli(wbits=4, abits=8, wmethod="laplace")
    folded, _, plan, _ = api.prepare(model, rules)
    x_range = TensorRange.from_range(float(x.min()), float(x.max()), 8, False, "minmax")
    x_mean = x.mean(axis=(0, 2, 3)).astype(np.float64)
    entries = weight_entries(folded, plan, bias_correction=mode, input_means={"x": x_mean})
    table = CalibrationTable("minmax", 8, {"x": x_range, **entries})
    q = initializers(insert_qdq(folded, plan, table)[0])

    # hand computation, per output channel c: Ŵ from the uncorrected 4-bit Laplace parameters
    w, b = initializers(folded)["w"].astype(np.float64), initializers(folded)["b"].astype(np.float64)
    params = weight_entries(folded, plan)["w"].qparams()
    codes = quantize(w.astype(np.float32), params)
    w_hat = dequantize(codes, params).astype(np.float64)
    flat, flat_hat = w.reshape(4, -1), w_hat.reshape(4, -1)
    mean, mean_hat = flat.mean(axis=1), flat_hat.mean(axis=1)
    assert np.abs(mean - mean_hat).max() > 1e-3  # clipping moved the means: there is something to correct
    xi = np.ones(4)
    if mode == "full":
        xi = np.linalg.norm(flat - mean[:, None], axis=1) / np.linalg.norm(
            flat_hat - mean_hat[:, None], axis=1
        )
        assert np.abs(xi - 1).max() > 1e-3
    offset = mean - xi * mean_hat  # ŵ' = ξ·ŵ + o has the float mean (and, with "full", the float spread)
    corrected = xi[:, None] * flat_hat + offset[:, None]
    np.testing.assert_allclose(corrected.mean(axis=1), mean, atol=1e-12)
    if mode == "full":
        np.testing.assert_allclose(
            np.linalg.norm(corrected - mean[:, None], axis=1),
            np.linalg.norm(flat - mean[:, None], axis=1),
            rtol=1e-9,
        )

    # the model: the same codes, DQ scale s·ξ, and the offset's response Σ E[x]·o folded into the int32 bias
    np.testing.assert_array_equal(q["w_quantized"], codes)
    np.testing.assert_array_equal(q["w_scale"], (params.scale * xi).astype(np.float32))
    bias = q["b_quantized"].astype(np.float64) * q["b_scale"]
    expected = b + offset * x_mean.sum() * 9
    assert np.abs(bias - expected).max() <= 0.5 * q["b_scale"].max() + 1e-12
    assert np.abs(expected - b).max() > 10 * q["b_scale"].max()  # the shift is far above rounding

    # and the graph computes Conv(x, ŵ') + b: the corrected mean error of the output vanishes
    y_ref = make_session(folded).run(None, {"x": x})[0]
    y_q = make_session(insert_qdq(folded, plan, table)[0], optimize=False).run(None, {"x": x})[0]
    plain = insert_qdq(
        folded, plan, CalibrationTable("minmax", 8, {"x": x_range, **weight_entries(folded, plan)})
    )
    y_plain = make_session(plain[0], optimize=False).run(None, {"x": x})[0]
    bias_error = np.abs((y_q - y_ref).mean(axis=(0, 2, 3)))
    assert bias_error.max() < 0.25 * np.abs((y_plain - y_ref).mean(axis=(0, 2, 3))).max()


def test_table_from_json_reproduces_the_model():
    model = load_model("calib_data/digits/model.onnx")
    data = [{"input": np.load("calib_data/digits/calib.npz")["input"]}]
    rules = loader.load_rules("default", **NAMES).with_cli(wbits=4, abits=4, method="laplace")
    folded, _, plan, _ = api.prepare(model, rules)
    table, stats = api.calibrate(folded, plan, data, per_channel=("input",))
    means = {"input": stats["input"].ch_mean}
    weights = weight_entries(folded, plan, bit_alloc=True, bias_correction="full", input_means=means)
    assert {e.kind for e in weights.values()} == {"weight"} and len(weights) == 5
    assert any(e.bias_shift for e in weights.values()) and any(e.spread_ratio for e in weights.values())
    full = replace(table, tensors={**table.tensors, **weights})
    text = dumps_json(full)
    again = loads_json(text)
    assert again == full and dumps_json(again) == text
    first = insert_qdq(folded, plan, full)[0].SerializeToString()
    assert insert_qdq(folded, plan, again)[0].SerializeToString() == first
    with pytest.raises(InternalError, match="'conv1.weight' of node 'conv1' has no weight entry"):
        insert_qdq(folded, plan, table)  # activations only: weights are never calibrated here

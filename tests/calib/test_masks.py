"""Real exports' masks: a tensor holding −inf (Log of a 0/1 mask) or −3.4e38 (padded BERT-style exports) is
left in float with a warning instead of stopping calibration; NaN in the data still names the sample."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxquant import api
from onnxquant.errors import BadDataError
from onnxquant.model import infer_shapes, make_session

MASKED = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8, 1, 1] x, float[N, 8, 1, 1] m) => (float[N, 8, 1, 1] y) {
  scores = Conv (x, w)
  mask = {mask}
  s = Add (scores, mask)
  y = Softmax <axis = 1> (s)
}
"""
MASKS = {"-inf": "Log (m)", "-3.4e38": "Mul (m, big)"}


def masked_model(mask: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(MASKED.replace("{mask}", MASKS[mask]))
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.normal(0, 1, (8, 8, 1, 1)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(np.array(-3.4e38, np.float32), "big"),
        ]
    )
    return infer_shapes(model)


def feeds(mask: str, n: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = (rng.uniform(size=(n, 8, 1, 1)) > 0.3).astype(np.float32)
    keep[:, 0] = 1  # every row keeps one position
    m = keep if mask == "-inf" else 1 - keep
    return {"x": rng.normal(0, 1, (n, 8, 1, 1)).astype(np.float32), "m": m}


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_a_mask_stays_float_and_the_rest_is_quantized(mask, caplog):
    model = masked_model(mask)
    result = api.convert(
        model, api.load_rules("tensorrt"), data=[feeds(mask)]
    )  # a Conv feeds the Add: its inputs are quantized
    assert "mask" not in result.table.tensors and {"x", "scores"} <= set(result.table.tensors)
    assert any("mask" in r.message and "left in float" in r.message for r in caplog.records)
    f = feeds(mask, seed=1)
    reference = make_session(model).run(None, f)[0]
    quantized = make_session(result.model).run(None, f)[0]
    assert np.isfinite(quantized).all()
    sqnr = 10 * np.log10((reference**2).sum() / ((reference - quantized) ** 2).sum())
    assert sqnr > 25, sqnr


def test_nan_in_the_data_still_names_the_sample():
    model, f = masked_model("-inf"), feeds("-inf")
    f["x"][5, 2] = np.nan
    with pytest.raises(BadDataError, match=r"input .x. sample 5 contains NaN"):
        api.convert(model, api.load_rules("tensorrt"), data=[f])

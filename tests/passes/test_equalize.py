"""Depthwise inputs quantized per channel and equalized into the depthwise weights (passes/plan.py): the
codes equal per-channel codes, a channel 10^4 below the largest keeps its resolution, and ONNX Runtime runs
the model at every optimization level."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxquant import api
from onnxquant.model import infer_shapes, with_outputs

SCALES = np.array([100.0, 1.0, 0.1, 0.01], np.float32)  # per-channel ranges spread 10^4
DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  y = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w, b)
}
"""


def depthwise_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(DEPTHWISE)
    w = rng.normal(0, 1, (4, 1, 3, 3)).astype(np.float32)
    model.graph.initializer.extend(
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    )
    return infer_shapes(model)


def data(seed: int, n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, 4, 8, 8)) * SCALES[None, :, None, None]).astype(np.float32)


def convert(depthwise: str):
    rules = replace(api.load_rules("default"), depthwise_inputs=depthwise)
    return api.convert(depthwise_model(), rules, data=[{"x": data(0)}])


def channel_sqnr(model: onnx.ModelProto, x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].astype(np.float64)
    err = ((y - reference) ** 2).sum(axis=(0, 2, 3))
    return 10 * np.log10((reference**2).sum(axis=(0, 2, 3)) / err)


def test_equalized_codes_are_the_per_channel_codes():
    result = convert("per_channel")
    assert result.plan.equalized == {"x": "Conv_0"}
    entry = result.table.tensors["x"]
    assert entry.axis == 1 and entry.signed and len(entry.scale) == 4
    s_c = np.asarray(entry.scale, np.float32)
    nodes = {n.op_type: n for n in result.model.graph.node}
    k = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "x_k")).ravel()
    np.testing.assert_allclose(k, s_c.max() / s_c, rtol=1e-6)
    q_out = nodes["QuantizeLinear"].output[0]
    x = data(1)
    codes = ort.InferenceSession(with_outputs(result.model, [q_out]).SerializeToString()).run(
        [q_out], {"x": x}
    )[0]
    expected = np.clip(np.rint(x / s_c[None, :, None, None]), -127, 127) + 128
    diff = np.abs(codes.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # equal but for float ties of x·k/s vs x/s_c


def test_small_channels_keep_their_resolution():
    x = data(2)
    reference = (
        ort.InferenceSession(depthwise_model().SerializeToString()).run(None, {"x": x})[0].astype(np.float64)
    )
    equalized = channel_sqnr(convert("per_channel").model, x, reference)
    per_tensor = channel_sqnr(convert("per_tensor").model, x, reference)
    assert equalized.min() > 35.0, equalized  # every channel at 8-bit resolution
    assert per_tensor[3] < 5.0, per_tensor  # one scale for all: the 0.01 channel is rounded away


@pytest.mark.parametrize(
    "level",
    [
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ],
)
def test_onnx_runtime_runs_it_at_every_optimization_level(level):
    model = convert("per_channel").model
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    x = data(3)
    got = ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())


def test_the_report_compares_equalized_tensors_in_float_units():
    from onnxquant.report import build_report

    result = convert("per_channel")
    report = build_report(result.float_model, result.model, [{"x": data(4)}], sensitivity_samples=0)
    by_name = {t.name: t for t in report.tensors}
    assert by_name["x"].accumulated.sqnr_db > 35  # x·k/k: 8-bit per channel, not the ×k mismatch (~0 dB)
    assert by_name["w"].accumulated.sqnr_db > 35  # stored as W/k, compared as W

"""FP8 (E4M3FN, E5M2): rounding against a hand-written nearest-value search over every FP8 value, ml_dtypes
and ONNX Runtime's QuantizeLinear; converted models that ONNX Runtime runs with all its optimizations as it
does with none (two of its graph rewrites mishandle FP8: calib/fp8.py, passes/insert_qdq.py); and `validate`
refusing an FP8 model in one line."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxquant import api
from onnxquant.calib.fp8 import FP8_FORMATS, fp8_round
from onnxquant.cli import main
from onnxquant.errors import BadOptionError
from onnxquant.model import make_session

DIGITS = Path(__file__).resolve().parents[1] / "calib_data" / "digits"
FORMATS = ("fp8_e4m3", "fp8_e5m2")


def reference_round(x: np.ndarray, fmt: str) -> np.ndarray:
    """Nearest finite FP8 value by exhaustive search over the 256 bit patterns; ties to the even pattern
    (even mantissa); beyond the largest value, saturate."""
    dtype = FP8_FORMATS[fmt].dtype
    patterns = np.arange(256, dtype=np.uint8)
    values = patterns.view(dtype).astype(np.float64)
    finite = np.isfinite(values) & ~((values == 0) & (patterns >= 128))  # drop NaN/inf and -0
    values, patterns = values[finite], patterns[finite]
    out = np.empty(x.shape)
    big = FP8_FORMATS[fmt].max
    for i, v in enumerate(np.clip(np.asarray(x, np.float64), -big, big).ravel()):
        dist = np.abs(values - v)
        nearest = np.flatnonzero(dist == dist.min())
        pick = nearest[0] if len(nearest) == 1 else next(j for j in nearest if patterns[j] % 2 == 0)
        out.flat[i] = values[pick]
    return out


def probe_values(fmt: str) -> np.ndarray:
    """Random values over the whole range, every midpoint between neighbouring values (ties), and values
    beyond the largest one."""
    dtype = FP8_FORMATS[fmt].dtype
    grid = np.unique(np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64))
    grid = grid[np.isfinite(grid)]
    mids = (grid[1:] + grid[:-1]) / 2
    rng = np.random.default_rng(3)
    big = FP8_FORMATS[fmt].max
    randoms = rng.standard_normal(400) * np.exp2(rng.uniform(-12, np.log2(big), 400))
    return np.concatenate([mids, randoms, [big * 1.01, -big * 3, 1e30, -1e30, 0.0]]).astype(np.float32)


def ort_quantize_dequantize(x: np.ndarray, fmt: str) -> np.ndarray:
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size])],
        [
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            helper.make_tensor("z", FP8_FORMATS[fmt].onnx_type, [], [0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rounding_is_nearest_even_saturating_as_ml_dtypes_and_onnx_runtime(fmt):
    x = probe_values(fmt)
    ours = fp8_round(x, fmt).astype(np.float64)
    np.testing.assert_array_equal(ours, reference_round(x, fmt))
    big = FP8_FORMATS[fmt].max
    np.testing.assert_array_equal(
        ours, np.clip(x, -big, big).astype(FP8_FORMATS[fmt].dtype).astype(np.float64)
    )
    np.testing.assert_array_equal(ours, ort_quantize_dequantize(x, fmt))


def convert_digits(fmt: str):
    rules = api.resolve_rules("default", wbits=8, abits=8, method="minmax").with_cli(
        weight_format=fmt, activation_format=fmt
    )
    return api.convert(DIGITS / "model.onnx", rules, data=DIGITS / "calib.npz")


def output_sqnr(float_model, quant_model, optimize: bool) -> float:
    x = {"input": np.load(DIGITS / "eval.npz")["input"][:64]}
    f = make_session(float_model).run(None, x)[0].astype(np.float64)
    q = make_session(quant_model, optimize=optimize).run(None, x)[0].astype(np.float64)
    return float(10 * np.log10((f**2).sum() / ((f - q) ** 2).sum()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_model_stores_fp8_and_runs_alike_with_and_without_onnx_runtime_rewrites(fmt):
    result = convert_digits(fmt)
    spec = FP8_FORMATS[fmt]
    stored = {t.name: t for t in result.model.graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in result.float_model.graph.initializer}
    for name, entry in result.table.tensors.items():
        assert entry.format == fmt and np.all(np.asarray(entry.zero_point) == 0)
        np.testing.assert_allclose(entry.scale, np.asarray(entry.amax) / spec.max, rtol=1e-6)
        if entry.kind == "weight":
            assert stored[f"{name}_quantized"].data_type == spec.onnx_type
            codes = numpy_helper.to_array(stored[f"{name}_quantized"]).astype(np.float64)
            scale = np.asarray(entry.scale, np.float32).reshape(-1, *[1] * (codes.ndim - 1))
            want = reference_round((weights[name] / scale).ravel(), fmt).reshape(codes.shape)
            np.testing.assert_array_equal(codes, want)
    optimized = output_sqnr(result.float_model, result.model, optimize=True)
    plain = output_sqnr(result.float_model, result.model, optimize=False)
    assert abs(optimized - plain) < 0.5 and plain > 15, (optimized, plain)
    assert "(" + fmt + ")" in result.summary.weights_line()


def test_fp8_layers_keep_a_float_bias_unless_onnx_runtime_would_overflow_it():
    e4m3 = convert_digits("fp8_e4m3").model
    assert not any(t.data_type == TensorProto.INT32 for t in e4m3.graph.initializer)
    e5m2 = convert_digits("fp8_e5m2").model  # E5M2 scales are amax/57344: s_x·s_w·2^31 < |bias|
    wide = [t for t in e5m2.graph.initializer if t.data_type == TensorProto.INT32]
    assert wide and all(np.abs(numpy_helper.to_array(t)).max() == 2**31 - 1 for t in wide)


def test_validate_refuses_an_fp8_model_in_one_line(tmp_path):
    out = tmp_path / "m.onnx"
    onnx.save(convert_digits("fp8_e4m3").model, out)
    result = CliRunner().invoke(main, ["validate", str(out), "--data", str(DIGITS / "eval.npz")])
    assert result.exit_code == 2, result.output
    assert "FP8" in result.output and "integer runtime" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ml_dtypes_types_are_the_onnx_ones():
    assert FP8_FORMATS["fp8_e4m3"].dtype is ml_dtypes.float8_e4m3fn
    assert float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max) == FP8_FORMATS["fp8_e4m3"].max
    assert float(ml_dtypes.finfo(ml_dtypes.float8_e5m2).max) == FP8_FORMATS["fp8_e5m2"].max


def test_gptq_with_fp8_weights_is_refused_in_one_line():
    with pytest.raises(BadOptionError, match="weights: rounding gptq on fp8_e4m3 uniform levels; accepted"):
        api.resolve_rules("default", wbits=8, abits=8).with_cli(weight_format="fp8_e4m3", rounding="gptq")

"""The integer plan against ONNX Runtime: bit-exact with float requant, within 1 LSB with fixed requant."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from rt_nets import conv_net, matmul_net, quantize

from onnxquant.errors import BadDataError
from onnxquant.runtime import validate
from onnxquant.runtime.plan import KIND_INTEGER

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "calib_data" / "digits"


@pytest.fixture(scope="module")
def qconv() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return quantize(conv_net(seed=0), rng.random((16, 3, 12, 12)).astype(np.float32))


def _data(rng, n=2, batch=3, shape=(3, 12, 12), name="x"):
    return [{name: rng.random((batch, *shape)).astype(np.float32)} for _ in range(n)]


def test_conv_net_bit_exact_with_float_requant(qconv: onnx.ModelProto) -> None:
    result = validate(qconv, _data(np.random.default_rng(1)), requant="float")
    assert result.passed, "\n".join(result.summary_lines())
    ops = {c.op for c in result.nodes if c.kind == KIND_INTEGER}
    assert {"Conv", "Add", "MaxPool", "AveragePool", "Concat", "GlobalAveragePool", "Reshape", "Gemm"} <= ops
    assert all(c.differ == 0 and c.count > 0 for c in result.nodes)
    assert all(s.kind != "float" for s in result.plan)
    assert result.samples == 6


def test_conv_net_fixed_requant_within_one_lsb(qconv: onnx.ModelProto) -> None:
    result = validate(qconv, _data(np.random.default_rng(2)), requant="fixed")
    assert result.passed, "\n".join(result.summary_lines())
    integer = [c for c in result.nodes if c.kind == KIND_INTEGER]
    assert max(c.max_lsb for c in integer) == 1  # fixed point does round differently somewhere
    assert all(c.vs_float is not None and c.vs_float.max_lsb <= 1 for c in integer)


def test_per_tensor_weights_bit_exact() -> None:
    rng = np.random.default_rng(3)
    q = quantize(
        conv_net(seed=1, channels=4, size=8), rng.random((8, 3, 8, 8)).astype(np.float32), per_channel=False
    )
    result = validate(q, _data(rng, shape=(3, 8, 8)), requant="float")
    assert result.passed, "\n".join(result.summary_lines())


def test_matmul_net_bit_exact() -> None:
    rng = np.random.default_rng(4)
    q = quantize(matmul_net(), rng.standard_normal((8, 5, 16)).astype(np.float32))
    result = validate(q, _data(rng, shape=(5, 16)), requant="float")
    assert result.passed, "\n".join(result.summary_lines())
    assert {c.op for c in result.nodes} >= {"MatMul", "Transpose"}


def test_result_json_and_summary(qconv: onnx.ModelProto) -> None:
    result = validate(qconv, _data(np.random.default_rng(5), n=1), requant="float")
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["passed"] is True and doc["requant"] == "float" and doc["backend"] == "numpy"
    conv1 = next(n for n in doc["nodes"] if n["name"] == "conv1")
    assert conv1["differ"] == 0 and conv1["histogram"] == {"0": conv1["elements"]}
    assert doc["outputs"][0]["tensor"] == "logits"
    lines = result.summary_lines()
    assert lines[0].startswith("validate: backend numpy, requant float")
    assert lines[-1].startswith("PASSED")


def test_data_mismatch_is_bad_data(qconv: onnx.ModelProto) -> None:
    with pytest.raises(BadDataError, match="do not match the model inputs"):
        validate(qconv, [{"y": np.zeros((1, 3, 12, 12), np.float32)}])
    with pytest.raises(BadDataError, match="axis 1 has size 4"):
        validate(qconv, [{"x": np.zeros((1, 4, 12, 12), np.float32)}])
    with pytest.raises(BadDataError, match="rank"):
        validate(qconv, [{"x": np.zeros((3, 12, 12), np.float32)}])
    with pytest.raises(BadDataError, match="no samples"):
        validate(qconv, [])


@pytest.mark.skipif(not (DIGITS / "model.onnx").exists(), reason="calib_data/digits not generated")
def test_digits_demo_bit_exact() -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = np.load(DIGITS / "calib.npz", allow_pickle=False)["input"]
    with tempfile.TemporaryDirectory() as tmp:
        quant_pre_process(str(DIGITS / "model.onnx"), f"{tmp}/p.onnx", skip_symbolic_shape=True)
        model = onnx.load(f"{tmp}/p.onnx")
    q = quantize(model, x[:64], input_name="input")
    data = [{"input": x[i : i + 32]} for i in range(64, 160, 32)]
    result = validate(q, data, requant="float")
    assert result.passed, "\n".join(result.summary_lines())
    assert sum(c.kind == KIND_INTEGER for c in result.nodes) >= 7
    fixed = validate(q, data, requant="fixed")
    assert fixed.passed, "\n".join(fixed.summary_lines())


@pytest.mark.parametrize("requant", ["float", "fixed"])
def test_segment_size_does_not_change_validation(requant):
    """ONNX Runtime's reference runs in segments; one checked tensor per segment or all in one: same."""
    model = conv_net()
    x = np.random.default_rng(3).standard_normal((12, 3, 12, 12)).astype(np.float32)
    q = quantize(model, x[:8])
    data = [{"x": x[i : i + 4]} for i in range(0, 12, 4)]
    small = validate(q, data, requant=requant, budget=1)
    large = validate(q, data, requant=requant, budget=2**40)
    assert small.summary_lines() == large.summary_lines()
    assert small.passed and small.samples == 12

"""The bundled digits demo (calib_data/digits) and the ResNet-18 generator in tools/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "calib_data" / "digits"


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def digits_model() -> onnx.ModelProto:
    return onnx.load(DIGITS / "model.onnx")


def test_digits_model_is_valid_with_unfolded_bn(digits_model: onnx.ModelProto) -> None:
    onnx.checker.check_model(digits_model, full_check=True)
    ops = [n.op_type for n in digits_model.graph.node]
    assert ops.count("BatchNormalization") == 4
    assert "Gemm" in ops
    assert [i.name for i in digits_model.graph.input] == ["input"]
    assert [o.name for o in digits_model.graph.output] == ["logits"]


def test_digits_calib_matches_model_input(digits_model: onnx.ModelProto) -> None:
    with np.load(DIGITS / "calib.npz", allow_pickle=False) as f:
        assert list(f.keys()) == ["input"]
        x = f["input"]
    dims = digits_model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert x.dtype == np.float32
    assert x.shape[0] >= 256
    assert list(x.shape[1:]) == [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_digits_eval_accuracy(digits_model: onnx.ModelProto) -> None:
    with np.load(DIGITS / "eval.npz", allow_pickle=False) as f:
        x, labels = f["input"], f["labels"]
    assert x.dtype == np.float32 and labels.dtype == np.int64
    assert len(labels) == len(x) >= 256
    logits = _session(DIGITS / "model.onnx").run(["logits"], {"input": x})[0]
    assert logits.shape == (len(x), 10)
    acc = float((logits.argmax(axis=1) == labels).mean())
    assert acc >= 0.95, acc


@pytest.fixture(scope="module")
def resnet18() -> onnx.ModelProto:
    return _load_tool("make_resnet18").build_resnet18(seed=0)


def test_resnet18_structure(resnet18: onnx.ModelProto) -> None:
    onnx.checker.check_model(resnet18, full_check=True)
    ops = [n.op_type for n in resnet18.graph.node]
    assert ops.count("BatchNormalization") == 20
    assert ops.count("Conv") == 20
    assert ops.count("Add") == 8
    assert ops.count("Gemm") == 1
    assert resnet18.opset_import[0].version == 13
    n_params = sum(int(np.prod(t.dims)) for t in resnet18.graph.initializer if "running" not in t.name)
    assert 11_600_000 < n_params < 11_750_000


def test_resnet18_runs_with_finite_logits(resnet18: onnx.ModelProto) -> None:
    x = _load_tool("make_resnet18").make_calib(2, seed=0)
    logits = _session(resnet18).run(["logits"], {"input": x})[0]
    assert logits.shape == (2, 1000)
    assert np.isfinite(logits).all()
    assert 0.1 < float(logits.std()) < 10.0

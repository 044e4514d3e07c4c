"""Criterion of the integer runtime: W8A8 ResNet-18-shaped model bit-exact with ONNX Runtime (float
requant)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import onnx
import pytest
from rt_nets import quantize

from onnxquant.runtime import validate
from onnxquant.runtime.plan import KIND_INTEGER

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_resnet18.py"


@pytest.mark.skipif(not TOOL.exists(), reason="tools/make_resnet18.py absent")
def test_resnet18_w8a8_bit_exact_at_every_integer_node() -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec = importlib.util.spec_from_file_location("make_resnet18", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model = tool.build_resnet18(seed=0)
    model.ir_version = min(model.ir_version, 10)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/f.onnx")
        quant_pre_process(f"{tmp}/f.onnx", f"{tmp}/p.onnx", skip_symbolic_shape=True)  # folds BN
        model = onnx.load(f"{tmp}/p.onnx")
    q = quantize(model, tool.make_calib(2, seed=0), input_name="input")
    result = validate(q, [{"input": tool.make_calib(1, seed=1)}], requant="float")
    assert result.passed, "\n".join(result.summary_lines())
    integer = [c for c in result.nodes if c.kind == KIND_INTEGER]
    assert len(integer) == 32  # 20 Conv, 8 Add, MaxPool, GlobalAveragePool, Flatten, Gemm
    assert sum(c.op == "Conv" for c in integer) == 20 and sum(c.op == "Add" for c in integer) == 8

"""The Python API: paths or ModelProtos, preset names or Rules, data as paths, mappings, arrays or iterables,
checked as the CLI checks them; the README's example runs; every written model runs in ONNX Runtime."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxquant import api
from onnxquant.api_inputs import as_data
from onnxquant.calib.readers import input_specs, open_data
from onnxquant.errors import BadDataError, BadModelError, BadOptionError
from onnxquant.model import load_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "calib_data" / "digits"
MODEL, CALIB = DEMO / "model.onnx", DEMO / "calib.npz"


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.load(CALIB)["input"][:64]


@pytest.fixture(scope="module")
def reference(calib) -> bytes:
    """The model the CLI's path gives: load_model, load_rules, a DataSource over the same samples."""
    model = load_model(MODEL)
    data = open_data(CALIB, input_specs(model), max_samples=64)
    rules = api.load_rules("default").with_cli(wbits=4, abits=4, method="minmax")
    return api.convert(model, rules, data=data).model.SerializeToString()


def convert_bytes(model, rules, data) -> bytes:
    return api.convert(model, rules, data=data, bits=4, method="minmax").model.SerializeToString()


@pytest.mark.parametrize(
    "make_data",
    [
        lambda x: x,  # a bare array
        lambda x: {"input": x},  # one mapping
        lambda x: x.astype(np.float64),  # float64, cast as the CLI casts it
        lambda x: [{"input": x[:40]}, {"input": x[40:]}],  # a list of batches
        lambda x: ({"input": b} for b in (x[:10], x[10:])),  # a generator, read once
        lambda x: lambda: [x[:32], x[32:]],  # a function returning batches
        lambda x: CALIB,  # a path (max_samples below)
    ],
    ids=["array", "mapping", "float64", "list", "generator", "function", "path"],
)
def test_every_accepted_form_gives_the_clis_model(calib, reference, make_data):
    data = make_data(calib)
    kwargs = {"max_samples": 64} if isinstance(data, Path) else {}
    out = api.convert(str(MODEL), "default", data=data, bits=4, method="minmax", **kwargs)
    assert out.model.SerializeToString() == reference


def test_a_model_proto_from_onnx_load_is_normalized_as_a_file_is(calib, reference):
    raw = onnx.load(str(MODEL))
    out = api.convert(raw, api.load_rules("default"), data=calib, wbits=4, abits=4, method="minmax")
    assert out.model.SerializeToString() == reference
    assert raw.SerializeToString() == MODEL.read_bytes()  # the caller's proto is untouched


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"wbits": 16}, BadOptionError, "wbits=16; accepted: an integer 2..8"),
        ({"bits": 1}, BadOptionError, "wbits=1; accepted: an integer 2..8"),
        ({"bits": 4, "abits": 4}, BadOptionError, "use bits=N, or wbits=N and abits=N, not both"),
        ({"method": "magic"}, BadOptionError, "method='magic'; accepted: minmax, percentile"),
        ({"bias_correction": "yes"}, BadOptionError, "bias_correction='yes'; accepted: None, mean, full"),
        ({"percentile": 120}, BadOptionError, "percentile=120; accepted: a number 50..100"),
        (
            {"rules": {"bits": 4}},
            BadOptionError,
            "rules: is a dict; accepted: a preset name (default, tensorrt, integer)",
        ),
        ({"model": 3}, BadModelError, "model: is a int; accepted: a path (str or os.PathLike) to an .onnx"),
        ({"data": "nowhere.npz"}, BadDataError, "nowhere.npz: no such file or directory"),
        ({"data": 3.5}, BadDataError, "data: is a float; accepted: a path (.npz, .npy, a directory)"),
        ({"data": {"image": np.zeros((2, 1, 8, 8))}}, BadDataError, "data batch 0: missing input(s) input"),
        ({"data": np.zeros((2, 8, 8), np.float32)}, BadDataError, "data batch 0: key 'input' has rank 3"),
    ],
)
def test_bad_arguments_raise_the_clis_one_line_errors(calib, kwargs, error, message):
    args = {"model": MODEL, "rules": "default", "data": calib, **kwargs}
    with pytest.raises(error) as err:
        api.convert(args.pop("model"), args.pop("rules"), **args)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_rules_with_cli_refuses_widths_out_of_range():
    with pytest.raises(BadOptionError, match=re.escape("abits=9; accepted: an integer 2..8")):
        api.load_rules("default").with_cli(abits=9)


def two_input_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3] a, float[N, 3] b) => (float[N, 2] y) { s = Add (a, b)
          y = Gemm <transB = 1> (s, w, c) }"""
    )
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.ones((2, 3), np.float32), "w"),
            numpy_helper.from_array(np.zeros(2, np.float32), "c"),
        ]
    )
    return model


def test_a_bare_array_for_a_two_input_model_is_one_line():
    with pytest.raises(BadDataError) as err:
        api.convert(two_input_model(), data=np.zeros((4, 3), np.float32))
    assert str(err.value) == (
        "data: a bare array feeds a single-input model, but the model has 2 inputs (a, b); accepted: a "
        "mapping {input_name: array}"
    )


def test_a_generator_read_twice_says_how_to_give_the_data(calib):
    batches = ({"input": b} for b in (calib[:32], calib[32:]))
    with pytest.raises(BadDataError, match="a one-shot iterator .* was already read"):
        source = as_data(batches, load_model(MODEL))
        assert sum(len(b["input"]) for b in source) == 64
        list(source)


def test_calibrate_validate_and_fold_take_paths_and_presets(calib):
    table, _ = api.calibrate(MODEL, "tensorrt", {"input": calib})
    assert table.activations() and any(e.kind == "weight" for e in table.tensors.values())
    folded, outcomes = api.fold(str(MODEL), "default")
    assert sum(o.applied for o in outcomes) >= 4 and not any(
        n.op_type == "BatchNormalization" for n in folded.graph.node
    )
    quant = api.convert(MODEL, data=calib, method="minmax").model
    result = api.validate(quant, calib[:16])
    assert result.passed


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.DOTALL)
    assert match, "README.md has no ```python block under '## Python API'"
    assert "api.convert(" in match.group(1) and "api.report(" in match.group(1)
    script = tmp_path / "readme_example.py"
    script.write_text(match.group(1))
    monkeypatch.chdir(ROOT)
    namespace = runpy.run_path(str(script))
    assert namespace["result"].summary.weights[4] == 5
    assert set(namespace["report"].output_sqnr()) == {"logits"}


# ------------------------------------------------------------ per-channel activations and ONNX Runtime fusion

BLOCKS = {
    "GlobalAveragePool": ("m = GlobalAveragePool (r1)", "float[N, 4, 1, 1] y", (4, 4, 1, 1)),
    "AveragePool": (
        "m = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1)",
        "float[N, 4, 6, 6] y",
        (4, 4, 1, 1),
    ),
    "Add": ("c2 = Conv (x, w1, b1)\n m = Add (r1, c2)", "float[N, 4, 6, 6] y", (4, 4, 1, 1)),
    "Concat": ("c2 = Conv (x, w1, b1)\n m = Concat <axis = 1> (r1, c2)", "float[N, 4, 6, 6] y", (4, 8, 1, 1)),
}


def block_model(op: str) -> onnx.ModelProto:
    """Conv → Relu → `op` → Conv: the pooled/added tensor is quantized on both sides of `op`."""
    body, output, w2 = BLOCKS[op]
    model = onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 4, 6, 6] x) => ({output}) {{
          c1 = Conv (x, w1, b1)
          r1 = Relu (c1)
          {body}
          y = Conv (m, w2, b2)
        }}"""
    )
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (4, 4, 1, 1)), ("b1", (4,)), ("w2", w2), ("b2", (4,))):
        model.graph.initializer.append(
            numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        )
    return model


def run_at(model: onnx.ModelProto, level, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


@pytest.mark.parametrize("op", list(BLOCKS))
@pytest.mark.parametrize("bit_alloc", ["activations", "both"])
def test_bit_allocated_models_run_in_onnx_runtime_at_every_level(op, bit_alloc):
    x = np.random.default_rng(1).standard_normal((16, 4, 6, 6)) * np.array([1, 10, 0.1, 3]).reshape(
        1, 4, 1, 1
    )
    result = api.convert(block_model(op), data=x, method="minmax", bit_alloc=bit_alloc)
    outputs = [run_at(result.model, level, {"x": x[:4].astype(np.float32)}) for level in LEVELS]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4 * np.abs(outputs[0]).max())
    assert any(e.axis == 1 for e in result.table.activations().values())  # allocation still happens


@pytest.mark.parametrize("bit_alloc", ["activations", "both"])
def test_the_demo_with_bit_allocation_runs_at_every_level(calib, bit_alloc):
    result = api.convert(MODEL, data=calib, method="minmax", bit_alloc=bit_alloc)
    outputs = [run_at(result.model, level, {"input": calib[:8]}) for level in LEVELS]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-3 * np.abs(outputs[0]).max())

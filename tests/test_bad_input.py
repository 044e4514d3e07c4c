"""Bad models at load (issue #14): inconsistent protobufs, zero-size and non-finite weights, a negative BN
variance, external data out of bounds, FIFOs. Each is one BadModelError line naming the file and tensor, never
a traceback, a hang or a numpy RuntimeWarning."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxquant.calib.weights import weight_range
from onnxquant.cli import main
from onnxquant.errors import BadModelError
from onnxquant.model import load_model
from onnxquant.passes import run_passes

RNG = np.random.default_rng(3)


def bn_mlp(**params: np.ndarray) -> onnx.ModelProto:
    """Conv(1→2) → BatchNormalization → Relu → Flatten → MatMul(32→3); `params` replace initializers."""
    values = {
        "w": RNG.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "b": RNG.standard_normal(2).astype(np.float32),
        "gamma": np.ones(2, np.float32),
        "beta": np.zeros(2, np.float32),
        "mu": RNG.standard_normal(2).astype(np.float32),
        "var": np.full(2, 0.5, np.float32),
        "m": RNG.standard_normal((32, 3)).astype(np.float32),
    }
    values.update(params)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mu", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "m"], ["z"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", values["m"].shape[1]])],
        [numpy_helper.from_array(v, k) for k, v in values.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(BadModelError, match=match) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and "accepted" in message, message
    return message


# --------------------------------------------------------------------------------- inconsistent protobufs


def _flipped(kind: str) -> bytes:
    """A model whose bytes parse but disagree with themselves, as a bit flip leaves them."""
    model = bn_mlp()
    if kind == "pads":  # Conv pads of the wrong length: fails only shape inference
        model.graph.node[0].attribute[0].ints[:] = [1, 1]
    elif kind == "dims":  # a weight's dims no longer match its data
        model.graph.initializer[0].dims[:] = [2, 1, 3, 1]
    elif kind == "rank":  # a declared output rank contradicting inference
        del model.graph.output[0].type.tensor_type.shape.dim[1]
    elif kind == "utf8":  # an op type that is no longer UTF-8 (the checker's message could not be decoded)
        model.graph.node[2].op_type = "RELU"
        return model.SerializeToString().replace(b"RELU", b"\xf4ELU")
    elif kind == "name":  # a node name that is no longer UTF-8: parsed as bytes, which the checker ignores
        model.graph.node[2].name = "relu_node"
        return model.SerializeToString().replace(b"relu_node", b"\xedelu_node")
    elif kind == "location":  # an external-data location that is no longer UTF-8
        tensor = model.graph.initializer[-1]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="weights.bin")
        return model.SerializeToString().replace(b"weights.bin", b"w\xffights.bin")
    return model.SerializeToString()


@pytest.mark.parametrize(
    "kind, match",
    [
        ("pads", r"invalid ONNX model \(shape inference: .*pads"),
        ("dims", r"invalid ONNX model|tensor 'w'"),
        ("rank", r"invalid ONNX model \(shape inference"),
        ("utf8", r"model\.graph\.node\[2\]\.op_type is not UTF-8 text"),
        ("name", r"model\.graph\.node\[2\]\.name is not UTF-8 text \(b'\\xedelu_node'\)"),
        ("location", r"model\.graph\.initializer\[6\]\.external_data\[0\]\.value is not UTF-8"),
    ],
)
def test_inconsistent_protobuf_is_one_line(tmp_path, kind, match):
    path = tmp_path / "m.onnx"
    path.write_bytes(_flipped(kind))
    assert str(path) in _one_line_error(path, match)


def test_ir3_header_on_a_modern_opset_is_one_line(tmp_path):
    """IR 3 (initializers must be graph inputs) with opset 13 and a Constant weight passes the checker; once
    the Constant is an initializer, the converted model failed onnx.checker (exit 70)."""
    model = bn_mlp()
    m = model.graph.initializer.pop()
    model.graph.node.insert(0, helper.make_node("Constant", [], [m.name], value=m, name="m_const"))
    model.ir_version = 3
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert str(path) in _one_line_error(path, r"IR version 3 is older than its opsets allow \(IR version 7")


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    "params, match",
    [
        (
            {"m": np.zeros((32, 0), np.float32)},
            r"tensor 'm' \(MatMul 'fc'\): zero-size weight of shape \(32, 0\)",
        ),
        (
            {"b": np.array([0.1, np.nan], np.float32)},
            r"tensor 'b' \(Conv 'conv'\): holds NaN at index \(1,\)",
        ),
        ({"w": np.full((2, 1, 3, 3), np.inf, np.float32)}, r"tensor 'w' \(Conv 'conv'\): holds Inf at index"),
        ({"m": np.full((32, 3), np.nan, np.float32)}, r"tensor 'm' \(MatMul 'fc'\): holds NaN"),
        (
            {"beta": np.array([np.inf, 0], np.float32)},
            r"tensor 'beta' \(BatchNormalization 'bn'\): holds Inf",
        ),
        (
            {"var": np.array([0.5, -1.0], np.float32)},
            r"tensor 'var' \(BatchNormalization 'bn'\): variance \+ epsilon is -0.99999 at channel 1",
        ),
    ],
)
def test_unusable_weights_are_named_at_load(tmp_path, params, match):
    path = tmp_path / "m.onnx"
    onnx.save(bn_mlp(**params), path)
    _one_line_error(path, match)


def test_inf_outside_weights_is_kept(tmp_path):
    """Inf in a constant that is not a weight (a Clip bound, a mask) is legitimate."""
    model = bn_mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.inf, np.float32), "hi"))
    model.graph.node[2].CopyFrom(helper.make_node("Clip", ["bn", "", "hi"], ["r"], name="clip"))
    onnx.save(model, tmp_path / "m.onnx")
    assert load_model(tmp_path / "m.onnx").graph.node[2].op_type == "Clip"


def test_weight_range_names_the_weight():
    w = np.ones((2, 3), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(BadModelError, match=r"tensor 'fc.weight': the weight holds NaN or Inf; accepted"):
        weight_range(w, 0, 4, name="fc.weight")
    with pytest.raises(BadModelError, match=r"tensor 'e': zero-size weight of shape \(2, 0\)"):
        weight_range(np.ones((2, 0), np.float32), 0, 4, name="e")


def test_negative_variance_folds_with_a_reason_and_no_runtime_warning():
    """A model handed to the API directly (not loaded) still gives no RuntimeWarning: the BN is not folded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, outcomes = run_passes(bn_mlp(var=np.array([0.5, -1.0], np.float32)), ["fold_conv_bn"])
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 1
    assert any("var + epsilon <= 0" in o.reason for o in outcomes), outcomes


def test_cli_negative_variance_is_one_line_without_runtime_warning(tmp_path):
    onnx.save(bn_mlp(var=np.array([0.5, -1.0], np.float32)), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((4, 1, 4, 4)).astype(np.float32))
    args = ["convert", tmp_path / "m.onnx", "--calib-data", tmp_path / "d.npz", "-o", tmp_path / "q.onnx"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    expected = (
        f"error: {tmp_path / 'm.onnx'}: tensor 'var' (BatchNormalization 'bn'): variance + epsilon is "
        "-0.99999 at channel 1; accepted: var + epsilon > 0"
    )
    assert result.output.strip().splitlines() == [expected]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------------ external data


def _external(tmp_path: Path, **entries: str) -> Path:
    """The model with every weight in w.bin; `entries` overwrite the first weight's external_data keys."""
    path = tmp_path / "m.onnx"
    onnx.save(bn_mlp(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    info = model.graph.initializer[0].external_data
    for key, value in entries.items():
        found = next((e for e in info if e.key == key), None)
        if found is None:
            found = info.add()
            found.key = key
        found.value = value
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "entries, match",
    [
        ({"location": "w.bin\0evil"}, r"tensor 'w': external data location .* holds a NUL byte"),
        ({"offset": "-4"}, r"tensor 'w': external data in .*w.bin: offset -4 \+ length 72 is outside"),
        ({"offset": "1000000"}, r"offset 1000000 \+ length 72 is outside the file's \d+ bytes"),
        ({"length": "-8"}, r"offset 0 \+ length -8 is outside"),
        ({"length": "1000000"}, r"length 1000000 is outside"),
        ({"length": "8"}, r"tensor 'w': external data in .*: 8 bytes but dims \(2, 1, 3, 3\) need 72"),
        ({"offset": "x"}, r"offset 'x' / length '72' are not integers"),
    ],
)
def test_external_data_bounds(tmp_path, entries, match):
    path = _external(tmp_path, **entries)
    with pytest.raises(BadModelError, match=match) as err:
        load_model(path)
    assert "\n" not in str(err.value) and "accepted" in str(err.value)


def _load_with_fifo_guard(path: Path, fifo: Path) -> BaseException | None:
    """load_model(path) in a thread; if it blocks on the FIFO, open the FIFO's write end to release it and
    fail: the loader must refuse a FIFO before opening it."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            load_model(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))  # the reader gets EOF and returns
        thread.join(10)
        pytest.fail(f"load_model blocked reading the FIFO {fifo}")
    return outcome[0]


def test_fifo_as_model_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    exc = _load_with_fifo_guard(fifo, fifo)
    assert isinstance(exc, BadModelError) and "is not a regular file (a FIFO" in str(exc), exc


def test_fifo_as_external_data_is_refused_without_blocking(tmp_path):
    path = _external(tmp_path)
    (tmp_path / "w.bin").unlink()
    os.mkfifo(tmp_path / "w.bin")
    exc = _load_with_fifo_guard(path, tmp_path / "w.bin")
    assert isinstance(exc, BadModelError) and "w.bin: is not a regular file" in str(exc), exc

"""Impossible tables and statistics (issue #14): JSON nested 10^5 deep, widths, zero points and scales no
runtime can use, per-channel entries that do not fit the model, TensorRT cache lines with truncated hex or a
zero scale, saved statistics with NaN or missing fields. Each is one BadDataError line naming the file and
the key."""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import replace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxquant import api
from onnxquant.calib.stats import stats_of
from onnxquant.calib.stats_io import load_stats, save_stats
from onnxquant.cli import main
from onnxquant.errors import BadDataError
from onnxquant.tables import load_table, loads_tensorrt_cache

ENTRY = {
    "min": -1.0,
    "max": 2.0,
    "amax": 2.0,
    "scale": 0.01,
    "zero_point": 100,
    "bits": 8,
    "signed": False,
    "method": "minmax",
}
CHANNELS = {**ENTRY, "scale": [0.01, 0.02], "zero_point": [0, 3], "bits": [8, 4], "axis": 0}
CHANNELS.update({k: [ENTRY[k]] * 2 for k in ("min", "max", "amax")})


def _table_text(**entry) -> str:
    return json.dumps(
        {
            "format": "onnxquant-calibration",
            "version": 1,
            "method": "minmax",
            "bits": 8,
            "tensors": {"t": entry},
        }
    )


def _refused(tmp_path, text: str, match: str) -> str:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(BadDataError) as info:
        load_table(path)
    msg = str(info.value)
    assert match in msg and "\n" not in msg and str(path) in msg, msg
    return msg


def test_fifo_as_table_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "t.json"
    os.mkfifo(fifo)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_error_of(load_table, fifo)), daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # blocked in open(): a writer releases it
        os.close(os.open(fifo, os.O_WRONLY))
        thread.join(10)
        pytest.fail("load_table blocked reading a FIFO")
    assert isinstance(outcome[0], BadDataError) and "t.json: is not a regular file" in str(outcome[0])


def _error_of(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def test_valid_entries_still_load(tmp_path):
    (tmp_path / "t.json").write_text(_table_text(**ENTRY))
    assert load_table(tmp_path / "t.json").tensors["t"].zero_point == 100
    (tmp_path / "t.json").write_text(_table_text(**CHANNELS))
    assert load_table(tmp_path / "t.json").tensors["t"].bits == [8, 4]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"format": "onnxquant-calibration", "tensors": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001,
        '{"CLS": "TensorsData", "data": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_deeply_nested_json_is_refused(tmp_path, text):
    _refused(tmp_path, text, "levels deep; accepted: at most 32 levels")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"bits": 1}, "tensor 't'.bits: 1 out of range; accepted: 2..8"),
        ({"bits": 9}, "tensor 't'.bits: 9 out of range; accepted: 2..8"),
        ({"bits": 16}, "tensor 't'.bits: 16 out of range"),
        ({"zero_point": 256}, "tensor 't'.zero_point: 256; accepted: 0..255 for unsigned 8-bit codes"),
        ({"zero_point": 16, "bits": 4}, "tensor 't'.zero_point: 16; accepted: 0..15 for unsigned 4-bit"),
        ({"zero_point": -1}, "tensor 't'.zero_point: -1; accepted: 0..255"),
        ({"signed": True, "zero_point": 3}, "tensor 't'.zero_point: 3; accepted: 0 for a signed"),
        ({"scale": 1e39}, "tensor 't'.scale: 1e+39 is denormal or overflows float32"),
        ({"scale": 1e-40}, "tensor 't'.scale: 1e-40 is denormal or overflows float32"),
        ({"scale": 0.0}, "tensor 't'.scale: 0.0 is not positive"),
        ({"scale": -0.5}, "tensor 't'.scale: -0.5 is not positive"),
        ({"min": 3.0}, "tensor 't': min > max or a negative amax"),
        ({"amax": -1.0}, "min > max or a negative amax"),
    ],
)
def test_impossible_per_tensor_fields(tmp_path, changes, match):
    _refused(tmp_path, _table_text(**{**ENTRY, **changes}), match)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"bits": [8, 9]}, "tensor 't'.bits[1]: 9 out of range"),
        ({"zero_point": [0, 16]}, "tensor 't'.zero_point[1]: 16; accepted: 0..15 for unsigned 4-bit codes"),
        ({"scale": [0.01, 1e-45]}, "tensor 't'.scale[1]: 1e-45 is denormal"),
        ({"axis": -1}, "tensor 't'.axis: -1; accepted: a non-negative integer"),
        (
            {"spread_ratio": [1.0, 1e-40], "kind": "weight"},
            "tensor 't'.scale[1]: 0.02 times spread_ratio 1e-40 is denormal",
        ),
    ],
)
def test_impossible_per_channel_fields(tmp_path, changes, match):
    _refused(tmp_path, _table_text(**{**CHANNELS, **changes}), match)


def test_ort_range_overflowing_float32_is_refused(tmp_path):
    text = json.dumps({"t": [-1e300, 1e300]})
    _refused(
        tmp_path, text, "tensor 't': lowest is outside the float32 range; accepted: |value| <= 3.40282e+38"
    )


def test_tensorrt_scale_overflowing_at_4_bits_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadDataError, match=r"line 2: tensor 't'.scale: inf is denormal or overflows"):
            loads_tensorrt_cache("TRT-8601-EntropyCalibration2\nt: 7f000000\n", "c", bits=4)


# --------------------------------------------------------------------------------- per-channel vs the model


def _conv() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize(
    "axis, length, match",
    [
        (4, 4, "tensor 'w': axis 4 but the tensor has rank 4; accepted: an axis in 0..3"),
        (1, 4, "tensor 'w': 4 per-channel values but axis 1 has 3 channels; accepted: one value per channel"),
        (0, 3, "tensor 'w': 3 per-channel values but axis 0 has 4 channels"),
    ],
)
def test_per_channel_entry_must_fit_the_weight(axis, length, match):
    model = _conv()
    x = np.random.default_rng(1).standard_normal((8, 3, 6, 6)).astype(np.float32)
    rules = api.load_rules(None)
    table = api.convert(model, rules, data=[{"x": x}]).table
    w = table.tensors["w"]
    lists = {k: getattr(w, k)[:length] for k in CHANNEL_LISTS}
    bad = replace(table, tensors={**table.tensors, "w": replace(w, axis=axis, **lists)})
    with pytest.raises(BadDataError, match=match):
        api.convert(model, rules, table=bad)


CHANNEL_LISTS = ("min", "max", "amax", "scale", "zero_point", "bits")


# ------------------------------------------------------------------------------------------ TensorRT cache


@pytest.mark.parametrize(
    "line, match",
    [
        ("t: 3c01", "line 2: expected 'tensor_name: <8 hex digits>', got 't: 3c01'"),
        ("t: 3c010a1", "expected 'tensor_name: <8 hex digits>'"),
        ("t: 00000000", "line 2: scale 0.0 of 't'; accepted: a positive normal float32"),
        ("t: 00000001", "line 2: scale 1.401298464324817e-45 of 't'; accepted: a positive normal"),
        ("t: 80000000", "scale -0.0 of 't'"),
    ],
)
def test_bad_tensorrt_cache_lines(line, match):
    with pytest.raises(BadDataError, match=match.replace("(", r"\(").replace(")", r"\)")):
        loads_tensorrt_cache(f"TRT-8601-EntropyCalibration2\n{line}\n", "cal.cache")
    assert loads_tensorrt_cache("TRT-8601-EntropyCalibration2\nt: 3c010a14\n").tensors["t"].amax > 1.0


@pytest.mark.parametrize("amax, scale", [(0.0, "0"), (1e-40, "7.87402e-43")])
def test_tensorrt_cache_is_not_written_with_a_scale_its_reader_refuses(tmp_path, amax, scale):
    """A hand-edited amax of 0 (or denormal after /127) passed the JSON checks and was written as a cache line
    that `loads_tensorrt_cache` (and TensorRT) refuse; found by the long fuzz profile."""
    table, out = tmp_path / "t.json", tmp_path / "t.cache"
    table.write_text(_table_text(**{**ENTRY, "amax": amax}))
    result = CliRunner().invoke(main, ["table", str(table), "--format", "tensorrt", "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.startswith(
        f"error: tensor 't': amax {amax} gives the TensorRT scale {scale} (amax/127); accepted: amax in "
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------------------------- --load-stats


def _stats_file(tmp_path, edit) -> str:
    path = tmp_path / "s.npz"
    save_stats({"t": stats_of(np.linspace(-1, 2, 1000).reshape(10, 100), bins=64)}, path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a: a.update({"0.min": np.array(np.nan)}), "tensor 't' field min holds NaN or Inf"),
        (lambda a: a.update({"0.m2": np.array(np.inf)}), "tensor 't' field m2 holds NaN or Inf"),
        (lambda a: a.update({"0.max": np.array(np.inf)}), "tensor 't' field max holds NaN or Inf"),
        (
            lambda a: a.update({"0.histogram.sums": a["0.histogram.counts"] * np.nan}),
            "histogram.sums holds NaN",
        ),
        (lambda a: a.pop("0.count"), "tensor 't' lacks field count"),
        (lambda a: a.pop("0.m2"), "tensor 't' lacks field m2"),
        (lambda a: a.pop("0.histogram.grid"), "tensor 't' lacks field histogram.grid"),
        (lambda a: a.update({"0.count": np.array(-5)}), "tensor 't' field count is negative"),
        (lambda a: a.update({"0.sum": np.array("x")}), "tensor 't' field sum is <U1, not a number"),
    ],
)
def test_bad_saved_statistics(tmp_path, edit, match):
    path = _stats_file(tmp_path, edit)
    with pytest.raises(BadDataError) as info:
        load_stats(path)
    msg = str(info.value)
    assert match in msg and str(path) in msg and "\n" not in msg, msg


def test_saved_statistics_round_trip(tmp_path):
    stats = load_stats(_stats_file(tmp_path, lambda a: None))
    assert stats["t"].count == 1000 and stats["t"].min == -1.0 and stats["t"].max == 2.0


def test_empty_tensor_statistics_keep_their_infinite_bounds(tmp_path):
    path = tmp_path / "s.npz"
    empty = stats_of(np.zeros((0, 3)), bins=64, histograms=False)
    save_stats({"t": empty}, path)
    assert load_stats(path)["t"].count == 0

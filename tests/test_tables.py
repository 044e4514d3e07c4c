"""Calibration tables: canonical JSON, TensorRT cache, ONNX Runtime JSON; round trips and bad files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from onnxquant.errors import BadDataError
from onnxquant.tables import (
    FORMATS,
    CalibrationTable,
    TensorRange,
    dumps_json,
    load_table,
    read_json,
    read_ort,
    read_tensorrt_cache,
    save_table,
    sniff_format,
    write_json,
    write_ort,
    write_tensorrt_cache,
)


def _table() -> CalibrationTable:
    tensors = {
        "conv1_out": TensorRange.from_range(-0.7, 6.1, 4, False, "laplace"),
        "relu/1:0": TensorRange.from_range(0.0, 2.0000001, 8, True, "laplace"),
        "neg": TensorRange.from_range(-1 / 3, 1e-20, 8, True, "kl"),
        "pc": TensorRange.from_range(
            np.array([-1.0, -0.1, 0.0]),
            np.array([1.0, 0.3, 2e-7]),
            np.array([4, 8, 2]),
            True,
            "laplace",
            axis=1,
        ),
        "zero": TensorRange.from_range(-1.0, 1.0, 8, True, "minmax").with_note("constant 0"),
    }
    return CalibrationTable(method="laplace", bits=8, tensors=tensors)


def test_json_round_trip_is_lossless_and_byte_identical(tmp_path):
    table = _table()
    write_json(table, tmp_path / "t.json")
    back = read_json(tmp_path / "t.json")
    assert back == table
    write_json(back, tmp_path / "t2.json")
    assert (tmp_path / "t.json").read_bytes() == (tmp_path / "t2.json").read_bytes()
    obj = json.loads((tmp_path / "t.json").read_text())
    assert obj["format"] == "onnxquant-calibration" and obj["version"] == 1
    assert obj["tensors"]["conv1_out"]["zero_point"] > 0 and obj["tensors"]["pc"]["axis"] == 1
    text = dumps_json(table)
    assert text.splitlines()[0] == "{" and text.isascii() and list(obj) == sorted(obj)
    assert load_table(tmp_path / "t.json") == table


def parse_tensorrt_cache(text: str) -> dict[str, float]:
    """Read a cache the way TensorRT does: a 'TRT-' header line, then 'name: hex' with hex = float32 bits."""
    lines = text.split("\n")
    assert lines[0].startswith("TRT-") and lines[0].endswith("-EntropyCalibration2")
    ranges = {}
    for line in lines[1:]:
        if not line:
            continue
        name, hexval = line.rsplit(": ", 1)
        assert len(hexval) == 8
        scale = struct.unpack(">f", bytes.fromhex(hexval))[0]
        ranges[name] = scale * 127.0  # dynamic range
    return ranges


def test_tensorrt_cache_parsed_the_way_tensorrt_reads_it(tmp_path):
    table = _table()
    write_tensorrt_cache(table, tmp_path / "calibration.cache")
    text = (tmp_path / "calibration.cache").read_text()
    ranges = parse_tensorrt_cache(text)
    assert set(ranges) == set(table.tensors)
    for name, entry in table.tensors.items():
        assert ranges[name] == pytest.approx(entry.amax_max, rel=1e-7)
    back = read_tensorrt_cache(tmp_path / "calibration.cache")
    assert back.tensors["relu/1:0"].amax == pytest.approx(2.0000001, rel=1e-7)
    save_table(back, tmp_path / "again.cache", "tensorrt")
    assert (tmp_path / "again.cache").read_text() == text
    assert load_table(tmp_path / "again.cache") == back


def test_tensorrt_cache_example_value(tmp_path):
    (tmp_path / "c.cache").write_text("TRT-8601-EntropyCalibration2\ninput: 3c010a14\n")
    entry = load_table(tmp_path / "c.cache").tensors["input"]
    assert entry.scale == pytest.approx(0.0078759, abs=1e-7)
    assert entry.amax == pytest.approx(1.0002, abs=1e-4)
    assert entry.signed and entry.zero_point == 0 and entry.bits == 8
    save_table(load_table(tmp_path / "c.cache"), tmp_path / "d.cache", "tensorrt")
    assert (tmp_path / "d.cache").read_text() == "TRT-8601-EntropyCalibration2\ninput: 3c010a14\n"


def test_ort_round_trip_and_onnxruntime_reads_it(tmp_path):
    table = _table()
    write_ort(table, tmp_path / "calibration.json")
    assert read_ort(tmp_path / "calibration.json") == table
    assert load_table(tmp_path / "calibration.json") == table
    calibrate = pytest.importorskip("onnxruntime.quantization.calibrate")
    if not hasattr(calibrate, "load_tensors_data"):
        pytest.skip("this ONNX Runtime has no load_tensors_data")
    ort = calibrate.load_tensors_data(tmp_path / "calibration.json")
    lo, hi = ort["conv1_out"].range_value
    assert (float(lo), float(hi)) == (np.float32(-0.7), np.float32(6.1))
    assert ort["neg"].range_value[1].dtype == np.float32


def test_ort_legacy_and_plain_ranges(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"a": [-1.0, 3.0], "b": [0.0, 2.0]}))
    table = load_table(tmp_path / "old.json", bits=8, symmetric=False)
    assert table.tensors["a"].min == -1.0 and table.tensors["a"].max == 3.0
    assert table.tensors["a"].zero_point == 64 and not table.tensors["a"].signed
    # an ORT file whose ranges were edited: the edited range wins over the embedded canonical copy
    write_ort(_table(), tmp_path / "c.json")
    obj = json.loads((tmp_path / "c.json").read_text())
    obj["data"]["neg"]["highest"]["data"] = 5.0
    (tmp_path / "c.json").write_text(json.dumps(obj))
    assert load_table(tmp_path / "c.json").tensors["neg"].max == 5.0


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "not a calibration table"),
        ("{not json", "not a calibration table"),
        (
            '{"format": "onnxquant-calibration", "version": 2, "method": "kl", "bits": 8, "tensors": {}}',
            "version",
        ),
        (
            (
                '{"format": "onnxquant-calibration", "version": 1, "method": "kl", "bits": 8, '
                '"tensors": {"a": {}}}'
            ),
            "tensor 'a': missing",
        ),
        (
            (
                '{"format": "onnxquant-calibration", "version": 1, "method": "kl", "bits": 8, '
                '"tensors": {"a": '
                '{"min": 0, "max": 1, "amax": 1, "scale": -1, "zero_point": 0, "bits": 8, "signed": true, '
                '"method": "kl"}}}'
            ),
            "not positive",
        ),
        ("TRT-8601-EntropyCalibration2\na: zz\n", "line 2"),
        ('{"a": [1]}', "expected \\[min, max\\]"),
        ('{"CLS": "TensorsData", "data": {"a": {"lowest": "x", "highest": 1}}}', "not numeric"),
    ],
)
def test_corrupted_tables_are_errors(tmp_path, content, match):
    path = tmp_path / "bad.table"
    path.write_text(content)
    with pytest.raises(BadDataError, match=match):
        load_table(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(BadDataError, match="no such file"):
        load_table(tmp_path / "nope.json")
    with pytest.raises(BadDataError, match="accepted: json, tensorrt, ort"):
        save_table(_table(), tmp_path / "x", "yaml")
    assert not (tmp_path / "x").exists()


def test_check_tensors_lists_unknown_and_missing():
    table = _table()
    table.check_tensors(known=set(table.tensors) | {"other"}, required={"neg"})
    with pytest.raises(BadDataError, match=r"does not have: 'zero'.*needs: 'other'"):
        table.check_tensors(known=set(table.tensors) - {"zero"}, required={"other"})


def test_format_registry_round_trips_and_is_sniffed(tmp_path):
    table = _table()
    assert tuple(FORMATS) == ("json", "tensorrt", "ort")
    for fmt in FORMATS.values():
        text = fmt.dumps(table)
        assert sniff_format(text) == fmt.name
        save_table(table, tmp_path / fmt.name, fmt.name)
        assert (tmp_path / fmt.name).read_text() == text
        back = load_table(tmp_path / fmt.name)
        assert back.tensors.keys() == table.tensors.keys()
        assert back.tensors["neg"].amax_max == pytest.approx(1 / 3, rel=1e-6)

"""Calibration tables: the canonical JSON (DESIGN.md, version 1) and formats derived from it.

A `CalibrationTable` maps tensor names to `TensorRange`s and describes the whole model: activations
(`kind` "activation", the default) and every quantized weight (`kind` "weight", per output channel, with the
bias-correction data `bias_shift` and `spread_ratio` where it was applied), so a table written by onnxquant
reproduces its model. Per-tensor entries carry scalars; per-channel entries carry lists (`scale`,
`zero_point`, `bits`, and `min`/`max`/`amax`) and an `axis`.

Formats (the `FORMATS` registry, used by `save_table` and by `load_table`, which sniffs the format):

- json: canonical and deterministic: ASCII, keys sorted, one tensor per line, floats in Python's shortest
  round-trip repr (−0.0 written as 0.0), so reading and rewriting gives the same bytes.
- tensorrt: TensorRT calibration cache: `TRT-<version>-EntropyCalibration2`, then `name: <8 hex>` per
  activation (sorted; TensorRT quantizes weights itself), the hex being the big-endian IEEE-754 float32 of
  amax/127 (TensorRT is 8-bit symmetric; other widths and per-channel entries are written as their overall
  amax, with a warning). Read back as 8-bit symmetric entries with amax = scale·127.
- ort: the JSON ONNX Runtime writes with `onnxruntime.quantization.calibrate.save_tensors_data` and reads
  with `load_tensors_data` (a serialized `TensorsData`: per tensor `lowest`/`highest` float32 arrays), plus an
  extra top-level `onnxquant` key holding the canonical table so the round trip is lossless (ONNX Runtime
  ignores it). Reading also accepts the older `calibration.json` of `write_calibration_table`
  ({tensor: [min, max]}); entries without the canonical copy get `bits` and `symmetric` from the caller.
  ONNX Runtime's flatbuffers and `.cache` variants are not handled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onnxquant.errors import BadDataError
from onnxquant.model import atomic_write
from onnxquant.model_checks import regular_file_size
from onnxquant.tables.canonical import MAX_JSON_DEPTH, dumps_json, json_depth, loads_json
from onnxquant.tables.entries import FORMAT_NAME, FORMAT_VERSION, TENSOR_KINDS, CalibrationTable, TensorRange
from onnxquant.tables.ort import dumps_ort, loads_ort
from onnxquant.tables.tensorrt import TRT_CALIBRATOR, TRT_VERSION, dumps_tensorrt_cache, loads_tensorrt_cache

__all__ = [
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TABLE_FORMATS",
    "TENSOR_KINDS",
    "TRT_CALIBRATOR",
    "TRT_VERSION",
    "CalibrationTable",
    "TableFormat",
    "TensorRange",
    "dumps_json",
    "dumps_ort",
    "dumps_tensorrt_cache",
    "load_table",
    "loads_json",
    "loads_ort",
    "loads_tensorrt_cache",
    "read_json",
    "read_ort",
    "read_tensorrt_cache",
    "save_table",
    "sniff_format",
    "write_json",
    "write_ort",
    "write_tensorrt_cache",
]


def _write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))


def _read_text(path: str | os.PathLike) -> str:
    regular_file_size(Path(path), "table", "a table file", BadDataError)  # a FIFO would block the read
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BadDataError(f"{path}: not a text file; accepted: {_ACCEPTED}") from None
    except OSError as exc:
        raise BadDataError(f"{path}: cannot read ({exc.strerror})") from exc


def write_json(table: CalibrationTable, path: str | os.PathLike) -> None:
    _write_text(path, dumps_json(table))


def read_json(path: str | os.PathLike) -> CalibrationTable:
    return loads_json(_read_text(path), str(path))


def write_tensorrt_cache(
    table: CalibrationTable, path: str | os.PathLike, version: str = TRT_VERSION
) -> None:
    _write_text(path, dumps_tensorrt_cache(table, version))


def read_tensorrt_cache(path: str | os.PathLike, bits: int = 8) -> CalibrationTable:
    return loads_tensorrt_cache(_read_text(path), str(path), bits)


def write_ort(table: CalibrationTable, path: str | os.PathLike) -> None:
    _write_text(path, dumps_ort(table))


def read_ort(path: str | os.PathLike, bits: int = 8, symmetric: bool = False) -> CalibrationTable:
    return loads_ort(_read_text(path), str(path), bits, symmetric)


@dataclass(frozen=True)
class TableFormat:
    """A table file format: its text writer and reader, and how messages name it."""

    name: str
    description: str
    dumps: Callable[[CalibrationTable], str]
    loads: Callable[..., CalibrationTable]  # (text, where, bits, symmetric); the last two if not in the file


FORMATS: dict[str, TableFormat] = {
    f.name: f
    for f in (
        TableFormat("json", "onnxquant JSON", dumps_json, loads_json),
        TableFormat(
            "tensorrt", "TensorRT cache (first line 'TRT-...')", dumps_tensorrt_cache, loads_tensorrt_cache
        ),
        TableFormat("ort", "ONNX Runtime calibration JSON", dumps_ort, loads_ort),
    )
}
TABLE_FORMATS = tuple(FORMATS)
_ACCEPTED = ", ".join(f.description for f in FORMATS.values())


def sniff_format(text: str) -> str:
    """The name of the format of table text `text` (a key of FORMATS), or "unknown"."""
    if text.startswith("TRT-"):
        return "tensorrt"
    if json_depth(text) > MAX_JSON_DEPTH:
        return "json"  # its reader refuses the depth in one line naming the file
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return "unknown"
    if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
        return "json"
    if isinstance(obj, dict):
        return "ort"
    return "unknown"


def load_table(path: str | os.PathLike, *, bits: int = 8, symmetric: bool = False) -> CalibrationTable:
    """Read a table in any supported format (sniffed); `bits`/`symmetric` apply where the file lacks them."""
    text = _read_text(path)
    fmt = FORMATS.get(sniff_format(text))
    if fmt is None:
        raise BadDataError(f"{path}: not a calibration table; accepted: {_ACCEPTED}")
    return fmt.loads(text, str(path), bits, symmetric)


def save_table(table: CalibrationTable, path: str | os.PathLike, format: str = "json") -> None:
    """Write `table` atomically in `format` (a key of FORMATS: json | tensorrt | ort)."""
    if format not in FORMATS:
        raise BadDataError(f"unknown table format {format!r}; accepted: {', '.join(FORMATS)}")
    _write_text(path, FORMATS[format].dumps(table))

"""Calibration tables: the canonical JSON (DESIGN.md, version 1) and formats derived from it.

A `CalibrationTable` maps activation tensor names to `TensorRange`s. Per-tensor entries carry scalars;
per-channel entries carry lists (`scale`, `zero_point`, `bits`, and `min`/`max`/`amax`) and an `axis`.

Formats (the `FORMATS` registry, used by `save_table` and by `load_table`, which sniffs the format):

- json: canonical and deterministic: ASCII, keys sorted, one tensor per line, floats in Python's shortest
  round-trip repr (−0.0 written as 0.0), so reading and rewriting gives the same bytes.
- tensorrt: TensorRT calibration cache: `TRT-<version>-EntropyCalibration2`, then `name: <8 hex>` per tensor
  (sorted), the hex being the big-endian IEEE-754 float32 of amax/127 (TensorRT is 8-bit symmetric; other
  widths and per-channel entries are written as their overall amax, with a warning). Read back as 8-bit
  symmetric entries with amax = scale·127.
- ort: the JSON ONNX Runtime writes with `onnxruntime.quantization.calibrate.save_tensors_data` and reads
  with `load_tensors_data` (a serialized `TensorsData`: per tensor `lowest`/`highest` float32 arrays), plus an
  extra top-level `onnxquant` key holding the canonical table so the round trip is lossless (ONNX Runtime
  ignores it). Reading also accepts the older `calibration.json` of `write_calibration_table`
  ({tensor: [min, max]}); entries without the canonical copy get `bits` and `symmetric` from the caller.
  ONNX Runtime's flatbuffers and `.cache` variants are not handled.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxquant.errors import BadDataError
from onnxquant.model import atomic_write
from onnxquant.quant import QParams, qparams_from_range

log = logging.getLogger(__name__)

FORMAT_NAME = "onnxquant-calibration"
FORMAT_VERSION = 1
TENSOR_KINDS = ("activation", "weight")
OPTIONAL_KEYS = ("kind", "bias_shift", "spread_ratio")  # besides axis and note; weight entries only


@dataclass(frozen=True)
class TensorRange:
    """Calibrated range and quantization parameters of one tensor."""

    min: float | list[float]
    max: float | list[float]
    amax: float | list[float]
    scale: float | list[float]
    zero_point: int | list[int]
    bits: int | list[int]
    signed: bool
    method: str
    axis: int | None = None
    note: str | None = None
    kind: str = "activation"  # or "weight": a quantized initializer (per output channel along `axis`)
    bias_shift: list[float] | None = None  # weights: per-channel shift of the layer's bias (bias correction)
    spread_ratio: list[float] | None = None  # weights: ξ_c, DequantizeLinear scale = scale·ξ_c (bias correction)

    @classmethod
    def from_range(cls, lo, hi, bits, symmetric: bool, method: str, axis: int | None = None) -> TensorRange:
        """Entry for the clipping range [lo, hi] at `bits` (scalars, or arrays for per-channel)."""
        p = qparams_from_range(lo, hi, bits, symmetric, axis)
        lo64, hi64 = np.minimum(np.asarray(lo, np.float64), 0), np.maximum(np.asarray(hi, np.float64), 0)

        def plain(a, kind=float):
            a = np.asarray(a)
            return kind(a) if a.ndim == 0 else [kind(v) for v in a.ravel()]

        return cls(min=plain(lo64), max=plain(hi64), amax=plain(np.maximum(-lo64, hi64)),
                   scale=plain(p.scale), zero_point=plain(p.zero_point, int), bits=plain(p.bits, int),
                   signed=symmetric, method=method, axis=axis)

    def qparams(self) -> QParams:
        bits = self.bits if isinstance(self.bits, int) else np.asarray(self.bits, np.int64)
        return QParams(scale=np.asarray(self.scale, np.float32), zero_point=np.asarray(self.zero_point, np.int64),
                       bits=bits, signed=self.signed, axis=self.axis)

    def to_json(self) -> dict:
        entry = {"min": self.min, "max": self.max, "amax": self.amax, "scale": self.scale,
                 "zero_point": self.zero_point, "bits": self.bits, "signed": self.signed, "method": self.method}
        if self.axis is not None:
            entry["axis"] = self.axis
        if self.note:
            entry["note"] = self.note
        if self.kind != "activation":
            entry["kind"] = self.kind
        if self.bias_shift is not None:
            entry["bias_shift"] = self.bias_shift
        if self.spread_ratio is not None:
            entry["spread_ratio"] = self.spread_ratio
        return entry

    def with_note(self, note: str) -> TensorRange:
        return replace(self, note=note)

    @property
    def amax_max(self) -> float:
        """The overall amax (the largest channel's for per-channel entries)."""
        return float(max(self.amax)) if isinstance(self.amax, list) else float(self.amax)

    @classmethod
    def from_json(cls, entry: Any, where: str = "entry") -> TensorRange:
        """Validate and build an entry from its JSON form (errors name `where`)."""
        if not isinstance(entry, dict):
            raise BadDataError(f"{where}: expected an object, got {type(entry).__name__}")
        required = ("min", "max", "amax", "scale", "zero_point", "bits", "signed", "method")
        missing = [k for k in required if k not in entry]
        unknown = sorted(set(entry) - set(required) - {"axis", "note", *OPTIONAL_KEYS})
        if missing or unknown:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            what = "; ".join(parts)
            raise BadDataError(f"{where}: {what}; accepted keys: {', '.join(required)}, axis, note, "
                               f"{', '.join(OPTIONAL_KEYS)}")
        axis = entry.get("axis")
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise BadDataError(f"{where}: axis must be an integer")
        per_channel = isinstance(entry["scale"], list)
        length = len(entry["scale"]) if per_channel else None
        if per_channel and (axis is None or length == 0):
            raise BadDataError(f"{where}: per-channel entries need a non-empty scale list and an axis")
        values = {}
        for key in ("min", "max", "amax", "scale", "zero_point", "bits"):
            kind = float if key in ("min", "max", "amax", "scale") else int
            values[key] = _plain(entry[key], kind, length, f"{where}.{key}")
        if not isinstance(entry["signed"], bool):
            raise BadDataError(f"{where}.signed: expected true or false")
        if not isinstance(entry["method"], str):
            raise BadDataError(f"{where}.method: expected a string")
        note = entry.get("note")
        if note is not None and not isinstance(note, str):
            raise BadDataError(f"{where}.note: expected a string")
        kind = entry.get("kind", "activation")
        if kind not in TENSOR_KINDS:
            raise BadDataError(f"{where}.kind: {kind!r}; accepted: {', '.join(TENSOR_KINDS)}")
        channel_lists = {}
        for key in ("bias_shift", "spread_ratio"):
            if entry.get(key) is not None:
                if not per_channel:
                    raise BadDataError(f"{where}.{key}: only per-channel entries carry one")
                channel_lists[key] = _plain(entry[key], float, length, f"{where}.{key}")
        for b in np.atleast_1d(values["bits"]):
            if not 1 <= b <= 16:
                raise BadDataError(f"{where}.bits: {b} out of range; accepted: 1..16")
        for sc in np.atleast_1d(values["scale"]):
            if not sc > 0:
                raise BadDataError(f"{where}.scale: {sc} is not positive")
        return cls(**values, signed=entry["signed"], method=entry["method"], axis=axis, note=note, kind=kind,
                   **channel_lists)


@dataclass(frozen=True)
class CalibrationTable:
    method: str
    bits: int
    tensors: dict[str, TensorRange] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "method": self.method, "bits": self.bits,
                "tensors": {name: self.tensors[name].to_json() for name in sorted(self.tensors)}}

    @classmethod
    def from_json(cls, obj: Any, where: str = "table") -> CalibrationTable:
        """Validate and build a table from its canonical JSON form."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise BadDataError(f"{where}: not an onnxquant calibration table "
                               f"(no \"format\": \"{FORMAT_NAME}\")")
        if obj.get("version") != FORMAT_VERSION:
            raise BadDataError(f"{where}: version {obj.get('version')!r} not supported; "
                               f"accepted: {FORMAT_VERSION}")
        unknown = sorted(set(obj) - {"format", "version", "method", "bits", "tensors"})
        if unknown:
            raise BadDataError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if not isinstance(obj.get("method"), str) or not isinstance(obj.get("bits"), int) or \
                isinstance(obj.get("bits"), bool) or not isinstance(obj.get("tensors"), dict):
            raise BadDataError(f"{where}: needs \"method\" (string), \"bits\" (integer), "
                               "\"tensors\" (object)")
        tensors = {name: TensorRange.from_json(entry, f"{where}: tensor {name!r}")
                   for name, entry in obj["tensors"].items()}
        return cls(method=obj["method"], bits=obj["bits"], tensors=tensors)

    def check_tensors(self, known: Collection[str], required: Collection[str] = ()) -> None:
        """Refuse a table naming tensors the model lacks, or lacking `required` ones (both are listed)."""
        unknown = sorted(set(self.tensors) - set(known))
        missing = sorted(set(required) - set(self.tensors))
        problems = []
        if unknown:
            problems.append(f"names {len(unknown)} tensor(s) the model does not have: {_listing(unknown)}")
        if missing:
            problems.append(f"lacks {len(missing)} tensor(s) the model needs: {_listing(missing)}")
        if problems:
            raise BadDataError("calibration table " + "; and ".join(problems))


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _plain(value: Any, kind: type, length: int | None, where: str):
    """A JSON scalar/list as float/int (list when `length` is set), validated."""
    def one(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadDataError(f"{where}: expected a number, got {json.dumps(v)[:40]}")
        if kind is int:
            if isinstance(v, float) and not v.is_integer():
                raise BadDataError(f"{where}: expected an integer, got {v}")
            return int(v)
        if not math.isfinite(v):
            raise BadDataError(f"{where}: not finite")
        return float(v) + 0.0

    if length is None:
        if isinstance(value, list):
            raise BadDataError(f"{where}: a list in a per-tensor entry (scale is a number)")
        return one(value)
    if not isinstance(value, list) or len(value) != length:
        raise BadDataError(f"{where}: expected a list of {length} numbers (one per channel)")
    return [one(v) for v in value]


# ---- canonical JSON -------------------------------------------------------------------------------------
def _canon(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _canon(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) + 0.0  # -0.0 -> 0.0
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(_canon(obj), sort_keys=True, ensure_ascii=True, allow_nan=False)


def dumps_json(table: CalibrationTable) -> str:
    """The canonical JSON text of `table` (deterministic; one tensor per line)."""
    obj = table.to_json()
    lines = ["{"]
    keys = sorted(obj)
    for n, key in enumerate(keys):
        comma = "," if n < len(keys) - 1 else ""
        if key != "tensors" or not obj[key]:
            lines.append(f" {_dumps(key)}: {_dumps(obj[key])}{comma}")
            continue
        lines.append(f" {_dumps(key)}: {{")
        names = sorted(obj[key])
        for m, name in enumerate(names):
            lines.append(f"  {_dumps(name)}: {_dumps(obj[key][name])}" + ("," if m < len(names) - 1 else ""))
        lines.append(f" }}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def loads_json(text: str, where: str = "table", bits: int = 8, symmetric: bool = False) -> CalibrationTable:
    """Parse canonical JSON (`bits` and `symmetric` are unused: the table carries them)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadDataError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    return CalibrationTable.from_json(obj, where)


def _write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))


def _read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BadDataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadDataError(f"{path}: is a directory; accepted: a table file") from None
    except UnicodeDecodeError:
        raise BadDataError(f"{path}: not a text file; accepted: {_ACCEPTED}") from None
    except OSError as exc:
        raise BadDataError(f"{path}: cannot read ({exc.strerror})") from exc


def write_json(table: CalibrationTable, path: str | os.PathLike) -> None:
    _write_text(path, dumps_json(table))


def read_json(path: str | os.PathLike) -> CalibrationTable:
    return loads_json(_read_text(path), str(path))


# ---- TensorRT calibration cache -------------------------------------------------------------------------
TRT_VERSION = "8601"
TRT_CALIBRATOR = "EntropyCalibration2"
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


def dumps_tensorrt_cache(table: CalibrationTable, version: str = TRT_VERSION,
                         calibrator: str = TRT_CALIBRATOR) -> str:
    """TensorRT cache text: header, then `name: hex(float32 amax/127, big-endian)` per tensor, sorted."""
    lines = [f"TRT-{version}-{calibrator}"]
    lossy = []
    for name in sorted(table.tensors):
        entry = table.tensors[name]
        if "\n" in name:
            raise BadDataError(f"tensor {name!r}: a name with a newline cannot go into a TensorRT cache")
        if entry.axis is not None or entry.bits != 8:
            lossy.append(name)
        scale = np.float32(entry.amax_max / 127.0)
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    if lossy:
        log.warning("TensorRT cache: %d tensor(s) are not 8-bit per-tensor (e.g. %r): written as their amax",
                    len(lossy), lossy[0])
    return "\n".join(lines) + "\n"


def loads_tensorrt_cache(text: str, where: str = "cache", bits: int = 8,
                         symmetric: bool = True) -> CalibrationTable:
    """Parse a TensorRT calibration cache into symmetric entries with amax = scale·127 (always symmetric)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise BadDataError(f"{where}: not a TensorRT calibration cache (first line must start with 'TRT-')")
    header = lines[0].strip().split("-", 2)
    calibrator = header[2] if len(header) == 3 else ""
    method = "kl" if "Entropy" in calibrator else ("minmax" if "MinMax" in calibrator else "tensorrt")
    tensors = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name or not _HEX.match(value):
            raise BadDataError(f"{where}: line {n}: expected 'tensor_name: <8 hex digits>', "
                               f"got {line[:60]!r}")
        scale = struct.unpack(">f", bytes.fromhex(value.zfill(8)))[0]
        if not (math.isfinite(scale) and scale >= 0):
            raise BadDataError(f"{where}: line {n}: scale {scale} of {name!r} is not finite and >= 0")
        amax = float(scale) * 127.0
        tensors[name] = TensorRange.from_range(-amax, amax, bits, True, method)
    return CalibrationTable(method=method, bits=bits, tensors=tensors)


def write_tensorrt_cache(table: CalibrationTable, path: str | os.PathLike,
                         version: str = TRT_VERSION) -> None:
    _write_text(path, dumps_tensorrt_cache(table, version))


def read_tensorrt_cache(path: str | os.PathLike, bits: int = 8) -> CalibrationTable:
    return loads_tensorrt_cache(_read_text(path), str(path), bits)


# ---- ONNX Runtime calibration JSON ----------------------------------------------------------------------
_ORT_METHODS = {"minmax": "MinMax", "kl": "Entropy", "percentile": "Percentile"}


def dumps_ort(table: CalibrationTable) -> str:
    """ONNX Runtime `TensorsData` JSON (lowest/highest as float32), with the canonical table embedded."""
    def arr(v):
        return {"CLS": "numpy.array", "data": v, "dtype": "float32"}

    data = {}
    for name in sorted(table.tensors):
        e = table.tensors[name]
        lo = [float(np.float32(v)) for v in e.min] if isinstance(e.min, list) else float(np.float32(e.min))
        hi = [float(np.float32(v)) for v in e.max] if isinstance(e.max, list) else float(np.float32(e.max))
        data[name] = {"CLS": "TensorData", "highest": arr(hi), "lowest": arr(lo)}
    obj = {"CLS": "TensorsData", "calibration_method": {"CLS": "CalibrationMethod", "value":
           f"CalibrationMethod.{_ORT_METHODS.get(table.method, 'MinMax')}"}, "data": data,
           "onnxquant": table.to_json()}
    return _dumps(obj) + "\n"


def loads_ort(text: str, where: str = "table", bits: int = 8, symmetric: bool = False) -> CalibrationTable:
    """Parse ONNX Runtime calibration JSON (TensorsData, or the older {tensor: [min, max]})."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadDataError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(obj, dict):
        raise BadDataError(f"{where}: not an ONNX Runtime calibration table (expected a JSON object)")
    if obj.get("CLS") == "TensorsData":
        if not isinstance(obj.get("data"), dict):
            raise BadDataError(f"{where}: TensorsData without a \"data\" object")
        ranges = {name: (_ort_value(d, "lowest", f"{where}: tensor {name!r}"),
                         _ort_value(d, "highest", f"{where}: tensor {name!r}"))
                  for name, d in obj["data"].items()}
        method_value = obj.get("calibration_method")
        method_name = method_value.get("value", "") if isinstance(method_value, dict) else str(method_value)
    else:
        ranges = {}
        for name, v in obj.items():
            if not (isinstance(v, list) and len(v) == 2):
                raise BadDataError(f"{where}: tensor {name!r}: expected [min, max]; accepted: ONNX Runtime "
                                   "TensorsData JSON or {tensor: [min, max]}")
            ranges[name] = (_plain(v[0], float, None, f"{where}: {name}"),
                            _plain(v[1], float, None, f"{where}: {name}"))
        method_name = ""
    embedded = None
    if "onnxquant" in obj:
        embedded = CalibrationTable.from_json(obj["onnxquant"], f"{where}: onnxquant")
    method = {v: k for k, v in _ORT_METHODS.items()}.get(method_name.rsplit(".", 1)[-1], "minmax")
    tensors = {}
    for name, (lo, hi) in ranges.items():
        entry = embedded.tensors.get(name) if embedded else None
        if entry is not None and _same_f32(entry.min, lo) and _same_f32(entry.max, hi):
            tensors[name] = entry
        else:
            if np.ndim(lo) != np.ndim(hi) or np.shape(lo) != np.shape(hi):
                raise BadDataError(f"{where}: tensor {name!r}: lowest and highest differ in shape")
            tensors[name] = TensorRange.from_range(lo, hi, bits, symmetric, method,
                                                   axis=1 if np.ndim(lo) else None)
    if embedded is not None:
        return CalibrationTable(method=embedded.method, bits=embedded.bits, tensors=tensors)
    return CalibrationTable(method=method, bits=bits, tensors=tensors)


def _ort_value(d: Any, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise BadDataError(f"{where}: no {key!r}")
    v = d[key]
    if isinstance(v, dict):
        v = v.get("data")
    arr = np.asarray(v, dtype=object)
    try:
        out = np.asarray(v, np.float64)
    except (TypeError, ValueError):
        raise BadDataError(f"{where}: {key} is not numeric") from None
    if arr.ndim > 1 or not np.isfinite(out).all():
        raise BadDataError(f"{where}: {key} must be a finite number or a list of numbers")
    return float(out) if out.ndim == 0 else out


def _same_f32(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def write_ort(table: CalibrationTable, path: str | os.PathLike) -> None:
    _write_text(path, dumps_ort(table))


def read_ort(path: str | os.PathLike, bits: int = 8, symmetric: bool = False) -> CalibrationTable:
    return loads_ort(_read_text(path), str(path), bits, symmetric)


# ---- any format -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableFormat:
    """A table file format: its text writer and reader, and how messages name it."""

    name: str
    description: str
    dumps: Callable[[CalibrationTable], str]
    loads: Callable[..., CalibrationTable]  # (text, where, bits, symmetric); the last two if not in the file


FORMATS: dict[str, TableFormat] = {f.name: f for f in (
    TableFormat("json", "onnxquant JSON", dumps_json, loads_json),
    TableFormat("tensorrt", "TensorRT cache (first line 'TRT-...')", dumps_tensorrt_cache,
                loads_tensorrt_cache),
    TableFormat("ort", "ONNX Runtime calibration JSON", dumps_ort, loads_ort),
)}
TABLE_FORMATS = tuple(FORMATS)
_ACCEPTED = ", ".join(f.description for f in FORMATS.values())


def sniff_format(text: str) -> str:
    """The name of the format of table text `text` (a key of FORMATS), or "unknown"."""
    if text.startswith("TRT-"):
        return "tensorrt"
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

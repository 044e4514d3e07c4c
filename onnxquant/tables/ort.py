"""ONNX Runtime's calibration JSON (`TensorsData`), with the canonical table embedded for a lossless round
trip."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxquant.errors import BadDataError
from onnxquant.tables.canonical import dumps_canonical, parse_json
from onnxquant.tables.entries import FLOAT32_MAX, CalibrationTable, TensorRange

_ORT_METHODS = {"minmax": "MinMax", "kl": "Entropy", "percentile": "Percentile"}


def dumps_ort(table: CalibrationTable) -> str:
    """ONNX Runtime `TensorsData` JSON (lowest/highest as float32), with the canonical table embedded."""

    def arr(v):
        return {"CLS": "numpy.array", "data": v, "dtype": "float32"}

    data = {}
    activations = table.activations()  # ONNX Runtime's TensorsData holds activation ranges only
    for name in sorted(activations):
        e = activations[name]
        lo = [float(np.float32(v)) for v in e.min] if isinstance(e.min, list) else float(np.float32(e.min))
        hi = [float(np.float32(v)) for v in e.max] if isinstance(e.max, list) else float(np.float32(e.max))
        data[name] = {"CLS": "TensorData", "highest": arr(hi), "lowest": arr(lo)}
    obj = {
        "CLS": "TensorsData",
        "calibration_method": {
            "CLS": "CalibrationMethod",
            "value": f"CalibrationMethod.{_ORT_METHODS.get(table.method, 'MinMax')}",
        },
        "data": data,
        "onnxquant": table.to_json(),
    }
    return dumps_canonical(obj) + "\n"


def loads_ort(text: str, where: str = "table", bits: int = 8, symmetric: bool = False) -> CalibrationTable:
    """Parse ONNX Runtime calibration JSON (TensorsData, or the older {tensor: [min, max]})."""
    obj = parse_json(text, where)
    if not isinstance(obj, dict):
        raise BadDataError(f"{where}: not an ONNX Runtime calibration table (expected a JSON object)")
    if obj.get("CLS") == "TensorsData":
        if not isinstance(obj.get("data"), dict):
            raise BadDataError(f'{where}: TensorsData without a "data" object')
        ranges = {
            name: (
                _ort_value(d, "lowest", f"{where}: tensor {name!r}"),
                _ort_value(d, "highest", f"{where}: tensor {name!r}"),
            )
            for name, d in obj["data"].items()
        }
        method_value = obj.get("calibration_method")
        method_name = method_value.get("value", "") if isinstance(method_value, dict) else str(method_value)
    else:
        ranges = {}
        for name, v in obj.items():
            if not (isinstance(v, list) and len(v) == 2):
                raise BadDataError(
                    f"{where}: tensor {name!r}: expected [min, max]; accepted: ONNX Runtime "
                    "TensorsData JSON or {tensor: [min, max]}"
                )
            ranges[name] = (
                _ort_value({"lowest": v[0]}, "lowest", f"{where}: tensor {name!r}"),
                _ort_value({"highest": v[1]}, "highest", f"{where}: tensor {name!r}"),
            )
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
            tensors[name] = TensorRange.from_range(
                lo, hi, bits, symmetric, method, axis=1 if np.ndim(lo) else None
            ).checked(f"{where}: tensor {name!r}")
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
    if (np.abs(out) > FLOAT32_MAX).any():
        raise BadDataError(
            f"{where}: {key} is outside the float32 range; accepted: |value| <= {FLOAT32_MAX:.6g}"
        )
    return float(out) if out.ndim == 0 else out


def _same_f32(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

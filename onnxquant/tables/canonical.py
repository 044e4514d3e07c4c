"""Canonical JSON text of a table: ASCII, keys sorted, one tensor per line, shortest round-trip floats."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from onnxquant.errors import BadDataError
from onnxquant.tables.entries import CalibrationTable

# Tables nest 5 levels at most (ONNX Runtime's TensorsData); deeper text is refused before json.loads, whose
# recursion would otherwise end in a RecursionError on a file nested 10^5 deep.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_depth(text: str) -> int:
    """How deep the arrays/objects of JSON `text` nest (strings skipped); no recursion, linear time."""
    bare = _JSON_STRING.sub("", text)
    levels = np.frombuffer(bare.encode("utf-8", "replace"), dtype=np.uint8)
    step = np.isin(levels, (ord("["), ord("{"))).astype(np.int64) - np.isin(levels, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def parse_json(text: str, where: str) -> Any:
    """`json.loads(text)`, refusing nesting deeper than MAX_JSON_DEPTH and invalid JSON in one line."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise BadDataError(
            f"{where}: JSON nested {depth} levels deep; accepted: at most {MAX_JSON_DEPTH} levels "
            "(a calibration table)"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadDataError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


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


def dumps_canonical(obj: Any) -> str:
    return json.dumps(_canon(obj), sort_keys=True, ensure_ascii=True, allow_nan=False)


def dumps_json(table: CalibrationTable) -> str:
    """The canonical JSON text of `table` (deterministic; one tensor per line)."""
    obj = table.to_json()
    lines = ["{"]
    keys = sorted(obj)
    for n, key in enumerate(keys):
        comma = "," if n < len(keys) - 1 else ""
        if key != "tensors" or not obj[key]:
            lines.append(f" {dumps_canonical(key)}: {dumps_canonical(obj[key])}{comma}")
            continue
        lines.append(f" {dumps_canonical(key)}: {{")
        names = sorted(obj[key])
        for m, name in enumerate(names):
            lines.append(
                f"  {dumps_canonical(name)}: {dumps_canonical(obj[key][name])}"
                + ("," if m < len(names) - 1 else "")
            )
        lines.append(f" }}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def loads_json(text: str, where: str = "table", bits: int = 8, symmetric: bool = False) -> CalibrationTable:
    """Parse canonical JSON (`bits` and `symmetric` are unused: the table carries them)."""
    return CalibrationTable.from_json(parse_json(text, where), where)

"""Calibration statistics on disk: an `.npz` of plain arrays, read with allow_pickle=False.

Every field of each `TensorStats` (and of its `Pass2` and `Histogram` parts) is one array named
`<i>.<field>` or `<i>.<part>.<field>`, i being the tensor's index in the sorted `__names__`; `__format__`
names the layout version. Merging statistics read back equals merging those written (see
`onnxquant.calib.stats`).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import numpy as np

from onnxquant.calib.histogram import Histogram
from onnxquant.calib.stats import Pass2, TensorStats
from onnxquant.errors import BadDataError, first_line
from onnxquant.model import atomic_write
from onnxquant.model_checks import regular_file_size

STATS_FORMAT = "onnxquant-stats-3"
_STATS_PARTS = ("pass2", "histogram")  # nested dataclasses of TensorStats, stored under "<i>.<part>.<field>"
_STATS_KINDS = {
    "count": int,
    "min": float,
    "max": float,
    "sum": float,
    "m2": float,
    "ch_count": int,
    "ref_mean": float,
    "abs_dev": float,
    "bins": int,
    "grid": float,
}
# Fields every saved tensor has (the others are None unless collected), by prefix after "<i>."
_REQUIRED = {
    "": ("count", "min", "max", "sum", "m2", "ch_count"),
    "pass2.": ("ref_mean", "count", "abs_dev"),
    "histogram.": ("bins", "grid", "counts"),
}
_TOGETHER = (("ch_min", "ch_max", "ch_sum", "ch_m2"), ("pass2.ch_ref_mean", "pass2.ch_abs_dev"))
_ACCEPTED = "accepted: an .npz from --save-stats of this onnxquant"
# What np.load raises on a damaged, encrypted or oddly compressed .npz
_NPZ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


def save_stats(stats: Mapping[str, TensorStats], path: str | os.PathLike) -> None:
    """Write collected statistics (mergeable, see `onnxquant.calib.stats`) to an .npz file atomically."""
    names = sorted(stats)
    arrays: dict[str, np.ndarray] = {
        "__format__": np.array(STATS_FORMAT),
        "__names__": np.array(names, dtype=str),
    }

    def put(prefix: str, obj) -> None:
        for f in fields(obj):
            v = getattr(obj, f.name)
            if f.name in _STATS_PARTS:
                if v is not None:
                    put(f"{prefix}{f.name}.", v)
            elif v is not None:
                arrays[prefix + f.name] = np.asarray(v)

    for i, name in enumerate(names):
        put(f"{i}.", stats[name])
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_stats(path: str | os.PathLike) -> dict[str, TensorStats]:
    """Read statistics written by `save_stats` (allow_pickle=False); every field is checked (present, finite,
    consistent) before use, so a damaged file is one line, never NaN ranges in a written model."""
    regular_file_size(Path(path), "statistics", "an .npz from --save-stats", BadDataError)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except _NPZ_ERRORS as exc:
        raise BadDataError(
            f"{path}: not a statistics file ({first_line(exc)}); accepted: an .npz from --save-stats"
        ) from None
    if "__format__" not in arrays or str(arrays["__format__"]) != STATS_FORMAT:
        raise BadDataError(
            f"{path}: not an onnxquant statistics file of this version ({STATS_FORMAT}); "
            "accepted: an .npz from --save-stats of this onnxquant"
        )

    def values(prefix: str, cls) -> dict:
        out = {}
        for f in fields(cls):
            a = arrays.get(prefix + f.name)
            if a is not None and f.name not in _STATS_PARTS:
                out[f.name] = _STATS_KINDS[f.name](a) if f.name in _STATS_KINDS else np.array(a)
        return out

    out = {}
    try:
        for i, name in enumerate(arrays["__names__"].tolist()):
            _check_fields(arrays, i, name)
            st = TensorStats(**values(f"{i}.", TensorStats))
            if f"{i}.pass2.ref_mean" in arrays:
                st.pass2 = Pass2(**values(f"{i}.pass2.", Pass2))
            if f"{i}.histogram.bins" in arrays:
                st.histogram = Histogram(**values(f"{i}.histogram.", Histogram))
                sums = st.histogram.sums
                if st.histogram.counts.shape != (4 * st.histogram.bins + 1,) or (
                    sums is not None and sums.shape != st.histogram.counts.shape
                ):
                    raise ValueError(f"histogram of {name} has {st.histogram.counts.size} counts")
            out[name] = st
    except (TypeError, ValueError, KeyError) as exc:
        raise BadDataError(f"{path}: corrupted statistics file ({first_line(exc)}); {_ACCEPTED}") from None
    return out


def _check_fields(arrays: Mapping[str, np.ndarray], i: int, name: str) -> None:
    """Raise ValueError naming the tensor and field when tensor `i`'s fields are missing, not numeric, NaN,
    infinite (only an empty tensor's min/max may be) or negative counts, or come without their partners."""
    for prefix, keys in _REQUIRED.items():
        present = [k for k in keys if f"{i}.{prefix}{k}" in arrays]
        if (prefix == "" or present) and len(present) != len(keys):
            missing = next(k for k in keys if f"{i}.{prefix}{k}" not in arrays)
            raise ValueError(f"tensor {name!r} lacks field {prefix}{missing}")
    for group in _TOGETHER:
        present = [k for k in group if f"{i}.{k}" in arrays]
        if present and len(present) != len(group):
            missing = next(k for k in group if f"{i}.{k}" not in arrays)
            raise ValueError(f"tensor {name!r} has {present[0]} but lacks field {missing}")
    count = arrays[f"{i}.count"]
    empty = count.size == 1 and count.dtype.kind in "iu" and not count.any()
    for key, value in arrays.items():
        if key.startswith(f"{i}."):
            _check_value(
                key.removeprefix(f"{i}."), value, name, inf_ok=empty and key in (f"{i}.min", f"{i}.max")
            )


def _check_value(field: str, value: np.ndarray, name: str, inf_ok: bool) -> None:
    if value.dtype.kind not in "iuf":
        raise ValueError(f"tensor {name!r} field {field} is {value.dtype}, not a number")
    if np.isnan(value).any() or (not inf_ok and np.isinf(value).any()):
        raise ValueError(f"tensor {name!r} field {field} holds NaN or Inf")
    if field.rsplit(".", 1)[-1] in ("count", "ch_count", "bins", "counts") and (value < 0).any():
        raise ValueError(f"tensor {name!r} field {field} is negative")

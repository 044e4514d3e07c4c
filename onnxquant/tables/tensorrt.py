"""TensorRT calibration cache: `TRT-<version>-<calibrator>`, then `name: <8 hex>` per activation (float32
amax/127, big-endian). TensorRT quantizes weights itself, so weight entries are not written."""

from __future__ import annotations

import logging
import math
import re
import struct

import numpy as np

from onnxquant.errors import BadDataError
from onnxquant.tables.entries import FLOAT32_MAX, FLOAT32_TINY, CalibrationTable, TensorRange

log = logging.getLogger(__name__)

TRT_VERSION = "8601"
TRT_CALIBRATOR = "EntropyCalibration2"
_HEX = re.compile(r"^[0-9a-fA-F]{8}$")


def dumps_tensorrt_cache(
    table: CalibrationTable, version: str = TRT_VERSION, calibrator: str = TRT_CALIBRATOR
) -> str:
    """TensorRT cache text: header, then `name: hex(float32 amax/127, big-endian)` per tensor, sorted."""
    lines = [f"TRT-{version}-{calibrator}"]
    lossy = []
    activations = table.activations()  # TensorRT quantizes weights itself: its cache holds activations only
    for name in sorted(activations):
        entry = activations[name]
        if "\n" in name:
            raise BadDataError(f"tensor {name!r}: a name with a newline cannot go into a TensorRT cache")
        if entry.axis is not None or entry.bits != 8:
            lossy.append(name)
        scale = np.float32(_cache_scale(name, entry.amax_max))
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    if lossy:
        log.warning(
            "TensorRT cache: %d tensor(s) are not 8-bit per-tensor (e.g. %r): written as their amax",
            len(lossy),
            lossy[0],
        )
    return "\n".join(lines) + "\n"


def _cache_scale(name: str, amax: float) -> float:
    """amax/127, refused unless it is a positive normal float32: the cache would otherwise hold a line its
    reader (and TensorRT) refuses. A table onnxquant calibrated never has amax 0 (a constant tensor gets the
    range [0, 1]); a hand-edited one can."""
    scale = amax / 127.0
    if not FLOAT32_TINY <= scale <= FLOAT32_MAX:
        raise BadDataError(
            f"tensor {name!r}: amax {amax} gives the TensorRT scale {scale:.6g} (amax/127); accepted: amax "
            f"in {FLOAT32_TINY * 127:.6g}..{FLOAT32_MAX * 127:.6g}"
        )
    return scale


def loads_tensorrt_cache(
    text: str, where: str = "cache", bits: int = 8, symmetric: bool = True
) -> CalibrationTable:
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
            raise BadDataError(
                f"{where}: line {n}: expected 'tensor_name: <8 hex digits>', got {line[:60]!r}"
            )
        scale = struct.unpack(">f", bytes.fromhex(value))[0]
        if not (math.isfinite(scale) and scale >= np.finfo(np.float32).tiny):
            raise BadDataError(
                f"{where}: line {n}: scale {scale} of {name!r}; accepted: a positive normal float32 "
                "(amax/127 > 0)"
            )
        amax = float(scale) * 127.0
        where_entry = f"{where}: line {n}: tensor {name!r}"
        with np.errstate(over="ignore"):  # a scale overflowing float32 at `bits` is refused by checked()
            entry = TensorRange.from_range(-amax, amax, bits, True, method)
        tensors[name] = entry.checked(where_entry)
    return CalibrationTable(method=method, bits=bits, tensors=tensors)

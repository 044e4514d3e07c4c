"""Calibration tables: the canonical JSON (DESIGN.md, version 1) and formats derived from it.

A `CalibrationTable` maps activation tensor names to `TensorRange`s. Per-tensor entries carry scalars;
per-channel entries carry lists (`scale`, `zero_point`, `bits`, and `min`/`max`/`amax`) and an `axis`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxquant.quant import QParams, qparams_from_range

FORMAT_NAME = "onnxquant-calibration"
FORMAT_VERSION = 1


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
        return entry


@dataclass(frozen=True)
class CalibrationTable:
    method: str
    bits: int
    tensors: dict[str, TensorRange] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "method": self.method, "bits": self.bits,
                "tensors": {name: self.tensors[name].to_json() for name in sorted(self.tensors)}}

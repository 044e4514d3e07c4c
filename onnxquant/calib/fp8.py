"""FP8 minifloat quantization (E4M3FN and E5M2), the 8-bit floating point of ONNX opset 19 Q/DQ.

Ristretto (Gysel et al., "Ristretto: A Framework for Empirical Study of Resource-Efficient Inference in
Convolutional Neural Networks", 2018) simulates minifloats of few exponent and mantissa bits; today's form is
Micikevicius et al., "FP8 Formats for Deep Learning" (2022), which ONNX (FLOAT8E4M3FN, FLOAT8E5M2) and
TensorRT adopted. A value is stored as `q = fp8(x / s)` and read back as `x ≈ s · q`, with one scale per
tensor (or per output channel of a weight) and zero point 0:

- E4M3FN: 4 exponent bits (bias 7), 3 mantissa bits, no infinities; largest finite value 448;
- E5M2: 5 exponent bits (bias 15), 2 mantissa bits (IEEE-like); largest finite value 57344.

`fp8(v)` rounds to the nearest representable value, ties to even mantissa, and saturates to ±max (ONNX
QuantizeLinear with `saturate=1`, its default; infinities saturate too). The scale maps the calibration
method's symmetric clipping range onto the format's range: `s = amax / max` (448 or 57344). The relative
spacing of FP8 values is constant within each binade, so unlike integer codes no second parameter (zero point)
helps: asymmetric ranges are covered by their larger side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
from onnx import TensorProto

from onnxquant.tables import TensorRange

# FP8 Q/DQ exist from opset 19 (FLOAT8 zero points). ONNX Runtime (1.32, ReluQuantFusion) deletes a Relu
# before a QuantizeLinear whose constant zero point is anything but an int8/uint8 one above the type's
# minimum, so an FP8 zero point 0 lets negative values through. A QuantizeLinear without a zero point, its
# type given by `output_dtype` (opset 21), is left alone: FP8 tensors are written so, with no zero points.
FP8_OPSET = 21


@dataclass(frozen=True)
class Fp8Format:
    name: str  # the rule-file value
    dtype: type  # the ml_dtypes scalar type
    onnx_type: int  # the TensorProto element type
    max: float  # largest finite value


FP8_FORMATS = {
    "fp8_e4m3": Fp8Format("fp8_e4m3", ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, 448.0),
    "fp8_e5m2": Fp8Format("fp8_e5m2", ml_dtypes.float8_e5m2, TensorProto.FLOAT8E5M2, 57344.0),
}


def is_fp8(fmt: str | None) -> bool:
    return fmt in FP8_FORMATS


def fp8_round(v: np.ndarray, fmt: str) -> np.ndarray:
    """`v` rounded to the FP8 format `fmt` (an array of its ml_dtypes type): nearest, ties to even,
    saturated to ±max like ONNX `saturate=1`; NaN stays NaN."""
    spec = FP8_FORMATS[fmt]
    return np.clip(np.asarray(v, np.float32), -spec.max, spec.max).astype(spec.dtype)


def fp8_codes(x: np.ndarray, scale, fmt: str, axis: int | None = None) -> np.ndarray:
    """The stored FP8 values of `x` under `scale` (per tensor, or one per channel along `axis`):
    `fp8(x / s)` with the division in float32, as QuantizeLinear computes it."""
    x = np.asarray(x, np.float32)
    s = np.asarray(scale, np.float32)
    if axis is not None and s.ndim:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return fp8_round(x / s, fmt)


def fp8_fake_quantize(x: np.ndarray, scale, fmt: str, axis: int | None = None) -> np.ndarray:
    """`s · fp8(x / s)` in float32: what Q→DQ computes."""
    s = np.asarray(scale, np.float32)
    if axis is not None and s.ndim:
        shape = [1] * np.ndim(x)
        shape[axis] = -1
        s = s.reshape(shape)
    return fp8_codes(x, scale, fmt, axis).astype(np.float32) * s


def fp8_scale(amax, fmt: str) -> np.ndarray:
    """`amax / max` (float32), at least the smallest normal float32 (a constant-zero tensor)."""
    tiny = np.finfo(np.float32).tiny
    return np.maximum(np.asarray(amax, np.float64) / FP8_FORMATS[fmt].max, tiny).astype(np.float32)


def fp8_entry(entry: TensorRange, fmt: str) -> TensorRange:
    """`entry` (a symmetric range from any calibration method) as an FP8 entry: scale amax / max, zero
    point 0, 8 bits, signed, `format` fmt. Per-channel entries keep one scale per channel."""
    scale = fp8_scale(entry.amax, fmt)
    per_channel = isinstance(entry.amax, list)
    return replace(
        entry,
        scale=[float(v) for v in scale] if per_channel else float(scale),
        zero_point=[0] * len(entry.amax) if per_channel else 0,
        bits=[8] * len(entry.amax) if per_channel else 8,
        signed=True,
        format=fmt,
    )

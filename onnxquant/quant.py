"""Affine quantization arithmetic shared by calibration, Q/DQ insertion, reports and the runtime.

`q = saturate(round_half_even(x / s) + z)`, `x ≈ s (q − z)`. A b-bit signed range is
`[−2^(b−1), 2^(b−1)−1]`, unsigned `[0, 2^b−1]`. Symmetric ranges are signed with z = 0 and use
`s = amax / (2^(b−1) − 1)` (the most negative code stays unused, as TensorRT and ONNX Runtime do).
Block-wise parameters (ONNX opset 21 `block_size`) hold one scale and zero point per `block_size` consecutive
elements along `axis`: their array has the tensor's rank, with that axis of length ceil(n / block_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_BITS, MAX_BITS = 2, 8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer code range of a b-bit type."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one tensor (arrays of one entry per channel when `axis` is set)."""

    scale: np.ndarray
    zero_point: np.ndarray
    bits: int | np.ndarray
    signed: bool
    axis: int | None = None
    block_size: int | None = None  # scale/zero_point have the tensor's rank, `axis` divided into blocks

    @property
    def qmin(self) -> np.ndarray:
        return np.asarray(np.vectorize(lambda b: qrange(int(b), self.signed)[0])(self.bits))

    @property
    def qmax(self) -> np.ndarray:
        return np.asarray(np.vectorize(lambda b: qrange(int(b), self.signed)[1])(self.bits))


def qparams_from_range(lo, hi, bits, symmetric: bool, axis: int | None = None) -> QParams:
    """Scale and zero point covering [lo, hi] (the range is widened to include 0).

    Symmetric: signed codes, z = 0, s = max(|lo|, |hi|) / (2^(b−1) − 1). Asymmetric: unsigned codes,
    s = (hi − lo) / (2^b − 1), z = round(−lo / s) clipped to the code range.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    bits_arr = np.asarray(bits, dtype=np.int64)
    tiny = np.float64(np.finfo(np.float32).tiny)
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / ((1 << (bits_arr - 1)) - 1), tiny)
        zero = np.zeros_like(scale, dtype=np.int64)
    else:
        levels = (1 << bits_arr) - 1
        scale = np.maximum((hi - lo) / levels, tiny)
        zero = np.clip(np.round(-lo / scale), 0, levels).astype(np.int64)
    scale = scale.astype(np.float32)
    return QParams(
        scale=scale,
        zero_point=zero,
        bits=bits if np.ndim(bits) == 0 else bits_arr,
        signed=symmetric,
        axis=axis,
    )


def _broadcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or np.ndim(values) == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(values, shape)


def expand_blocks(values: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    """Block-wise `values` repeated `block_size` times along `axis` and cut to `length` there: one per
    element of the tensor they quantize."""
    return np.take(np.repeat(np.asarray(values), block_size, axis=axis), np.arange(length), axis=axis)


def _per_element(values, p: QParams, x: np.ndarray) -> np.ndarray:
    """`values` (one per channel, block or tensor) broadcastable against `x`."""
    if p.block_size:
        return expand_blocks(values, p.axis, p.block_size, x.shape[p.axis])
    return _broadcast(values, p.axis, x.ndim)


def quantize(x: np.ndarray, p: QParams) -> np.ndarray:
    """Integer codes (int64) of `x` under `p`, rounded half to even and saturated to the b-bit range."""
    scale = _per_element(p.scale.astype(np.float32), p, x)
    zero = _per_element(p.zero_point, p, x)
    width_axis = None if p.block_size else p.axis  # block-wise parameters have one width
    lo, hi = _broadcast(p.qmin, width_axis, x.ndim), _broadcast(p.qmax, width_axis, x.ndim)
    q = np.rint(x.astype(np.float32) / scale).astype(np.int64) + zero
    return np.clip(q, lo, hi)


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    scale = _per_element(p.scale.astype(np.float32), p, q)
    zero = _per_element(p.zero_point, p, q)
    return ((q - zero) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, p: QParams) -> np.ndarray:
    return dequantize(quantize(x, p), p)

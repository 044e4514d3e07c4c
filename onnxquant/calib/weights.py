"""Weight calibration from the weights themselves (no data), and ACIQ bias correction (eq. 12–13).

`weight_range` gives per-channel (or per-tensor) clipping ranges:
- minmax: [min, max] of each channel;
- laplace / gauss: ACIQ (see `onnxquant.calib.aciq`) with b = mean |w − mean| or σ = std of each channel;
- mse: the range [f·min, f·max], f ∈ {1/100, 2/100, ..., 1}, whose fake-quantized weights have the smallest
  squared error, evaluated exactly on the weights (symmetric: signed codes with scale amax/(2^(b−1)−1);
  otherwise unsigned codes with an integer zero point). Ties go to the smallest f.

Bias correction, per output channel c (ACIQ eq. 12–13): μ_c = E[W_c] − E[Ŵ_c] and
ξ_c = ‖W_c − E[W_c]‖₂ / ‖Ŵ_c − E[Ŵ_c]‖₂ (1 when not `full`, or when Ŵ_c is constant). The corrected
weights are ŵ' = ξ_c·(ŵ − E[Ŵ_c]) + E[W_c], which equals ŵ + μ_c when ξ_c = 1; they have the float mean
and (when full) the float spread.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from onnxquant.calib.aciq import aciq_range
from onnxquant.errors import BadModelError, BadRulesError, InternalError

WEIGHT_METHODS: tuple[str, ...] = ("minmax", "laplace", "gauss", "mse")  # the registry of weight methods
MSE_STEPS = 100
BLOCK = 2**22  # elements of a weight turned into float64 at a time


def _channels(w: np.ndarray, axis: int | None) -> np.ndarray:
    """`w` as a (C, K) float64 matrix, one row per channel (one row when axis is None)."""
    w = np.asarray(w, np.float64)
    if axis is None:
        return w.reshape(1, -1)
    if not -w.ndim <= axis < w.ndim:
        raise InternalError(f"channel axis {axis} out of range for a weight of shape {w.shape}")
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def weight_range(
    w: np.ndarray,
    axis: int | None,
    bits,
    method: str = "minmax",
    *,
    symmetric: bool = True,
    name: str = "weight",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (lo, hi) along `axis` (arrays of one entry per channel; 0-d arrays when axis is None).
    `name` (the initializer's) is what errors blame.

    Channels are read in blocks of about `BLOCK` elements (`_channel_blocks`): every statistic is a per-row
    reduction, so the result is that of the whole (C, K) float64 matrix, which for a weight of hundreds of
    MB would cost twice its size again."""
    if method not in WEIGHT_METHODS:
        raise BadRulesError(
            f"unknown weight calibration method {method!r}; accepted: {', '.join(WEIGHT_METHODS)}"
        )
    w = np.asarray(w)
    rows = _row_count(w, axis)
    if rows == 0 or w.size == 0:
        raise BadModelError(
            f"tensor {name!r}: zero-size weight of shape {np.shape(w)}; accepted: at least one element"
        )
    bits = np.broadcast_to(np.asarray(bits, np.int64), (rows,))
    lo, hi, center, spread = (np.empty(rows) for _ in range(4))
    for part, m in _channel_blocks(w, axis):
        lo[part], hi[part] = m.min(axis=1), m.max(axis=1)
        if not (np.isfinite(lo[part]).all() and np.isfinite(hi[part]).all()):  # min/max propagate NaN
            raise BadModelError(f"tensor {name!r}: the weight holds NaN or Inf; accepted: finite weights")
        if method in ("laplace", "gauss"):
            center[part] = m.mean(axis=1)
            dev = m - center[part][:, None]
            spread[part] = (
                np.abs(dev).mean(axis=1) if method == "laplace" else np.sqrt((dev * dev).mean(axis=1))
            )
        elif method == "mse":
            spread[part] = _mse_factor(m, lo[part], hi[part], bits[part], symmetric)
    if method in ("laplace", "gauss"):
        lo, hi = aciq_range(method, center, spread, lo, hi, bits, symmetric)
    elif method == "mse":
        lo, hi = lo * spread, hi * spread
    if axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo, hi


def _row_count(w: np.ndarray, axis: int | None) -> int:
    if axis is None:
        return 1
    if not -w.ndim <= axis < w.ndim:
        raise InternalError(f"channel axis {axis} out of range for a weight of shape {w.shape}")
    return w.shape[axis]


def _channel_blocks(w: np.ndarray, axis: int | None) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, matrix) pairs covering `_channels(w, axis)` in consecutive blocks of at least two whole
    channels, of about `BLOCK` elements (one block when axis is None or the weight is small). Each block has
    the memory layout the whole matrix would have (strided rows for axis > 0), so numpy reduces its rows in
    the same order and the statistics are the same to the last bit."""
    rows = 1 if axis is None else w.shape[axis]
    if axis is None or w.size <= BLOCK or rows < 4:
        yield slice(0, rows), _channels(w, axis)
        return
    step = max(2, BLOCK * rows // w.size)
    starts = list(range(0, rows, step))
    if rows - starts[-1] < 2:  # one row alone would be reduced as a contiguous vector, in another order
        starts.pop()
    for start, stop in zip(starts, [*starts[1:], rows]):
        part = slice(start, stop)
        yield part, _channels(w[(slice(None),) * (axis % w.ndim) + (part,)], axis)


def mse_error(m: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: np.ndarray, symmetric: bool) -> np.ndarray:
    """Per-row squared error of fake-quantizing the rows of `m` with ranges [lo, hi] (float64 arithmetic)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    tiny = np.finfo(np.float64).tiny
    if symmetric:
        qmax = (1 << bits) // 2 - 1
        s = np.maximum(np.maximum(-lo, hi) / qmax, tiny)[:, None]
        q = np.clip(np.rint(m / s), -qmax[:, None] - 1, qmax[:, None])
        return ((m - s * q) ** 2).sum(axis=1)
    qmax = (1 << bits) - 1
    s = np.maximum((hi - lo) / qmax, tiny)[:, None]
    z = np.clip(np.rint(-lo[:, None] / s), 0, qmax[:, None])
    q = np.clip(np.rint(m / s) + z, 0, qmax[:, None])
    return ((m - s * (q - z)) ** 2).sum(axis=1)


def _mse_factor(m, lo, hi, bits, symmetric) -> np.ndarray:
    best = np.full(m.shape[0], np.inf)
    factor = np.ones(m.shape[0])
    for k in range(1, MSE_STEPS + 1):
        f = k / MSE_STEPS
        err = mse_error(m, lo * f, hi * f, bits, symmetric)
        better = err < best
        best[better], factor[better] = err[better], f
    return factor


def bias_correction(w: np.ndarray, w_deq: np.ndarray, axis: int, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """(μ_c, ξ_c) per channel along `axis`: mean shift E[W_c] − E[Ŵ_c], spread ratio (ones unless `full`)."""
    if np.shape(w) != np.shape(w_deq):
        raise InternalError(f"bias correction: weight shapes differ: {np.shape(w)} vs {np.shape(w_deq)}")
    a, b = _channels(w, axis), _channels(w_deq, axis)
    mean_a, mean_b = a.mean(axis=1), b.mean(axis=1)
    shift = mean_a - mean_b
    ratio = np.ones_like(shift)
    if full:
        na = np.linalg.norm(a - mean_a[:, None], axis=1)
        nb = np.linalg.norm(b - mean_b[:, None], axis=1)
        ratio = np.where(nb > 0, na / np.where(nb > 0, nb, 1.0), 1.0)
    return shift, ratio


def apply_bias_correction(w_deq: np.ndarray, shift: np.ndarray, ratio: np.ndarray, axis: int) -> np.ndarray:
    """Corrected float weights ξ_c·(ŵ − E[Ŵ_c]) + E[Ŵ_c] + μ_c (float32, the shape of `w_deq`)."""
    b = _channels(w_deq, axis)
    mean_b = b.mean(axis=1, keepdims=True)
    out = ratio[:, None] * (b - mean_b) + mean_b + shift[:, None]
    shape = np.moveaxis(np.asarray(w_deq), axis, 0).shape
    return np.moveaxis(out.reshape(shape), 0, axis).astype(np.float32)

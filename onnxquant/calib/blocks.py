"""Block-wise weight quantization: one scale per block of B consecutive weights along the input axis.

PocketFlow's "bucketing" (Wu et al., PocketFlow, 2018: uniform quantization of weights split into buckets,
each with its own range) and today's 4-bit LLM weights (GPTQ/AWQ group size, ONNX Runtime's MatMulNBits)
share one idea: a weight row along the reduction (input) axis is cut into blocks of B values, and block j of
output channel c gets its own scale s_cj (and zero point): `q = clip(round_half_even(w / s_cj) + z_cj)`.
Outliers then spoil only their own block's resolution.

ONNX expresses it from opset 21: DequantizeLinear with `axis` a and `block_size` B takes a scale of the
weight's rank whose dimension a is ⌈n_a / B⌉ (the others equal the weight's), so blocks run along one axis:
- Conv (Cout, Cin/g, kh, kw): axis 1, blocks of B input channels at each kernel position (ONNX does not
  allow a block to run across the flattened Cin·kh·kw);
- ConvTranspose (Cin, Cout/g, ...): axis 0; MatMul (..., K, N): the K axis; Gemm: K (axis 1 when transB).
The last block of a row may be shorter; a weight whose input axis is shorter than B (a depthwise Conv's
single input channel) is quantized per channel instead (calib/weight_table.py). Each block's range comes
from the weight calibration method (calib/weights.py) applied to the block's values. Storage per weight: b
bits of code plus 16/B bits of scale (and b/B of zero point for unsigned codes): `stored_bits`. Scales are
stored as float16 (as GPTQ/AWQ checkpoints and MatMulNBits hold them; a Cast to float32 before the
DequantizeLinear, which ONNX Runtime folds at load time and then still fuses the MatMul into MatMulNBits),
and the codes are rounded with that float16 scale; float32 where a scale is outside float16's normal range
(insert_qdq.half_scales).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from onnxquant.calib.weights import weight_range
from onnxquant.tables import TensorRange
from onnxquant.tables.entries import blocked_shape


def block_axis(op_type: str, ndim: int, trans_b: bool = False) -> int:
    """The input (reduction) axis of a compute node's weight, along which blocks run."""
    if op_type == "Conv":
        return 1
    if op_type == "ConvTranspose":
        return 0
    if op_type == "Gemm":
        return 1 if trans_b else 0
    return ndim - 2  # MatMul (..., K, N)


def block_range(
    w: np.ndarray, axis: int, block_size: int, bits: int, method: str, symmetric: bool, name: str = "weight"
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of every block, arrays of `blocked_shape(w.shape, axis, block_size)`: `weight_range` by
    `method` on the values of each block (the full blocks as one matrix, the shorter last blocks as
    another)."""
    moved = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    lead, n = moved.shape[:-1], moved.shape[-1]
    full = n // block_size
    parts_lo, parts_hi = [], []
    for start, stop, width in (
        (0, full * block_size, block_size),
        (full * block_size, n, n - full * block_size),
    ):
        if stop <= start:
            continue
        rows = np.ascontiguousarray(moved[..., start:stop]).reshape(-1, width)
        lo, hi = weight_range(rows, 0, bits, method, symmetric=symmetric, name=name)
        parts_lo.append(lo.reshape(*lead, -1))
        parts_hi.append(hi.reshape(*lead, -1))
    lo = np.moveaxis(np.concatenate(parts_lo, axis=-1), -1, axis)
    hi = np.moveaxis(np.concatenate(parts_hi, axis=-1), -1, axis)
    return lo, hi


def block_entry(
    w: np.ndarray, axis: int, block_size: int, bits: int, method: str, symmetric: bool, name: str = "weight"
) -> TensorRange:
    """The block-wise `kind="weight"` entry of `w` (see the module docstring)."""
    lo, hi = block_range(w, axis, block_size, bits, method, symmetric, name)
    entry = TensorRange.from_range(lo, hi, bits, symmetric, method, axis=axis, block_size=block_size)
    return replace(entry, kind="weight")


def stored_bits(
    shape: tuple[int, ...], axis: int, block_size: int, bits: int, signed: bool, scale_bits: int = 32
) -> float:
    """Bits stored per weight: the codes, one scale of `scale_bits` per block, and a zero point per block for
    unsigned codes (symmetric weights store none)."""
    count = int(np.prod(shape))
    blocks = int(np.prod(blocked_shape(tuple(shape), axis, block_size)))
    per_block = scale_bits + (0 if signed else bits)
    return (count * bits + blocks * per_block) / count

"""Weight entries of the calibration table: every quantized weight's range, scale, zero point and width, so a
table describes the whole model and reproduces it without recalibration.

Per output channel c (axis from `plan.weight_axis`; one entry for a per-tensor spec) the range comes from the
weight itself (`calib.weights.weight_range`, method `spec.method`), optionally at widths allocated per channel
(ACIQ eq. 10–11, `calib.bitalloc`). Bias correction (ACIQ eq. 12–13, Conv and Gemm only) is stored as data:
with Ŵ the dequantized weights, μ_c = E[W_c] − E[Ŵ_c] and ξ_c = ‖W_c − E[W_c]‖ / ‖Ŵ_c − E[Ŵ_c]‖ (for "full";
1 for "mean"), the corrected weights ŵ' = ξ_c·(ŵ − E[Ŵ_c]) + E[W_c] = ξ_c·ŵ + o_c, o_c = E[W_c] − ξ_c·E[Ŵ_c],
have the float mean (and spread). The codes stay those of scale s_c; the entry's `spread_ratio` ξ_c makes the
DequantizeLinear scale s_c·ξ_c, and the offset o_c reaches the output through the bias:
`bias_shift_c = o_c · Σ E[x]` over the receptive field of channel c (Conv: the input channel means of c's
group times the kernel size; Gemm: all input feature means).

Number formats (rules `granularity: per_block`, `format`, `scale`): block-wise entries (calib/blocks.py)
have one range per block of `block_size` weights along the input axis; FP8 entries (calib/fp8.py) take the
method's symmetric range as amax / the format's largest value; power-of-two scales (calib/pow2.py) replace
each free scale by the 2^k of smallest squared error on the weight. Bias correction and bit allocation
apply to per-channel integer entries with free scales only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxquant.calib.bitalloc import allocate_bits
from onnxquant.calib.blocks import block_axis, block_entry
from onnxquant.calib.fp8 import fp8_entry, is_fp8
from onnxquant.calib.pow2 import pow2_weight_entry
from onnxquant.calib.weights import bias_correction as correction_terms
from onnxquant.calib.weights import weight_range
from onnxquant.errors import BadOptionError
from onnxquant.ir import constant, import_graph
from onnxquant.passes.plan import QuantPlan, weight_axis
from onnxquant.quant import MAX_BITS, MIN_BITS, dequantize, quantize
from onnxquant.rules import QuantSpec
from onnxquant.tables import TensorRange

log = logging.getLogger(__name__)

BIAS_CORRECTION = ("mean", "full")
CORRECTED_OPS = ("Conv", "Gemm")


def weight_entries(
    model: onnx.ModelProto,
    plan: QuantPlan,
    *,
    bit_alloc: bool = False,
    bias_correction: str | None = None,
    input_means: Mapping[str, np.ndarray] | None = None,
) -> dict[str, TensorRange]:
    """A `kind="weight"` entry for every weight the plan quantizes, keyed by initializer name.

    `bias_correction` ("mean" or "full") needs `input_means`, the per-channel means of each corrected
    node's first input; without one the entry's note says the correction was skipped. A weight shared by
    several quantized nodes gets the spec of the first and is not bias-corrected (the shift is per node).
    """
    if bias_correction not in (None, *BIAS_CORRECTION):
        raise BadOptionError(
            f"bias_correction={bias_correction!r}; accepted: None, {', '.join(BIAS_CORRECTION)}"
        )
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    users: dict[str, int] = {}
    for d in plan.nodes:
        if d.quantize and d.weight:
            users[d.weight] = users.get(d.weight, 0) + 1
    entries: dict[str, TensorRange] = {}
    for d in plan.nodes:
        if not d.quantize or d.weight is None or d.weight in entries:
            continue
        node = nodes[d.name]
        w = np.asarray(
            constant(node.inputs[1], readonly=True), np.float32
        )  # no second copy of a float32 weight
        spec = _short_blocks_per_channel(node, w.shape, d.weights)
        axis = _entry_axis(node, w.ndim, spec)
        entry = weight_entry(w, axis, spec, bit_alloc, name=d.weight)
        if bias_correction and not _plain(spec):
            entry = replace(entry, note=f"bias correction skipped ({_format_name(spec)} weights)")
        elif bias_correction and axis is not None and node.op in CORRECTED_OPS and users[d.weight] == 1:
            entry = _corrected(
                entry, w, node, (input_means or {}).get(node.inputs[0].name), full=bias_correction == "full"
            )
        entries[d.weight] = entry
    return entries


def _short_blocks_per_channel(node: gs.Node, shape: tuple[int, ...], spec: QuantSpec) -> QuantSpec:
    """Per channel instead of per block where the input axis is shorter than a block (a depthwise Conv's one
    input channel, a patch-embedding Conv's three): every block would be shorter than `block_size`, at up
    to a scale per weight, while the point of blocks is `bits + 16/block_size` bits per weight."""
    if spec.granularity != "per_block":
        return spec
    axis = block_axis(node.op, len(shape), bool(node.attrs.get("transB", 0)))
    return replace(spec, granularity="per_channel") if shape[axis] < spec.block_size else spec


def _entry_axis(node: gs.Node, ndim: int, spec: QuantSpec) -> int | None:
    """The axis of a weight entry: output channels (per channel), the input axis (per block), or None."""
    if spec.granularity == "per_channel":
        return weight_axis(node, ndim)
    if spec.granularity == "per_block":
        return block_axis(node.op, ndim, bool(node.attrs.get("transB", 0)))
    return None


def _plain(spec: QuantSpec) -> bool:
    """Integer codes with free scales, per tensor or channel: what bias correction and bit allocation take."""
    return spec.granularity != "per_block" and spec.format == "int" and spec.scale == "float"


def _format_name(spec: QuantSpec) -> str:
    if spec.granularity == "per_block":
        return f"block-wise ({spec.block_size})"
    return spec.format if spec.format != "int" else "power-of-two scale"


def weight_entry(
    w: np.ndarray, axis: int | None, spec: QuantSpec, bit_alloc: bool = False, name: str = "weight"
) -> TensorRange:
    """The range of `w` per channel along `axis` (one width per channel) by `spec.method`; with `bit_alloc`,
    widths of mean `spec.bits` allocated from the channels' clipping ranges (ACIQ eq. 10–11). Errors name
    the initializer `name`. Block-wise, FP8 and power-of-two specs: see the module docstring (`axis` is then
    the input axis for blocks)."""
    if spec.granularity == "per_block":
        entry = block_entry(w, axis, spec.block_size, spec.bits, spec.method, spec.symmetric, name)
    else:
        entry = _channel_entry(w, axis, spec, bit_alloc and _plain(spec), name)
    if is_fp8(spec.format):
        entry = fp8_entry(entry, spec.format)
    if spec.scale == "pow2":
        entry = pow2_weight_entry(entry, w)
    return entry


def _channel_entry(
    w: np.ndarray, axis: int | None, spec: QuantSpec, bit_alloc: bool, name: str
) -> TensorRange:
    symmetric = spec.symmetric or is_fp8(spec.format)  # FP8 has no zero point
    bits = spec.bits if axis is None else np.full(w.shape[axis], spec.bits)
    if bit_alloc and axis is not None:
        lo, hi = weight_range(w, axis, bits, spec.method, symmetric=symmetric, name=name)
        bits = allocate_bits(np.maximum(-lo, hi), spec.bits, lo=MIN_BITS, hi=MAX_BITS)
    lo, hi = weight_range(w, axis, bits, spec.method, symmetric=symmetric, name=name)
    return replace(TensorRange.from_range(lo, hi, bits, symmetric, spec.method, axis), kind="weight")


def _corrected(
    entry: TensorRange, w: np.ndarray, node: gs.Node, x_mean: np.ndarray | None, full: bool
) -> TensorRange:
    """`entry` with the spread ratios ξ_c ("full") and the bias shift o_c·Σ E[x] (see the module
    docstring)."""
    params = entry.qparams()
    w_deq = dequantize(quantize(w, params), params)
    mu, ratio = correction_terms(w, w_deq, entry.axis, full)
    deq_mean = np.moveaxis(w_deq, entry.axis, 0).reshape(w.shape[entry.axis], -1).mean(axis=1)
    if full:
        entry = replace(entry, spread_ratio=[float(r) for r in ratio])
    shift = _bias_shift(node, (1.0 - ratio) * deq_mean + mu, x_mean, w.shape)
    if shift is None:
        return replace(
            entry, note=f"bias correction skipped (no per-channel mean of {node.inputs[0].name!r})"
        )
    return replace(entry, bias_shift=[float(v) for v in shift])


def _bias_shift(
    node: gs.Node, offset: np.ndarray, x_mean: np.ndarray | None, w_shape: tuple[int, ...]
) -> np.ndarray | None:
    """E[Σ over a receptive field of x] times each output channel's weight offset (padding ignored)."""
    if x_mean is None:
        return None
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        if x_mean.size != w_shape[1] * group:
            return None
        per_group = x_mean.reshape(group, w_shape[1]).sum(axis=1) * int(np.prod(w_shape[2:]))
        return offset * np.repeat(per_group, w_shape[0] // group)
    if node.attrs.get("transA", 0) or x_mean.size != (
        w_shape[1] if weight_axis(node, 2) == 0 else w_shape[0]
    ):
        return None
    return offset * x_mean.sum()

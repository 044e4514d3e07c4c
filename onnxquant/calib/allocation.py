"""Per-channel activation ranges at allocated widths (`--bit-alloc activations`): which planned activations
may carry per-channel scales, and their ranges at per-channel widths from ACIQ eq. 10–11
(calib/bitalloc.py)."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxquant.calib.bitalloc import allocate_bits
from onnxquant.calib.engine import compute_table
from onnxquant.calib.methods import METHODS, clip_range
from onnxquant.errors import BadRulesError, OnnxQuantError
from onnxquant.passes.plan import FUSED_ACTIVATIONS, QuantPlan, tensor_shapes
from onnxquant.quant import MAX_BITS, MIN_BITS
from onnxquant.rules import COMPUTE_OPS

log = logging.getLogger(__name__)


def channel_tensors(model: onnx.ModelProto, plan: QuantPlan) -> tuple[str, ...]:
    """Planned activations with a channel axis (rank >= 2 and more than one channel) that may carry
    per-channel scales (`per_channel_safe`), in name order."""
    shapes = tensor_shapes(model)
    safe = per_channel_safe(model, plan)
    out, unknown, unsafe = [], [], []
    for t in sorted(plan.activations):
        if t not in shapes:
            unknown.append(t)
            continue
        dims = shapes[t].dim
        if len(dims) < 2 or (dims[1].HasField("dim_value") and dims[1].dim_value == 1):
            continue
        (out if t in safe else unsafe).append(t)
    if unknown:
        log.warning("bit allocation: shape unknown, kept per tensor: %s", ", ".join(unknown))
    if unsafe:
        log.info(
            "bit allocation: kept per tensor (a pool, Add or Concat reads or writes it): %s",
            ", ".join(unsafe),
        )
    return tuple(out)


def per_channel_safe(model: onnx.ModelProto, plan: QuantPlan) -> set[str]:
    """Planned activations that may carry per-channel scales without reaching a kernel that takes one scale.

    ONNX Runtime fuses DQ → pool/Add/Concat → Q into QLinear kernels that take one scale and do not check it
    (QLinearGlobalAveragePool: "x_scale must be a scalar"), so a per-channel scale there gives a model that
    fails at the default optimization level. The pattern exists only where the Q is not preceded by the
    sub-8-bit Clip (`insert_qdq`), i.e. at 8 bits; Conv/Gemm/MatMul fusion checks the scales itself and
    leaves per-channel ones in float. So a tensor is refused when a quantized non-compute op writes it
    (looking through a Relu/Clip) at 8 bits, or reads it and has an output planned at 8 bits.
    """
    quantized = {d.name for d in plan.nodes if d.quantize}
    writer = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def unclipped(tensor: str) -> bool:
        return tensor in plan.activations and plan.activations[tensor].bits >= MAX_BITS

    def fusable(node: onnx.NodeProto | None, outputs: list[str]) -> bool:
        return (
            node is not None
            and node.name in quantized
            and node.op_type not in COMPUTE_OPS
            and any(unclipped(t) for t in outputs)
        )

    safe = set()
    for tensor in plan.activations:
        node = writer.get(tensor)
        if node is not None and node.op_type in FUSED_ACTIVATIONS and node.input and node.input[0] in writer:
            node = writer[node.input[0]]
        if fusable(node, [tensor]) or any(fusable(r, list(r.output)) for r in readers.get(tensor, [])):
            continue
        safe.add(tensor)
    return safe


def allocated_range(stats: dict, tensor: str, spec, method_options: dict):
    """Per-channel range of `tensor` at per-channel widths allocated from its per-channel clipping ranges."""
    if not METHODS[spec.method].per_channel:
        raise BadRulesError(
            f"tensor {tensor}: per-channel bit allocation needs a per-channel method; "
            f"accepted: {', '.join(sorted(n for n, m in METHODS.items() if m.per_channel))} "
            f"(got {spec.method})"
        )
    try:
        lo, hi = clip_range(
            spec.method, stats[tensor], spec.bits, spec.symmetric, per_channel=True, **method_options
        )
    except OnnxQuantError as exc:
        raise type(exc)(f"tensor {tensor}: {exc}") from exc
    span = np.maximum(hi, 0) - np.minimum(lo, 0)  # dead (constant 0) channels: 0, so the fewest bits
    widths = allocate_bits(span, spec.bits, lo=MIN_BITS, hi=MAX_BITS)
    return compute_table(
        {tensor: stats[tensor]},
        {tensor: (widths, spec.symmetric)},
        spec.method,
        per_channel=[tensor],
        **method_options,
    ).tensors[tensor]

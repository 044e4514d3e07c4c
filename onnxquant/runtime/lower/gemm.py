"""The GEMM family: ``DQ(x) → {Conv, ConvTranspose, Gemm, MatMul}(DQ(w) [, bias]) [→ Add(bias)]
[→ Relu | Clip]* → Q`` becomes one `GemmStep`.

``acc = Σ (x − z_x)(w − z_w) + b`` in int32 with ``b = round(bias / (s_x s_w))`` (an int32 bias already at
scale ``s_x s_w`` is used as is), then ``y = clip(requant(acc) + z_y, lo, hi)`` where the real multiplier is
``s_x s_w / s_y`` (times ``alpha`` for Gemm) and ``[lo, hi]`` is the code range narrowed by the activation.
The node is refused (runs in float) unless ``max|x − z_x| · Σ_k |w_k − z_w| + |b| < 2^31`` for every output
channel, a proof that the int32 accumulator cannot overflow; for a MatMul of two activations the bound is
``K · max|a − z_a| · max|b − z_b|``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxquant.runtime import plan as P
from onnxquant.runtime.lower.base import Context, QInfo, Refused
from onnxquant.runtime.requant import INT32_MAX, f32_scale, quantize_multiplier

OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def lower(ctx: Context, node: gs.Node) -> P.GemmStep:
    """Lower one Conv / ConvTranspose / Gemm / MatMul with its output chain; Refused when it does not
    apply."""
    op = node.op
    x_src, xq = ctx.act(node.inputs[0], "input")
    sx, zx = xq.scalar()
    b_src, bq = None, None
    if node.inputs[1].name in ctx.weights:
        w, wq = ctx.weights[node.inputs[1].name]
    elif op == "MatMul":
        b_src, bq = ctx.act(node.inputs[1], "operand B")
        w, wq = None, None
    else:
        raise Refused(f"weight {node.inputs[1].name!r} is not a DequantizeLinear of a constant")
    w, w_axis, out_ch, attrs, alpha, beta = _layout(node, w)
    if w is not None:
        wscale, wzp = _per_channel(wq, w_axis, out_ch, attrs.get("group", 1), op)
    else:
        wscale, wzp = np.full(1, bq.scalar()[0], np.float32), np.full(1, bq.scalar()[1], np.int64)
    s_acc = np.float64(alpha) * np.float64(sx) * wscale.astype(np.float64)
    bias = np.zeros(out_ch if w is not None else 1, dtype=np.int64)
    has_bias = op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name
    if has_bias:
        bias = bias + _bias(ctx, node.inputs[2], sx, wscale, s_acc, beta, alpha, out_ch)
    chain = ctx.chain(node.outputs[0], allow_bias=op in ("MatMul", "Gemm") or not has_bias)
    if chain.bias is not None:
        extra = chain.bias
        extra = extra.reshape(-1) if extra.size > 1 else np.full(bias.shape, float(extra.reshape(-1)[0]))
        if extra.shape != bias.shape:
            raise Refused("bias Add does not broadcast along the output channels")
        bias = bias + np.rint(extra / s_acc).astype(np.int64)
    yq, lo, hi = ctx.out(chain)
    sy, zy = yq.scalar()
    real = s_acc / np.float64(sy)
    if op == "Gemm":
        scale = f32_scale(np.float32(alpha), sx, wscale, divide_by=sy)
    else:
        scale = f32_scale(sx, wscale, divide_by=sy)
    mult, shift = quantize_multiplier(real)
    xlo, xhi = ctx.range_of(x_src, xq)
    xmax = max(abs(xlo - zx), abs(xhi - zx))
    if w is not None:
        wabs = weight_abs_sum(op, w, wzp, attrs.get("group", 1))
        bound = int(np.max(xmax * wabs + np.abs(bias)))
        k = int(np.prod(w.shape[1:])) if op in ("Conv", "ConvTranspose") else w.shape[0]
    else:
        k = (node.inputs[1].shape or [None, None])[-2]
        if not isinstance(k, int):
            raise Refused("K of an activation × activation MatMul is not known statically")
        blo, bhi = ctx.range_of(b_src, bq)
        bound = int(k * xmax * max(abs(blo - bq.scalar()[1]), abs(bhi - bq.scalar()[1])))
    if bound > INT32_MAX:
        raise Refused(f"int32 accumulator could overflow: bound {bound} >= 2^31 (K={k})")
    inputs = [x_src] + ([b_src] if b_src else [])
    step = P.GemmStep(
        node.name,
        op,
        inputs,
        [],
        [],
        x_zp=zx,
        x_range=(xlo, xhi),
        w=w,
        w_zp=wzp,
        w_bits=8 if wq is None or wq.dtype.endswith("8") else 4,
        b_zp=bq.scalar()[1] if bq else 0,
        b_range=ctx.range_of(b_src, bq) if bq else (0, 0),
        bias=bias,
        attrs=attrs,
        requant=P.Requant(scale, mult, shift, zy, lo, hi),
        bound=bound,
        info=f"K={k}, accumulator bound {bound} < 2^31",
    )
    return ctx.finish(step, node, chain, lo, hi, yq.dtype)


def _layout(node: gs.Node, w: np.ndarray | None):
    """(weight in the step's layout, its output-channel axis in the source, output channels, attrs, alpha,
    beta) of `node`."""
    op, attrs, alpha, beta = node.op, {}, 1.0, 1.0
    if op in ("Conv", "ConvTranspose"):
        if w.ndim not in (3, 4):
            raise Refused(f"{w.ndim - 2}-D {op} is not lowered")
        group = int(node.attrs.get("group", 1))
        nk = w.ndim - 2
        attrs = {
            "group": group,
            "kernel": list(w.shape[2:]),
            "strides": list(node.attrs.get("strides", [1] * nk)),
            "dilations": list(node.attrs.get("dilations", [1] * nk)),
            "pads": list(node.attrs.get("pads", [0] * 2 * nk)),
            "auto_pad": node.attrs.get("auto_pad", "NOTSET"),
        }
        if op == "Conv":
            return w, 0, w.shape[0], attrs, alpha, beta
        if node.attrs.get("output_shape") is not None or attrs["auto_pad"] != "NOTSET":
            raise Refused("ConvTranspose with output_shape/auto_pad is not lowered")
        attrs["output_padding"] = list(node.attrs.get("output_padding", [0] * nk))
        return w, 1, w.shape[1] * group, attrs, alpha, beta
    if op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        attrs = {"transA": int(node.attrs.get("transA", 0))}
        if w.ndim != 2:
            raise Refused("Gemm weight is not 2-D")
        trans_b = int(node.attrs.get("transB", 0))
        w = w.T if trans_b else w
        return w, 0 if trans_b else 1, w.shape[1], attrs, alpha, beta
    if w is not None and w.ndim != 2:  # MatMul
        raise Refused("MatMul weight is not 2-D")
    return w, 1, w.shape[1] if w is not None else 1, attrs, alpha, beta


def _per_channel(wq: QInfo, axis: int, out_ch: int, group: int, op: str) -> tuple[np.ndarray, np.ndarray]:
    """Weight scale (float32) and zero point (int64), one per output channel."""
    if wq.per_tensor:
        s, z = wq.scalar()
        return np.full(out_ch, s, np.float32), np.full(out_ch, z, np.int64)
    if wq.axis != axis:
        raise Refused(f"weight is quantized per channel along axis {wq.axis}, not the output channels")
    scale, zp = wq.scale.astype(np.float32), np.broadcast_to(wq.zero_point, wq.scale.shape).astype(np.int64)
    if op == "ConvTranspose" and group > 1:
        scale, zp = np.tile(scale, group), np.tile(zp, group)
    if scale.size != out_ch:
        raise Refused("per-channel weight scale does not match the output channels")
    return scale, zp


def _bias(
    ctx: Context, tensor: gs.Tensor, sx, wscale, s_acc, beta: float, alpha: float, out_ch: int
) -> np.ndarray:
    """int64 bias per output channel at the accumulator scale ``s_acc``."""
    if tensor.name in ctx.weights:
        codes, bq = ctx.weights[tensor.name]
        expect = f32_scale(sx, wscale)
        same = (
            bq.dtype == "int32"
            and np.all(bq.zero_point == 0)
            and alpha == 1.0
            and beta == 1.0
            and np.all(np.broadcast_to(bq.scale, expect.shape) == expect)
            and codes.size == out_ch
        )
        if same:
            return codes.reshape(-1).astype(np.int64)
    value = ctx.const(tensor)
    if value is None:
        raise Refused("bias is not constant")
    value = np.asarray(value, dtype=np.float64) * beta
    if value.size == 1:
        value = np.full(out_ch, float(value.reshape(-1)[0]))
    value = value.reshape(-1)
    if value.size != out_ch:
        raise Refused("bias does not broadcast along the output channels")
    return np.rint(value / s_acc).astype(np.int64)


def weight_abs_sum(op: str, w: np.ndarray, wzp: np.ndarray, group: int) -> np.ndarray:
    """``Σ_k |w_k − z_w|`` per output channel, for the accumulator bound."""
    if op == "Conv":
        return np.abs(w - wzp.reshape(-1, *[1] * (w.ndim - 1))).reshape(w.shape[0], -1).sum(axis=1)
    if op == "ConvTranspose":
        c, mg = w.shape[:2]
        wg = w.reshape(group, c // group, mg, -1)
        z = wzp.reshape(group, 1, mg, 1)
        return np.abs(wg - z).sum(axis=(1, 3)).reshape(-1)
    return np.abs(w - wzp.reshape(1, -1)).sum(axis=0)

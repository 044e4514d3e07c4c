"""Lowering of the GEMM family: ``DQ(x) → {Conv, ConvTranspose, Gemm, MatMul}(DQ(w) [, bias]) [→ Add(bias)]
[→ Relu | Clip]* → Q`` to a `GemmStep` (see `lower.py` for the arithmetic and the overflow proof)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from onnxquant.runtime import plan as P
from onnxquant.runtime.requant import INT32_MAX, f32_scale, quantize_multiplier

if TYPE_CHECKING:
    from onnxquant.runtime.lower import QInfo


class Refused(Exception):
    """A pattern does not apply; the message is the reason shown to the user."""


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class GemmPatterns:
    """Matcher methods mixed into the lowering (they use its `_act`, `_chain`, `_out`, `_finish`, ...)."""

    def _gemm(self, idx: int, node: onnx.NodeProto) -> P.GemmStep:
        op, name = node.op_type, self.names[idx]
        x_src, xq = self._act(node.input[0], "input")
        sx, zx = xq.scalar()
        attrs: dict = {}
        b_src, bq = None, None
        if node.input[1] in self.weights:
            w, wq = self.weights[node.input[1]]
        elif op == "MatMul":
            b_src, bq = self._act(node.input[1], "operand B")
            w, wq = None, None
        else:
            raise Refused(f"weight {node.input[1]!r} is not a DequantizeLinear of a constant")
        alpha, beta = 1.0, 1.0
        if op in ("Conv", "ConvTranspose"):
            if w.ndim not in (3, 4):
                raise Refused(f"{w.ndim - 2}-D {op} is not lowered")
            group = int(_attr(node, "group", 1))
            nk = w.ndim - 2
            attrs = {"group": group, "kernel": list(w.shape[2:]),
                     "strides": list(_attr(node, "strides", [1] * nk)),
                     "dilations": list(_attr(node, "dilations", [1] * nk)),
                     "pads": list(_attr(node, "pads", [0] * 2 * nk)),
                     "auto_pad": _attr(node, "auto_pad", b"NOTSET").decode()}
            if op == "ConvTranspose":
                if _attr(node, "output_shape") is not None or attrs["auto_pad"] != "NOTSET":
                    raise Refused("ConvTranspose with output_shape/auto_pad is not lowered")
                attrs["output_padding"] = list(_attr(node, "output_padding", [0] * nk))
                out_ch, w_axis = w.shape[1] * group, 1
            else:
                out_ch, w_axis = w.shape[0], 0
        elif op == "Gemm":
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            attrs = {"transA": int(_attr(node, "transA", 0))}
            if w.ndim != 2:
                raise Refused("Gemm weight is not 2-D")
            trans_b = int(_attr(node, "transB", 0))
            w_axis = 0 if trans_b else 1
            w = w.T if trans_b else w
            out_ch = w.shape[1]
        else:  # MatMul
            if w is not None and w.ndim != 2:
                raise Refused("MatMul weight is not 2-D")
            out_ch = w.shape[1] if w is not None else 1
            w_axis = 1
        if w is not None:
            wscale, wzp = self._per_channel(wq, w_axis, out_ch, attrs.get("group", 1), op)
        else:
            wscale, wzp = np.full(1, bq.scalar()[0], np.float32), np.full(1, bq.scalar()[1], np.int64)
        s_acc = np.float64(alpha) * np.float64(sx) * wscale.astype(np.float64)
        bias = np.zeros(out_ch if w is not None else 1, dtype=np.int64)
        has_bias = op in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]
        if has_bias:
            bias = bias + self._bias(node.input[2], sx, wscale, s_acc, beta, alpha, out_ch)
        q_idx, lo_f, hi_f, extra, covered = self._chain(node.output[0], allow_bias=op in ("MatMul", "Gemm")
                                                        or not has_bias)
        if extra is not None:
            extra = extra.reshape(-1) if extra.size > 1 else np.full(bias.shape, float(extra.reshape(-1)[0]))
            if extra.shape != bias.shape:
                raise Refused("bias Add does not broadcast along the output channels")
            bias = bias + np.rint(extra / s_acc).astype(np.int64)
        yq, lo, hi = self._out(q_idx, lo_f, hi_f)
        sy, zy = yq.scalar()
        real = s_acc / np.float64(sy)
        if op == "Gemm":
            scale = f32_scale(np.float32(alpha), sx, wscale, divide_by=sy)
        else:
            scale = f32_scale(sx, wscale, divide_by=sy)
        mult, shift = quantize_multiplier(real)
        xlo, xhi = self._range_of(x_src, xq)
        xmax = max(abs(xlo - zx), abs(xhi - zx))
        if w is not None:
            wabs = self._weight_abs_sum(op, w, wzp, attrs.get("group", 1))
            bound = int(np.max(xmax * wabs + np.abs(bias)))
            k = int(np.prod(w.shape[1:])) if op in ("Conv", "ConvTranspose") else w.shape[0]
        else:
            k = (self.shapes.get(node.input[1]) or [None, None])[-2]
            if k is None:
                raise Refused("K of an activation × activation MatMul is not known statically")
            blo, bhi = self._range_of(b_src, bq)
            bound = int(k * xmax * max(abs(blo - bq.scalar()[1]), abs(bhi - bq.scalar()[1])))
        if bound > INT32_MAX:
            raise Refused(f"int32 accumulator could overflow: bound {bound} >= 2^31 (K={k})")
        inputs = [x_src] + ([b_src] if b_src else [])
        step = P.GemmStep(name, op, inputs, [], [], x_zp=zx, x_range=(xlo, xhi),
                          w=w, w_zp=wzp, w_bits=8 if wq is None or wq.dtype.endswith("8") else 4,
                          b_zp=bq.scalar()[1] if bq else 0,
                          b_range=self._range_of(b_src, bq) if bq else (0, 0), bias=bias, attrs=attrs,
                          requant=P.Requant(scale, mult, shift, zy, lo, hi), bound=bound,
                          info=f"K={k}, accumulator bound {bound} < 2^31")
        return self._finish(step, idx, covered, q_idx, lo, hi, yq.dtype)

    def _per_channel(self, wq: QInfo, axis: int, out_ch: int, group: int, op: str):
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

    def _bias(self, name: str, sx, wscale, s_acc, beta: float, alpha: float, out_ch: int) -> np.ndarray:
        if name in self.weights:
            codes, bq = self.weights[name]
            expect = f32_scale(sx, wscale)
            same = (bq.dtype == "int32" and np.all(bq.zero_point == 0) and alpha == 1.0 and beta == 1.0
                    and np.all(np.broadcast_to(bq.scale, expect.shape) == expect) and codes.size == out_ch)
            if same:
                return codes.reshape(-1).astype(np.int64)
        if name not in self.consts:
            raise Refused("bias is not constant")
        value = np.asarray(self.consts[name], dtype=np.float64) * beta
        if value.size == 1:
            value = np.full(out_ch, float(value.reshape(-1)[0]))
        value = value.reshape(-1)
        if value.size != out_ch:
            raise Refused("bias does not broadcast along the output channels")
        return np.rint(value / s_acc).astype(np.int64)

    @staticmethod
    def _weight_abs_sum(op: str, w: np.ndarray, wzp: np.ndarray, group: int) -> np.ndarray:
        if op == "Conv":
            return np.abs(w - wzp.reshape(-1, *[1] * (w.ndim - 1))).reshape(w.shape[0], -1).sum(axis=1)
        if op == "ConvTranspose":
            c, mg = w.shape[:2]
            wg = w.reshape(group, c // group, mg, -1)
            z = wzp.reshape(group, 1, mg, 1)
            return np.abs(wg - z).sum(axis=(1, 3)).reshape(-1)
        return np.abs(w - wzp.reshape(1, -1)).sum(axis=0)


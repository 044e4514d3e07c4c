"""NumPy backend: exact integer execution of a plan.

Integer GEMMs run through float64 BLAS when the accumulator bound of the step is below 2^53 (every product and
every partial sum is then an exactly representable integer, whatever the summation order), and in int64
otherwise. Convolution is im2col + GEMM with the input padded by its zero point (0 after subtracting it);
ConvTranspose is GEMM + col2im. Requantization follows `requant.py` in the chosen mode.

Quantized Add in float mode reproduces ONNX Runtime's AVX2 QLinearAdd kernel: with ``r_a = s_a/s_c``,
``r_b = s_b/s_c`` and ``k = z_c − fma(r_a, z_a, r_b z_b)`` in float32, ``c = round(fma(a, r_a, fma(b, r_b,
k)))``. AveragePool in float mode reproduces ONNX Runtime's QLinearAveragePool: dequantize, float32 sum in
window order, divide by the count, ``round(y / s_y + z_y)``. GlobalAveragePool uses the integer sum and
float32 scale ``s_x / (s_y · n)`` as MLAS does. In fixed mode every multiplier is a `quantize_multiplier`
pair.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import numpy as np

from onnxquant.errors import InternalError
from onnxquant.runtime import plan as P
from onnxquant.runtime import requant as R
from onnxquant.runtime.float_ops import NodeRunner

log = logging.getLogger(__name__)

F64_EXACT = 1 << 53
NP_DTYPES = {
    "uint8": np.uint8,
    "int8": np.int8,
    "uint4": np.uint8,
    "int4": np.int8,
    "uint2": np.uint8,
    "int2": np.int8,
    "uint16": np.uint16,
    "int16": np.int16,
    "int32": np.int32,
}


def imatmul(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """Exact integer matmul (numpy broadcasting rules): float64 BLAS when `bound` < 2^53, else int64."""
    if bound < F64_EXACT:
        return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def _chan(values, axis: int, ndim: int) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 0 or values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def requantize(acc: np.ndarray, rq: P.Requant, mode: str, axis: int) -> np.ndarray:
    """Apply a step's requantization to int accumulators; per-channel parameters lie along `axis`."""
    if mode == "float":
        return R.requant_float(acc, _chan(rq.scale, axis, acc.ndim), rq.zero_point, rq.lo, rq.hi)
    return R.requant_fixed(
        acc,
        _chan(rq.multiplier, axis, acc.ndim),
        _chan(rq.shift, axis, acc.ndim),
        rq.zero_point,
        rq.lo,
        rq.hi,
    )


def conv_geometry(in_sp, kernel, strides, dilations, pads, auto_pad: str, ceil_mode: int = 0):
    """Output spatial size and (begin, end) pads, ONNX semantics (ceil_mode as ONNX Runtime)."""
    n = len(kernel)
    pads = list(pads)
    out = []
    for i in range(n):
        eff = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-in_sp[i] // strides[i])
            total = max((o - 1) * strides[i] + eff - in_sp[i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + n] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            pads[i] = pads[i + n] = 0
        numer = in_sp[i] + pads[i] + pads[i + n] - eff
        o = (-(-numer // strides[i]) if ceil_mode else numer // strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= in_sp[i] + pads[i]:
            o -= 1
        out.append(o)
    return out, pads


def as_2d(attrs: dict, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """A 1-D spatial op's input and attributes viewed as 2-D with H = 1 (2-D ones unchanged)."""
    if len(attrs["kernel"]) == 2:
        return x, attrs
    a = dict(attrs)
    a["kernel"] = [1, attrs["kernel"][0]]
    a["strides"] = [1, attrs["strides"][0]]
    a["dilations"] = [1, attrs.get("dilations", [1])[0]]
    p = attrs["pads"]
    a["pads"] = [0, p[0], 0, p[1]]
    return x[:, :, None, :], a


def windows(x: np.ndarray, kernel, strides, dilations, pads, out_sp, fill) -> np.ndarray:
    """(N, C, kh, kw, OH, OW) gathered windows of a (N, C, H, W) array padded with `fill`."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    oh, ow = out_sp
    need_h = max((oh - 1) * sh + (kh - 1) * dh + 1, h + pads[0])
    need_w = max((ow - 1) * sw + (kw - 1) * dw + 1, w + pads[1])
    xp = np.full((n, c, need_h, need_w), fill, dtype=x.dtype)
    xp[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w] = x
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[
                :, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw
            ]
    return cols


class NumpyBackend:
    """Runs every step on the CPU; subclasses replace the GEMM primitives."""

    name = "numpy"

    def __init__(self):
        self.nodes = NodeRunner()

    # ------------------------------------------------------------------ driver
    def run(
        self,
        plan: P.Plan,
        feeds: Mapping[str, np.ndarray],
        mode: str = "float",
        keep: Collection[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Execute the plan; returns every tensor value (integer tensors as int64 codes), or with `keep`
        only those tensors, every other one freed after its last reader so memory stays a few activations."""
        env: dict[str, np.ndarray] = dict(plan.constants)
        env.update(feeds)
        last = {n: i for i, step in enumerate(plan.steps) for n in step.inputs if n}
        for i, step in enumerate(plan.steps):
            args = [self.arg(env, step, name) for name in step.inputs]
            env.update(zip(step.outputs, self.run_step(plan, step, args, mode)))
            if keep is not None:
                for name in [*step.inputs, *step.outputs]:
                    if name and last.get(name, -1) <= i and name not in keep and name not in plan.constants:
                        env.pop(name, None)
        return env if keep is None else {n: env[n] for n in keep}

    @staticmethod
    def arg(env: Mapping[str, np.ndarray], step: P.Step, name: str):
        if not name:
            return None
        if isinstance(step, P.AddStep) and name in step.const:
            return step.const[name]
        return env[name]

    @staticmethod
    def outputs(plan: P.Plan, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph outputs, integer tensors cast to their container dtype."""
        out = {}
        for name in plan.outputs:
            value = env[name]
            if name in plan.int_dtypes and np.issubdtype(np.asarray(value).dtype, np.integer):
                value = np.asarray(value).astype(NP_DTYPES[plan.int_dtypes[name]])
            out[name] = value
        return out

    def run_step(self, plan: P.Plan, step: P.Step, args: list, mode: str) -> list[np.ndarray]:
        if mode not in R.REQUANT_MODES:
            raise InternalError(
                f"requant mode {mode!r} reached the backend; accepted: {', '.join(R.REQUANT_MODES)}"
            )
        if isinstance(step, P.FloatStep):
            return self.nodes.run(
                plan, step, [self._float_arg(plan, n, a) for n, a in zip(step.inputs, args)]
            )
        if isinstance(step, P.QuantizeStep):
            x = np.asarray(args[0], dtype=np.float32)
            return [
                R.quantize_f32(
                    x,
                    _chan(step.scale, (step.axis or 0) % x.ndim, x.ndim),
                    _chan(step.zero_point, (step.axis or 0) % x.ndim, x.ndim),
                    step.lo,
                    step.hi,
                )
            ]
        if isinstance(step, P.DequantizeStep):
            q = np.asarray(args[0]).astype(np.int64)
            ax = (step.axis or 0) % max(q.ndim, 1)
            return [R.dequantize_f32(q, _chan(step.scale, ax, q.ndim), _chan(step.zero_point, ax, q.ndim))]
        codes = [None if a is None else np.asarray(a).astype(np.int64) for a in args]
        if isinstance(step, P.GemmStep):
            return [
                {
                    "Conv": self.conv,
                    "ConvTranspose": self.conv_transpose,
                    "Gemm": self.gemm,
                    "MatMul": self.matmul,
                }[step.op](step, codes, mode)
            ]
        if isinstance(step, P.AddStep):
            return [add(step, codes[0], codes[1], mode)]
        if isinstance(step, P.PoolStep):
            return [pool(step, codes[0], mode)]
        if isinstance(step, P.MoveStep):
            return [move(step, codes, mode)]
        raise InternalError(f"step {step.name!r}: unknown step type {type(step).__name__}")

    @staticmethod
    def _float_arg(plan: P.Plan, name: str, value):
        if value is not None and name in plan.int_dtypes and np.asarray(value).dtype == np.int64:
            return np.asarray(value).astype(NP_DTYPES[plan.int_dtypes[name]])
        return value

    # ------------------------------------------------------------------ GEMM family
    def conv(self, step: P.GemmStep, args, mode: str) -> np.ndarray:
        x = args[0]
        one_d = x.ndim == 3
        x, attrs = as_2d(step.attrs, x)
        g = attrs["group"]
        out_sp, pads = conv_geometry(
            x.shape[2:],
            attrs["kernel"],
            attrs["strides"],
            attrs["dilations"],
            attrs["pads"],
            attrs["auto_pad"],
        )
        cols = windows(x - step.x_zp, attrs["kernel"], attrs["strides"], attrs["dilations"], pads, out_sp, 0)
        n = x.shape[0]
        m = step.w.shape[0]
        cols = cols.reshape(n, g, -1, out_sp[0] * out_sp[1])
        w = (step.w - step.w_zp.reshape(-1, *[1] * (step.w.ndim - 1))).reshape(g, m // g, -1)
        acc = self.group_gemm(w, cols, step.bound)  # (N, G, M/g, L)
        acc = acc.reshape(n, m, *out_sp) + step.bias.reshape(1, m, 1, 1)
        y = requantize(acc, step.requant, mode, 1)
        return y[:, :, 0, :] if one_d else y

    def group_gemm(self, w: np.ndarray, cols: np.ndarray, bound: int) -> np.ndarray:
        """(G, Mg, K) × (N, G, K, L) → (N, G, Mg, L), exact."""
        return imatmul(w[None], cols, bound)

    def conv_transpose(self, step: P.GemmStep, args, mode: str) -> np.ndarray:
        x = args[0]
        one_d = x.ndim == 3
        x, attrs = as_2d(step.attrs, x)
        op = step.attrs.get("output_padding", [0])
        opad = [0, op[0]] if one_d else op
        g = attrs["group"]
        n, _, h, w_ = x.shape
        cg, mg = step.w.shape[:2]  # cg: all input channels
        kh, kw = attrs["kernel"]
        sh, sw = attrs["strides"]
        dh, dw = attrs["dilations"]
        w = step.w if step.w.ndim == 4 else step.w[:, :, None, :]
        wz = (w.reshape(g, cg // g, mg, kh, kw) - step.w_zp.reshape(g, 1, mg, 1, 1)).reshape(g, cg // g, -1)
        xs = (x - step.x_zp).reshape(n, g, cg // g, h * w_)
        cols = imatmul(np.swapaxes(wz, 1, 2)[None], xs, step.bound).reshape(n, g * mg, kh, kw, h, w_)
        full_h = (h - 1) * sh + (kh - 1) * dh + 1 + opad[0]
        full_w = (w_ - 1) * sw + (kw - 1) * dw + 1 + opad[1]
        out = np.zeros((n, g * mg, full_h, full_w), dtype=np.int64)
        for i in range(kh):
            for j in range(kw):
                out[
                    :, :, i * dh : i * dh + sh * (h - 1) + 1 : sh, j * dw : j * dw + sw * (w_ - 1) + 1 : sw
                ] += cols[:, :, i, j]
        p = attrs["pads"]
        out = out[:, :, p[0] : full_h - p[2], p[1] : full_w - p[3]] + step.bias.reshape(1, -1, 1, 1)
        y = requantize(out, step.requant, mode, 1)
        return y[:, :, 0, :] if one_d else y

    def gemm(self, step: P.GemmStep, args, mode: str) -> np.ndarray:
        a = args[0].T if step.attrs.get("transA") else args[0]
        return self.matmul_const(step, a, mode)

    def matmul(self, step: P.GemmStep, args, mode: str) -> np.ndarray:
        if step.w is None:
            acc = imatmul(args[0] - step.x_zp, args[1] - step.b_zp, step.bound)
            return requantize(acc, step.requant, mode, acc.ndim - 1)
        return self.matmul_const(step, args[0], mode)

    def matmul_const(self, step: P.GemmStep, a: np.ndarray, mode: str) -> np.ndarray:
        """(…, M, K) codes × constant (K, N) weight, bias and requantization along the last axis."""
        acc = imatmul(a - step.x_zp, step.w - step.w_zp.reshape(1, -1), step.bound) + step.bias
        return requantize(acc, step.requant, mode, acc.ndim - 1)


# ---------------------------------------------------------------------- elementwise, pooling, moves
def add(step: P.AddStep, a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    (sa, za), (sb, zb), (sc, zc) = step.a, step.b, step.out
    if mode == "fixed":
        twice = 2.0 * max(float(sa), float(sb))
        ma, mb = R.quantize_multiplier(float(sa) / twice), R.quantize_multiplier(float(sb) / twice)
        mo = R.quantize_multiplier(twice / (float(1 << 20) * float(sc)))
        xa = R.multiply_by_quantized_multiplier((a - za) << 20, *ma)
        xb = R.multiply_by_quantized_multiplier((b - zb) << 20, *mb)
        return R.requant_fixed(xa + xb, mo[0], mo[1], zc, step.lo, step.hi)
    f32, f64 = np.float32, np.float64
    ra, rb = f32(f32(sa) / f32(sc)), f32(f32(sb) / f32(sc))
    # k = z_c − fma(r_a, z_a, r_b·z_b): ONNX Runtime's build contracts this expression into an FMA
    k = f32(f32(zc) - f32(f64(ra) * f64(za) + f64(f32(rb * f32(zb)))))
    if b.size == 1 and a.size != 1:
        kk = f32(k + f32(f32(b.reshape(-1)[0]) * rb))
        v = (a.astype(f64) * f64(ra) + f64(kk)).astype(f32)
    elif a.size == 1 and b.size != 1:
        kk = f32(k + f32(f32(a.reshape(-1)[0]) * ra))
        v = (b.astype(f64) * f64(rb) + f64(kk)).astype(f32)
    else:  # fma(a, ra, fma(b, rb, k)); products and sums are exact in float64 before the float32 rounding
        inner = (b.astype(f64) * f64(rb) + f64(k)).astype(f32)
        v = (a.astype(f64) * f64(ra) + inner.astype(f64)).astype(f32)
    return np.clip(np.rint(v), step.lo, step.hi).astype(np.int64)


def pool(step: P.PoolStep, x: np.ndarray, mode: str) -> np.ndarray:
    (sx, zx), (sy, zy) = step.src, step.out
    if step.op in ("GlobalMaxPool", "GlobalAveragePool"):
        axes = tuple(range(2, x.ndim))
        if step.op == "GlobalMaxPool":
            return _recode(x.max(axis=axes, keepdims=True), step.src, step.out, step.lo, step.hi, mode)
        count = int(np.prod(x.shape[2:]))
        acc = x.sum(axis=axes, keepdims=True) - count * zx
        if mode == "float":
            scale = np.float32(np.float32(sx) / np.float32(np.float32(sy) * np.float32(count)))
            return R.requant_float(acc, scale, zy, step.lo, step.hi)
        m, s = R.quantize_multiplier(float(sx) / (float(sy) * count))
        return R.requant_fixed(acc, m, s, zy, step.lo, step.hi)
    one_d = x.ndim == 3
    x2, attrs = as_2d(step.attrs, x)
    out_sp, pads = conv_geometry(
        x2.shape[2:],
        attrs["kernel"],
        attrs["strides"],
        attrs["dilations"],
        attrs["pads"],
        attrs["auto_pad"],
        attrs["ceil_mode"],
    )
    if step.op == "MaxPool":
        cols = windows(
            x2, attrs["kernel"], attrs["strides"], attrs["dilations"], pads, out_sp, np.iinfo(np.int64).min
        )
        y = _recode(cols.max(axis=(2, 3)), step.src, step.out, step.lo, step.hi, mode)
    else:
        valid = windows(
            np.ones((1, 1, *x2.shape[2:]), np.int64),
            attrs["kernel"],
            attrs["strides"],
            attrs["dilations"],
            pads,
            out_sp,
            0,
        )
        cols = windows(x2, attrs["kernel"], attrs["strides"], attrs["dilations"], pads, out_sp, zx)
        count = (
            np.full(valid.shape[4:], np.prod(attrs["kernel"]))
            if attrs["count_include_pad"]
            else valid.sum(axis=(0, 1, 2, 3))
        )
        if mode == "float":
            xf = R.dequantize_f32(cols, sx, zx)
            acc = np.zeros(xf.shape[:2] + xf.shape[4:], np.float32)
            for i in range(xf.shape[2]):
                for j in range(xf.shape[3]):
                    acc = (acc + xf[:, :, i, j]).astype(np.float32)
            avg = (acc / count.astype(np.float32)).astype(np.float32)
            v = ((avg / np.float32(sy)).astype(np.float32) + np.float32(zy)).astype(np.float32)
            y = np.clip(np.rint(v), step.lo, step.hi).astype(np.int64)
        else:
            acc = (cols - zx).sum(axis=(2, 3))
            m, s = R.quantize_multiplier(float(sx) / (float(sy) * count.astype(np.float64)))
            y = R.requant_fixed(acc, m, s, zy, step.lo, step.hi)
    return y[:, :, 0, :] if one_d else y


def _recode(q: np.ndarray, src, out, lo: int, hi: int, mode: str) -> np.ndarray:
    if (np.float32(src[0]), int(src[1])) == (np.float32(out[0]), int(out[1])):
        return np.clip(q, lo, hi)
    return R.requant_qdq(q, src[0], src[1], out[0], out[1], lo, hi, mode)


def move(step: P.MoveStep, xs: list[np.ndarray], mode: str) -> np.ndarray:
    a = step.attrs
    if step.op == "Concat":
        parts = [_recode(x, p, step.out, step.lo, step.hi, mode) for x, p in zip(xs, step.srcs)]
        return np.concatenate(parts, axis=a["axis"])
    x = xs[0]
    if step.op == "Reshape":
        shape = [x.shape[i] if (d == 0 and not a["allowzero"]) else d for i, d in enumerate(a["shape"])]
        y = x.reshape(shape)
    elif step.op == "Flatten":
        ax = a["axis"] % (x.ndim + 1) if a["axis"] < 0 else a["axis"]
        y = x.reshape(int(np.prod(x.shape[:ax])), -1)
    elif step.op == "Transpose":
        y = np.transpose(x, a["perm"])
    elif step.op == "Squeeze":
        y = np.squeeze(x, axis=None if a["axes"] is None else tuple(ax % x.ndim for ax in a["axes"]))
    else:  # Unsqueeze
        rank = x.ndim + len(a["axes"])
        y = x
        for ax in sorted(ax % rank for ax in a["axes"]):
            y = np.expand_dims(y, ax)
    return _recode(y, step.srcs[0], step.out, step.lo, step.hi, mode)

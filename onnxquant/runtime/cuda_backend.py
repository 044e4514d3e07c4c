"""CUDA backend: the GEMM family (Conv, Gemm, MatMul with a constant weight) on the GPU through the kernels in
`cuda/` (package `onnxquant.kernels`), compiled with PyCUDA for the device's architecture and cached; every
other step runs as in the NumPy backend, so results are bit-identical to it.

Operands are shifted into int8 (``x' = x − o_x``, ``w' = w − o_w`` with o = 128 for codes above 127, 8 for
4-bit codes above 7), so ``Σ (x − z_x)(w − z_w) = Σ x'w' − z_x'·Σw' − z_w'·Σx' + K z_x' z_w'``. The constant
terms fold into the bias on the host (modulo 2^32, exact because the true sum fits in int32); ``z_w'·Σx'`` is
applied in the epilogue from per-row sums when a weight zero point is non-zero. Kernels: tensor-core
``mma.sync`` m16n8k32 on sm_80+, ``__dp4a`` otherwise, and a packed-int4 kernel when both operands fit in 4
bits.

PyCUDA is an optional extra, imported only when this backend is created.
"""

from __future__ import annotations

import atexit
import importlib.resources
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from onnxquant.errors import BadModelError, InternalError, UnavailableError, first_line
from onnxquant.runtime import plan as P
from onnxquant.runtime.numpy_backend import NumpyBackend, as_2d, conv_geometry
from onnxquant.runtime.requant import REQUANT_MODES

log = logging.getLogger(__name__)

KERNEL_FILES = ("gemm_int8.cu", "gemm_int4.cu", "im2col.cu")
TILE_MN, TILE_K = 128, 64
MODE_CODE = {"float": 0, "fixed": 1, "raw": 2}


def kernel_dir() -> Path:
    """Directory of the shipped CUDA sources (the checkout's `cuda/` when run from an uninstalled source
    tree)."""
    try:
        return Path(str(importlib.resources.files("onnxquant.kernels")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "cuda"


def _pad(n: int, to: int) -> int:
    return max(to, -(-n // to) * to)


def _wrap32(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.int64)
    return (((v + (1 << 31)) % (1 << 32)) - (1 << 31)).astype(np.int32)


class _Device:
    """The CUDA context, compiled modules and kernel handles (one per process)."""

    def __init__(self):
        try:
            import pycuda.driver as drv
        except ImportError as exc:
            raise UnavailableError(
                "backend cuda needs PyCUDA (pip install 'onnxquant[cuda]') and an NVIDIA GPU; "
                "accepted here: --backend numpy"
            ) from exc
        self.drv = drv
        try:
            drv.init()
            if drv.Device.count() == 0:
                raise UnavailableError("backend cuda: no NVIDIA GPU found; accepted here: --backend numpy")
            dev = drv.Device(0)
            self.ctx = dev.retain_primary_context()
            self.ctx.push()
        except drv.Error as exc:
            raise UnavailableError(
                f"backend cuda: no usable GPU ({first_line(exc)}); accepted here: --backend numpy"
            ) from exc
        atexit.register(self._close)
        self.name = dev.name()
        self.cc = dev.compute_capability()
        arch = f"sm_{self.cc[0]}{self.cc[1]}"
        from pycuda.compiler import SourceModule

        kdir = kernel_dir()
        self.fn, self.modules = {}, []
        for fname in KERNEL_FILES:
            try:
                mod = SourceModule(
                    (kdir / fname).read_text(),
                    arch=arch,
                    options=["-std=c++17"],
                    include_dirs=[str(kdir)],
                    no_extern_c=True,
                )
            except drv.CompileError as exc:  # our kernel sources do not compile: a bug of ours
                raise InternalError(
                    f"backend cuda: compiling {fname} for {arch} failed ({first_line(exc)})"
                ) from exc
            except Exception as exc:  # no nvcc, unwritable cache, ...: this host cannot build kernels
                raise UnavailableError(
                    f"backend cuda: cannot compile {fname} for {arch} ({first_line(exc)}); "
                    "accepted here: --backend numpy"
                ) from exc
            self.modules.append(mod)
            for name in (
                "row_sums_s8",
                "gemm_s8_dp4a",
                "gemm_s8_mma",
                "gemm_s4_dp4a",
                "im2col_s8",
                "pack_s4",
            ):
                try:
                    self.fn[name] = mod.get_function(name)
                except self.drv.LogicError:
                    pass
        log.info("cuda backend on %s (%s)", self.name, arch)

    def _close(self) -> None:
        try:
            self.ctx.pop()
        except self.drv.Error as exc:  # interpreter shutdown: the context may already be gone
            log.debug("cuda context pop: %s", first_line(exc))

    def check(self, what: str, fn, *args, **kwargs):
        """Call a PyCUDA function; a driver error becomes a one-line OnnxQuantError."""
        try:
            return fn(*args, **kwargs)
        except (self.drv.Error, MemoryError) as exc:
            raise UnavailableError(f"backend cuda: {what} failed ({first_line(exc)})") from exc

    def launch(self, name: str, grid, block, *args) -> None:
        self.check(f"kernel {name}", self.fn[name], *args, grid=tuple(int(g) for g in grid), block=block)
        self.check(f"kernel {name} (synchronize)", self.ctx.synchronize)

    def to_gpu(self, arr: np.ndarray):
        from pycuda import gpuarray

        return self.check("host→device copy", gpuarray.to_gpu, np.ascontiguousarray(arr))

    def empty(self, shape, dtype):
        from pycuda import gpuarray

        return self.check("device allocation", gpuarray.empty, shape, dtype)

    def get(self, garr) -> np.ndarray:
        return self.check("device→host copy", garr.get)


@lru_cache(maxsize=1)
def device() -> _Device:
    return _Device()


class CudaBackend(NumpyBackend):
    """GEMM-family steps on the GPU; everything else as `NumpyBackend`."""

    name = "cuda"

    def __init__(self):
        super().__init__()
        self.dev = device()
        self._prepared: dict[int, dict] = {}

    # ----------------------------------------------------------------- weights and epilogue (cached per step)
    def _prepare(self, step: P.GemmStep, w: np.ndarray, groups: int) -> dict:
        """`w` is (G, N, K) codes; returns device operands and epilogue arrays."""
        key = id(step)
        if key in self._prepared:
            return self._prepared[key]
        g, n, k = w.shape
        xlo, xhi = step.x_range
        wlo, whi = int(w.min(initial=0)), int(w.max(initial=0))
        four = step.w_bits == 4 and xhi - xlo <= 15 and whi - wlo <= 15
        lim = 7 if four else 127
        xo = (8 if four else 128) if xhi > lim else 0
        wo = (8 if four else 128) if whi > lim else 0
        if xlo - xo < -lim - 1 or xhi - xo > lim or wlo - wo < -lim - 1 or whi - wo > lim:
            four = False
            xo, wo = (128 if xhi > 127 else 0), (128 if whi > 127 else 0)
        zx = step.x_zp - xo
        zw = (step.w_zp.reshape(g, n) - wo).astype(np.int64)
        wp = w - wo
        colsum = wp.sum(axis=2)
        bias = step.bias.reshape(g, n) - zx * colsum + k * zx * zw
        npad, kpad = _pad(n, TILE_MN), _pad(k, TILE_K)
        b8 = np.zeros((g, npad, kpad), np.int8)
        b8[:, :n, :k] = wp
        rq = step.requant

        def per_col(values, dtype):
            out = np.zeros((g, npad), dtype)
            out[:, :n] = (
                np.broadcast_to(np.asarray(values).reshape(-1), (g * n,)).reshape(g, n)
                if np.size(values) > 1
                else np.asarray(values).reshape(-1)[0]
            )
            return self.dev.to_gpu(out)

        dev = self.dev
        prep = {
            "g": g,
            "n": n,
            "k": k,
            "npad": npad,
            "kpad": kpad,
            "xo": xo,
            "zx": zx,
            "four": four,
            "b": dev.to_gpu(_pack_rows(b8) if four else b8),
            "bias": per_col(_wrap32(bias), np.int32),
            "scale": per_col(rq.scale, np.float32),
            "mult": per_col(rq.multiplier, np.int32),
            "shift": per_col(rq.shift, np.int32),
            "wzp": per_col(_wrap32(zw), np.int32) if np.any(zw != 0) else None,
        }
        self._prepared[key] = prep
        return prep

    def _gemm(self, prep: dict, a_dev, m: int, mpad: int, mode: str, rq: P.Requant, out, out_map) -> None:
        """Launch rowsums (if needed) and the GEMM with the fused epilogue into `out`."""
        dev = self.dev
        g, n, npad, kpad = prep["g"], prep["n"], prep["npad"], prep["kpad"]
        if prep["four"]:
            packed = dev.empty((g, mpad, kpad // 2), np.uint8)
            total = g * mpad * kpad // 2
            dev.launch(
                "pack_s4",
                (min((total + 255) // 256, 65535), 1, 1),
                (256, 1, 1),
                a_dev,
                packed,
                np.int64(total),
            )
        rowsum = None
        if prep["wzp"] is not None:
            rowsum = dev.empty((g, mpad), np.int32)
            if prep["four"]:
                raise BadModelError(
                    "backend cuda: 4-bit GEMM with non-zero weight zero points is not supported"
                )
            dev.launch(
                "row_sums_s8",
                ((mpad + 255) // 256, g, 1),
                (256, 1, 1),
                a_dev,
                np.int32(mpad),
                np.int32(kpad),
                rowsum,
            )
        null = np.intp(0)
        ep = [
            prep["bias"],
            prep["wzp"] if prep["wzp"] is not None else null,
            rowsum if rowsum is not None else null,
            prep["scale"],
            prep["mult"],
            prep["shift"],
            np.int32(npad),
            np.int32(mpad),
            np.int32(MODE_CODE[mode]),
            np.int32(rq.zero_point),
            np.int32(rq.lo),
            np.int32(rq.hi),
            out,
            *[np.int64(v) for v in out_map[:4]],
            np.int32(out_map[4]),
        ]
        if prep["four"]:
            name, tile = "gemm_s4_dp4a", 64
            a_arg = packed
        elif tuple(dev.cc) >= (8, 0):
            name, tile = "gemm_s8_mma", 128
            a_arg = a_dev
        else:
            name, tile = "gemm_s8_dp4a", 64
            a_arg = a_dev
        dev.launch(
            name,
            (npad // tile, mpad // tile, g),
            (256, 1, 1),
            a_arg,
            prep["b"],
            np.int32(mpad),
            np.int32(npad),
            np.int32(kpad),
            np.int32(m),
            np.int32(n),
            *ep,
        )

    @staticmethod
    def _decode(raw: np.ndarray, rq: P.Requant) -> np.ndarray:
        return raw.view(np.uint8 if rq.hi > 127 else np.int8).astype(np.int64)

    # ------------------------------------------------------------------ steps
    def conv(self, step: P.GemmStep, args, mode: str) -> np.ndarray:
        if mode not in REQUANT_MODES:
            raise InternalError(f"requant mode {mode!r} reached the backend")
        x = args[0]
        one_d = x.ndim == 3
        x, attrs = as_2d(step.attrs, x)
        grp = attrs["group"]
        n, c, h, w = x.shape
        m = step.w.shape[0]
        (oh, ow), pads = conv_geometry(
            [h, w], attrs["kernel"], attrs["strides"], attrs["dilations"], attrs["pads"], attrs["auto_pad"]
        )
        kh, kw = attrs["kernel"]
        prep = self._prepare(step, step.w.reshape(grp, m // grp, -1), grp)
        rows = n * oh * ow
        mpad, kpad = _pad(rows, TILE_MN), prep["kpad"]
        dev = self.dev
        x8 = dev.to_gpu((x - prep["xo"]).astype(np.int8))
        a = dev.empty((grp, mpad, kpad), np.int8)
        total = grp * mpad * kpad
        dev.launch(
            "im2col_s8",
            (min((total + 255) // 256, 65535), 1, 1),
            (256, 1, 1),
            x8,
            a,
            *[
                np.int32(v)
                for v in (
                    grp,
                    mpad,
                    kpad,
                    n,
                    c,
                    h,
                    w,
                    kh,
                    kw,
                    *attrs["strides"],
                    pads[0],
                    pads[1],
                    *attrs["dilations"],
                    oh,
                    ow,
                    prep["zx"],
                )
            ],
        )
        out = dev.empty((n, m, oh * ow), np.int8)
        l_ = oh * ow
        self._gemm(prep, a, rows, mpad, mode, step.requant, out, ((m // grp) * l_, m * l_, 1, l_, l_))
        y = self._decode(dev.get(out), step.requant).reshape(n, m, oh, ow)
        return y[:, :, 0, :] if one_d else y

    def matmul_const(self, step: P.GemmStep, a: np.ndarray, mode: str) -> np.ndarray:
        lead, k = a.shape[:-1], a.shape[-1]
        a2 = a.reshape(-1, k)
        prep = self._prepare(step, step.w.T[None], 1)
        rows = a2.shape[0]
        mpad = _pad(rows, TILE_MN)
        a8 = np.zeros((1, mpad, prep["kpad"]), np.int8)
        a8[0, :rows, :k] = a2 - prep["xo"]
        n = prep["n"]
        out = self.dev.empty((rows, n), np.int8)
        self._gemm(prep, self.dev.to_gpu(a8), rows, mpad, mode, step.requant, out, (0, 0, n, 1, rows))
        return self._decode(self.dev.get(out), step.requant).reshape(*lead, n)


def _pack_rows(a8: np.ndarray) -> np.ndarray:
    """Pack int8 values in [-8, 7] two per byte along the last axis (low nibble first)."""
    nib = (a8.astype(np.int16) & 0xF).astype(np.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


class RawGemm:
    """Device-resident int8 GEMM C = A·Bᵀ (int32 out) for benchmarks: `launch()` runs only the kernel."""

    def __init__(self, a: np.ndarray, b: np.ndarray, kernel: str = "mma"):
        self.dev = device()
        m, k = a.shape
        n = b.shape[0]
        self.m, self.n = m, n
        mpad, npad, kpad = _pad(m, TILE_MN), _pad(n, TILE_MN), _pad(k, TILE_K)
        a8, b8 = np.zeros((mpad, kpad), np.int8), np.zeros((npad, kpad), np.int8)
        a8[:m, :k], b8[:n, :k] = a, b
        self.a, self.b = self.dev.to_gpu(a8), self.dev.to_gpu(b8)
        zeros = self.dev.to_gpu(np.zeros(npad, np.int32))
        self.out = self.dev.empty((m, n), np.int32)
        self.name = {"mma": "gemm_s8_mma", "dp4a": "gemm_s8_dp4a"}[kernel]
        tile = 128 if kernel == "mma" else 64
        self.grid = (npad // tile, mpad // tile, 1)
        null = np.intp(0)
        self.args = [
            self.a,
            self.b,
            np.int32(mpad),
            np.int32(npad),
            np.int32(kpad),
            np.int32(m),
            np.int32(n),
            zeros,
            null,
            null,
            null,
            null,
            null,
            np.int32(npad),
            np.int32(mpad),
            np.int32(MODE_CODE["raw"]),
            np.int32(0),
            np.int32(0),
            np.int32(0),
            self.out,
            np.int64(0),
            np.int64(0),
            np.int64(n),
            np.int64(1),
            np.int32(m),
        ]

    def launch(self) -> None:
        self.dev.check(
            f"kernel {self.name}", self.dev.fn[self.name], *self.args, grid=self.grid, block=(256, 1, 1)
        )

    def result(self) -> np.ndarray:
        self.dev.check("synchronize", self.dev.ctx.synchronize)
        return self.dev.get(self.out)

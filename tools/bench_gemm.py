"""Benchmark onnxquant's CUDA int8 GEMM against cuBLASLt int8 (torch._int_mm, or CuPy when torch is absent).

C[M, N] = A[M, K] · B[N, K]ᵀ with int8 operands and int32 results, at M = N = K ∈ {1024, 2048, 4096, 8192} and
at the implicit-GEMM shapes of the ResNet-18-shaped model (M = batch·OH·OW, N = output channels, K =
Cin·kh·kw). Every shape is checked bit for bit against the peer (or NumPy when no peer is installed); the
table reports TOPS (2·M·N·K / time) of both and the ratio ours / peer. Needs an NVIDIA GPU and PyCUDA; exits
with a one-line message (code 2) without them.

    python tools/bench_gemm.py [--sizes 1024 2048 4096 8192] [--batch 8] [--kernel mma|dp4a] [--repeat 20]
                               [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, M per image, N, K) of ResNet-18 at 224x224; M is multiplied by the batch size
RESNET18_GEMMS = [
    ("conv1 7x7/2", 112 * 112, 64, 3 * 49),
    ("layer1 3x3", 56 * 56, 64, 64 * 9),
    ("layer2.0.conv1 3x3/2", 28 * 28, 128, 64 * 9),
    ("layer2 3x3", 28 * 28, 128, 128 * 9),
    ("layer2 downsample 1x1", 28 * 28, 128, 64),
    ("layer3.0.conv1 3x3/2", 14 * 14, 256, 128 * 9),
    ("layer3 3x3", 14 * 14, 256, 256 * 9),
    ("layer3 downsample 1x1", 14 * 14, 256, 128),
    ("layer4.0.conv1 3x3/2", 7 * 7, 512, 256 * 9),
    ("layer4 3x3", 7 * 7, 512, 512 * 9),
    ("layer4 downsample 1x1", 7 * 7, 512, 256),
    ("fc", 1, 1000, 512),
]


def _peer():
    """(name, prepare(a, b) -> (run, result)) for cuBLASLt int8, or None."""
    try:
        import torch

        if torch.cuda.is_available() and hasattr(torch, "_int_mm"):

            def prepare(a, b):
                if a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[0] % 8:  # torch._int_mm's limits
                    return None
                ta = torch.from_numpy(a).cuda()
                tb = torch.from_numpy(b).cuda().t()  # (K, N) column-major: the TN layout cuBLASLt prefers
                out = {}

                def run():
                    out["c"] = torch._int_mm(ta, tb)

                return run, lambda: out["c"].cpu().numpy(), torch.cuda.synchronize

            return f"torch._int_mm (cuBLASLt, torch {torch.__version__})", prepare
    except ImportError:
        pass
    try:
        import cupy

        def prepare(a, b):
            ca, cb = cupy.asarray(a), cupy.asarray(b)
            out = {}

            def run():
                out["c"] = cupy.matmul(ca.astype(cupy.int32), cb.T.astype(cupy.int32))

            return run, lambda: cupy.asnumpy(out["c"]), cupy.cuda.Device().synchronize

        return f"cupy {cupy.__version__} matmul (int32 upcast: not cuBLASLt int8)", prepare
    except ImportError:
        return None


def _time(run, sync, repeat: int) -> float:
    """Mean seconds per call, with CUDA events around `repeat` calls after two warm-ups."""
    import pycuda.driver as drv

    run()
    run()
    sync()
    start, end = drv.Event(), drv.Event()
    start.record()
    for _ in range(repeat):
        run()
    end.record()
    end.synchronize()
    return start.time_till(end) / 1e3 / repeat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--batch", type=int, default=8, help="batch size for the ResNet-18 shapes (default 8)")
    ap.add_argument("--kernel", choices=["mma", "dp4a"], default="mma")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()

    from onnxquant.errors import OnnxQuantError

    try:
        from onnxquant.runtime.cuda_backend import RawGemm, device

        dev = device()
    except OnnxQuantError as exc:
        sys.stderr.write(f"bench_gemm: {exc}\n")
        return 2
    if args.kernel == "mma" and tuple(dev.cc) < (8, 0):
        sys.stderr.write(
            f"bench_gemm: {dev.name} is sm_{dev.cc[0]}{dev.cc[1]}; the mma kernel needs sm_80+, "
            "use --kernel dp4a\n"
        )
        return 2
    peer = _peer()
    peer_name = peer[0] if peer else "none (checked against NumPy only)"
    shapes = [(f"{s}^3", s, s, s) for s in args.sizes]
    shapes += [
        (name, m * args.batch if name != "fc" else args.batch, n, k) for name, m, n, k in RESNET18_GEMMS
    ]
    rng = np.random.default_rng(0)
    rows = []
    sys.stdout.write(f"GPU: {dev.name} (sm_{dev.cc[0]}{dev.cc[1]}), kernel {args.kernel}, peer {peer_name}\n")
    sys.stdout.write(
        f"{'shape':<24}{'M':>7}{'N':>7}{'K':>7}{'ours TOPS':>11}{'peer TOPS':>11}{'ratio':>7}  exact\n"
    )
    for name, m, n, k in shapes:
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        b = rng.integers(-128, 128, (n, k)).astype(np.int8)
        ours = RawGemm(a, b, args.kernel)
        t_ours = _time(ours.launch, lambda o=ours: o.dev.ctx.synchronize(), args.repeat)
        c_ours = ours.result()
        ops = 2.0 * m * n * k
        row = {"shape": name, "M": m, "N": n, "K": k, "ours_tops": ops / t_ours / 1e12}
        prepared = peer[1](a, b) if peer else None
        if prepared is not None:
            run, result, sync = prepared
            row["peer_tops"] = ops / _time(run, sync, args.repeat) / 1e12
            row["ratio"] = row["ours_tops"] / row["peer_tops"]
            row["exact"] = bool(np.array_equal(c_ours, result()))
        elif m * n * k <= 2048**3:
            row["exact"] = bool(np.array_equal(c_ours, a.astype(np.int64) @ b.astype(np.int64).T))
        rows.append(row)
        peer_tops = (
            f"{row['peer_tops']:11.1f}{row['ratio']:7.2f}" if "peer_tops" in row else f"{'-':>11}{'-':>7}"
        )
        sys.stdout.write(
            f"{name:<24}{m:>7}{n:>7}{k:>7}{row['ours_tops']:11.1f}{peer_tops}  "
            f"{row.get('exact', 'unchecked')}\n"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"gpu": dev.name, "kernel": args.kernel, "peer": peer_name, "rows": rows}, indent=1)
        )
    return 0 if all(r.get("exact", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

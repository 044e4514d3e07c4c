"""KL threshold search for one tensor: onnxquant's vectorized search vs a per-candidate Python loop.

The loop is the shape of ONNX Runtime's `get_optimal_threshold`-style search (one candidate at a time, numpy
inside); both run on the same histogram (2048 bins requested) of 10^6 Laplace samples and must pick the same
threshold.

    python tools/bench_kl.py [--bins 2048] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

from onnxquant.calib.kl import kl_threshold_bins
from onnxquant.calib.stats import stats_of

ROOT = Path(__file__).resolve().parents[1]


def loop_reference():
    spec = importlib.util.spec_from_file_location("test_kl", ROOT / "tests/calib/test_kl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_kl


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bins", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    x = np.random.default_rng(0).laplace(0, 1, 1_000_000).astype(np.float32)
    counts = stats_of(x, bins=args.bins).abs_hist
    reference = loop_reference()
    print("| levels | vectorized ms | per-candidate loop ms | speed-up |")
    print("|---:|---:|---:|---:|")
    for nq in (128, 8):
        assert kl_threshold_bins(counts, nq) == reference(counts, nq)[0]
        fast = best_time(lambda nq=nq: kl_threshold_bins(counts, nq), args.repeat)
        slow = best_time(lambda nq=nq: reference(counts, nq), max(1, args.repeat // 3))
        print(f"| {nq} | {fast * 1e3:.2f} | {slow * 1e3:.0f} | {slow / fast:.0f}x |")


if __name__ == "__main__":
    main()

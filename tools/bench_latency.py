"""ONNX Runtime CPU latency of the models `tools/bench_real.py run` wrote, measured alone on a quiet machine.

    python tools/bench_latency.py [--cache DIR] [--models a,b] [--runs 30]

Per model: the float model, onnxquant's kl W8A8 (default preset), minmax W8A8 (tensorrt preset) and kl W8A8
with the `integer` preset (a `--variant integer="--rules integer"` cell), and the peers' models, each at
batch 1 with 2 intra-op threads, the median of `--runs` runs after 5 warm-up runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from bench_real import median_latency_ms, session

CANDIDATES = {
    "onnxquant default": "oq_kl_w8a8_default.onnx",
    "onnxquant tensorrt": "oq_minmax_w8a8_tensorrt.onnx",
    "onnxquant integer": "oq_kl_w8a8_default_integer.onnx",  # --variant integer="--rules integer"
    "ORT": "peer_ort.onnx",
    "NNCF": "peer_nncf.onnx",
}


def median_ms(path: Path, feeds: dict[str, np.ndarray], runs: int) -> float:
    sess = session(str(path))
    return median_latency_ms(sess, {i.name: feeds[i.name] for i in sess.get_inputs()}, runs, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/onnxquant-bench").expanduser())
    ap.add_argument("--models", default=None, help="Comma-separated model names (default: all fetched).")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    root = args.cache / "models"
    names = args.models.split(",") if args.models else sorted(p.name for p in root.iterdir() if p.is_dir())
    print("| model | float | " + " | ".join(CANDIDATES) + " |")
    print("|---|---:|" + "---:|" * len(CANDIDATES))
    for name in names:
        evaluation = np.load(root / name / "eval.npz")
        feeds = {k: evaluation[k][:1] for k in evaluation.files}
        cells = [f"{median_ms(root / name / 'model.onnx', feeds, args.runs):.1f}"]
        for file in CANDIDATES.values():
            path = root / name / "out" / file
            cells.append(f"{median_ms(path, feeds, args.runs):.1f}" if path.exists() else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

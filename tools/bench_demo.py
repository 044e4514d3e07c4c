"""Digits demo accuracy: top-1 and logit SQNR of each calibration configuration against the float model.

Every configuration is `onnxquant convert calib_data/digits/model.onnx --bits B <flags> --calib-data
calib_data/digits/calib.npz`, run through the CLI in this process; the quantized and the float model are then
run by ONNX Runtime on the 450 held-out samples of `calib_data/digits/eval.npz`. Prints a markdown table for
BENCHMARKS.md.

    python tools/bench_demo.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxquant.cli import main as cli
from onnxquant.model import make_session

DEMO = Path(__file__).resolve().parent.parent / "calib_data" / "digits"
CONFIGS = [
    (8, "minmax", ()),
    (8, "kl", ()),
    (8, "kl", ("--rules", "tensorrt")),
    (8, "laplace", ()),
    (4, "minmax", ()),
    (4, "minmax", ("--bias-correction",)),
    (4, "laplace", ()),
    (4, "laplace", ("--bias-correction",)),
    (4, "laplace", ("--bit-alloc", "activations")),
    (4, "laplace", ("--bit-alloc", "both")),
    (4, "laplace", ("--bit-alloc", "both", "--bias-correction")),
    (4, "gauss", ()),
    (4, "kl", ()),
    (4, "percentile", ()),
    (4, "mse", ()),
    (4, "mse", ("--wcalib", "mse", "--bias-correction")),
]


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(onnx.load(path)).run(None, {"input": x})[0]


def main() -> None:
    ev = np.load(DEMO / "eval.npz")
    x, labels = ev["input"], ev["labels"]
    reference = logits(DEMO / "model.onnx", x)
    print(f"float top-1 {100 * np.mean(reference.argmax(1) == labels):.2f} %\n")
    print("| width | method | flags | top-1 | logit SQNR dB |\n|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, method, flags in CONFIGS:
            out = Path(tmp) / "q.onnx"
            args = [
                "convert",
                str(DEMO / "model.onnx"),
                "--bits",
                str(bits),
                "--calib",
                method,
                *flags,
                "--calib-data",
                str(DEMO / "calib.npz"),
                "-o",
                str(out),
            ]
            try:
                cli(args, standalone_mode=False)
            except SystemExit as exc:
                if exc.code:
                    raise
            got = logits(out, x)
            sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - got) ** 2))
            top1 = 100 * np.mean(got.argmax(1) == labels)
            print(f"| W{bits}A{bits} | {method} | {' '.join(flags) or '—'} | {top1:.2f} % | {sqnr:.1f} |")


if __name__ == "__main__":
    main()

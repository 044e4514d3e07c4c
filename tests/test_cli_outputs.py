"""Outputs of every command: never an input or another output, committed together or not at all (errors,
SIGINT, SIGTERM, a failed rename), no temp files left behind (stale ones of a killed run are removed), the
mode open() would give, and a CLI whose errors are one line, first."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxquant import model as model_module
from onnxquant import outputs, tables
from onnxquant.cli import main
from onnxquant.errors import BadDataError, BadPathError
from onnxquant.model import make_session, save_model

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
WIDE = RNG.standard_normal((64, 3, 3, 3)).astype(np.float32)  # over onnx's 1 KiB external-data threshold


def tiny_model(weights: np.ndarray = W) -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["y"], ["z"], name="relu"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", len(weights), 6, 6])],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.ones(len(weights), np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


@pytest.fixture(autouse=True)
def default_sigint():
    """The interrupt tests need Python's own SIGINT handler, whatever an earlier test in the process left."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture()
def work(tmp_path):
    onnx.save(tiny_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((16, 3, 6, 6)).astype(np.float32))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def one_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def convert_args(work: Path, *extra) -> list:
    return ["convert", work / "model.onnx", "--bits", "8", "--calib", "minmax", "--calib-data", *extra]


# --------------------------------------------------------------------------------- 1. the output-path guard


def _with_external_data(work: Path) -> None:
    model = tiny_model()
    onnx.save(
        model, work / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0
    )


def _reader(work: Path, monkeypatch) -> None:
    (work / "tiny_reader.py").write_text(
        "import numpy as np\n\ndef batches():\n    return [{'x': np.ones((2, 3, 6, 6), np.float32)}]\n"
    )
    monkeypatch.syspath_prepend(str(work))


GUARD_CASES = {
    # case: (args, what the line must say)
    "convert -o calib data": (
        lambda w: [*convert_args(w, w / "calib.npz"), "-o", w / "calib.npz"],
        "--calib-data",
    ),
    "calibrate -o calib data": (
        lambda w: ["calibrate", w / "model.onnx", "--calib-data", w / "calib.npz", "-o", w / "calib.npz"],
        "--calib-data",
    ),
    "table IN -o IN": (lambda w: ["table", w / "t.json", "--format", "json", "-o", w / "t.json"], "TABLE"),
    "report -o data": (
        lambda w: [
            "report",
            w / "model.onnx",
            w / "model.onnx",
            "--data",
            w / "calib.npz",
            "-o",
            w / "calib.npz",
        ],
        "--data",
    ),
    "validate --json data": (
        lambda w: ["validate", w / "model.onnx", "--data", w / "calib.npz", "--json", w / "calib.npz"],
        "--data",
    ),
    "-o external data": (
        lambda w: [*convert_args(w, w / "calib.npz"), "-o", w / "weights.bin"],
        "MODEL's external data",
    ),
    "-o = --table-out": (
        lambda w: [*convert_args(w, w / "calib.npz"), "-o", w / "o.onnx", "--table-out", w / "o.onnx"],
        "output --table-out equals output -o",
    ),
    "--report = --json": (
        lambda w: (
            ["report", w / "model.onnx", w / "model.onnx", "--data", w / "calib.npz", "-o", w / "r"]
            + ["--json", w / "r"]
        ),
        "output --json equals output -o",
    ),
    "--save-stats = --load-stats": (
        lambda w: (
            [*convert_args(w, w / "calib.npz"), "-o", w / "o.onnx"]
            + ["--load-stats", w / "s.npz", "--save-stats", w / "s.npz"]
        ),
        "--load-stats",
    ),
    "hard link to the data": (
        lambda w: [*convert_args(w, w / "calib.npz"), "-o", w / "hard.npz"],
        "--calib-data",
    ),
    "symlink to the data": (
        lambda w: [*convert_args(w, w / "calib.npz"), "-o", w / "soft.npz"],
        "--calib-data",
    ),
    "a file of the data directory": (
        lambda w: [*convert_args(w, w / "data"), "-o", w / "data" / "part.npz"],
        "--calib-data",
    ),
    "the reader's source": (
        lambda w: [
            *convert_args(w)[:-1],
            "--calib-reader",
            "tiny_reader:batches",
            "-o",
            w / "tiny_reader.py",
        ],
        "--calib-reader",
    ),
    "the rule file": (
        lambda w: ["fold", w / "model.onnx", "--rules", w / "r.yaml", "-o", w / "r.yaml"],
        "--rules",
    ),
    "the quantized model of report": (
        lambda w: ["report", w / "model.onnx", w / "q.onnx", "--data", w / "calib.npz", "-o", w / "q.onnx"],
        "QUANT_MODEL",
    ),
}


@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_an_output_that_is_an_input_or_another_output_is_refused(work, case, monkeypatch):
    if case == "-o external data":
        _with_external_data(work)
    if case == "the reader's source":
        _reader(work, monkeypatch)
    (work / "t.json").write_text("{}")
    (work / "s.npz").write_bytes(b"stats")
    (work / "r.yaml").write_text("placement: ort\n")
    (work / "q.onnx").write_bytes((work / "model.onnx").read_bytes())
    os.link(work / "calib.npz", work / "hard.npz")
    os.symlink(work / "calib.npz", work / "soft.npz")
    (work / "data").mkdir()
    np.savez(work / "data" / "part.npz", x=np.ones((4, 3, 6, 6), np.float32))
    args, says = GUARD_CASES[case]
    before, listing = digest(work), sorted(os.listdir(work))
    result = invoke(*args(work))
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert line.startswith("error: ") and says in line and "accepted: " in line, line
    assert digest(work) == before and sorted(os.listdir(work)) == listing


def test_distinct_outputs_beside_the_inputs_are_accepted(work):
    result = invoke(
        *convert_args(work, work / "calib.npz"), "-o", work / "o.onnx", "--table-out", work / "t.json"
    )
    assert result.exit_code == 0, result.output
    assert tables.load_table(work / "t.json").tensors and onnx.load(work / "o.onnx").graph.node
    again = invoke(
        *convert_args(work, work / "calib.npz"), "-o", work / "o.onnx", "--table-out", work / "t.json"
    )
    assert again.exit_code == 0, again.output  # replacing earlier outputs is no collision


# --------------------------------------------------------------------------------- 2. all outputs or none


def test_a_failure_after_the_model_leaves_neither_model_nor_table(work, monkeypatch):
    def broken(*_a, **_k):
        raise BadDataError("t.json: cannot encode the table (test)")

    monkeypatch.setattr(tables, "save_table", broken)
    before = digest(work)
    result = invoke(
        *convert_args(work, work / "calib.npz"), "-o", work / "o.onnx", "--table-out", work / "t.json"
    )
    assert result.exit_code == 2 and "cannot encode the table" in one_line(result)
    assert digest(work) == before and temps(work) == []


def test_sigint_while_staging_leaves_nothing_and_says_interrupted(work, monkeypatch):
    def interrupted(*_a, **_k):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tables, "save_table", interrupted)
    before = digest(work)
    result = invoke(
        *convert_args(work, work / "calib.npz"), "-o", work / "o.onnx", "--table-out", work / "t.json"
    )
    assert result.exit_code == 130 and one_line(result) == "interrupted"
    assert digest(work) == before and temps(work) == []


def test_sigint_during_the_renames_waits_until_every_output_is_in_place(work, monkeypatch):
    renamed = []

    def interrupt_at_first_rename(target):
        renamed.append(target.name)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(outputs, "_before_rename", interrupt_at_first_rename)
    args = [*convert_args(work, work / "calib.npz"), "-o", work / "o.onnx", "--table-out", work / "t.json"]
    result = invoke(*args, "--save-stats", work / "s.npz")
    assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1] == "interrupted"
    assert renamed == ["o.onnx", "t.json", "s.npz"]
    assert tables.load_table(work / "t.json").tensors
    session = make_session(onnx.load(work / "o.onnx"))
    assert session.run(None, {"x": np.ones((1, 3, 6, 6), np.float32)})[0].shape == (1, 4, 6, 6)
    assert (work / "s.npz").stat().st_size > 0 and temps(work) == []


def test_a_failed_rename_puts_back_the_outputs_already_replaced(tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.json"
    first.write_text("old a")
    with pytest.raises(BadPathError, match="b.json: cannot write"), outputs.staged_outputs():
        with outputs.atomic_write(first) as tmp:
            tmp.write_text("new a")
        with outputs.atomic_write(second) as tmp:
            tmp.write_text("new b")
        second.mkdir()  # appears after staging: its rename fails
        (second / "keep").write_text("x")
    assert first.read_text() == "old a" and (second / "keep").exists()
    assert temps(tmp_path) == []


def _run_python(script: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_sigterm_while_staging_removes_the_temps_and_exits_143(work, monkeypatch):
    def not_caught(signum, _frame):  # only if the CLI installed no handler: fail the test, not the worker
        raise KeyboardInterrupt

    monkeypatch.setattr(tables, "save_table", lambda *_a, **_k: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, not_caught)
    try:
        before = digest(work)
        args = [
            *convert_args(work, work / "calib.npz"),
            "-o",
            work / "o.onnx",
            "--table-out",
            work / "t.json",
        ]
        result = invoke(*args)
    finally:
        assert signal.signal(signal.SIGTERM, previous) is not_caught  # the CLI put the handler back
    assert result.exit_code == 143 and one_line(result) == "interrupted"
    assert digest(work) == before and temps(work) == []


def test_sigint_while_importing_is_one_line_not_a_traceback(work):
    script = """
        import builtins, os, runpy, signal, sys
        real_import = builtins.__import__
        def import_and_interrupt(name, *args, **kwargs):
            if name == "onnx":
                os.kill(os.getpid(), signal.SIGINT)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = import_and_interrupt
        sys.argv = ["onnxquant", "inspect", "model.onnx"]
        runpy.run_module("onnxquant.launch", run_name="__main__")
    """
    proc = _run_python(script, work)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted" and proc.stdout == ""


def test_sigint_as_the_process_ends_exits_130_with_one_line(work):
    script = """
        import atexit, os, runpy, signal, sys
        atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))
        sys.argv = ["onnxquant", "fold", "model.onnx", "-o", "folded.onnx"]
        runpy.run_module("onnxquant.launch", run_name="__main__")
    """
    proc = _run_python(script, work)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted" and "applied" in proc.stdout
    assert onnx.load(work / "folded.onnx").graph.node


def test_the_console_script_starts_with_the_launcher():
    setup = (ROOT / "setup.cfg").read_text()
    assert "onnxquant = onnxquant.launch:main" in setup


# --------------------------------------------------------------------------------- 3. stale temps


def test_temps_of_a_killed_run_are_removed_by_the_next_one(work):
    script = """
        import os, signal, sys
        from onnxquant import outputs
        from onnxquant.cli import main
        outputs._before_rename = lambda target: os.kill(os.getpid(), signal.SIGKILL)
        sys.argv = ["onnxquant", "fold", "model.onnx", "-o", "out.onnx"]
        main()
    """
    proc = _run_python(script, work)
    assert proc.returncode == -signal.SIGKILL
    left = temps(work)
    assert len(left) == 1 and outputs.temp_pattern("out.onnx").fullmatch(left[0]), left
    (work / ".out.onnx.notes.tmp").write_text("a user's file")  # not our naming: kept
    live = work / f".out.onnx.{outputs.host_tag()}-1.abcd1234.tmp"  # pid 1 is alive: kept
    live.write_text("another run's")
    elsewhere = work / ".out.onnx.00beef-99999999.abcd1234.tmp"  # another host, old: removed
    elsewhere.write_text("x")
    os.utime(elsewhere, (0, 0))
    result = invoke("fold", work / "model.onnx", "-o", work / "out.onnx")
    assert result.exit_code == 0, result.output
    assert temps(work) == sorted([".out.onnx.notes.tmp", live.name])


# --------------------------------------------------------------------------------- 4. file modes


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_outputs_get_the_mode_open_gives(work, umask, mask, mode):
    umask(mask)
    result = invoke(
        *convert_args(work, work / "calib.npz"), "-o", work / "o.onnx", "--table-out", work / "t.json"
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((work / "o.onnx").stat().st_mode) == mode
    assert stat.S_IMODE((work / "t.json").stat().st_mode) == mode


def test_a_replaced_output_keeps_its_mode_like_open_and_cp(work, umask):
    umask(0o077)
    (work / "o.onnx").write_bytes(b"old")
    os.chmod(work / "o.onnx", 0o640)
    result = invoke("fold", work / "model.onnx", "-o", work / "o.onnx")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((work / "o.onnx").stat().st_mode) == 0o640 and onnx.load(work / "o.onnx").graph.node


def test_an_output_through_a_symlink_keeps_the_link(work):
    os.symlink("real.onnx", work / "link.onnx")
    result = invoke("fold", work / "model.onnx", "-o", work / "link.onnx")
    assert result.exit_code == 0, result.output
    assert (work / "link.onnx").is_symlink() and onnx.load(work / "real.onnx").graph.node


# --------------------------------------------------------------------------------- models with external data


def test_a_model_with_external_data_appears_with_its_data_file(tmp_path, monkeypatch, umask):
    umask(0o022)
    monkeypatch.setattr(model_module, "TWO_GIB", 64)  # this tiny model takes the >2 GiB path
    save_model(tiny_model(WIDE), tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    for name in ("big.onnx", "big.onnx.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    loaded = onnx.load(tmp_path / "big.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), WIDE)


def test_a_failure_before_commit_leaves_no_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "TWO_GIB", 64)
    with pytest.raises(BadDataError), outputs.staged_outputs():
        save_model(tiny_model(WIDE), tmp_path / "big.onnx")
        raise BadDataError("later step failed")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------- 5. usage errors


@pytest.mark.parametrize(
    "args, says",
    [
        (["convert", "MODEL", "--bits", "9"], "--bits"),
        (["convert", "MODEL", "--bitz", "4"], "--bitz"),
        (["table", "MODEL"], "--format"),
        (["convert", "MODEL", "--percentile", "nan"], "--percentile"),
        (["convert", "MODEL", "--percentile", "inf"], "--percentile"),
        (["report", "MODEL", "MODEL", "--data", "MODEL", "-o", "r.html", "--fail-under-sqnr", "nan"], "sqnr"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_usage_errors_are_one_line_that_comes_first(work, args, says):
    result = invoke(*[work / "model.onnx" if a == "MODEL" else a for a in args])
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert line.startswith("error: ") and says in line and "--help" in line, line
    assert result.stdout == ""


def test_global_options_before_the_command(work):
    result = invoke("--debug", "-v", "inspect", work / "model.onnx")
    assert result.exit_code == 0, result.output
    assert "conv (Conv)" in result.stdout
    (work / "model.onnx").write_bytes(b"garbage")
    shown = CliRunner().invoke(main, ["--debug", "inspect", str(work / "model.onnx")])
    assert type(shown.exception).__name__ == "BadModelError"  # --debug before the command: the traceback
    quiet = invoke("inspect", work / "model.onnx")
    assert quiet.exit_code == 2 and "model.onnx" in one_line(quiet)


def test_help_and_version_still_exit_0():
    assert invoke("--help").exit_code == 0 and invoke("--version").exit_code == 0
    assert "Example:" in invoke("convert", "--help").stdout

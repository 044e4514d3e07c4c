"""Whichever ONNX Runtime distribution is installed is used; a missing or broken one is one line and exit 2.

The broken installations are real package folders on disk, found by the ordinary import machinery through a
finder that hides the installed onnxruntime: a folder without `__init__.py` (what `pip uninstall onnxruntime`
leaves when onnxruntime-gpu shared the folder) and an `__init__.py` whose import fails as a missing shared
library does.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import logging
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxquant import ort as ort_module
from onnxquant.cli import main
from onnxquant.errors import UnavailableError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "calib_data" / "digits"


class _OnlyFolder:
    """A meta-path finder that finds `onnxruntime` in one folder and nowhere else."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def find_spec(self, name, path=None, target=None):
        if name != "onnxruntime":
            return None
        return importlib.machinery.PathFinder.find_spec(name, [self.folder])


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """Install a fake `onnxruntime/` folder: returns a function writing its files and hiding the real one."""

    def install(files: dict[str, str]) -> Path:
        site = tmp_path / "site"
        for rel, text in files.items():
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text(text)
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # undone last: the real module comes back
        del sys.modules["onnxruntime"]
        monkeypatch.setattr(sys, "meta_path", [_OnlyFolder(site), *sys.meta_path])
        return site

    ort_module.load.cache_clear()
    yield install
    ort_module.load.cache_clear()


def _convert(tmp_path: Path):
    out = tmp_path / "out.onnx"
    args = ["convert", DIGITS / "model.onnx", "--bits", "8", "--calib-data", DIGITS / "calib.npz", "-o", out]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result, out


def test_half_removed_folder_is_one_line_and_exit_2(installed, tmp_path):
    site = installed({"onnxruntime/capi/onnxruntime_providers_cuda.so": ""})
    result, out = _convert(tmp_path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "error: onnxruntime: the installed ONNX Runtime is broken: the folder "
        f"{site / 'onnxruntime'} has no __init__.py (half removed by an uninstall); "
    ), lines[0]
    assert lines[0].endswith(f"repair: {ort_module.REPAIR}")
    assert not out.exists()


def test_failing_import_is_one_line_and_exit_2(installed, tmp_path):
    installed(
        {
            "onnxruntime/__init__.py": "raise ImportError(\n"
            "    'libonnxruntime.so.1: cannot open shared object file: No such file or directory\\nmore'\n"
            ")\n"
        }
    )
    result, out = _convert(tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "error: onnxruntime: the installed ONNX Runtime is broken: import fails (ImportError: "
        "libonnxruntime.so.1: cannot open shared object file: No such file or directory); "
    ), result.stderr
    assert not out.exists()


def test_missing_runtime_names_what_to_install(monkeypatch, tmp_path):
    ort_module.load.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises
    try:
        result, out = _convert(tmp_path)
    finally:
        ort_module.load.cache_clear()
    assert result.exit_code == 2
    assert result.stderr == (
        "error: onnxruntime: no ONNX Runtime is installed; install one: pip install onnxruntime "
        "(CPU; or onnxruntime-gpu for CUDA)\n"
    )
    assert not out.exists()


def test_commands_without_a_model_run_need_no_runtime(monkeypatch, tmp_path):
    """`table` converts files only: it works even where ONNX Runtime is missing."""
    table = tmp_path / "t.json"
    table.write_text(
        '{"format": "onnxquant-calibration", "version": 1, "method": "minmax", "bits": 8, "tensors": '
        '{"x": {"min": 0.0, "max": 1.27, "amax": 1.27, "scale": 0.01, "zero_point": 0, "bits": 8, '
        '"signed": true, "method": "minmax"}}}'
    )
    ort_module.load.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    try:
        result = CliRunner().invoke(
            main,
            ["table", str(table), "--format", "tensorrt", "-o", str(tmp_path / "c")],
            catch_exceptions=False,
        )
    finally:
        ort_module.load.cache_clear()
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c").read_text().splitlines()[1] == "x: 3c23d70a"  # 0.01 as big-endian IEEE-754


def test_the_installed_runtime_is_used_whatever_its_distribution():
    module = ort_module.load()
    assert module is sys.modules["onnxruntime"]
    assert hasattr(module, "InferenceSession")
    found = ort_module.distributions()
    assert found and all(name.startswith(("onnxruntime", "ort-")) for name in found), found


def test_gpu_build_overwritten_by_the_cpu_build_warns(monkeypatch, caplog):
    """onnxruntime-gpu installed, onnxruntime installed over it: still runs (on the CPU), with a warning."""
    real = ort_module.load()
    versions = {"onnxruntime-gpu": "1.20.0", "onnxruntime": "1.20.1"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(real, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(ort_module.importlib.metadata, "version", version)
    monkeypatch.setattr(ort_module, "distributions", lambda: ["onnxruntime 1.20.1", "onnxruntime-gpu 1.20.0"])
    ort_module.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="onnxquant.ort"):
            assert ort_module.load() is real
    finally:
        ort_module.load.cache_clear()
    expected = (
        f"onnxruntime: onnxruntime-gpu 1.20.0 is installed but {real.__file__} holds a build without CUDA "
        "(installed: onnxruntime 1.20.1, onnxruntime-gpu 1.20.0); to use the GPU: pip install "
        "--force-reinstall --no-deps onnxruntime-gpu"
    )
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_unavailable_is_a_user_error():
    assert UnavailableError("x").exit_code == 2

"""The code base stays ruff-clean (line length 110) and every module imports without the optional extras."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "--line-length", "110", "--no-cache", "onnxquant", "tests", "tools"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:]


IMPORT_ALL_WITHOUT_PYCUDA = """
import importlib, pkgutil, sys
sys.modules["pycuda"] = None  # any `import pycuda...` now raises ImportError
import onnxquant
names = [m.name for m in pkgutil.walk_packages(onnxquant.__path__, "onnxquant.")]
for name in names:
    importlib.import_module(name)
print(len(names), "pycuda" in sys.modules and sys.modules["pycuda"] is not None)
"""


def test_every_module_imports_without_pycuda():
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL_WITHOUT_PYCUDA], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    count, loaded = result.stdout.split()
    assert int(count) >= 20 and loaded == "False"

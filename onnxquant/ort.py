"""The installed ONNX Runtime, whichever distribution provides it.

`onnxruntime`, `onnxruntime-gpu`, `onnxruntime-openvino`, `onnxruntime-directml`, ... all install the same
`onnxruntime/` package folder, so onnxquant imports that folder and never asks which distribution wrote it.
Two of them installed together overwrite each other's files, and uninstalling one then leaves a folder
without `__init__.py` (Python imports it as an empty namespace package) or without its compiled core: every
command would die in a long traceback. `ort` imports ONNX Runtime on first use instead, and a missing or
broken installation becomes one `UnavailableError` line naming the folder and how to repair it, while
commands that never run a model (`table`, `--help`) keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from functools import lru_cache
from types import ModuleType

from onnxquant.errors import UnavailableError, first_line

log = logging.getLogger(__name__)

PACKAGE = "onnxruntime"
REPAIR = "pip install --force-reinstall onnxruntime (or onnxruntime-gpu, onnxruntime-openvino, ...)"


def distributions() -> list[str]:
    """Installed distributions that claim the `onnxruntime/` folder, as 'name version' (slow: only for errors
    and warnings)."""
    names = importlib.metadata.packages_distributions().get(PACKAGE, [])
    out = []
    for name in sorted(set(names)):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def _installed_note() -> str:
    found = distributions()
    return f"installed: {', '.join(found)}" if found else "no ONNX Runtime distribution is installed"


@lru_cache(maxsize=1)
def load() -> ModuleType:
    """Import ONNX Runtime once; raise `UnavailableError` (one line) when it is missing or broken."""
    try:
        module = importlib.import_module(PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name != PACKAGE:
            raise _broken(f"import fails ({first_line(exc)})") from exc
        raise UnavailableError(
            f"{PACKAGE}: no ONNX Runtime is installed; install one: pip install onnxruntime "
            "(CPU; or onnxruntime-gpu for CUDA)"
        ) from exc
    except Exception as exc:  # a missing shared library, a half-removed compiled core, a version clash
        raise _broken(f"import fails ({type(exc).__name__}: {first_line(exc)})") from exc
    if getattr(module, "__file__", None) is None:
        folders = ", ".join(getattr(module, "__path__", []))
        raise _broken(f"the folder {folders} has no __init__.py (half removed by an uninstall)")
    if not hasattr(module, "InferenceSession"):
        raise _broken(f"{module.__file__} defines no InferenceSession")
    _warn_if_overwritten(module)
    return module


def _broken(what: str) -> UnavailableError:
    return UnavailableError(
        f"{PACKAGE}: the installed ONNX Runtime is broken: {what}; {_installed_note()}; repair: {REPAIR}"
    )


def _warn_if_overwritten(module: ModuleType) -> None:
    """onnxruntime-gpu installed, but the folder holds a build without CUDA: another distribution (usually
    onnxruntime, pulled in as a dependency) overwrote its files. Everything still runs, on the CPU."""
    if "CUDAExecutionProvider" in module.get_available_providers():
        return
    try:
        gpu = importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return
    log.warning(
        "%s: onnxruntime-gpu %s is installed but %s holds a build without CUDA (%s); to use the GPU: "
        "pip install --force-reinstall --no-deps onnxruntime-gpu",
        PACKAGE,
        gpu,
        module.__file__,
        _installed_note(),
    )


class _Lazy:
    """Stands in for the `onnxruntime` module: the first attribute read imports it through `load()`."""

    def __getattr__(self, name: str):
        return getattr(load(), name)


ort = _Lazy()

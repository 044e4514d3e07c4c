"""Errors, split by whose fault they are.

`OnnxQuantError` and its subclasses are bad input the user can fix: the CLI prints one line and exits with
code 2 (1 for `CheckFailed`). `InternalError` is a bug of ours (a broken invariant): it is not a user error,
the CLI shows the traceback and exits with code 70 (EX_SOFTWARE).
"""

from __future__ import annotations


class OnnxQuantError(Exception):
    """Bad input of any kind: the message names the file/tensor/key, what was wrong and what is accepted."""

    exit_code = 2


class BadModelError(OnnxQuantError):
    """The model file cannot be loaded or handled."""


class BadRulesError(OnnxQuantError):
    """The rule file has an unknown key, a wrong type or an impossible value."""


class BadDataError(OnnxQuantError):
    """Calibration or evaluation data does not match the model or is not usable."""


class BadPathError(OnnxQuantError):
    """An input or output path cannot be used (missing directory, not writable, equal to an input)."""


class BadOptionError(OnnxQuantError):
    """An option's value is unknown (a backend, a requantization mode, a bit-allocation mode, ...)."""


class UnavailableError(OnnxQuantError):
    """What the user asked for needs something this machine lacks (PyCUDA, a GPU, a CUDA compiler)."""


class CheckFailed(OnnxQuantError):
    """A check the user asked for failed (validate, report thresholds): exit code 1."""

    exit_code = 1


class InternalError(Exception):
    """A broken invariant inside onnxquant: a bug to report, never the user's input."""

    exit_code = 70


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of `exc`'s message (its type name when the message is empty)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__

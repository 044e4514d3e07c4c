"""Errors the user can fix. The CLI prints each as one line and exits with code 2."""
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


class CheckFailed(OnnxQuantError):
    """A check the user asked for failed (validate, report thresholds): exit code 1."""

    exit_code = 1

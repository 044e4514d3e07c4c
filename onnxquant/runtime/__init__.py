"""Integer execution of QDQ models: `lower` a model to a `Plan`, run it with a backend (`BACKENDS`: numpy, or
cuda through PyCUDA, imported only when that backend is created) in a requantization mode (`REQUANT_MODES`),
and `validate` it against ONNX Runtime."""

from __future__ import annotations

from onnxquant.runtime.backends import BACKENDS, get_backend
from onnxquant.runtime.lower import lower
from onnxquant.runtime.plan import Plan
from onnxquant.runtime.requant import REQUANT_MODES
from onnxquant.runtime.validate import Comparison, ValidationResult, validate

__all__ = [
    "BACKENDS",
    "REQUANT_MODES",
    "Comparison",
    "Plan",
    "ValidationResult",
    "get_backend",
    "lower",
    "validate",
]

"""Integer execution of QDQ models: `lower` a model to a `Plan`, run it with a backend (numpy, or cuda through
PyCUDA, imported only when asked for), and `validate` it against ONNX Runtime."""
from __future__ import annotations

from onnxquant.runtime.lower import lower
from onnxquant.runtime.plan import Plan
from onnxquant.runtime.validate import Comparison, ValidationResult, get_backend, validate

__all__ = ["Comparison", "Plan", "ValidationResult", "get_backend", "lower", "validate"]

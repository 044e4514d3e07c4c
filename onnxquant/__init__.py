"""onnxquant: a graph-rewriting ONNX quantization converter."""

from __future__ import annotations

__version__ = "0.1.0"

"""Rule files: schema, loader and shipped presets (default.yaml, tensorrt.yaml)."""

from __future__ import annotations

from onnxquant.rules.loader import PRESETS, dump_rules, load_rules, parse_rules
from onnxquant.rules.schema import COMPUTE_OPS, Match, NodeRule, Override, QuantSpec, Rules

__all__ = [
    "COMPUTE_OPS",
    "PRESETS",
    "Match",
    "NodeRule",
    "Override",
    "QuantSpec",
    "Rules",
    "dump_rules",
    "load_rules",
    "parse_rules",
]

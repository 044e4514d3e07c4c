"""The rule file, validated into frozen dataclasses.

A rule file decides which rewrite passes run, where Q/DQ goes (`placement`, see passes/plan.py; and
`depthwise_inputs: per_channel`, per-channel scales at depthwise-conv inputs folded into their weights), which
op types are quantized, weight and activation specs, and ordered per-node overrides matched by name glob,
op type or position (`first`/`last` compute layer). Later overrides win; an override that matches no node of
a model is reported by `unmatched_overrides` (the planner warns about it).
"""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from onnxquant.errors import BadOptionError
from onnxquant.quant import MAX_BITS, MIN_BITS

PLACEMENTS = ("ort", "tensorrt")
GRANULARITIES = ("per_channel", "per_tensor")
POSITIONS = ("first", "last")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    method: str = "minmax"


@dataclass(frozen=True)
class Match:
    name: str | None = None
    op_type: str | None = None
    position: str | None = None

    def matches(self, node_name: str, op_type: str, positions: frozenset[str]) -> bool:
        return (
            (self.name is None or fnmatch.fnmatchcase(node_name, self.name))
            and (self.op_type is None or self.op_type == op_type)
            and (self.position is None or self.position in positions)
        )

    def describe(self) -> str:
        parts = [
            f"{k} {v!r}"
            for k, v in (("name", self.name), ("op_type", self.op_type), ("position", self.position))
            if v is not None
        ]
        return " and ".join(parts)


@dataclass(frozen=True)
class Override:
    match: Match
    skip: bool | None = None
    weights: dict = field(default_factory=dict)
    activations: dict = field(default_factory=dict)
    origin: str = field(default="", compare=False)  # "<file> override <k>", for messages

    def describe(self, index: int, source: str) -> str:
        """Where the override was written, e.g. "r.yaml override 2 (name 'head*')"."""
        return f"{self.origin or f'{source} override {index + 1}'} ({self.match.describe()})"


@dataclass(frozen=True)
class Rules:
    placement: str = "ort"
    depthwise_inputs: str = "per_tensor"  # per_channel: equalized into the depthwise weights (plan.py)
    passes: tuple[str, ...] = ()
    quantize_ops: tuple[str, ...] = COMPUTE_OPS
    weights: QuantSpec = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    activations: QuantSpec = QuantSpec(bits=8, symmetric=False)
    overrides: tuple[Override, ...] = ()
    source: str = "<defaults>"

    def with_cli(
        self,
        *,
        wbits: int | None = None,
        abits: int | None = None,
        method: str | None = None,
        wmethod: str | None = None,
        passes: tuple[str, ...] | None = None,
    ) -> Rules:
        """CLI flags override the file's global settings; per-node overrides still apply on top.

        Widths outside MIN_BITS..MAX_BITS are refused here, so no caller can build a model at a width the
        quantizer cannot store."""
        for flag, value in (("wbits", wbits), ("abits", abits)):
            _check_bits(flag, value)
        weights, acts = self.weights, self.activations
        if wbits is not None:
            weights = replace(weights, bits=int(wbits))
        if wmethod is not None:
            weights = replace(weights, method=wmethod)
        if abits is not None:
            acts = replace(acts, bits=int(abits))
        if method is not None:
            acts = replace(acts, method=method)
        return replace(
            self, weights=weights, activations=acts, passes=self.passes if passes is None else passes
        )

    def for_node(self, node_name: str, op_type: str, positions: frozenset[str]) -> NodeRule:
        """The effective decision for one node, with the rule that made it."""
        quantize = op_type in self.quantize_ops
        reason = "" if quantize else f"op type {op_type} not in quantize_ops"
        weights, acts = self.weights, self.activations
        for i, ov in enumerate(self.overrides):
            if not ov.match.matches(node_name, op_type, positions):
                continue
            where = ov.describe(i, self.source)
            if ov.skip is not None:
                quantize = not ov.skip
                reason = f"skipped by {where}" if ov.skip else ""
            weights = replace(weights, **ov.weights)
            acts = replace(acts, **ov.activations)
        return NodeRule(quantize=quantize, reason=reason, weights=weights, activations=acts)

    def unmatched_overrides(self, nodes: Iterable[tuple[str, str, frozenset[str]]]) -> list[str]:
        """The overrides that match none of `nodes` (name, op type, positions), described for a warning."""
        nodes = list(nodes)
        return [
            ov.describe(i, self.source)
            for i, ov in enumerate(self.overrides)
            if not any(ov.match.matches(*node) for node in nodes)
        ]


def _check_bits(flag: str, value: object) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not MIN_BITS <= value <= MAX_BITS
    ):
        raise BadOptionError(f"{flag}={value!r}; accepted: an integer {MIN_BITS}..{MAX_BITS}")


@dataclass(frozen=True)
class NodeRule:
    quantize: bool
    reason: str
    weights: QuantSpec
    activations: QuantSpec

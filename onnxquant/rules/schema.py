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

from onnxquant.errors import BadOptionError, BadRulesError
from onnxquant.quant import MAX_BITS, MIN_BITS

PLACEMENTS = ("ort", "tensorrt", "weights")  # weights: weight-only, activations stay float
GRANULARITIES = ("per_channel", "per_tensor")
POSITIONS = ("first", "last")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ROUNDINGS = ("nearest", "gptq")  # weights: round to nearest, or GPTQ's error compensation (calib/gptq.py)
WEIGHT_GRANULARITIES = (*GRANULARITIES, "per_block")  # per_block: `block_size` weights along the input axis
FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")  # integer codes, or FP8 minifloats (E4M3FN, E5M2) with one scale
SCALES = ("float", "pow2")  # free scales, or powers of two (a requantization is a shift)
LEVELS = ("uniform", "apot", "kmeans")  # weights: uniform grid, additive powers of two, or a k-means codebook
EQUALIZE_LAYERS = "equalize_layers"  # the cross-layer equalization pass (passes/equalize_layers.py)
BIAS_CORRECTIONS = ("mean", "full", "empirical")  # weight_table.py (ACIQ eq. 12-13), calib/output_bias.py


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    method: str = "minmax"
    rounding: str = "nearest"
    block_size: int = 32  # weights at granularity per_block
    format: str = "int"
    scale: str = "float"
    levels: str = "uniform"
    clusters: int | None = None  # levels kmeans: codebook size (None: 2^bits)


def spec_conflict(spec: QuantSpec) -> str | None:
    """Why the fields of `spec` cannot go together, or None."""
    if spec.format != "int" and spec.bits != 8:
        return f"format {spec.format} stores 8 bits, not {spec.bits}; accepted: bits 8 with an FP8 format"
    if spec.format != "int" and spec.granularity == "per_block":
        return f"format {spec.format} with granularity per_block; accepted: FP8 per tensor or per channel"
    if spec.levels != "uniform" and (spec.format != "int" or spec.granularity == "per_block"):
        return (
            f"levels {spec.levels} with format {spec.format}, granularity {spec.granularity}; accepted: int"
        )
    if spec.rounding == "gptq" and (spec.format, spec.levels) != ("int", "uniform"):
        return f"rounding gptq on {spec.format} {spec.levels} levels; accepted: gptq on uniform int levels"
    if spec.rounding == "gptq" and spec.granularity == "per_block":
        return "rounding gptq with granularity per_block; accepted: gptq per channel or per tensor"
    return None


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
    quantize_outputs: tuple[str, ...] = ()  # placement ort: outputs with Q/DQ even where read in float
    weights: QuantSpec = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    activations: QuantSpec = QuantSpec(bits=8, symmetric=False)
    overrides: tuple[Override, ...] = ()
    smooth_quant: float | None = None  # SmoothQuant's migration strength α (calib/smooth.py); None: off
    bias_correction: str | None = None  # one of BIAS_CORRECTIONS; None: off
    source: str = "<defaults>"

    def with_cli(
        self,
        *,
        wbits: int | None = None,
        abits: int | None = None,
        method: str | None = None,
        wmethod: str | None = None,
        passes: tuple[str, ...] | None = None,
        rounding: str | None = None,
        smooth_quant: float | None = None,
        bias_correction: str | None = None,
        equalize_layers: bool = False,
        weight_format: str | None = None,
        activation_format: str | None = None,
        block_size: int | None = None,
        pow2_scales: bool = False,
        levels: str | None = None,
        clusters: int | None = None,
        weight_only: bool = False,
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
        if rounding is not None:
            weights = replace(weights, rounding=_choice("rounding", rounding, ROUNDINGS))
        if smooth_quant is not None and not (
            isinstance(smooth_quant, numbers.Real) and 0 <= smooth_quant <= 1
        ):
            raise BadOptionError(
                f"smooth_quant={smooth_quant!r}; accepted: a number 0..1 (SmoothQuant's alpha)"
            )
        if bias_correction is not None:
            _choice("bias_correction", bias_correction, BIAS_CORRECTIONS)
        weights = replace(weights, **_format_fields(weight_format, levels=levels, clusters=clusters))
        acts = replace(acts, **_format_fields(activation_format))
        if block_size is not None:
            weights = replace(weights, granularity="per_block", block_size=int(block_size))
        if pow2_scales:
            weights, acts = replace(weights, scale="pow2"), replace(acts, scale="pow2")
        if abits is not None:
            acts = replace(acts, bits=int(abits))
        if method is not None:
            acts = replace(acts, method=method)
        for what, spec in (("weights", weights), ("activations", acts)):
            problem = spec_conflict(spec)
            if problem:
                raise BadOptionError(f"{what}: {problem}")
        return replace(
            self,
            placement="weights" if weight_only else self.placement,
            weights=weights,
            activations=acts,
            passes=_with_pass(self.passes if passes is None else passes, EQUALIZE_LAYERS, equalize_layers),
            smooth_quant=self.smooth_quant if smooth_quant is None else float(smooth_quant),
            bias_correction=bias_correction or self.bias_correction,
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
            for what, spec in (("weights", weights), ("activations", acts)):
                problem = spec_conflict(spec)
                if problem:
                    raise BadRulesError(f"{where}, node {node_name}: {what}: {problem}")
        return NodeRule(quantize=quantize, reason=reason, weights=weights, activations=acts)

    def unmatched_overrides(self, nodes: Iterable[tuple[str, str, frozenset[str]]]) -> list[str]:
        """The overrides that match none of `nodes` (name, op type, positions), described for a warning."""
        nodes = list(nodes)
        return [
            ov.describe(i, self.source)
            for i, ov in enumerate(self.overrides)
            if not any(ov.match.matches(*node) for node in nodes)
        ]


def _format_fields(fmt: str | None, levels: str | None = None, clusters: int | None = None) -> dict:
    fields = {}
    if fmt is not None:
        fields["format"] = _choice("format", fmt, FORMATS)
    if levels is not None:
        fields["levels"] = _choice("levels", levels, LEVELS)
    if clusters is not None:
        fields["clusters"] = int(clusters)
    return fields


def _with_pass(passes: tuple[str, ...], name: str, wanted: bool) -> tuple[str, ...]:
    return (*passes, name) if wanted and name not in passes else passes


def _choice(flag: str, value: object, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise BadOptionError(f"{flag}={value!r}; accepted: {', '.join(accepted)}")
    return value


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

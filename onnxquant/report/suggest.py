"""Rule-file overrides that keep the most sensitive layers at a higher width (`--suggest-rules`).

Layers are taken in the report's ranking (isolated sensitivity). To choose k for a target output SQNR the
output noise is predicted: noise of separately quantized layers adds approximately, and one more bit divides
quantization noise power by 4. With N the measured accumulated output MSE and n_i the output MSE with only
layer i quantized at b_i bits (its narrowest input: W4A8 is 4), keeping the set S at h bits predicts

    N_S = N · (Σ_{i∉S} n_i + Σ_{i∈S} n_i · 4^−(h − b_i)) / Σ_i n_i,   SQNR_S = SQNR − 10·log10(N_S / N)

and k is the smallest number of top-ranked layers whose prediction meets the target on every output. The
override for a layer matches its node by name (glob characters escaped); a layer that the rules do not
quantize (e.g. a Flatten after a quantized tensor) targets the producers of its quantized inputs instead,
whose rules set those widths (a tensor requested at several widths gets the widest). The suggested rules are
the rules the model was converted with, the overrides appended (later overrides win).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from onnxquant.errors import BadRulesError
from onnxquant.quant import MAX_BITS, MIN_BITS
from onnxquant.rules import Match, Override, Rules, dump_rules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuggestOptions:
    """What to suggest: keep `k` layers (or the fewest meeting `target_sqnr` dB) at `high_bits`, as overrides
    of `rules`, the rules the model was converted with."""

    rules: Rules
    k: int | None = None
    target_sqnr: float | None = None
    high_bits: int = 8

    def __post_init__(self) -> None:
        hb = self.high_bits
        if isinstance(hb, bool) or not isinstance(hb, int) or not MIN_BITS <= hb <= MAX_BITS:
            raise BadRulesError(
                f"suggest rules: high bits {hb!r}; accepted: an integer {MIN_BITS}..{MAX_BITS}"
            )
        k = self.k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise BadRulesError(f"suggest rules: k={k!r}; accepted: an integer >= 0")
        if k is None and self.target_sqnr is None:
            raise BadRulesError("suggest rules: give the number of layers k or a target output SQNR")


@dataclass(frozen=True)
class Suggestion:
    """Which layers to keep at `high_bits`, and what that is predicted (and, once measured, found) to give."""

    k: int
    layers: tuple[str, ...]
    nodes: tuple[str, ...]
    high_bits: int
    target_sqnr: float | None
    before: dict[str, float]
    predicted: dict[str, float] | None
    met: bool | None
    rules: Rules  # the base rules with the overrides appended
    comment: str  # why: the chosen layers and the prediction, as rule-file comment lines
    curve: tuple[dict[str, float], ...] = ()  # predicted SQNR per output for k = 0..n
    measured: dict[str, float] | None = (
        None  # output SQNR after converting with `rules` (`Report.with_measured`)
    )

    @property
    def gain_db(self) -> dict[str, float] | None:
        """Measured SQNR improvement per output, once `measured` is set."""
        if self.measured is None:
            return None
        return {o: self.measured[o] - self.before[o] for o in self.before if o in self.measured}

    def rules_text(self) -> str:
        """The rule file to write: the comment, then `rules` as YAML."""
        return self.comment + dump_rules(self.rules)

    def to_json(self) -> dict:
        def clean(d):
            return None if d is None else {k: (v if math.isfinite(v) else None) for k, v in d.items()}

        return {
            "k": self.k,
            "layers": list(self.layers),
            "nodes": list(self.nodes),
            "high_bits": self.high_bits,
            "target_sqnr_db": self.target_sqnr,
            "before_sqnr_db": clean(self.before),
            "predicted_sqnr_db": clean(self.predicted),
            "target_met": self.met,
            "measured_sqnr_db": clean(self.measured),
            "gain_db": clean(self.gain_db),
            "curve": [clean(c) for c in self.curve],
            "rules": self.rules_text(),
        }


def candidates(report, high_bits: int) -> list:
    """The layers keeping at `high_bits` could improve, most sensitive first."""
    return [la for la in report.worst() if la.narrowest_bits < high_bits]


def predict_output_sqnr(report, k: int, high_bits: int = 8) -> dict[str, float] | None:
    """Predicted SQNR per output with the k most sensitive layers kept at `high_bits` (see the module)."""
    if report.ranked_by != "sensitivity":
        return None
    cands = candidates(report, high_bits)
    chosen = {la.name for la in cands[:k]}
    measured = [la for la in report.layers if la.sensitivity]
    out = {}
    for o in report.outputs:
        total = sum(la.sensitivity[o.name].mse for la in measured if o.name in la.sensitivity)
        if total <= 0 or not math.isfinite(o.sqnr_db):
            out[o.name] = o.sqnr_db
            continue
        kept = 0.0
        for la in measured:
            n = la.sensitivity[o.name].mse if o.name in la.sensitivity else 0.0
            kept += n * (4.0 ** -(high_bits - la.narrowest_bits) if la.name in chosen else 1.0)
        ratio = kept / total
        out[o.name] = math.inf if ratio <= 0 else o.sqnr_db - 10.0 * math.log10(ratio)
    return out


def plan_suggestion(report, options: SuggestOptions) -> Suggestion:
    """Choose the layers (k given, or the fewest meeting the target SQNR) and derive the suggested rules."""
    high_bits, target_sqnr, k = options.high_bits, options.target_sqnr, options.k
    cands = candidates(report, high_bits)
    before = report.output_sqnr()
    curve = []
    if report.ranked_by == "sensitivity":
        curve = [predict_output_sqnr(report, i, high_bits) for i in range(len(cands) + 1)]
    met = None
    if k is None:
        if not curve:
            raise BadRulesError(
                "suggest rules: a target SQNR needs isolated sensitivity (sensitivity samples "
                "> 0); accepted: a target with sensitivity, or k"
            )
        k = next((i for i, c in enumerate(curve) if all(v >= target_sqnr for v in c.values())), None)
        met = k is not None
        if k is None:
            k = len(cands)
            log.warning(
                "no number of layers at %d bits is predicted to reach %.1f dB: suggesting all %d",
                high_bits,
                target_sqnr,
                k,
            )
    k = min(k, len(cands))
    chosen = cands[:k]
    nodes = tuple(dict.fromkeys(n for la in chosen for n in _targets(la, options.rules)))
    predicted = curve[k] if curve else None
    if met is None and target_sqnr is not None and predicted is not None:
        met = all(v >= target_sqnr for v in predicted.values())
    overrides = tuple(
        Override(
            match=Match(name=glob_escape(n)), weights={"bits": high_bits}, activations={"bits": high_bits}
        )
        for n in nodes
    )
    rules = replace(options.rules, overrides=options.rules.overrides + overrides, source="suggested rules")
    return Suggestion(
        k=k,
        layers=tuple(la.name for la in chosen),
        nodes=nodes,
        high_bits=high_bits,
        target_sqnr=target_sqnr,
        before=before,
        predicted=predicted,
        met=met,
        rules=rules,
        comment=_comment(chosen, high_bits, predicted, before),
        curve=tuple(curve),
    )


def _targets(layer, rules: Rules) -> tuple[str, ...]:
    """Override targets of a layer: itself when the rules quantize its op (its input requests set the
    widths), else the producers of its quantized inputs."""
    if rules.for_node(layer.name, layer.op_type, frozenset()).quantize or len(layer.owners) == 1:
        return layer.owners[:1]
    return layer.owners[1:]


def glob_escape(name: str) -> str:
    """A glob matching exactly `name` (rules match node names with fnmatch)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _comment(chosen, high_bits: int, predicted, before) -> str:
    lines = [
        f"# onnxquant --suggest-rules: keep the {len(chosen)} most sensitive layer(s) at {high_bits} bits"
    ]
    for la in chosen:
        lines.append(
            f"#   {la.name} ({la.op_type}): output SQNR with only it quantized {_fmt(la.sensitivity_db)} dB"
        )
    for o, v in (predicted or {}).items():
        lines.append(f"# predicted output SQNR of {o}: {_fmt(before[o])} -> {_fmt(v)} dB")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    return "inf" if math.isinf(v) else f"{v:.2f}"

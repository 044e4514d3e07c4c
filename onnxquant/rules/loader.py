"""Load a YAML rule file (or a shipped preset by name) into `Rules`, naming the file and key of any error.

The names a rule file may use for passes and calibration methods are given by the caller (the pass and method
registries live in `onnxquant.passes` and `onnxquant.calib`, which depend on rules, not the other way round).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from onnxquant.errors import BadRulesError
from onnxquant.quant import MAX_BITS, MIN_BITS
from onnxquant.rules.schema import (
    GRANULARITIES,
    PLACEMENTS,
    POSITIONS,
    Match,
    Override,
    QuantSpec,
    Rules,
)

PRESETS = ("default", "tensorrt")
TOP_KEYS = ("placement", "depthwise_inputs", "passes", "quantize_ops", "weights", "activations", "overrides")
SPEC_KEYS = ("bits", "symmetric", "granularity", "method")
OVERRIDE_KEYS = ("match", "skip", "weights", "activations")
MATCH_KEYS = ("name", "op_type", "position")


@dataclass(frozen=True)
class _Names:
    """The names a rule file may use, in the order error messages list them."""

    passes: tuple[str, ...]
    methods: tuple[str, ...]
    weight_methods: tuple[str, ...]


def load_rules(
    source: str | os.PathLike | None = None,
    *,
    pass_names: Collection[str],
    method_names: Collection[str],
    weight_method_names: Collection[str],
) -> Rules:
    """Rules from a preset name (`default`, `tensorrt`), a YAML file path, or the default preset.

    `pass_names`, `method_names`, `weight_method_names`: the accepted values of `passes`,
    `activations.method` and `weights.method` (see `parse_rules`).
    """
    source = "default" if source is None else source
    if str(source) in PRESETS:
        text = importlib.resources.files("onnxquant.rules").joinpath(f"presets/{source}.yaml").read_text()
        where = f"preset {source}"
    else:
        path = Path(source)
        if not path.is_file():
            raise BadRulesError(
                f"{path}: rule file not found; accepted: a YAML file or a preset ({', '.join(PRESETS)})"
            )
        text, where = path.read_text(encoding="utf-8", errors="replace"), str(path)
    return parse_rules(
        text, where, pass_names=pass_names, method_names=method_names, weight_method_names=weight_method_names
    )


def dump_rules(rules: Rules) -> str:
    """YAML text that `parse_rules` reads back into the same `Rules` (used to extend effective rules)."""

    def spec(q) -> dict:
        return {"bits": q.bits, "symmetric": q.symmetric, "granularity": q.granularity, "method": q.method}

    def override(ov) -> dict:
        entry = {"match": {k: v for k, v in vars(ov.match).items() if v is not None}}
        if ov.skip is not None:
            entry["skip"] = ov.skip
        entry.update({k: dict(v) for k, v in (("weights", ov.weights), ("activations", ov.activations)) if v})
        return entry

    acts = spec(rules.activations)
    del acts["granularity"]
    doc = {
        "placement": rules.placement,
        "depthwise_inputs": rules.depthwise_inputs,
        "passes": list(rules.passes),
        "quantize_ops": list(rules.quantize_ops),
        "weights": spec(rules.weights),
        "activations": acts,
        "overrides": [override(ov) for ov in rules.overrides],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def parse_rules(
    text: str,
    where: str,
    *,
    pass_names: Collection[str],
    method_names: Collection[str],
    weight_method_names: Collection[str],
) -> Rules:
    """Validate rule-file YAML `text` (errors name `where` and the key) into `Rules`.

    `pass_names`: accepted entries of `passes`; `method_names`, `weight_method_names`: accepted activation and
    weight calibration methods.
    """
    names = _Names(tuple(pass_names), tuple(method_names), tuple(weight_method_names))
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise BadRulesError(f"{where}: not valid YAML{at}") from exc
    doc = {} if doc is None else doc
    _check_keys(doc, TOP_KEYS, where, "")
    defaults = Rules()
    weights = _spec(doc.get("weights", {}), where, "weights", defaults.weights, names.weight_methods)
    acts = _spec(doc.get("activations", {}), where, "activations", defaults.activations, names.methods)
    if acts.granularity != "per_tensor":
        raise BadRulesError(
            f"{where}: key 'activations.granularity' is {acts.granularity!r}; accepted: per_tensor"
        )
    passes = tuple(_str_list(doc.get("passes", []), where, "passes", names.passes))
    ops = tuple(_str_list(doc.get("quantize_ops", list(defaults.quantize_ops)), where, "quantize_ops", None))
    placement = _choice(doc.get("placement", "ort"), where, "placement", PLACEMENTS)
    depthwise = _choice(
        doc.get("depthwise_inputs", defaults.depthwise_inputs), where, "depthwise_inputs", GRANULARITIES
    )
    raw_overrides = doc.get("overrides") or []
    if not isinstance(raw_overrides, list):
        raise BadRulesError(
            f"{where}: key 'overrides' must be a list of {{match, skip, weights, activations}}"
        )
    overrides = tuple(_override(ov, where, f"overrides[{i}]", names) for i, ov in enumerate(raw_overrides))
    return Rules(
        placement=placement,
        depthwise_inputs=depthwise,
        passes=passes,
        quantize_ops=ops,
        weights=weights,
        activations=acts,
        overrides=overrides,
        source=where,
    )


def _check_keys(doc: Any, allowed: tuple[str, ...], where: str, prefix: str) -> None:
    if not isinstance(doc, dict):
        raise BadRulesError(
            f"{where}: key '{prefix.rstrip('.') or '<top level>'}' must be a mapping "
            f"with keys {', '.join(allowed)}"
        )
    for key in doc:
        if key not in allowed:
            raise BadRulesError(f"{where}: unknown key '{prefix}{key}'; accepted: {', '.join(allowed)}")


def _choice(value: Any, where: str, key: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BadRulesError(f"{where}: key '{key}' is {value!r}; accepted: {', '.join(choices)}")
    return value


def _str_list(value: Any, where: str, key: str, choices: tuple[str, ...] | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRulesError(f"{where}: key '{key}' must be a list of strings, got {value!r}")
    if choices is not None:
        for v in value:
            _choice(v, where, key, choices)
    return value


def _spec_fields(doc: Any, where: str, key: str, methods: tuple[str, ...]) -> dict:
    """Validated fields of a (possibly partial) weights/activations mapping."""
    _check_keys(doc, SPEC_KEYS, where, key + ".")
    fields = {}
    if "bits" in doc:
        bits = doc["bits"]
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise BadRulesError(
                f"{where}: key '{key}.bits' is {bits!r}; accepted: an integer {MIN_BITS}..{MAX_BITS}"
            )
        fields["bits"] = bits
    if "symmetric" in doc:
        if not isinstance(doc["symmetric"], bool):
            raise BadRulesError(
                f"{where}: key '{key}.symmetric' is {doc['symmetric']!r}; accepted: true, false"
            )
        fields["symmetric"] = doc["symmetric"]
    if "granularity" in doc:
        fields["granularity"] = _choice(doc["granularity"], where, f"{key}.granularity", GRANULARITIES)
    if "method" in doc:
        fields["method"] = _choice(doc["method"], where, f"{key}.method", methods)
    return fields


def _spec(doc: Any, where: str, key: str, base: QuantSpec, methods: tuple[str, ...]) -> QuantSpec:
    return QuantSpec(**{**base.__dict__, **_spec_fields(doc, where, key, methods)})


def _override(doc: Any, where: str, key: str, names: _Names) -> Override:
    _check_keys(doc, OVERRIDE_KEYS, where, key + ".")
    if "match" not in doc:
        raise BadRulesError(
            f"{where}: key '{key}.match' is missing; accepted: a mapping of {', '.join(MATCH_KEYS)}"
        )
    match_doc = doc["match"]
    _check_keys(match_doc, MATCH_KEYS, where, key + ".match.")
    if not match_doc:
        raise BadRulesError(
            f"{where}: key '{key}.match' is empty; accepted: one or more of {', '.join(MATCH_KEYS)}"
        )
    for k in ("name", "op_type"):
        if k in match_doc and not isinstance(match_doc[k], str):
            raise BadRulesError(f"{where}: key '{key}.match.{k}' must be a string, got {match_doc[k]!r}")
    if "position" in match_doc:
        _choice(match_doc["position"], where, f"{key}.match.position", POSITIONS)
    skip = doc.get("skip")
    if skip is not None and not isinstance(skip, bool):
        raise BadRulesError(f"{where}: key '{key}.skip' is {skip!r}; accepted: true, false")
    weights = _spec_fields(doc.get("weights", {}), where, f"{key}.weights", names.weight_methods)
    acts = _spec_fields(doc.get("activations", {}), where, f"{key}.activations", names.methods)
    return Override(match=Match(**match_doc), skip=skip, weights=weights, activations=acts)

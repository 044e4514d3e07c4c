"""Load a YAML rule file (or a shipped preset by name) into `Rules`, naming the file and key of any error.

A rule file extends a preset, so a partial file changes only what it says. `extends: default` is implied;
`extends: tensorrt` or `extends: other.yaml` (relative to the file) pick another base, and `extends: none`
starts from the schema's bare defaults (no passes, compute ops only: what `dump_rules` writes, every key
given). Keys given in the file replace the base's; `weights` and `activations` replace field by field, so
`activations: {bits: 4}` keeps the base's method; `overrides` are appended to the base's (later ones win).
A chain that comes back to a file it passed through is an error naming the chain.

The YAML is read by a safe loader with budgets: nesting deeper than `MAX_DEPTH` or a document that expands
(through anchors and aliases) to more than `MAX_NODES` nodes is refused in one line, so a "billion laughs"
file cannot hang the loader or fill memory; values echoed in messages are cut to about 80 characters.

The names a rule file may use for passes and calibration methods are given by the caller (the pass and method
registries live in `onnxquant.passes` and `onnxquant.calib`, which depend on rules, not the other way round).
"""

from __future__ import annotations

import importlib.resources
import os
import reprlib
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from onnxquant.errors import BadRulesError
from onnxquant.quant import MAX_BITS, MIN_BITS
from onnxquant.rules.schema import (
    BIAS_CORRECTIONS,
    COMPUTE_OPS,
    FORMATS,
    GRANULARITIES,
    LEVELS,
    PLACEMENTS,
    POSITIONS,
    ROUNDINGS,
    SCALES,
    WEIGHT_GRANULARITIES,
    Match,
    Override,
    QuantSpec,
    Rules,
    spec_conflict,
)

PRESETS = ("default", "tensorrt", "integer")
NO_BASE = "none"  # `extends: none`: the schema's bare defaults
TOP_KEYS = (
    "extends",
    "placement",
    "depthwise_inputs",
    "passes",
    "quantize_ops",
    "quantize_outputs",
    "weights",
    "activations",
    "overrides",
    "smooth_quant",
    "bias_correction",
)
SPEC_KEYS = (
    "bits",
    "symmetric",
    "granularity",
    "method",
    "rounding",
    "block_size",
    "format",
    "scale",
    "levels",
    "clusters",
)
WEIGHT_ONLY = {"granularity": "per_tensor", "rounding": "nearest", "levels": "uniform"}  # activations' values
MAX_BLOCK = 1 << 16
MAX_CLUSTERS = 256
OVERRIDE_KEYS = ("match", "skip", "weights", "activations")
MATCH_KEYS = ("name", "op_type", "position")
MAX_DEPTH = 32  # nesting levels of a YAML document; a rule file needs 5
MAX_NODES = 100_000  # YAML nodes after alias expansion; a rule file with 1000 overrides has ~15000
MAX_SHOWN = 80  # characters of a value echoed in an error message

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, MAX_SHOWN, 40


def shown(value: Any) -> str:
    """`repr(value)` cut to about MAX_SHOWN characters, in bounded time whatever the value's size."""
    text = _SHORT.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


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
    names = _Names(tuple(pass_names), tuple(method_names), tuple(weight_method_names))
    return _load(source, names, chain=())


def _load(source: str | os.PathLike | None, names: _Names, chain: tuple[str, ...]) -> Rules:
    source = "default" if source is None else source
    if str(source) in PRESETS:
        text = importlib.resources.files("onnxquant.rules").joinpath(f"presets/{source}.yaml").read_text()
        return _parse(text, f"preset {source}", names, base_dir=None, chain=chain)
    path = Path(source)
    if not path.is_file():
        raise BadRulesError(
            f"{path}: rule file not found; accepted: a YAML file or a preset ({', '.join(PRESETS)})"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    return _parse(text, str(path), names, base_dir=path.parent, chain=chain)


def dump_rules(rules: Rules) -> str:
    """YAML text that `parse_rules` reads back into the same `Rules` (used to extend effective rules).

    It says `extends: none` and gives every key, so it does not depend on what the presets hold."""

    def spec(q) -> dict:
        return {key: getattr(q, key) for key in SPEC_KEYS}

    def override(ov) -> dict:
        entry = {"match": {k: v for k, v in vars(ov.match).items() if v is not None}}
        if ov.skip is not None:
            entry["skip"] = ov.skip
        entry.update({k: dict(v) for k, v in (("weights", ov.weights), ("activations", ov.activations)) if v})
        return entry

    acts = spec(rules.activations)
    for key in (*WEIGHT_ONLY, "block_size", "clusters"):
        del acts[key]
    doc = {
        "extends": NO_BASE,
        "placement": rules.placement,
        "depthwise_inputs": rules.depthwise_inputs,
        "passes": list(rules.passes),
        "quantize_ops": list(rules.quantize_ops),
        "quantize_outputs": list(rules.quantize_outputs),
        "weights": spec(rules.weights),
        "activations": acts,
        "overrides": [override(ov) for ov in rules.overrides],
        "smooth_quant": rules.smooth_quant,
        "bias_correction": rules.bias_correction,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def parse_rules(
    text: str,
    where: str,
    *,
    pass_names: Collection[str],
    method_names: Collection[str],
    weight_method_names: Collection[str],
    base_dir: str | os.PathLike | None = None,
) -> Rules:
    """Validate rule-file YAML `text` (errors name `where` and the key) into `Rules`.

    `pass_names`: accepted entries of `passes`; `method_names`, `weight_method_names`: accepted activation and
    weight calibration methods. An `extends: FILE` is resolved against `base_dir` (default: the current
    directory).
    """
    names = _Names(tuple(pass_names), tuple(method_names), tuple(weight_method_names))
    return _parse(text, where, names, base_dir=Path(base_dir) if base_dir is not None else None, chain=())


def _parse(text: str, where: str, names: _Names, base_dir: Path | None, chain: tuple[str, ...]) -> Rules:
    """Rules of one file: its base (`extends`) with the file's keys applied on top."""
    doc = safe_yaml(text, where)
    doc = {} if doc is None else doc
    _check_keys(doc, TOP_KEYS, where, "")
    identity = where if base_dir is None else str((base_dir / Path(where).name).resolve())
    chain = (*chain, identity)
    base = _base_rules(doc, where, names, base_dir, chain)
    return _apply(doc, base, where, names)


def _base_rules(doc: dict, where: str, names: _Names, base_dir: Path | None, chain: tuple[str, ...]) -> Rules:
    """The rules `doc` extends: a preset, another file (relative to `base_dir`), or none."""
    default = NO_BASE if where == "preset default" else "default"
    extends = doc.get("extends", default)
    if not isinstance(extends, str) or not extends:
        raise BadRulesError(
            f"{where}: key 'extends' is {shown(extends)}; accepted: {', '.join(PRESETS)}, {NO_BASE} "
            "or a rule-file path"
        )
    if extends == NO_BASE:
        return Rules()
    if extends in PRESETS:
        target, identity = extends, f"preset {extends}"
    else:
        target = (base_dir or Path.cwd()) / extends
        identity = str(target.resolve())
        if not target.is_file():
            raise BadRulesError(
                f"{where}: key 'extends' is {shown(extends)}: no such file {target}; accepted: "
                f"{', '.join(PRESETS)}, {NO_BASE} or a rule-file path relative to this file"
            )
    if identity in chain:
        cycle = " -> ".join((*chain[chain.index(identity) :], identity))
        raise BadRulesError(
            f"{where}: key 'extends' makes a cycle: {cycle}; accepted: a chain that ends at a preset or "
            f"{NO_BASE}"
        )
    return _load(target, names, chain)


def _apply(doc: dict, base: Rules, where: str, names: _Names) -> Rules:
    """`base` with the keys `doc` gives: top-level keys replace, spec fields replace, overrides append."""
    weights = _spec(doc.get("weights", {}), where, "weights", base.weights, names.weight_methods)
    acts = _spec(doc.get("activations", {}), where, "activations", base.activations, names.methods)
    _refuse_weight_only(vars(acts), where, "activations")
    for key, spec in (("weights", weights), ("activations", acts)):
        problem = spec_conflict(spec)
        if problem:
            raise BadRulesError(f"{where}: key '{key}': {problem}")
    passes = base.passes
    if "passes" in doc:
        passes = tuple(_str_list(doc["passes"], where, "passes", names.passes))
    ops = base.quantize_ops
    if "quantize_ops" in doc:
        ops = tuple(_str_list(doc["quantize_ops"], where, "quantize_ops", None))
    outputs = base.quantize_outputs
    if "quantize_outputs" in doc:
        outputs = tuple(_str_list(doc["quantize_outputs"], where, "quantize_outputs", COMPUTE_OPS))
    placement = _choice(doc.get("placement", base.placement), where, "placement", PLACEMENTS)
    depthwise = _choice(
        doc.get("depthwise_inputs", base.depthwise_inputs), where, "depthwise_inputs", GRANULARITIES
    )
    raw_overrides = doc.get("overrides") or []
    if not isinstance(raw_overrides, list):
        raise BadRulesError(
            f"{where}: key 'overrides' must be a list of {{match, skip, weights, activations}}"
        )
    overrides = tuple(_override(ov, where, i, names) for i, ov in enumerate(raw_overrides))
    return replace(
        base,
        placement=placement,
        depthwise_inputs=depthwise,
        passes=passes,
        quantize_ops=ops,
        quantize_outputs=outputs,
        weights=weights,
        activations=acts,
        overrides=base.overrides + overrides,
        smooth_quant=_alpha(doc.get("smooth_quant", base.smooth_quant), where),
        bias_correction=_optional_choice(
            doc, "bias_correction", base.bias_correction, where, BIAS_CORRECTIONS
        ),
        source=where,
    )


def _alpha(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise BadRulesError(
            f"{where}: key 'smooth_quant' is {shown(value)}; accepted: a number 0..1 (SmoothQuant's "
            "alpha) or null"
        )
    return float(value)


def _optional_choice(
    doc: dict, key: str, default: str | None, where: str, choices: tuple[str, ...]
) -> str | None:
    value = doc.get(key, default)
    if value is None:
        return None
    if value not in choices:
        raise BadRulesError(f"{where}: key '{key}' is {shown(value)}; accepted: {', '.join(choices)} or null")
    return value


class _Refused(yaml.YAMLError):
    """A YAML document over the loader's depth or expansion budget."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents nested deeper than MAX_DEPTH before the recursive composer
    reaches Python's recursion limit."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes of `node` with every alias expanded (memoized by node identity, so linear in the file)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = size
    return size


def safe_yaml(text: str, where: str) -> Any:
    """The YAML document in `text`, with only plain types and within the depth and alias-expansion budgets;
    any problem is one BadRulesError line naming `where`."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise _Refused(f"expands to more than {MAX_NODES} nodes through anchors and aliases")
        return loader.construct_document(node)
    except _Refused as exc:
        raise BadRulesError(f"{where}: refused: {exc}; accepted: a plain rule file") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        if isinstance(exc, yaml.reader.ReaderError):
            at = f" (character #x{exc.character:04x} at position {exc.position}; only printable text)"
        raise BadRulesError(f"{where}: not valid YAML{at}") from exc
    finally:
        if loader is not None:
            loader.dispose()


def _check_keys(doc: Any, allowed: tuple[str, ...], where: str, prefix: str) -> None:
    if not isinstance(doc, dict):
        raise BadRulesError(
            f"{where}: key '{prefix.rstrip('.') or '<top level>'}' must be a mapping "
            f"with keys {', '.join(allowed)}"
        )
    for key in doc:
        if key not in allowed:
            name = key if isinstance(key, str) and len(key) <= MAX_SHOWN else shown(key)
            raise BadRulesError(f"{where}: unknown key '{prefix}{name}'; accepted: {', '.join(allowed)}")


def _choice(value: Any, where: str, key: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BadRulesError(f"{where}: key '{key}' is {shown(value)}; accepted: {', '.join(choices)}")
    return value


def _str_list(value: Any, where: str, key: str, choices: tuple[str, ...] | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRulesError(f"{where}: key '{key}' must be a list of strings, got {shown(value)}")
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
                f"{where}: key '{key}.bits' is {shown(bits)}; accepted: an integer {MIN_BITS}..{MAX_BITS}"
            )
        fields["bits"] = bits
    if "symmetric" in doc:
        if not isinstance(doc["symmetric"], bool):
            raise BadRulesError(
                f"{where}: key '{key}.symmetric' is {shown(doc['symmetric'])}; accepted: true, false"
            )
        fields["symmetric"] = doc["symmetric"]
    if "granularity" in doc:
        fields["granularity"] = _choice(doc["granularity"], where, f"{key}.granularity", WEIGHT_GRANULARITIES)
    if "method" in doc:
        fields["method"] = _choice(doc["method"], where, f"{key}.method", methods)
    for name, choices in (
        ("rounding", ROUNDINGS),
        ("format", FORMATS),
        ("scale", SCALES),
        ("levels", LEVELS),
    ):
        if name in doc:
            fields[name] = _choice(doc[name], where, f"{key}.{name}", choices)
    if "block_size" in doc:
        fields["block_size"] = _integer(doc["block_size"], where, f"{key}.block_size", 2, MAX_BLOCK)
    if doc.get("clusters") is not None:
        fields["clusters"] = _integer(doc["clusters"], where, f"{key}.clusters", 2, MAX_CLUSTERS)
    return fields


def _integer(value: Any, where: str, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRulesError(f"{where}: key '{key}' is {shown(value)}; accepted: an integer {lo}..{hi}")
    return value


def _spec(doc: Any, where: str, key: str, base: QuantSpec, methods: tuple[str, ...]) -> QuantSpec:
    return QuantSpec(**{**base.__dict__, **_spec_fields(doc, where, key, methods)})


def _override(doc: Any, where: str, index: int, names: _Names) -> Override:
    key = f"overrides[{index}]"
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
            raise BadRulesError(f"{where}: key '{key}.match.{k}' must be a string, got {shown(match_doc[k])}")
    if "position" in match_doc:
        _choice(match_doc["position"], where, f"{key}.match.position", POSITIONS)
    skip = doc.get("skip")
    if skip is not None and not isinstance(skip, bool):
        raise BadRulesError(f"{where}: key '{key}.skip' is {shown(skip)}; accepted: true, false")
    weights = _spec_fields(doc.get("weights", {}), where, f"{key}.weights", names.weight_methods)
    acts = _spec_fields(doc.get("activations", {}), where, f"{key}.activations", names.methods)
    _refuse_weight_only(acts, where, f"{key}.activations")
    return Override(
        match=Match(**match_doc),
        skip=skip,
        weights=weights,
        activations=acts,
        origin=f"{where} override {index + 1}",
    )


def _refuse_weight_only(fields: dict, where: str, key: str) -> None:
    """Activations are per tensor, rounded to nearest, on a uniform grid. Runtimes fuse a node into integer
    work only with per-tensor activation scales, so a per-channel request could not be honoured; per-channel
    activation ranges come from bit allocation or depthwise equalization instead."""
    for name, accepted in WEIGHT_ONLY.items():
        if fields.get(name, accepted) != accepted:
            hint = (
                " (per-channel activation ranges: --bit-alloc activations, or depthwise_inputs: per_channel)"
                if name == "granularity"
                else f" ({fields[name]} is for weights)"
            )
            raise BadRulesError(
                f"{where}: key '{key}.{name}' is {fields[name]!r}; accepted: {accepted}{hint}"
            )

"""What the `onnxquant` commands print and write besides models and tables: the convert summary, the report
files and the suggested rule file."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import click

from onnxquant.cli_options import human_size
from onnxquant.errors import BadOptionError, CheckFailed
from onnxquant.model import atomic_write
from onnxquant.report import render_html, render_text
from onnxquant.report.storage import storage_lines

log = logging.getLogger(__name__)


def rewrite_kind(reason: str) -> str:
    """A canonicalization's kind, from its reason: 'fused Add 'a' (bias) into Conv 'c'' -> 'fused Add'."""
    words = reason.split()
    return " ".join(words[:2]) if words and not words[0].isdigit() else reason


FOLD_LINE_MAX = 100


def folded_line(folded) -> str:
    """`folded N nodes: a into b, ...` when that fits one line, else the count per pass (the nodes are logged
    at -v)."""
    for o in folded:
        log.info("folded %s", f"{o.nodes[0]} into {o.nodes[1]}" if len(o.nodes) > 1 else o.nodes[0])
    listed = ", ".join(f"{o.nodes[0]} into {o.nodes[1]}" if len(o.nodes) > 1 else o.nodes[0] for o in folded)
    line = f"folded {len(folded)} nodes: {listed or 'none'}"
    if len(line) <= FOLD_LINE_MAX:
        return line
    kinds = Counter(o.pass_name for o in folded)
    return (
        f"folded {len(folded)} nodes: "
        + ", ".join(f"{n} by {kind}" for kind, n in sorted(kinds.items()))
        + " (-v lists them)"
    )


def quantized_outputs(model, float_nodes) -> dict[str, str]:
    """Float-listed nodes whose output is quantized for the nodes after it (Flatten → [Clip →] Q → DQ → Gemm):
    node name -> that output. The report lists such a tensor among the quantized ones; the summary says the
    node itself computes in float."""
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    nodes = {n.name: n for n in model.graph.node}
    found = {}
    for name, _, _ in float_nodes:
        node = nodes.get(name)
        if node is None or not node.output:
            continue
        users = readers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Clip" and users[0].output:
            users = readers.get(users[0].output[0], [])
        if users and all(u.op_type == "QuantizeLinear" for u in users):
            found[name] = node.output[0]
    return found


def _output_note(tensor: str | None, table) -> str:
    if tensor is None:
        return ""
    entry = table.tensors.get(tensor)
    bits = f" (A{entry.bits})" if entry is not None and entry.axis is None else ""
    return f"; its output {tensor!r} is quantized{bits} as the next layer's input"


def print_convert_summary(result, size_in: int, size_out: int, out: Path) -> None:
    s = result.summary
    if result.canonicalized:
        kinds = Counter(rewrite_kind(o.reason) for o in result.canonicalized)
        click.echo("canonicalized: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
    click.echo(folded_line(result.folded))
    if result.equalized:
        layers = sum(len(o.nodes) for o in result.equalized)
        click.echo(f"cross-layer equalization: {len(result.equalized)} chain(s) of {layers} layers")
    click.echo("weights quantized: " + s.weights_line())
    click.echo("activations quantized: " + s.activations_line())
    for line in storage_lines(result.model):
        click.echo(line)
    if s.float_nodes:
        quantized = quantized_outputs(result.model, s.float_nodes)
        click.echo(f"left in float: {len(s.float_nodes)} nodes")
        for name, op, reason in s.float_nodes[:12]:
            click.echo(f"  {name} ({op}): {reason}{_output_note(quantized.get(name), result.table)}")
        if len(s.float_nodes) > 12:
            click.echo(f"  ... and {len(s.float_nodes) - 12} more (see `onnxquant inspect`)")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(
        f"size: {human_size(size_in)} -> {human_size(size_out)} ({size_out / size_in:.3f}x); wrote {out}"
    )


def print_mixed_precision(mixed) -> None:
    """What --target-sqnr chose: the layers kept at the higher width and the SQNR measured with them."""
    worst = min(mixed.measured.values())
    verdict = "met" if mixed.met else "NOT met even with every layer kept"
    click.echo(
        f"target SQNR {mixed.target_sqnr:g} dB {verdict}: {worst:.2f} dB on the calibration data with "
        f"{len(mixed.layers)} layer(s) at {mixed.high_bits} bits"
        + (f" ({', '.join(mixed.layers)})" if mixed.layers else "")
    )
    click.echo(
        "  tried (layers kept: worst output SQNR): " + ", ".join(f"{k}: {v:.2f}" for k, v in mixed.tried)
    )


LABELS_KEY = "labels"


def report_data_options(data_opts: dict) -> dict:
    """The data options `report` uses: --data is its data, so a --calib-reader would be ignored; refuse it."""
    if data_opts.get("calib_reader") is not None:
        raise BadOptionError(
            f"--calib-reader {data_opts['calib_reader']}: report reads its evaluation data from --data only; "
            "accepted: --data PATH (.npz/.npy/directory) without --calib-reader"
        )
    return data_opts


def report_extra_keys(labels_key: str | None) -> tuple[str, ...]:
    """Non-input keys the report's data may hold: the --labels key, else a `labels` array to hint about."""
    return (labels_key,) if labels_key else (LABELS_KEY,)


def labels_hint(data, labels_key: str | None) -> tuple[str, ...]:
    """A note when the data holds a `labels` array that --labels did not name (accuracies left out)."""
    if labels_key is None and data.extra(LABELS_KEY) is not None:
        return (
            f"the data holds a '{LABELS_KEY}' array: add --labels {LABELS_KEY} for both models' accuracy",
        )
    return ()


def report_about(float_model, quant_model, data_path, rules_path) -> dict[str, str]:
    """What the report names as compared: the model and data paths and the rules (preset `default` when
    none was given)."""
    return {
        "float_model": str(float_model),
        "quant_model": str(quant_model),
        "data": str(data_path),
        "rules": str(rules_path or "default"),
    }


def write_suggestion(suggestion, path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(suggestion.rules_text(), encoding="utf-8")
    gain = suggestion.measured or suggestion.predicted or {}
    kind = "measured" if suggestion.measured else "predicted"
    change = ", ".join(
        f"{name} {suggestion.before[name]:.1f} -> {db:.1f} dB"
        for name, db in gain.items()
        if name in suggestion.before
    )
    click.echo(
        f"wrote {path}: {suggestion.k} layers at {suggestion.high_bits} bits; {kind} output SQNR {change}"
    )


def write_json(result, path: Path) -> None:
    """`result.to_json()` as indented, key-sorted JSON, written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=1, sort_keys=True), encoding="utf-8")


def write_report(result, html_path: Path, json_path: Path | None) -> None:
    with atomic_write(html_path) as tmp:
        tmp.write_text(render_html(result), encoding="utf-8")
    if json_path is not None:
        write_json(result, json_path)
    click.echo(render_text(result))
    click.echo(f"wrote {html_path}" + (f" and {json_path}" if json_path else ""))


def fail_under(result, threshold: float | None) -> None:
    if threshold is None:
        return
    failing = result.fails_under(threshold)
    if failing:
        raise CheckFailed(f"output SQNR below {threshold} dB: {', '.join(failing)}")

"""What the `onnxquant` commands print and write besides models and tables: the convert summary, the report
files and the suggested rule file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from onnxquant.cli_options import human_size
from onnxquant.errors import CheckFailed
from onnxquant.model import atomic_write
from onnxquant.report import render_html, render_text


def rewrite_kind(reason: str) -> str:
    """A canonicalization's kind, from its reason: 'fused Add 'a' (bias) into Conv 'c'' -> 'fused Add'."""
    words = reason.split()
    return " ".join(words[:2]) if words and not words[0].isdigit() else reason


def print_convert_summary(result, size_in: int, size_out: int, out: Path) -> None:
    s = result.summary
    folded = (
        ", ".join(
            f"{o.nodes[0]} into {o.nodes[1]}" if len(o.nodes) > 1 else o.nodes[0] for o in result.folded
        )
        or "none"
    )
    if result.canonicalized:
        kinds = Counter(rewrite_kind(o.reason) for o in result.canonicalized)
        click.echo("canonicalized: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
    click.echo(f"folded {len(result.folded)} nodes: {folded}")
    click.echo(
        "weights quantized: "
        + (", ".join(f"{n} at {b} bits" for b, n in sorted(s.weights.items())) or "none")
    )
    click.echo(
        "activations quantized: "
        + (", ".join(f"{n} at {b} bits" for b, n in sorted(s.activations.items())) or "none")
    )
    if s.float_nodes:
        click.echo(f"left in float: {len(s.float_nodes)} nodes")
        for name, op, reason in s.float_nodes[:12]:
            click.echo(f"  {name} ({op}): {reason}")
        if len(s.float_nodes) > 12:
            click.echo(f"  ... and {len(s.float_nodes) - 12} more (see `onnxquant inspect`)")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(
        f"size: {human_size(size_in)} -> {human_size(size_out)} ({size_out / size_in:.3f}x); wrote {out}"
    )


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

"""A short terminal summary of a report: the model outputs, then the worst layers."""

from __future__ import annotations

import math

from onnxquant.report.storage import storage_line


def _db(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if math.isinf(v) else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]


ABOUT = (
    ("float_model", "float model"),
    ("quant_model", "quantized model"),
    ("data", "data"),
    ("rules", "rules"),
    ("weights", "weights"),
    ("activations", "activations"),
    ("method", "calibration"),
)


def about_lines(about: dict) -> list[str]:
    """The report's header: what was compared, with which settings, when and by which version."""
    lines = [f"  {label}: {about[key]}" for key, label in ABOUT if key in about]
    if "date" in about or "onnxquant" in about:
        lines.append(f"  made {about.get('date', '?')} by onnxquant {about.get('onnxquant', '?')}")
    return lines


def sensitivity_header(report) -> list[str]:
    """One sensitivity column per model output when there are several (the minimum ranks the layers)."""
    outs = [o.name for o in report.outputs]
    return [f"sens. {o} dB" for o in outs] if len(outs) > 1 else []


def _per_output(report, la) -> list[str]:
    return [_db(la.sensitivity[o.name].sqnr_db if o.name in la.sensitivity else None) for o in report.outputs]


def _bits_per_weight(size) -> str:
    """`4.27/3.60`: a weight's stored and Huffman-coded bits per weight (- without a weight)."""
    return "-" if size is None else f"{size.stored_per_weight:.2f}/{size.coded_per_weight:.2f}"


def render_text(report, worst: int = 5) -> str:
    """Outputs (SQNR, max error, top-1 agreement, accuracies) and the `worst` most harmful layers."""
    lines = [
        f"onnxquant report: {report.samples} samples"
        + (f", isolated sensitivity on {report.sensitivity_samples}" if report.sensitivity_samples else ""),
        *about_lines(report.about),
    ]
    rows = [
        [
            o.name,
            _db(o.sqnr_db),
            f"{o.metrics.cosine:.4f}",
            f"{o.metrics.max_abs_error:.4g}",
            _pct(o.top1_agreement),
            _pct(o.accuracy_float),
            _pct(o.accuracy_quant),
        ]
        for o in report.outputs
    ]
    lines += _table(["output", "SQNR dB", "cosine", "max err", "top-1 agree", "acc float", "acc quant"], rows)
    stored = storage_line(t.size for t in report.tensors if t.size is not None)
    if stored:
        lines.append(stored)
    sizes = {t.name: t.size for t in report.tensors if t.kind == "weight" and t.size is not None}
    ranked = report.worst(worst)
    if ranked:
        by = (
            "output SQNR with only this layer quantized"
            if report.ranked_by == "sensitivity"
            else "accumulated SQNR at the layer output"
        )
        lines += ["", f"worst layers (by {by}):"]
        per_output = sensitivity_header(report)
        rows = [
            [
                la.shown,
                la.op_type,
                f"W{la.weight_bits or '-'}A{la.act_bits or '-'}",
                _db(la.sensitivity_db),
                *(_per_output(report, la) if per_output else ()),
                _db(la.isolated.sqnr_db if la.isolated else None),
                _db(la.accumulated.sqnr_db if la.accumulated else None),
                _bits_per_weight(sizes.get(la.weight)),
            ]
            for la in ranked
        ]
        header = ["layer", "op", "bits", "sens. dB", *per_output, "isolated dB", "accum. dB"]
        header.append("W bits/w stored/Huffman")
        lines += _table(header, rows)
    sug = report.suggestion
    if sug is not None:
        lines += [
            "",
            f"suggested: keep {sug.k} layer(s) at {sug.high_bits} bits ({', '.join(sug.layers) or '-'})",
        ]
        for o, v in (sug.predicted or {}).items():
            lines.append(f"  {o}: predicted {_db(sug.before[o])} -> {_db(v)} dB")
        for o, v in (sug.gain_db or {}).items():
            lines.append(f"  {o}: measured {_db(sug.measured[o])} dB ({'+' if v >= 0 else ''}{_db(v)} dB)")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"

"""One self-contained HTML page for a report: summary, plots as inline SVG (`svg.py`), sortable tables.

Nothing is fetched: the style and scripts (`assets/`) are inlined, and there are no external scripts, styles,
fonts or images. A small script sorts the tables when a header is clicked and, once it has run, sets
`document.title` and `data-ready="1"` on <body>, and writes the rendered size of every plot into
`data-plot-sizes` (what the browser test checks).
"""

from __future__ import annotations

import importlib.resources
import math
from functools import cache

from onnxquant.report.markup import esc, fmt
from onnxquant.report.render_text import ABOUT, sensitivity_header
from onnxquant.report.storage import storage_line
from onnxquant.report.svg import METHOD_COLORS, calib_plot, curve_plot, entropy_plot, layers_plot

ASSETS = ("report.css", "report.js", "error-hook.js")


@cache
def asset(name: str) -> str:
    """The text of a packaged asset (`onnxquant/report/assets/<name>`)."""
    return (
        importlib.resources.files("onnxquant.report").joinpath(f"assets/{name}").read_text(encoding="utf-8")
    )


def _dv(v: float | None) -> str:
    """data-v attribute value for sorting."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(float(v))


def _sqnr_class(v: float | None) -> str:
    if v is None or math.isnan(v):
        return ""
    return "good" if v >= 30 else ("warn" if v >= 15 else "bad")


def _cell(v, kind: str = "db", cls: str = "") -> str:
    c = f"num {cls}".strip()
    return f'<td class="{c}" data-v="{_dv(v)}">{fmt(v, kind)}</td>'


def _rank_value(report, la) -> float | None:
    if report.ranked_by == "sensitivity":
        return la.sensitivity_db
    return la.accumulated.sqnr_db if la.accumulated else None


def _summary(report) -> str:
    cards = []
    for o in report.outputs:
        m = o.metrics
        rows = [
            ("cosine", fmt(m.cosine, "cos")),
            ("max abs error", fmt(m.max_abs_error, "g")),
            ("MSE", fmt(m.mse, "g")),
        ]
        if o.top1_agreement is not None:
            rows.append(("top-1 agreement", fmt(o.top1_agreement, "pct")))
        if o.accuracy_float is not None:
            rows.append(
                (
                    "accuracy float → quant",
                    (f"{fmt(o.accuracy_float, 'pct')} → {fmt(o.accuracy_quant, 'pct')}"),
                )
            )
        body = "".join(f'<tr><td class="lbl">{esc(k)}</td><td>{v}</td></tr>' for k, v in rows)
        cards.append(
            f'<div class="card"><div class="lbl">output {esc(o.name)} · SQNR</div>'
            f'<div class="big {_sqnr_class(m.sqnr_db)}">{fmt(m.sqnr_db)} dB</div><table>{body}</table>'
            "</div>"
        )
    worst = report.worst(5)
    wl = ""
    if worst:
        by = (
            "output SQNR with only this layer quantized"
            if report.ranked_by == "sensitivity"
            else "accumulated SQNR at the layer's output"
        )
        items = "".join(
            f"<li><b>{esc(la.shown)}</b> ({esc(la.op_type)}, W{la.weight_bits or '–'}A{la.act_bits or '–'}): "
            f"{fmt(_rank_value(report, la))} dB</li>"
            for la in worst
        )
        wl = (
            f'<div class="card"><div class="lbl">worst layers, by {by}</div><ol class="worst">{items}</ol>'
            "</div>"
        )
    notes = ""
    if report.notes:
        notes = '<div class="notes">' + "".join(f"<div>{esc(n)}</div>" for n in report.notes) + "</div>"
    return f'<section id="summary"><div class="cards">{"".join(cards)}{wl}</div>{notes}</section>'


def _about(report) -> str:
    """What was compared (models, data, rules, settings), when, and by which onnxquant."""
    rows = "".join(
        f'<tr><td class="lbl">{esc(label)}</td><td class="name">{esc(report.about[key])}</td></tr>'
        for key, label in ABOUT
        if key in report.about
    )
    made = f"{report.about.get('date', '?')}, onnxquant {report.about.get('onnxquant', '?')}"
    return f'<table class="about">{rows}<tr><td class="lbl">made</td><td>{esc(made)}</td></tr></table>'


def _layers_table(report) -> str:
    """One row per layer; MSE and relative error stay in the JSON so the table fits the page."""
    per_output = sensitivity_header(report)
    head = [
        ("#", "num"),
        ("layer", "str"),
        ("op", "str"),
        ("W bits", "num"),
        ("A bits", "num"),
        ("sensitivity dB", "num"),
        *((h, "num") for h in per_output),
        ("isolated SQNR", "num"),
        ("isolated cosine", "num"),
        ("accum. SQNR", "num"),
        ("accum. cosine", "num"),
        ("accum. max err", "num"),
    ]
    rows = []
    for la in report.layers:
        a, i = la.accumulated, la.isolated
        named = f' title="node {esc(la.name)}"' if la.shown != la.name else ""
        sens = "".join(
            _cell(la.sensitivity[o.name].sqnr_db if o.name in la.sensitivity else None)
            for o in (report.outputs if per_output else ())
        )
        rows.append(
            "<tr>"
            + _cell(la.index, "g")
            + f'<td class="name"{named}>{esc(la.shown)}</td><td>{esc(la.op_type)}</td>'
            + _cell(la.weight_bits, "g")
            + _cell(la.act_bits, "g")
            + _cell(la.sensitivity_db, "db", _sqnr_class(la.sensitivity_db))
            + sens
            + _cell(i.sqnr_db if i else None)
            + _cell(i.cosine if i else None, "cos")
            + _cell(a.sqnr_db if a else None)
            + _cell(a.cosine if a else None, "cos")
            + _cell(a.max_abs_error if a else None, "g")
            + "</tr>"
        )
    return _table("layers-table", head, rows)


def _tensors_table(report) -> str:
    """One row per quantized tensor; MSE and relative error stay in the JSON so the table fits the page."""
    head = [("tensor", "str"), ("kind", "str"), ("bits", "num"), ("entropy bits", "num"), ("clipped", "num")]
    for pre in ("accum.", "isolated"):
        head += [(f"{pre} SQNR", "num"), (f"{pre} cosine", "num"), (f"{pre} max err", "num")]
    rows = []
    for t in report.tensors:
        cells = [
            f'<td class="name">{esc(t.name)}</td><td>{esc(t.kind)}</td>',
            _cell(t.bits, "g"),
            _cell(t.entropy, "bits"),
            _cell(t.clip_fraction, "pct"),
        ]
        for m in (t.accumulated, t.isolated):
            cells += [
                _cell(m.sqnr_db if m else None),
                _cell(m.cosine if m else None, "cos"),
                _cell(m.max_abs_error if m else None, "g"),
            ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table("tensors-table", head, rows)


def _storage_table(report) -> str:
    """One row per layer with a quantized weight: its width, and the bits per weight and size as stored and
    Huffman-coded (report/storage.py); empty when no layer has one."""
    sizes = {t.name: t.size for t in report.tensors if t.kind == "weight" and t.size is not None}
    head = [("layer", "str"), ("weight", "str"), ("W bits", "num"), ("stored bits/w", "num")]
    head += [("Huffman bits/w", "num"), ("stored KB", "num"), ("Huffman KB", "num")]
    rows = []
    for la in report.layers:
        size = sizes.get(la.weight)
        if size is None:
            continue
        rows.append(
            f'<tr><td class="name">{esc(la.shown)}</td><td class="name">{esc(la.weight)}</td>'
            + _cell(la.weight_bits, "g")
            + _cell(size.stored_per_weight, "bits")
            + _cell(size.coded_per_weight, "bits")
            + _cell(size.stored_bits / 8192, "g")
            + _cell(size.coded_bits / 8192, "g")
            + "</tr>"
        )
    if not rows:
        return ""
    total = storage_line(sizes.values())
    return (
        f'<section id="storage"><h2>Weight storage</h2><p class="sub">{esc(total)}: codes at their container '
        "width plus scales, zero points or codebooks; Huffman-coded: the codes' Huffman code.</p>"
        + _table("storage-table", head, rows)
        + "</section>"
    )


def _table(ident: str, head, rows) -> str:
    ths = "".join(f'<th data-type="{kind}">{esc(h)}</th>' for h, kind in head)
    return (
        f'<div class="scroll"><table class="sortable" id="{ident}"><thead><tr>{ths}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _suggestion(report) -> str:
    sug = report.suggestion
    if sug is None:
        return ""
    lines = [f"Keep {sug.k} layer(s) at {sug.high_bits} bits: {esc(', '.join(sug.layers) or '–')}."]
    for o, v in (sug.predicted or {}).items():
        lines.append(f"Output {esc(o)}: {fmt(sug.before[o])} dB now, predicted {fmt(v)} dB.")
    for o, v in (sug.gain_db or {}).items():
        lines.append(
            f"Output {esc(o)}: measured {fmt(sug.measured[o])} dB after converting with these rules "
            f"({'+' if v >= 0 else ''}{fmt(v)} dB)."
        )
    plot = curve_plot(sug)
    fig = (
        (
            f"<figure>{plot}<figcaption>Predicted output SQNR when the k most sensitive layers are kept at "
            f"{sug.high_bits} bits (noise powers add; one more bit divides noise by 4); circles: measured."
            "</figcaption></figure>"
        )
        if plot
        else ""
    )
    return (
        f'<section id="suggestion"><h2>Suggested rules</h2><p>{"<br>".join(lines)}</p>{fig}'
        f"<details><summary>rule file</summary><pre>{esc(sug.rules_text())}</pre></details></section>"
    )


def _calibration(report) -> str:
    if not report.calibration:
        return ""
    legend = "".join(f'<span><i style="background:{c}"></i>{m}</span>' for m, c in METHOD_COLORS.items())
    plots = "".join(f"<div>{calib_plot(v)}</div>" for v in report.calibration.values())
    return (
        f'<section id="calibration"><h2>Calibration</h2><p class="sub">Histogram of each activation '
        f"(log counts) with the clipping range each method would choose; the table's method is drawn thick."
        f'</p><div class="legend">{legend}</div><div class="grid">{plots}</div></section>'
    )


def render_html(report) -> str:
    """The report as one self-contained HTML page."""
    sub = f"{report.samples} samples compared"
    if report.sensitivity_samples:
        sub += f"; isolated sensitivity on the first {report.sensitivity_samples}"
    sub += f"; {len(report.layers)} layers, {len(report.tensors)} quantized tensors"
    lp, ep = layers_plot(report), entropy_plot(report)
    layers_fig = (
        (
            f'<section id="plots"><h2>Where the error enters and where it compounds</h2><figure>{lp}'
            "<figcaption>Bars: output SQNR with only this layer quantized (sensitivity; the 3 worst in "
            "red). Line: accumulated SQNR at the layer's output, whole model quantized (after the output's "
            "own "
            "quantization where it has one). Dots: isolated SQNR at the layer's output, only its inputs and "
            "weights quantized.</figcaption></figure></section>"
        )
        if lp
        else ""
    )
    entropy_fig = (
        (
            f'<section id="codes"><h2>Code statistics</h2><figure>{ep}<figcaption>Code entropy (blue: '
            "activations, orange: weights) inside the nominal width (grey): the average bits per value an "
            "entropy coder would need.</figcaption></figure></section>"
        )
        if ep
        else ""
    )
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>onnxquant report (loading)</title>",
            f"<script>{asset('error-hook.js')}</script><style>{asset('report.css')}</style></head>",
            f'<body data-ready="0"><main><h1>onnxquant accuracy report</h1><p class="sub">{esc(sub)}</p>',
            _about(report),
            _summary(report),
            layers_fig,
            _suggestion(report),
            '<section id="layers"><h2>Layers</h2><p class="sub">Click a header to sort.</p>',
            _layers_table(report),
            "</section>",
            f'<section id="tensors"><h2>Quantized tensors</h2>{_tensors_table(report)}</section>',
            _storage_table(report),
            entropy_fig,
            _calibration(report),
            f"<script>{asset('report.js')}</script></main></body></html>",
        ]
    )

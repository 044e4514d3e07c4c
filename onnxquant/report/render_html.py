"""One self-contained HTML page for a report: summary, plots as inline SVG, sortable tables.

Nothing is fetched: no external scripts, styles, fonts or images. A small inline script sorts the tables
when a header is clicked and, once it has run, sets `document.title` and `data-ready="1"` on <body>, and
writes the rendered size of every plot into `data-plot-sizes` (what the browser test checks).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from onnxquant.report.calibview import CalibView

METHOD_COLORS = {
    "minmax": "#7f7f7f",
    "percentile": "#9467bd",
    "mse": "#2ca02c",
    "laplace": "#1f77b4",
    "gauss": "#17becf",
    "kl": "#d62728",
}
BLUE, ORANGE, GREEN, RED, GREY = "#4c78a8", "#f58518", "#54a24b", "#e45756", "#bbbbbb"

CSS = """
:root { --fg:#1d232b; --muted:#5f6b7a; --line:#d8dde3; --bg:#ffffff; --panel:#f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
        min-width: 230px; }
.card .big { font-size: 28px; font-weight: 650; } .card .lbl { color: var(--muted); font-size: 12px; }
.card table td { padding: 1px 10px 1px 0; }
.good { color: #2e7d32; } .warn { color: #b26a00; } .bad { color: #c62828; }
.notes { background: #fff8e1; border: 1px solid #f0d890; border-radius: 6px; padding: 8px 14px; }
.worst li { margin: 2px 0; }
figure { margin: 10px 0 18px; } figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; }
svg.plot { display: block; background: #fff; }
svg text { font: 11px system-ui, "DejaVu Sans", sans-serif; fill: #333; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table.sortable { border-collapse: collapse; width: 100%; font-size: 12.5px; }
table.sortable th, table.sortable td { padding: 4px 8px; border-bottom: 1px solid var(--line);
                                       white-space: nowrap; }
table.sortable td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { position: sticky; top: 0; background: var(--panel); cursor: pointer; user-select: none;
                    text-align: left; }
table.sortable th[data-dir="asc"]::after { content: " \\25B2"; }
table.sortable th[data-dir="desc"]::after { content: " \\25BC"; }
table.sortable tr:hover td { background: #eef4fb; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(370px, 1fr)); gap: 10px; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
pre { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 10px;
      overflow-x: auto; }
"""

SCRIPT = """
(function () {
  function key(cell, num) {
    var v = cell.getAttribute('data-v');
    if (v === null) v = cell.textContent;
    if (!num) return v.toLowerCase();
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }
  var tables = document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables, function (t) {
    var heads = t.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, i) {
      th.addEventListener('click', function () {
        var asc = th.getAttribute('data-dir') !== 'asc';
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('data-dir'); });
        th.setAttribute('data-dir', asc ? 'asc' : 'desc');
        var num = th.getAttribute('data-type') === 'num';
        var body = t.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[i], num), y = key(b.cells[i], num);
          if (x === null && y === null) return 0;
          if (x === null) return 1;
          if (y === null) return -1;
          var c = x < y ? -1 : (x > y ? 1 : 0);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var sizes = [];
  Array.prototype.forEach.call(document.querySelectorAll('svg.plot'), function (s) {
    var r = s.getBoundingClientRect();
    sizes.push(Math.round(r.width) + 'x' + Math.round(r.height));
  });
  document.body.setAttribute('data-plot-sizes', sizes.join(','));
  document.body.setAttribute('data-ready', '1');
  document.title = document.title.replace(' (loading)', '');
})();
"""

ERROR_HOOK = (
    "window.addEventListener('error', function (e) { document.documentElement.setAttribute("
    "'data-js-error', String(e.message || e)); });"
)



def _axis_label(x: float, y: float, name: str) -> str:
    """A category label under a bar, rotated 45°, shortened from the left to 22 characters."""
    label = name if len(name) <= 22 else "…" + name[-21:]
    return f'<text x="{x:.1f}" y="{y}" transform="rotate(-45 {x:.1f} {y})" text-anchor="end">{_e(label)}</text>'

def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v: float | None, kind: str = "db") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if kind == "db":
        return f"{v:.2f}"
    if kind == "cos":
        return f"{v:.5f}"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "bits":
        return f"{v:.2f}"
    return f"{v:.4g}"


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
    return f'<td class="{c}" data-v="{_dv(v)}">{_fmt(v, kind)}</td>'


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


# ------------------------------------------------------------------------------------------------ plots


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_e(label)}">'
    )


def _axis_y(x0: int, y_of, ticks: Sequence[float], width: int, unit: str = "") -> str:
    out = []
    for t in ticks:
        y = y_of(t)
        out.append(f'<line x1="{x0}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}{unit}</text>')
    return "".join(out)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _label_room(names) -> int:
    """Pixels below the x axis for labels rotated by 45° (about 4.6 px per character, at most 22 shown)."""
    longest = max((min(len(n), 22) for n in names), default=4)
    return 24 + int(longest * 4.6)


def _legend(items: Sequence[tuple[str, str, str]], x: int, y: int) -> str:
    """Legend entries (kind 'bar', 'line' or 'dot', colour, label) in a row starting at (x, y)."""
    out = []
    for kind, color, label in items:
        if kind == "bar":
            out.append(f'<rect x="{x}" y="{y - 8}" width="12" height="10" fill="{color}"/>')
        elif kind == "line":
            out.append(
                f'<line x1="{x}" x2="{x + 14}" y1="{y - 3}" y2="{y - 3}" stroke="{color}" stroke-width="2"/>'
            )
        else:
            out.append(f'<circle cx="{x + 6}" cy="{y - 3}" r="3.5" fill="{color}"/>')
        out.append(f'<text x="{x + 18}" y="{y + 1}">{_e(label)}</text>')
        x += 26 + int(6.2 * len(label))
    return "".join(out)


def layers_plot(report) -> str:
    """Bars: output SQNR, only the layer quantized; line: accumulated SQNR at its output; dots: isolated."""
    layers = report.layers
    if not layers:
        return ""
    sens = [la.sensitivity_db for la in layers]
    acc = [la.accumulated.sqnr_db if la.accumulated else None for la in layers]
    iso = [la.isolated.sqnr_db if la.isolated else None for la in layers]
    vals = _finite(sens + acc + iso)
    if not vals:
        return ""
    worst = {la.name for la in report.worst(3)}
    bottom = _label_room(la.name for la in layers)
    width, height, left, right, top = 1180, 250 + bottom, 56, 12, 16
    lo, hi = min(0.0, min(vals)), max(vals) * 1.15 + 2
    cap = hi

    def y_of(v: float) -> float:
        v = min(v, cap)
        return top + (hi - v) / (hi - lo) * (height - top - bottom)

    n = len(layers)
    band = (width - left - right) / n
    parts = [_svg_open(width, height, "per-layer SQNR"), _axis_y(left, y_of, _ticks(lo, hi), width - right)]
    parts.append(
        f'<text x="14" y="{top + (height - top - bottom) / 2:.0f}" transform="rotate(-90 14 '
        f'{top + (height - top - bottom) / 2:.0f})" text-anchor="middle">SQNR (dB)</text>'
    )
    base = y_of(max(lo, 0.0))
    for i, la in enumerate(layers):
        x = left + i * band
        v = sens[i]
        if v is not None and not math.isnan(v):
            y = y_of(v if math.isfinite(v) else cap)
            color = RED if la.name in worst else BLUE
            parts.append(
                f'<rect x="{x + band * 0.15:.1f}" y="{min(y, base):.1f}" width="{band * 0.7:.1f}" '
                f'height="{max(abs(base - y), 1):.1f}" fill="{color}" opacity="0.85">'
                f"<title>{_e(la.name)}: {_fmt(v)} dB output SQNR with only this layer quantized</title>"
                "</rect>"
            )
        if n <= 60 or i % max(1, n // 60) == 0:
            parts.append(_axis_label(x + band / 2, height - bottom + 12, la.name))
    for series, color, name in ((acc, ORANGE, "accumulated"), (iso, GREEN, "isolated")):
        pts = [
            (left + (i + 0.5) * band, y_of(v))
            for i, v in enumerate(series)
            if v is not None and math.isfinite(v)
        ]
        if not pts:
            continue
        if name == "accumulated":
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                + '"/>'
            )
        for (x, y), la in zip(
            pts, [la for la, v in zip(layers, series) if v is not None and math.isfinite(v)]
        ):
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2" fill="{color}"><title>{_e(la.name)}: '
                f"{name} SQNR at its output</title></circle>"
            )
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{base:.1f}" y2="{base:.1f}" stroke="#999"/>')
    parts.append(
        _legend(
            [
                ("bar", BLUE, "sensitivity: output SQNR, only this layer quantized"),
                ("bar", RED, "3 worst"),
                ("line", ORANGE, "accumulated SQNR at the layer output"),
                ("dot", GREEN, "isolated SQNR at the layer output"),
            ],
            left + 8,
            top + 6,
        )
    )
    parts.append("</svg>")
    return "".join(parts)


def entropy_plot(report) -> str:
    """Per quantized tensor: nominal width (grey) and code entropy (blue), in bits."""
    tensors = report.tensors
    if not tensors:
        return ""
    bottom = _label_room(t.name for t in tensors)
    width, height, left, right, top = 1180, 150 + bottom, 56, 12, 12
    hi = max(t.bits for t in tensors) + 0.5

    def y_of(v: float) -> float:
        return top + (hi - v) / hi * (height - top - bottom)

    n = len(tensors)
    band = (width - left - right) / n
    parts = [
        _svg_open(width, height, "code entropy vs nominal width"),
        _axis_y(left, y_of, _ticks(0, hi), width - right),
    ]
    parts.append(
        f'<text x="14" y="{(height - bottom) / 2:.0f}" '
        f'transform="rotate(-90 14 {(height - bottom) / 2:.0f})" '
        'text-anchor="middle">bits</text>'
    )
    for i, t in enumerate(tensors):
        x = left + i * band
        yb, ye = y_of(t.bits), y_of(t.entropy)
        parts.append(
            f'<rect x="{x + band * 0.1:.1f}" y="{yb:.1f}" width="{band * 0.8:.1f}" '
            f'height="{y_of(0) - yb:.1f}" fill="{GREY}" opacity="0.6"><title>{_e(t.name)}: {t.bits}-bit '
            f"{t.kind}</title></rect>"
        )
        parts.append(
            f'<rect x="{x + band * 0.25:.1f}" y="{ye:.1f}" width="{band * 0.5:.1f}" '
            f'height="{max(y_of(0) - ye, 0.5):.1f}" fill="{BLUE if t.kind == "activation" else ORANGE}">'
            f"<title>{_e(t.name)}: entropy {t.entropy:.2f} bits</title></rect>"
        )
        if n <= 80 or i % max(1, n // 80) == 0:
            parts.append(_axis_label(x + band / 2, height - bottom + 12, t.name))
    parts.append("</svg>")
    return "".join(parts)


def calib_plot(view: CalibView) -> str:
    """Histogram (log counts) with each method's range; the chosen method drawn thick and labelled."""
    width, height, left, right, top, bottom = 370, 190, 8, 8, 26, 22
    counts = view.counts
    span = view.hi - view.lo or 1.0
    logc = [math.log10(c + 1) for c in counts.tolist()]
    top_v = max(logc) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(v: float) -> float:
        return left + (min(max(v, view.lo), view.hi) - view.lo) / span * plot_w

    parts = [_svg_open(width, height, f"calibration histogram of {view.tensor}")]
    parts.append(f'<text x="{left}" y="14" font-weight="600">{_e(view.tensor)}</text>')
    parts.append(
        f'<text x="{width - right}" y="14" text-anchor="end">{view.bits}-bit '
        f"{'signed' if view.symmetric else 'unsigned'}</text>"
    )
    bw = plot_w / len(counts)
    for i, c in enumerate(logc):
        if c <= 0:
            continue
        h = c / top_v * plot_h
        parts.append(
            f'<rect x="{left + i * bw:.2f}" y="{top + plot_h - h:.1f}" width="{max(bw - 0.3, 0.5):.2f}" '
            f'height="{h:.1f}" fill="#9fb3c8"/>'
        )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#999"/>'
    )
    for m, (lo, hi) in view.ranges.items():
        color = METHOD_COLORS.get(m, "#444")
        chosen = m == view.chosen
        for v in {lo, hi}:
            if v == 0.0 and view.lo == 0.0:
                continue
            x = x_of(v)
            dash = "" if chosen else ' stroke-dasharray="4 2"'
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="{color}" '
                f'stroke-width="{3 if chosen else 1.3}"{dash}>'
                f"<title>{m}: [{lo:.4g}, {hi:.4g}]</title></line>"
            )
    if view.chosen_range is not None:
        lo, hi = view.chosen_range
        x = x_of(hi)
        anchor = "end" if x > width / 2 else "start"
        dx = -4 if anchor == "end" else 4
        parts.append(
            f'<text x="{x + dx:.1f}" y="{top + 12}" text-anchor="{anchor}" font-weight="600" '
            f'fill="{METHOD_COLORS.get(view.chosen or "", "#000")}">chosen: {_e(view.chosen)} '
            f"{hi:.3g}</text>"
        )
    parts.append(f'<text x="{left}" y="{height - 6}">{view.lo:.3g}</text>')
    parts.append(f'<text x="{width - right}" y="{height - 6}" text-anchor="end">{view.hi:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def curve_plot(sug) -> str:
    """Predicted output SQNR against the number of layers kept at high bits, the target and the choice."""
    if not sug.curve:
        return ""
    width, height, left, right, top, bottom = 560, 240, 56, 16, 14, 36
    outs = list(sug.curve[0])
    vals = _finite(
        [c[o] for c in sug.curve for o in outs] + [sug.target_sqnr] + list((sug.measured or {}).values())
    )
    lo, hi = min(vals) - 1, max(vals) + 1
    n = len(sug.curve) - 1 or 1

    def x_of(k: float) -> float:
        return left + k / n * (width - left - right)

    def y_of(v: float) -> float:
        return top + (hi - min(max(v, lo), hi)) / (hi - lo) * (height - top - bottom)

    parts = [
        _svg_open(width, height, "predicted output SQNR vs layers kept"),
        _axis_y(left, y_of, _ticks(lo, hi), width - right),
    ]
    for k in range(len(sug.curve)):
        if len(sug.curve) <= 25 or k % max(1, len(sug.curve) // 25) == 0:
            parts.append(
                f'<text x="{x_of(k):.1f}" y="{height - bottom + 14}" text-anchor="middle">{k}</text>'
            )
    parts.append(
        f'<text x="{(left + width) / 2:.0f}" y="{height - 4}" text-anchor="middle">layers kept at '
        f"{sug.high_bits} bits (most sensitive first)</text>"
    )
    colors = [BLUE, ORANGE, GREEN, RED]
    for j, o in enumerate(outs):
        pts = [(x_of(k), y_of(c[o])) for k, c in enumerate(sug.curve) if math.isfinite(c[o])]
        parts.append(
            f'<polyline fill="none" stroke="{colors[j % 4]}" stroke-width="2" points="'
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            + f'"><title>{_e(o)}: predicted</title></polyline>'
        )
    if sug.target_sqnr is not None:
        y = y_of(sug.target_sqnr)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{RED}" '
            f'stroke-dasharray="5 3"/><text x="{width - right}" y="{y - 4:.1f}" text-anchor="end">target '
            f"{sug.target_sqnr:.1f} dB</text>"
        )
    parts.append(
        f'<line x1="{x_of(sug.k):.1f}" x2="{x_of(sug.k):.1f}" y1="{top}" y2="{height - bottom}" '
        f'stroke="#333" stroke-dasharray="2 2"/>'
    )
    for j, (o, v) in enumerate((sug.measured or {}).items()):
        if math.isfinite(v):
            parts.append(
                f'<circle cx="{x_of(sug.k):.1f}" cy="{y_of(v):.1f}" r="5" fill="none" '
                f'stroke="{colors[j % 4]}" stroke-width="2"><title>{_e(o)}: measured {v:.2f} dB'
                "</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ page


def _rank_value(report, la) -> float | None:
    if report.ranked_by == "sensitivity":
        return la.sensitivity_db
    return la.accumulated.sqnr_db if la.accumulated else None


def _summary(report) -> str:
    cards = []
    for o in report.outputs:
        m = o.metrics
        rows = [
            ("cosine", _fmt(m.cosine, "cos")),
            ("max abs error", _fmt(m.max_abs_error, "g")),
            ("MSE", _fmt(m.mse, "g")),
        ]
        if o.top1_agreement is not None:
            rows.append(("top-1 agreement", _fmt(o.top1_agreement, "pct")))
        if o.accuracy_float is not None:
            rows.append(
                (
                    "accuracy float → quant",
                    (f"{_fmt(o.accuracy_float, 'pct')} → {_fmt(o.accuracy_quant, 'pct')}"),
                )
            )
        body = "".join(f'<tr><td class="lbl">{_e(k)}</td><td>{v}</td></tr>' for k, v in rows)
        cards.append(
            f'<div class="card"><div class="lbl">output {_e(o.name)} · SQNR</div>'
            f'<div class="big {_sqnr_class(m.sqnr_db)}">{_fmt(m.sqnr_db)} dB</div><table>{body}</table>'
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
            f"<li><b>{_e(la.name)}</b> ({_e(la.op_type)}, W{la.weight_bits or '–'}A{la.act_bits or '–'}): "
            f"{_fmt(_rank_value(report, la))} dB</li>"
            for la in worst
        )
        wl = (
            f'<div class="card"><div class="lbl">worst layers, by {by}</div><ol class="worst">{items}</ol>'
            "</div>"
        )
    notes = ""
    if report.notes:
        notes = '<div class="notes">' + "".join(f"<div>{_e(n)}</div>" for n in report.notes) + "</div>"
    return f'<section id="summary"><div class="cards">{"".join(cards)}{wl}</div>{notes}</section>'


def _layers_table(report) -> str:
    head = [
        ("#", "num"),
        ("layer", "str"),
        ("op", "str"),
        ("W bits", "num"),
        ("A bits", "num"),
        ("sensitivity dB", "num"),
        ("isolated SQNR", "num"),
        ("isolated cosine", "num"),
        ("accum. SQNR", "num"),
        ("accum. cosine", "num"),
        ("accum. MSE", "num"),
        ("accum. max err", "num"),
        ("accum. rel err", "num"),
    ]
    rows = []
    for la in report.layers:
        a, i = la.accumulated, la.isolated
        rows.append(
            "<tr>"
            + _cell(la.index, "g")
            + f"<td>{_e(la.name)}</td><td>{_e(la.op_type)}</td>"
            + _cell(la.weight_bits, "g")
            + _cell(la.act_bits, "g")
            + _cell(la.sensitivity_db, "db", _sqnr_class(la.sensitivity_db))
            + _cell(i.sqnr_db if i else None)
            + _cell(i.cosine if i else None, "cos")
            + _cell(a.sqnr_db if a else None)
            + _cell(a.cosine if a else None, "cos")
            + _cell(a.mse if a else None, "g")
            + _cell(a.max_abs_error if a else None, "g")
            + _cell(a.rel_error if a else None, "g")
            + "</tr>"
        )
    return _table("layers-table", head, rows)


def _tensors_table(report) -> str:
    head = [("tensor", "str"), ("kind", "str"), ("bits", "num"), ("entropy bits", "num"), ("clipped", "num")]
    for pre in ("accum.", "isolated"):
        head += [
            (f"{pre} SQNR", "num"),
            (f"{pre} cosine", "num"),
            (f"{pre} MSE", "num"),
            (f"{pre} max err", "num"),
            (f"{pre} rel err", "num"),
        ]
    rows = []
    for t in report.tensors:
        cells = [
            f"<td>{_e(t.name)}</td><td>{_e(t.kind)}</td>",
            _cell(t.bits, "g"),
            _cell(t.entropy, "bits"),
            _cell(t.clip_fraction, "pct"),
        ]
        for m in (t.accumulated, t.isolated):
            cells += [
                _cell(m.sqnr_db if m else None),
                _cell(m.cosine if m else None, "cos"),
                _cell(m.mse if m else None, "g"),
                _cell(m.max_abs_error if m else None, "g"),
                _cell(m.rel_error if m else None, "g"),
            ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table("tensors-table", head, rows)


def _table(ident: str, head, rows) -> str:
    ths = "".join(f'<th data-type="{kind}">{_e(h)}</th>' for h, kind in head)
    return (
        f'<div class="scroll"><table class="sortable" id="{ident}"><thead><tr>{ths}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _suggestion(report) -> str:
    sug = report.suggestion
    if sug is None:
        return ""
    lines = [f"Keep {sug.k} layer(s) at {sug.high_bits} bits: {_e(', '.join(sug.layers) or '–')}."]
    for o, v in (sug.predicted or {}).items():
        lines.append(f"Output {_e(o)}: {_fmt(sug.before[o])} dB now, predicted {_fmt(v)} dB.")
    for o, v in (sug.gain_db or {}).items():
        lines.append(
            f"Output {_e(o)}: measured {_fmt(sug.measured[o])} dB after converting with these rules "
            f"({'+' if v >= 0 else ''}{_fmt(v)} dB)."
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
        f"<details><summary>rule file</summary><pre>{_e(sug.rules)}</pre></details></section>"
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
            f"<script>{ERROR_HOOK}</script><style>{CSS}</style></head>",
            f'<body data-ready="0"><main><h1>onnxquant accuracy report</h1><p class="sub">{_e(sub)}</p>',
            _summary(report),
            layers_fig,
            _suggestion(report),
            '<section id="layers"><h2>Layers</h2><p class="sub">Click a header to sort.</p>',
            _layers_table(report),
            "</section>",
            f'<section id="tensors"><h2>Quantized tensors</h2>{_tensors_table(report)}</section>',
            entropy_fig,
            _calibration(report),
            f"<script>{SCRIPT}</script></main></body></html>",
        ]
    )

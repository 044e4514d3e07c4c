"""The report's charts as inline SVG: per-layer SQNR, code entropy, calibration histograms, suggestion curve.

Every chart is one `<svg class="plot">` element with explicit width and height (the page's script measures
them); names are escaped, long ones shortened from the left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from onnxquant.report.calibview import CalibView
from onnxquant.report.markup import esc, finite, fmt

METHOD_COLORS = {
    "minmax": "#7f7f7f",
    "percentile": "#9467bd",
    "mse": "#2ca02c",
    "laplace": "#1f77b4",
    "gauss": "#17becf",
    "kl": "#d62728",
}
BLUE, ORANGE, GREEN, RED, GREY = "#4c78a8", "#f58518", "#54a24b", "#e45756", "#bbbbbb"
LEGEND_BAND = 30  # px above a plot's data area kept for its legend or labels, so no line runs under text


def _axis_label(x: float, y: float, name: str) -> str:
    """A category label under a bar, rotated 45°, shortened from the left to 22 characters."""
    label = name if len(name) <= 22 else "…" + name[-21:]
    return (
        f'<text x="{x:.1f}" y="{y}" transform="rotate(-45 {x:.1f} {y})" text-anchor="end">{esc(label)}</text>'
    )


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(label)}">'
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
        out.append(f'<text x="{x + 18}" y="{y + 1}">{esc(label)}</text>')
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
    vals = finite(sens + acc + iso)
    if not vals:
        return ""
    worst = {la.name for la in report.worst(3)}
    bottom = _label_room(la.shown for la in layers)
    width, height, left, right, top = 1180, 264 + bottom, 56, 12, LEGEND_BAND
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
                f"<title>{esc(la.shown)}: {fmt(v)} dB output SQNR with only this layer quantized</title>"
                "</rect>"
            )
        if n <= 60 or i % max(1, n // 60) == 0:
            parts.append(_axis_label(x + band / 2, height - bottom + 12, la.shown))
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
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2" fill="{color}"><title>{esc(la.shown)}: '
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
            LEGEND_BAND - 12,
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
            f'height="{y_of(0) - yb:.1f}" fill="{GREY}" opacity="0.6"><title>{esc(t.name)}: {t.bits}-bit '
            f"{t.kind}</title></rect>"
        )
        parts.append(
            f'<rect x="{x + band * 0.25:.1f}" y="{ye:.1f}" width="{band * 0.5:.1f}" '
            f'height="{max(y_of(0) - ye, 0.5):.1f}" fill="{BLUE if t.kind == "activation" else ORANGE}">'
            f"<title>{esc(t.name)}: entropy {t.entropy:.2f} bits</title></rect>"
        )
        if n <= 80 or i % max(1, n // 80) == 0:
            parts.append(_axis_label(x + band / 2, height - bottom + 12, t.name))
    parts.append("</svg>")
    return "".join(parts)


def calib_plot(view: CalibView) -> str:
    """Histogram (log counts) with each method's range; the chosen method drawn thick and labelled."""
    width, height, left, right, top, bottom = 370, 204, 8, 8, 40, 22
    counts = view.counts
    span = view.hi - view.lo or 1.0
    logc = [math.log10(c + 1) for c in counts.tolist()]
    top_v = max(logc) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(v: float) -> float:
        return left + (min(max(v, view.lo), view.hi) - view.lo) / span * plot_w

    parts = [_svg_open(width, height, f"calibration histogram of {view.tensor}")]
    parts.append(f'<text x="{left}" y="14" font-weight="600">{esc(view.tensor)}</text>')
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
            f'<text x="{x + dx:.1f}" y="{top - 6}" text-anchor="{anchor}" font-weight="600" '
            f'fill="{METHOD_COLORS.get(view.chosen or "", "#000")}">chosen: {esc(view.chosen)} '
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
    vals = finite(
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
            + f'"><title>{esc(o)}: predicted</title></polyline>'
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
                f'stroke="{colors[j % 4]}" stroke-width="2"><title>{esc(o)}: measured {v:.2f} dB'
                "</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)

"""Escaping and number formatting shared by the HTML page and its SVG charts."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence


def esc(s: object) -> str:
    """`s` as HTML text or attribute value."""
    return html.escape(str(s), quote=True)


def fmt(v: float | None, kind: str = "db") -> str:
    """A value for display: `db`, `cos`, `pct`, `bits`, or `g` (4 significant digits); – when missing."""
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


def finite(values: Sequence[float | None]) -> list[float]:
    """The finite values of `values`."""
    return [v for v in values if v is not None and math.isfinite(v)]

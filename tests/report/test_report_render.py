"""HTML (self-contained; rendered by headless Chromium when present), JSON and terminal output."""

from __future__ import annotations

import dataclasses
import html
import importlib.resources
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_models import digits_converted, digits_data, preset

from onnxquant.calib.engine import collect_stats
from onnxquant.report import SuggestOptions, build_report, plan_suggestion, render_html, render_text
from onnxquant.report.render_html import ASSETS


@pytest.fixture(scope="module")
def full_report():
    r = digits_converted(4, 4, "laplace")
    stats = collect_stats(
        r.float_model, sorted(r.plan.activations), digits_data("calib"), histograms=True, moments=True
    )
    data = digits_data("eval")
    rep = build_report(
        r.float_model,
        r.model,
        data,
        labels=data.extra("labels"),
        sensitivity_samples=64,
        stats=stats,
        table=r.table,
    )
    options = SuggestOptions(preset(), target_sqnr=rep.outputs[0].sqnr_db + 6)
    return dataclasses.replace(rep, suggestion=plan_suggestion(rep, options))


def test_html_is_self_contained(full_report):
    page = render_html(full_report)
    assert page.startswith("<!DOCTYPE html>")
    for pattern in (
        r"https?://",
        r"<script[^>]*\bsrc\s*=",
        r"<link\b",
        r"@import",
        r"url\(",
        r"<img\b",
        r"<iframe\b",
    ):
        assert not re.search(pattern, page, re.IGNORECASE), pattern
    n_svg = len(re.findall(r'<svg class="plot"', page))
    assert n_svg == 3 + len(full_report.calibration)  # layers, suggestion curve, entropy, one per activation
    for w, h in re.findall(r'<svg class="plot" width="(\d+)" height="(\d+)"', page):
        assert int(w) > 100 and int(h) > 100
    for la in full_report.layers:
        assert f'<td class="name">{la.shown}</td>' in page
    assert 'class="sortable" id="layers-table"' in page and 'class="sortable" id="tensors-table"' in page
    assert "chosen: laplace" in page


def test_html_inlines_its_assets(full_report):
    page = render_html(full_report)
    folder = importlib.resources.files("onnxquant.report").joinpath("assets")
    assert sorted(ASSETS) == sorted(p.name for p in folder.iterdir())  # every asset file is used
    for name in ASSETS:
        text = folder.joinpath(name).read_text(encoding="utf-8")
        assert len(text) > 50 and text in page, name
    assert f"<style>{folder.joinpath('report.css').read_text(encoding='utf-8')}</style>" in page
    assert page.endswith(
        f"<script>{folder.joinpath('report.js').read_text(encoding='utf-8')}</script></main></body></html>"
    )
    # the suggestion's rule file is shown as written
    assert html.escape(full_report.suggestion.rules_text(), quote=True) in page


def test_html_escapes_names(full_report):
    page = render_html(
        dataclasses.replace(full_report, notes=(*full_report.notes, "<script>alert(1)</script>"))
    )
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_text_summary(full_report):
    text = render_text(full_report)
    lines = text.splitlines()
    assert lines[0].startswith("onnxquant report: 450 samples, isolated sensitivity on 64")
    assert any(line.startswith("logits") for line in lines)
    worst = full_report.worst(1)[0].name
    assert any(line.startswith(worst) for line in lines)
    assert "suggested: keep" in text
    assert len(lines) < 30


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2000",
]


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary")
def test_browser_renders_report(full_report, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(render_html(full_report), encoding="utf-8")
    png = tmp_path / "report.png"
    base = [_chromium(), *CHROMIUM_FLAGS]
    shot = subprocess.run(
        [*base, f"--user-data-dir={tmp_path / 'profile1'}", f"--screenshot={png}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    dom = subprocess.run(
        [*base, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # the inline script ran to the end, and no script error was recorded
    assert re.search(r'<body[^>]*data-ready="1"', html), html[:500]
    assert not re.search(r"<html[^>]*data-js-error", html)
    assert "<title>onnxquant report</title>" in html
    sizes = re.search(r'data-plot-sizes="([^"]*)"', html).group(1).split(",")
    assert len(sizes) == 3 + len(full_report.calibration)
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        assert w > 100 and h > 100, sizes
    # the screenshot is a real page: big enough, many colours, not blank
    assert png.stat().st_size > 20_000
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 2000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50
    lo, hi = zip(*img.getextrema())
    assert min(lo) < 60 and max(hi) > 200

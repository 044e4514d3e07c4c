"""The accuracy diff report: per-layer error, sensitivity, output agreement, calibration histograms.

`build_report(float_model, quant_model, data)` computes an immutable `Report` (with
`suggest=SuggestOptions(...)` also its rule suggestion); `render_html`, `render_text` and `Report.to_json`
present it.
"""

from __future__ import annotations

from onnxquant.report.core import LayerResult, OutputResult, Report, TensorResult, build_report
from onnxquant.report.render_html import render_html
from onnxquant.report.render_text import render_text
from onnxquant.report.suggest import Suggestion, SuggestOptions, plan_suggestion, predict_output_sqnr

__all__ = [
    "LayerResult",
    "OutputResult",
    "Report",
    "SuggestOptions",
    "Suggestion",
    "TensorResult",
    "build_report",
    "plan_suggestion",
    "predict_output_sqnr",
    "render_html",
    "render_text",
]

"""The accuracy diff report: per-layer error, sensitivity, output agreement, calibration histograms.

`build_report(float_model, quant_model, data)` computes a `Report`; `render_html`, `render_text` and
`Report.to_json` present it; `suggest_rules` turns its ranking into a rule-file override.
"""

from __future__ import annotations

from onnxquant.report.core import LayerResult, OutputResult, Report, TensorResult, build_report
from onnxquant.report.render_html import render_html
from onnxquant.report.render_text import render_text
from onnxquant.report.suggest import Suggestion, plan_suggestion, predict_output_sqnr, suggest_rules

__all__ = [
    "LayerResult",
    "OutputResult",
    "Report",
    "Suggestion",
    "TensorResult",
    "build_report",
    "plan_suggestion",
    "predict_output_sqnr",
    "render_html",
    "render_text",
    "suggest_rules",
]

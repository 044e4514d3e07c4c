"""The low-bit stages of `convert` that read the calibration data again: SmoothQuant before calibration,
GPTQ rounding after it (the empirical bias correction, calib/output_bias.py, runs on the Q/DQ model in
`convert`). Each returns the note `convert` prints about what it did."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx

from onnxquant.calib.gptq import apply_gptq
from onnxquant.calib.smooth import smooth
from onnxquant.errors import BadDataError
from onnxquant.passes.plan import QuantPlan, plan_quantization
from onnxquant.rules import Rules
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)

Batches = Iterable[dict[str, np.ndarray]]


def require_data(data: Batches | None, stage: str) -> Batches:
    if data is None:
        raise BadDataError(
            f"convert: {stage} needs calibration data; accepted: --calib-data PATH or --calib-reader"
        )
    return data


def smoothed(
    model: onnx.ModelProto, rules: Rules, data: Batches | None, progress: bool
) -> tuple[onnx.ModelProto, QuantPlan, str]:
    """SmoothQuant (calib/smooth.py) on the folded model, and the plan of the smoothed graph."""
    smoothed, results = smooth(
        model,
        require_data(data, "SmoothQuant"),
        alpha=rules.smooth_quant,
        widths=(rules.activations.bits, rules.weights.bits),
        progress=progress,
    )
    for r in results:
        log.info("SmoothQuant %s: %s", r.tensor, r.how)
    note = (
        f"SmoothQuant (alpha {rules.smooth_quant:g}): {sum(r.applied for r in results)} of {len(results)} "
        "MatMul/Gemm inputs smoothed"
    )
    return smoothed, plan_quantization(smoothed, rules), note


def gptq_rounded(
    model: onnx.ModelProto, plan: QuantPlan, table: CalibrationTable, data: Batches | None, progress: bool
) -> tuple[onnx.ModelProto, str]:
    """The folded model with its GPTQ layers' weights on their quantization grid (calib/gptq.py)."""
    chosen = {d.name for d in plan.nodes if d.quantize and d.weight and d.weights.rounding == "gptq"}
    rounded, results = apply_gptq(
        model, plan, table, require_data(data, "GPTQ rounding"), nodes=chosen, progress=progress
    )
    for r in results:
        if r.skipped is not None:
            log.info("GPTQ: %s kept round-to-nearest: %s", r.node, r.skipped)
        else:
            log.debug("GPTQ: %s output error proxy %.3g -> %.3g", r.node, r.rtn_error, r.gptq_error)
    done = sum(r.skipped is None for r in results)
    kept = f" ({len(chosen) - done} round-to-nearest: -v says why)" if done < len(chosen) else ""
    return rounded, f"GPTQ rounded {done} of {len(chosen)} layers{kept}"

"""Lowering a QDQ model to an integer plan.

The model is imported as a graph-surgeon graph (`onnxquant.ir`); `base.Context` folds the constants (weights
stored quantized, or in float behind a constant Q → DQ pair) and records every DequantizeLinear of an
activation. Each remaining node whose op is in `LOWERINGS` is offered to its family's ``lower(ctx, node)``:

* `gemm`: ``DQ(x) → {Conv, ConvTranspose, Gemm, MatMul}(DQ(w) [, bias]) [→ Add(bias)] [→ Relu | Clip]* → Q``,
  an int32 accumulation proven not to overflow, then requantization;
* `add`: ``DQ(a) + DQ(b) [→ Relu | Clip]* → Q``, both operands requantized to the output scale;
* `pool`: ``DQ → {MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool} → Q``, pooling sums stay integer;
* `move`: ``DQ → {Concat, Reshape, Flatten, Transpose, Squeeze, Unsqueeze} → Q``, codes moved and requantized
  only where the output (scale, zero point) differs from the input's.

Every intermediate tensor of a pattern must have exactly one consumer and must not be a graph output. A family
raises `Refused` with the reason when its pattern does not apply; the node then runs in float between a
DequantizeLinear and a QuantizeLinear, and the plan records why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx
import onnx_graphsurgeon as gs

from onnxquant import ir
from onnxquant.errors import BadModelError
from onnxquant.runtime import plan as P
from onnxquant.runtime.lower import add, gemm, move, pool
from onnxquant.runtime.lower.base import QDQ_OPS, Context, QInfo, Refused

__all__ = ["LOWERINGS", "Context", "QInfo", "Refused", "lower"]

log = logging.getLogger(__name__)

LOWERINGS: dict[str, Callable[[Context, gs.Node], P.Step]] = {
    "Conv": gemm.lower,
    "ConvTranspose": gemm.lower,
    "Gemm": gemm.lower,
    "MatMul": gemm.lower,
    "Add": add.lower,
    "MaxPool": pool.lower,
    "AveragePool": pool.lower,
    "GlobalAveragePool": pool.lower,
    "GlobalMaxPool": pool.lower,
    "Concat": move.lower,
    "Reshape": move.lower,
    "Flatten": move.lower,
    "Transpose": move.lower,
    "Squeeze": move.lower,
    "Unsqueeze": move.lower,
}


OPERATOR_FORM = ("ConvInteger", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul")


def lower(model: onnx.ModelProto) -> P.Plan:
    """Lower a QDQ model to an integer plan; a BadModelError when the model has no Q/DQ nodes."""
    if not {n.op_type for n in model.graph.node} & set(QDQ_OPS):
        raise BadModelError(
            f"{model.graph.name or 'model'}: has no QuantizeLinear/DequantizeLinear nodes; "
            "accepted: a QDQ model (onnxquant convert, or onnxruntime quantize_static with "
            "QuantFormat.QDQ)"
        )
    _refuse_operator_form(model)
    ctx = Context(model)
    ctx.fold_constants()
    matched: dict[str, P.Step] = {}
    reasons: dict[str, str] = {}
    for node in ctx.graph.nodes:
        if node.name in ctx.status or node.op in QDQ_OPS:
            continue
        family = LOWERINGS.get(node.op)
        if family is None:
            reasons[node.name] = f"no integer kernel for {node.op}"
            continue
        try:
            matched[node.name] = family(ctx, node)
        except Refused as exc:
            reasons[node.name] = str(exc)
    steps: list[P.Step] = []
    for node in ctx.graph.nodes:
        if node.name in matched:
            steps.append(matched[node.name])
        elif node.name not in ctx.status:
            step = _boundary(ctx, node, reasons.get(node.name))
            if step is not None:
                steps.append(step)
    status = [ctx.status[n.name] for n in ctx.graph.nodes]
    used = {i for s in steps for i in s.inputs} | set(ctx.graph_outputs)
    consts = {k: v for k, v in ctx.consts.items() if k in used}
    plan = P.Plan(
        steps,
        consts,
        ctx.inputs,
        ctx.graph_outputs,
        ctx.int_dtypes,
        status,
        list(ctx.model.opset_import),
        ctx.model.ir_version,
    )
    log.info("%s", plan.report_lines()[0])
    return plan


def _refuse_operator_form(model: onnx.ModelProto) -> None:
    """A model already quantized in operator form (QLinearConv, MatMulInteger, ...) computes its integer work
    in ops that are neither Q/DQ nor float: there is no QDQ graph to lower, and nothing to compare with."""
    for node in model.graph.node:
        if node.op_type in OPERATOR_FORM or node.op_type.startswith("QLinear"):
            raise BadModelError(
                f"{model.graph.name or 'model'}: node {node.name or node.op_type!r} is {node.op_type}, an "
                "already quantized operator (QOperator format); accepted: a QDQ model (onnxquant convert, "
                "or onnxruntime quantize_static with QuantFormat.QDQ)"
            )


def _boundary(ctx: Context, node: gs.Node, reason: str | None) -> P.Step | None:
    """The step of a node outside every integer step: a DequantizeLinear leaving integer codes (None when
    only integer steps read it), a QuantizeLinear entering them, or a float fallback."""
    name, op, out = node.name, node.op, node.outputs[0].name
    if op == "DequantizeLinear" and out in ctx.dq:
        users = ir.consumers(node.outputs[0])
        if out in ctx.graph_outputs or any(u.name not in ctx.status for u in users):
            src, qi = ctx.dq[out]
            ctx.set(node, P.KIND_DEQUANTIZE, name)
            return P.DequantizeStep(
                name,
                op,
                [src],
                [out],
                [name],
                kind=P.KIND_DEQUANTIZE,
                scale=qi.scale,
                zero_point=qi.zero_point,
                axis=qi.axis,
            )
        ctx.set(node, P.KIND_INTEGER, ",".join(ctx.status[u.name].step for u in users))
        return None
    if op == "QuantizeLinear" and out in ctx.ranges:
        qi = ctx.qinfo(node)
        ctx.set(node, P.KIND_QUANTIZE, name)
        return P.QuantizeStep(
            name,
            op,
            [node.inputs[0].name],
            [out],
            [name],
            kind=P.KIND_QUANTIZE,
            scale=qi.scale,
            zero_point=qi.zero_point,
            axis=qi.axis,
            lo=qi.range[0],
            hi=qi.range[1],
        )
    reason = reason or (
        f"{op} parameters are not constant" if op.endswith("Linear") else f"no integer kernel for {op}"
    )
    ctx.set(node, P.KIND_FLOAT, name, reason)
    return P.FloatStep(
        name,
        op,
        [t.name for t in node.inputs],
        [t.name for t in node.outputs],
        [name],
        kind=P.KIND_FLOAT,
        info=reason,
        node=ctx.protos[name],
    )

"""Data movement on codes: ``DQ → {Concat, Reshape, Flatten, Transpose, Squeeze, Unsqueeze} → Q`` becomes a
`MoveStep`.

The op moves codes unchanged; an input whose (scale, zero point) differs from the output Q's is re-coded
``q' = clip(round(s (q − z) / s') + z', lo, hi)``. The output must feed the Q directly (no activation).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxquant.runtime import plan as P
from onnxquant.runtime.lower.base import Chain, Context, Refused

OPS = ("Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


def lower(ctx: Context, node: gs.Node) -> P.MoveStep:
    """Lower one data-movement node and its Q; Refused when shapes or axes are not constant."""
    op = node.op
    data_inputs = list(node.inputs) if op == "Concat" else [node.inputs[0]]
    srcs, params = [], []
    for tensor in data_inputs:
        src, qi = ctx.act(tensor, "input")
        srcs.append(src)
        params.append(qi.scalar())
    attrs = _attrs(ctx, node)
    q = ctx.single_consumer(node.outputs[0])
    if q.op != "QuantizeLinear":
        raise Refused(f"output feeds {q.op}, not QuantizeLinear")
    chain = Chain(q, -np.inf, np.inf, None, [])
    yq, lo, hi = ctx.out(chain)
    step = P.MoveStep(node.name, op, srcs, [], [], srcs=params, out=yq.scalar(), lo=lo, hi=hi, attrs=attrs)
    return ctx.finish(step, node, chain, lo, hi, yq.dtype)


def _attrs(ctx: Context, node: gs.Node) -> dict:
    op = node.op
    if op == "Concat":
        return {"axis": int(node.attrs["axis"])}
    if op == "Flatten":
        return {"axis": int(node.attrs.get("axis", 1))}
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return {"perm": list(perm) if perm is not None else None}
    if op == "Reshape":
        shape = ctx.const(node.inputs[1])
        if shape is None:
            raise Refused("Reshape shape is not constant")
        return {
            "shape": [int(v) for v in np.asarray(shape).reshape(-1)],
            "allowzero": int(node.attrs.get("allowzero", 0)),
        }
    # Squeeze / Unsqueeze: axes attribute (opset < 13) or constant input
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = ctx.const(node.inputs[1])
        if value is None:
            raise Refused(f"{op} axes are not constant")
        axes = np.asarray(value).reshape(-1).tolist()
    return {"axes": None if axes is None else [int(a) for a in axes]}

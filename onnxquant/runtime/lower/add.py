"""Quantized Add: ``DQ(a) + DQ(b) [→ Relu | Clip]* → Q`` becomes an `AddStep`.

``c = clip(round((s_a (a − z_a) + s_b (b − z_b)) / s_c) + z_c, lo, hi)``: both operands are requantized to the
output's scale (the backends reproduce ONNX Runtime's QLinearAdd arithmetic, see `numpy_backend`). Either
operand may be a per-tensor quantized constant; its codes travel with the step.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxquant.runtime import plan as P
from onnxquant.runtime.lower.base import Context, Refused

OPS = ("Add",)


def lower(ctx: Context, node: gs.Node) -> P.AddStep:
    """Lower one Add with its output chain; Refused when an operand is not quantized per tensor."""
    srcs, params, const = [], [], {}
    for pos, tensor in enumerate(node.inputs[:2]):
        if tensor.name in ctx.weights:
            codes, qi = ctx.weights[tensor.name]
            if not qi.per_tensor:
                raise Refused("constant Add operand is quantized per channel")
            key = f"{node.name}::const{pos}"
            const[key] = codes
            srcs.append(key)
        else:
            src, qi = ctx.act(tensor, "operand")
            srcs.append(src)
        params.append(qi.scalar())
    chain = ctx.chain(node.outputs[0], allow_bias=False)
    yq, lo, hi = ctx.out(chain)
    step = P.AddStep(
        node.name, "Add", srcs, [], [], a=params[0], b=params[1], out=yq.scalar(), lo=lo, hi=hi, const=const
    )
    return ctx.finish(step, node, chain, lo, hi, yq.dtype)

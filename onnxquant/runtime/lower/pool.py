"""Pooling on codes: ``DQ → {MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool} [→ Relu | Clip]* → Q``
becomes a `PoolStep`.

Max pooling commutes with the monotone dequantization, so it runs on codes and only re-codes when the output
(scale, zero point) differs. Average pooling sums ``x − z_x`` in integers and requantizes by
``s_x / (s_y · n)`` for a window of ``n`` elements (ONNX Runtime's float arithmetic in float mode).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxquant import ir
from onnxquant.runtime import plan as P
from onnxquant.runtime.lower.base import Context, Refused

OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def lower(ctx: Context, node: gs.Node) -> P.PoolStep:
    """Lower one 1-D or 2-D pooling node with its output chain; Refused for 3-D, dilated AveragePool or a
    used MaxPool indices output."""
    if len(node.outputs) > 1 and node.outputs[1].name and ir.consumers(node.outputs[1]):
        raise Refused("MaxPool indices output is used")
    src, xq = ctx.act(node.inputs[0], "input")
    attrs = {}
    if not node.op.startswith("Global"):
        kernel = list(node.attrs["kernel_shape"])
        nk = len(kernel)
        if nk not in (1, 2):
            raise Refused(f"{nk}-D pooling is not lowered")
        attrs = {
            "kernel": kernel,
            "strides": list(node.attrs.get("strides", [1] * nk)),
            "pads": list(node.attrs.get("pads", [0] * 2 * nk)),
            "dilations": list(node.attrs.get("dilations", [1] * nk)),
            "ceil_mode": int(node.attrs.get("ceil_mode", 0)),
            "count_include_pad": int(node.attrs.get("count_include_pad", 0)),
            "auto_pad": node.attrs.get("auto_pad", "NOTSET"),
        }
        if node.op == "AveragePool" and any(d != 1 for d in attrs["dilations"]):
            raise Refused("dilated AveragePool is not lowered")
    chain = ctx.chain(node.outputs[0], allow_bias=False)
    yq, lo, hi = ctx.out(chain)
    step = P.PoolStep(
        node.name, node.op, [src], [], [], src=xq.scalar(), out=yq.scalar(), lo=lo, hi=hi, attrs=attrs
    )
    return ctx.finish(step, node, chain, lo, hi, yq.dtype)

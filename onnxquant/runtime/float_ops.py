"""Float fallback: one ONNX node run by ONNX Runtime in a single-node model (sessions cached per dtype
set)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from onnxquant.errors import BadModelError, first_line
from onnxquant.model import make_session
from onnxquant.runtime import plan as P

log = logging.getLogger(__name__)


class NodeRunner:
    """Builds and caches a single-node ONNX Runtime session for each float step."""

    def __init__(self):
        self._sessions: dict[tuple, object] = {}

    def run(self, plan: P.Plan, step: P.FloatStep, args: list) -> list[np.ndarray]:
        names, feeds = [], {}
        for name, value in zip(step.inputs, args):
            if name and name not in feeds:
                names.append(name)
                feeds[name] = np.asarray(value)
        key = (id(step), tuple((feeds[n].dtype.str, tuple(_declared_shape(feeds[n]))) for n in names))
        sess = self._sessions.get(key)
        if sess is None:
            sess = self._sessions[key] = self._build(plan, step, names, feeds)
        wanted = [o for o in step.outputs if o]
        try:
            values = dict(zip(wanted, sess.run(wanted, feeds)))
            return [values.get(o) for o in step.outputs]
        except Exception as exc:
            raise BadModelError(
                f"node {step.name!r} ({step.op}): ONNX Runtime failed in the float fallback "
                f"({first_line(exc)})"
            ) from exc

    @staticmethod
    def _build(plan: P.Plan, step: P.FloatStep, names: list[str], feeds: dict):
        inputs = [
            helper.make_tensor_value_info(
                n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype), _declared_shape(feeds[n])
            )
            for n in names
        ]
        outputs = [onnx.ValueInfoProto(name=o) for o in step.outputs if o]
        graph = helper.make_graph([step.node], f"fallback_{step.name}", inputs, outputs)
        model = helper.make_model(graph, opset_imports=plan.opsets, ir_version=plan.ir_version)
        return make_session(model, optimize=False)


def _declared_shape(value: np.ndarray) -> list[int | None]:
    """The shape a fallback model declares for an input: dynamic dims, except for the length of a 1-D integer
    tensor (a shape operand such as Resize `sizes` or Reshape `shape`), which ONNX Runtime's shape inference
    reads as 0 when it is not given and then rejects the node."""
    if value.ndim == 1 and value.dtype.kind in "iu":
        return [int(value.shape[0])]
    return [None] * value.ndim

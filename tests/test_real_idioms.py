"""What real exports do that toy models don't: work inside control flow is reported as left float."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxquant import api
from onnxquant.model import infer_shapes


def if_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (4, 4)).astype(np.float32), "w")
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["b"])],
        "then",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_work_inside_control_flow_is_reported_as_left_float():
    feeds = {"x": np.ones((2, 4), np.float32), "c": np.array(True)}
    result = api.convert(if_model(), api.load_rules("default"), data=[feeds])
    assert "node 'branch' (If): 3 nodes in its subgraphs are not quantized" in result.notes

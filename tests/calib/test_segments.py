"""Segmented calibration runs: the same tensors as one ONNX Runtime session exposing them all, a bounded
amount of them per segment, and nothing computed that no calibrated tensor needs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.calib.engine import collect_stats
from onnxquant.calib.segments import SegmentedModel, node_inputs
from onnxquant.model import make_session, with_outputs

RNG = np.random.default_rng(0)


def _init(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def branchy_model() -> onnx.ModelProto:
    """Conv chain with a residual Add, a Shape -> Reshape path (int64 tensors cross cuts), an If whose
    branches read a tensor of the enclosing graph, and a head that feeds no calibrated tensor."""
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["c2"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["c2"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["xs", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
        helper.make_node("Add", ["branch", "r1"], ["res"], name="residual"),
        helper.make_node("Shape", ["res"], ["shp"], name="shape"),
        helper.make_node("Reshape", ["res", "shp"], ["res2"], name="reshape"),
        helper.make_node("Conv", ["res2", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        [
            _init("w1", (8, 4, 3, 3)),
            _init("w2", (8, 8, 3, 3)),
            _init("w3", (8, 8, 3, 3)),
            _init("wf", (5, 8)),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


CALIBRATED = ["r1", "c2", "res2", "c3"]


def batch(n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 16, 16)).astype(np.float32)}


def test_node_inputs_include_what_subgraphs_read_from_the_enclosing_graph():
    model = branchy_model()
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    assert node_inputs(if_node) == {"cond", "c2"}


@pytest.mark.parametrize("budget", [1, 4 * 8 * 16 * 16 * 4, 2**30])
def test_segments_give_the_tensors_one_session_gives(budget):
    model, feed = branchy_model(), batch()
    reference = make_session(with_outputs(model, CALIBRATED)).run(CALIBRATED, feed)
    seg = SegmentedModel(model, CALIBRATED, feed, budget)
    got = {}
    for outs in seg.run(feed):
        got.update(outs)
    for name, ref in zip(CALIBRATED, reference):
        np.testing.assert_array_equal(got[name], ref)
    # another batch size than the one the segments were planned at
    other = batch(3, seed=1)
    reference = make_session(with_outputs(model, CALIBRATED)).run(CALIBRATED, other)
    got = {k: v for outs in seg.run(other) for k, v in outs.items()}
    np.testing.assert_array_equal(got["c3"], reference[-1])


def test_each_segment_holds_at_most_the_budget_and_the_head_is_not_run():
    model, feed = branchy_model(), batch()
    one_tensor = 4 * 8 * 16 * 16 * 4  # every calibrated tensor of this model at batch 4
    seg = SegmentedModel(model, CALIBRATED, feed, budget=one_tensor)
    assert len(seg.segments) == len(CALIBRATED)
    for s, outs in zip(seg.segments, seg.run(feed)):
        assert sum(outs[t].nbytes for t in outs if t in CALIBRATED) <= one_tensor
        assert set(s.outputs) <= set(CALIBRATED) | {n for later in seg.segments for n in later.feeds}
    ran = [n for s in seg.segments for n in s.nodes]
    assert len(ran) == len(set(ran)) and not {"gap", "flatten", "fc"} & set(ran)


def test_only_runs_the_segments_the_wanted_tensors_need():
    model, feed = branchy_model(), batch()
    seg = SegmentedModel(model, CALIBRATED, feed, budget=1)
    produced = [set(outs) for outs in seg.run(feed, needed={"c2"})]
    assert "c2" in produced[-1] and not any("c3" in p for p in produced)


def test_collect_stats_is_the_same_with_any_budget():
    model, data = branchy_model(), [batch(4, s) for s in range(3)]
    small = collect_stats(model, CALIBRATED, data, moments=True, per_channel=["c3"], budget=1)
    large = collect_stats(model, CALIBRATED, data, moments=True, per_channel=["c3"], budget=2**30)
    for t in CALIBRATED:
        a, b = small[t], large[t]
        assert (a.count, a.min, a.max, a.sum, a.m2) == (b.count, b.min, b.max, b.sum, b.m2)
        np.testing.assert_array_equal(a.hist, b.hist)
    np.testing.assert_array_equal(small["c3"].ch_max, large["c3"].ch_max)

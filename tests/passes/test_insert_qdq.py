"""Q/DQ insertion: checker-clean models that ONNX Runtime runs, exact b-bit codes, int32 bias, placement."""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from onnxquant import api
from onnxquant.calib.engine import collect_stats, compute_table
from onnxquant.calib.methods import METHODS, WEIGHT_METHODS
from onnxquant.calib.weight_table import weight_entries
from onnxquant.model import load_model, make_session, with_outputs
from onnxquant.passes import PASS_NAMES
from onnxquant.passes.insert_qdq import insert_qdq
from onnxquant.quant import qrange
from onnxquant.rules import loader
from onnxquant.tables import CalibrationTable, TensorRange

DEMO = "calib_data/digits/model.onnx"
NAMES = {"pass_names": PASS_NAMES, "method_names": tuple(METHODS), "weight_method_names": WEIGHT_METHODS}


def load_rules(source=None):
    return loader.load_rules(source, **NAMES)


def parse_rules(text, where):
    return loader.parse_rules(text, where, **NAMES)


RESIDUAL = """
<ir_version: 7, opset_import: ["" : 13]>
g (float[N, 4, 6, 6] x) => (float[N, 10] y) {
  c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
  s = Add (c2, x)
  r2 = Relu (s)
  p = GlobalAveragePool (r2)
  f = Flatten (p)
  y = Gemm <transB = 1> (f, wf, bf)
}
"""


def residual_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(RESIDUAL)
    for name, shape in (
        ("w1", (4, 4, 3, 3)),
        ("b1", (4,)),
        ("w2", (4, 4, 3, 3)),
        ("b2", (4,)),
        ("wf", (10, 4)),
        ("bf", (10,)),
    ):
        model.graph.initializer.append(
            numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
        )
    return onnx.shape_inference.infer_shapes(model)


def data(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 6, 6)).astype(np.float32)


def minmax_table(model: onnx.ModelProto, plan, x: np.ndarray) -> CalibrationTable:
    """An independent min/max calibration: run the float model with every planned tensor exposed."""
    names = sorted(plan.activations)
    values = make_session(with_outputs(model, names)).run(names, {model.graph.input[0].name: x})
    entries = {
        n: TensorRange.from_range(
            v.min(), v.max(), plan.activations[n].bits, plan.activations[n].symmetric, "minmax"
        )
        for n, v in zip(names, values)
    }
    return CalibrationTable(method="minmax", bits=8, tensors=entries)


def insert(folded: onnx.ModelProto, plan, table: CalibrationTable, **weight_options):
    """Q/DQ from `table` completed with weight entries, as api.convert does."""
    table = replace(table, tensors={**weight_entries(folded, plan, **weight_options), **table.tensors})
    model, summary = insert_qdq(folded, plan, table)
    return SimpleNamespace(model=model, plan=plan, summary=summary, table=table)


def quantize(model: onnx.ModelProto, rules, x: np.ndarray):
    folded, _, plan, _ = api.prepare(model, rules)
    return insert(folded, plan, minmax_table(folded, plan, x))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_stay_in_the_b_bit_range_and_model_runs_both_ways(bits):
    model, x = residual_model(), data()
    result = quantize(model, load_rules("default").with_cli(wbits=bits, abits=bits), x)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    inits = {t.name: t for t in q.graph.initializer}
    for node in q.graph.node:
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0] in inits
            and "bias" not in node.input[0]
            and inits[node.input[0]].data_type != TensorProto.INT32
        ):
            codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            lo, hi = qrange(bits, True)
            assert lo <= codes.min() and codes.max() <= hi
            assert inits[node.input[0]].data_type == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
    quant_outs = [n.output[0] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    codes = make_session(with_outputs(q, quant_outs), optimize=False).run(quant_outs, {"x": x})
    for c in codes:
        assert c.min() >= 0 and c.max() <= 2**bits - 1
        assert c.max() >= 2**bits - 2
    full = make_session(q, optimize=True).run(None, {"x": x})[0]
    none = make_session(q, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(full, none, atol=1e-4 * np.abs(none).max())


def relative_error(bits: int) -> float:
    model, x = residual_model(), data()
    q = quantize(model, load_rules("default").with_cli(wbits=bits, abits=bits), x).model
    ref = make_session(model).run(None, {"x": x})[0]
    return float(np.abs(make_session(q).run(None, {"x": x})[0] - ref).max() / np.abs(ref).max())


def test_error_shrinks_with_every_added_bit():
    errors = [relative_error(bits) for bits in range(2, 9)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.02


def test_bias_is_int32_with_scale_sx_times_sw():
    model, x = residual_model(), data()
    q = quantize(model, load_rules("default"), x).model
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    conv = next(n for n in q.graph.node if n.op_type == "Conv" and n.output[0] == "c1")
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    bias_dq, w_dq, x_dq = dq[conv.input[2]], dq[conv.input[1]], dq[conv.input[0]]
    assert inits[bias_dq.input[0]].dtype == np.int32
    x_scale = inits[x_dq.input[1]]
    np.testing.assert_allclose(inits[bias_dq.input[1]], x_scale * inits[w_dq.input[1]], rtol=1e-6)
    b1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b1"))
    np.testing.assert_allclose(
        inits[bias_dq.input[0]] * inits[bias_dq.input[1]], b1, atol=float(inits[bias_dq.input[1]].max())
    )


def test_w8a8_lets_onnxruntime_fuse_to_integer_kernels(tmp_path):
    model = load_model(DEMO)
    x = np.load("calib_data/digits/calib.npz")["input"]
    q = quantize(model, load_rules("default"), x).model
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(q.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == 4, ops


def test_tensorrt_placement_quantizes_only_inputs_of_compute_ops_and_adds():
    model, x = residual_model(), data()
    result = quantize(model, load_rules("tensorrt").with_cli(method="minmax"), x)
    assert set(result.plan.activations) == {"x", "r1", "c2", "f"}
    q = result.model
    inits = {t.name: t for t in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].data_type == TensorProto.INT8
            assert numpy_helper.to_array(inits[node.input[2]]) == 0


def test_skip_override_leaves_the_node_float():
    model, x = residual_model(), data()
    rules = parse_rules("overrides: [{match: {op_type: Gemm}, skip: true}]", "skip.yaml")
    result = quantize(model, rules, x)
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == "wf" and gemm.input[0] == "f"
    assert "Gemm" in {op for _, op, _ in result.summary.float_nodes}
    assert any("skipped by skip.yaml override 1" in reason for _, _, reason in result.summary.float_nodes)


def test_maxpool_input_takes_the_output_range():
    model = load_model(DEMO)
    x = np.load("calib_data/digits/calib.npz")["input"]
    rules = replace(
        load_rules("default").with_cli(method="laplace", wbits=4, abits=4), depthwise_inputs="per_tensor"
    )
    folded, _, plan, _ = api.prepare(model, rules)
    assert plan.shared == {"relu2_out": "pool_out"} and not plan.equalized
    table, stats = api.calibrate(folded, plan, [{"input": x}])
    assert stats["relu2_out"] is stats["pool_out"]  # not collected: it is calibrated on the pool's statistics
    assert table.tensors["relu2_out"] == table.tensors["pool_out"]
    own_stats = collect_stats(folded, ["relu2_out", "pool_out"], [{"input": x}], moments=True)
    assert own_stats["relu2_out"].amax == own_stats["pool_out"].amax  # max pooling keeps the largest value
    own = compute_table(own_stats, {"relu2_out": (4, False)}, "laplace").tensors["relu2_out"]
    assert own.max < 0.7 * table.tensors["pool_out"].max  # its own Laplace fit would clip the maxima
    q = insert(folded, plan, table).model
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    params = {
        n.input[0].removesuffix("_clipped"): (inits[n.input[1]], inits[n.input[2]])
        for n in q.graph.node
        if n.op_type == "QuantizeLinear"
    }
    assert params["relu2_out"] == params["pool_out"]


def _spread_channels_model() -> onnx.ModelProto:
    """residual_model whose first conv's output channels span four decades (the case eq. 10–11 is for)."""
    model = residual_model()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    spread = numpy_helper.to_array(w1) * np.array([0.1, 1.0, 10.0, 100.0], np.float32)[:, None, None, None]
    w1.CopyFrom(numpy_helper.from_array(spread.astype(np.float32), "w1"))
    return model


def _fake_quant(x: np.ndarray, scale, zero, bits, signed: bool) -> np.ndarray:
    """Independent per-channel (axis 1) fake quantization: saturate(round_half_even(x / s) + z) in b bits."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    s, z = np.asarray(scale, np.float32).reshape(shape), np.asarray(zero, np.float32).reshape(shape)
    b = np.asarray(bits).reshape(shape)
    lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed else (0, 2**b - 1)
    return (np.clip(np.rint(x / s) + z, lo, hi) - z) * s


def test_activation_bit_allocation_per_channel():
    model, x = _spread_channels_model(), data(128)
    rules = load_rules("default").with_cli(method="minmax", abits=4)
    folded, _, plan, _ = api.prepare(model, rules)
    table, stats = api.calibrate(folded, plan, [{"x": x}], allocate=True)
    result = insert(folded, plan, table)
    entry = result.table.tensors["r1"]
    assert entry.axis == 1 and np.mean(entry.bits) <= 4 and entry.bits == sorted(entry.bits)
    assert entry.bits[0] < entry.bits[-1]  # the widest channel gets the most bits
    exposed = ["r1", "r1_dequantized", "r1_quantized"]  # r1: the Relu output before its Q/DQ
    r1, deq, codes = make_session(with_outputs(result.model, exposed)).run(exposed, {"x": x})
    np.testing.assert_allclose(
        deq,
        _fake_quant(r1, entry.scale, entry.zero_point, entry.bits, entry.signed),
        rtol=1e-6,
        atol=1e-6 * np.abs(r1).max(),
    )
    for c, b in enumerate(entry.bits):  # codes stay in each channel's own width
        assert codes[:, c].min() >= 0 and codes[:, c].max() <= 2**b - 1
    assert len(np.unique(codes[:, 0])) <= 2 ** entry.bits[0] < len(np.unique(codes[:, -1]))
    even = compute_table(stats, {"r1": (4, False)}, "minmax", per_channel=["r1"]).tensors["r1"]
    error = {
        name: np.mean((_fake_quant(r1, e.scale, e.zero_point, e.bits, False) - r1) ** 2)
        for name, e in (("allocated", entry), ("even", even))
    }
    assert error["allocated"] < 0.5 * error["even"], error  # same average width, less total noise
    y_ref = make_session(model).run(None, {"x": x})[0]
    y = make_session(result.model).run(None, {"x": x})[0]
    assert np.abs(y - y_ref).max() < 0.1 * np.abs(y_ref).max()

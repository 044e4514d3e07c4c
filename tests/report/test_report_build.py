"""build_report on real conversions: numbers checked against direct ONNX Runtime runs, ranking, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from report_models import (
    DIGITS,
    batches,
    convert,
    digits_converted,
    digits_data,
    digits_model,
    fragile_model,
    preset,
    random_inputs,
)

from onnxquant import api
from onnxquant.calib.engine import collect_stats
from onnxquant.errors import BadDataError, BadModelError
from onnxquant.model import make_session, with_outputs
from onnxquant.report import build_report, render_text
from onnxquant.report.metrics import compare
from onnxquant.report.qdq import analyze
from onnxquant.report.sensitivity import isolated_model


@pytest.fixture(scope="module")
def digits_report():
    r = digits_converted(4, 4)
    data = digits_data("eval")
    return r, build_report(r.float_model, r.model, data, labels=data.extra("labels"), sensitivity_samples=48)


def test_outputs_match_direct_runs(digits_report):
    r, rep = digits_report
    arrays = dict(np.load(DIGITS / "eval.npz"))
    x, labels = arrays["input"], arrays["labels"]
    yf = make_session(r.float_model).run(["logits"], {"input": x})[0]
    yq = make_session(r.model).run(["logits"], {"input": x})[0]
    out = rep.outputs[0]
    direct = compare(yf, yq)
    assert out.name == "logits" and rep.samples == len(x) == 450
    assert out.sqnr_db == pytest.approx(direct.sqnr_db, abs=0.05)
    assert out.metrics.max_abs_error == pytest.approx(direct.max_abs_error, rel=1e-3)
    assert out.top1_agreement == pytest.approx(np.mean(yf.argmax(1) == yq.argmax(1)))
    assert out.accuracy_float == pytest.approx(np.mean(yf.argmax(1) == labels))
    assert out.accuracy_quant == pytest.approx(np.mean(yq.argmax(1) == labels))
    assert out.accuracy_float > 0.95  # the demo model is trained


def test_tensors_layers_and_entropy(digits_report):
    r, rep = digits_report
    acts = {t.name: t for t in rep.tensors if t.kind == "activation"}
    weights = {t.name: t for t in rep.tensors if t.kind == "weight"}
    assert set(acts) == set(r.plan.activations)
    assert {"conv1.weight", "fc.weight"} <= set(weights)
    assert all(t.bits == 4 for t in rep.tensors)
    for t in rep.tensors:
        assert 0 < t.entropy <= t.bits + 1e-9
        assert t.accumulated is not None and t.isolated is not None
    # entropy of relu1_out codes, recomputed from the quantized model's QuantizeLinear output
    x = dict(np.load(DIGITS / "eval.npz"))["input"]
    codes = make_session(with_outputs(r.model, ["relu1_out_quantized"])).run(
        ["relu1_out_quantized"], {"input": x}
    )[0]
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    assert acts["relu1_out"].entropy == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-9)
    # weight error: the dequantized codes against the float weights, computed directly
    w = numpy_helper.to_array(next(t for t in r.float_model.graph.initializer if t.name == "conv1.weight"))
    scale = np.abs(w).reshape(len(w), -1).max(axis=1) / 7
    wq = np.clip(np.rint(w / scale[:, None, None, None]), -7, 7) * scale[:, None, None, None]
    assert weights["conv1.weight"].isolated.sqnr_db == pytest.approx(compare(w, wq).sqnr_db, abs=0.01)
    # the input's isolated error is only its own 4-bit rounding: [0, 1] in 15 steps
    xq = np.clip(np.rint(x[:48] / (1 / 15)), 0, 15) * (1 / 15)
    assert acts["input"].isolated.sqnr_db == pytest.approx(compare(x[:48], xq).sqnr_db, abs=0.05)
    names = [la.name for la in rep.layers]
    assert names[:2] == ["conv1", "conv2"] and names[-1] == "fc"
    for la in rep.layers:
        assert la.sensitivity_db is not None and la.accumulated is not None and la.isolated is not None
        # quantizing one layer alone costs less than quantizing everything
        assert la.sensitivity_db > rep.outputs[0].sqnr_db
    assert rep.worst(1)[0].sensitivity_db == min(la.sensitivity_db for la in rep.layers)
    # conv1's output is quantized after its fused Relu: accumulated error is measured there (the raw output
    # would sit inside the integer QLinearConv ONNX Runtime fuses), the last layer at the model output
    by_name = {la.name: la for la in rep.layers}
    assert by_name["conv1"].measured == "relu1_out"
    relu1_f = make_session(with_outputs(r.float_model, ["relu1_out"])).run(["relu1_out"], {"input": x})[0]
    relu1_q = make_session(with_outputs(r.model, ["relu1_out_dequantized"])).run(
        ["relu1_out_dequantized"], {"input": x}
    )[0]
    direct = compare(relu1_f, relu1_q)
    assert by_name["conv1"].accumulated.sqnr_db == pytest.approx(direct.sqnr_db, abs=0.01)
    assert by_name["conv1"].accumulated.count == direct.count == relu1_f.size
    assert by_name["fc"].measured == "logits"
    assert by_name["fc"].accumulated.sqnr_db == pytest.approx(rep.outputs[0].sqnr_db, rel=1e-9)
    doc = json.loads(json.dumps(rep.to_json(), allow_nan=False))
    assert doc["outputs"][0]["name"] == "logits" and len(doc["layers"]) == len(rep.layers)
    text = render_text(rep)
    assert "logits" in text and rep.worst(1)[0].name in text


def test_streaming_is_batch_size_independent():
    r = digits_converted(4, 4)
    a = build_report(r.float_model, r.model, digits_data(batch_size=7), sensitivity_samples=0)
    b = build_report(r.float_model, r.model, digits_data(batch_size=450), sensitivity_samples=0)
    assert a.samples == b.samples == 450
    assert a.outputs[0].sqnr_db == pytest.approx(b.outputs[0].sqnr_db, rel=1e-6)
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and ta.entropy == pytest.approx(tb.entropy, rel=1e-12)
        if ta.kind == "activation":
            assert ta.accumulated.sqnr_db == pytest.approx(tb.accumulated.sqnr_db, rel=1e-5)
    assert a.ranked_by == "accumulated" and a.sensitivity_samples == 0


def test_fragile_layer_ranks_first():
    model = fragile_model()
    r = convert(model, batches(random_inputs(128), 32), wbits=4, abits=8)
    rep = build_report(r.float_model, r.model, batches(random_inputs(96, seed=5), 40), sensitivity_samples=32)
    assert rep.sensitivity_samples == 32
    ranked = rep.worst()
    assert ranked[0].name == "fragile", [(la.name, la.sensitivity_db) for la in ranked]
    assert ranked[0].sensitivity_db < ranked[1].sensitivity_db - 3
    # and the same model with a well-behaved weight does not single it out
    r2 = convert(fragile_model(outlier=1.0), batches(random_inputs(128), 32), wbits=4, abits=8)
    rep2 = build_report(
        r2.float_model, r2.model, batches(random_inputs(96, seed=5), 40), sensitivity_samples=32
    )
    fr = next(la for la in rep2.layers if la.name == "fragile")
    assert fr.sensitivity_db > ranked[0].sensitivity_db + 6


def test_isolated_model_quantizes_only_that_layer():
    r = digits_converted(4, 4)
    g = analyze(r.model, r.float_model)
    layer = next(la for la in g.layers if la.name == "conv2")
    iso = isolated_model(r.float_model, r.model, g, layer)
    ops = [n.op_type for n in iso.model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 3  # input, weight, bias
    assert iso.inputs == {"relu1_out": next(iter(iso.inputs.values()))}


def test_labels_of_wrong_length():
    r = digits_converted(4, 4)
    with pytest.raises(BadDataError, match="449 labels for 450 samples"):
        build_report(r.float_model, r.model, digits_data(), labels=np.zeros(449, np.int64))
    # a plain list of batches has no sample count up front: found at the end of the pass
    arrays = dict(np.load(DIGITS / "eval.npz"))
    with pytest.raises(BadDataError, match="labels"):
        build_report(
            r.float_model,
            r.model,
            batches({"input": arrays["input"]}, 100),
            labels=np.zeros(451, np.int64),
            sensitivity_samples=0,
        )
    with pytest.raises(BadDataError, match="one integer class per sample"):
        build_report(r.float_model, r.model, digits_data(), labels=np.zeros((450, 3)))


def test_models_with_different_inputs_or_outputs():
    r = digits_converted(4, 4)
    other = convert(fragile_model(), batches(random_inputs(32), 32), wbits=8, abits=8)
    with pytest.raises(
        BadModelError, match="input 'input' is float .N,3,8,8. but float .N,1,8,8. in the float"
    ):
        build_report(r.float_model, other.model, digits_data())
    renamed = onnx.ModelProto()
    renamed.CopyFrom(r.model)
    renamed.graph.output[0].name = "scores"
    with pytest.raises(
        BadModelError, match=r"outputs \['scores'\] differ from the float model's \['logits'\]"
    ):
        build_report(r.float_model, renamed, digits_data())
    renamed = onnx.ModelProto()
    renamed.CopyFrom(r.model)
    renamed.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    with pytest.raises(BadModelError, match="input 'input'"):
        build_report(r.float_model, renamed, digits_data())


def test_unrelated_quant_model_reports_outputs_only():
    # same interface, but a different network: rename the float model's tensors and quantize that
    r = digits_converted(4, 4)
    foreign = onnx.ModelProto()
    foreign.CopyFrom(digits_model())
    outputs = {o.name for o in foreign.graph.output}
    inputs = {i.name for i in foreign.graph.input}
    for node in foreign.graph.node:
        node.name = "other_" + node.name
        for i, x in enumerate(node.input):
            if x not in inputs and not any(t.name == x for t in foreign.graph.initializer):
                node.input[i] = "other_" + x
        for i, x in enumerate(node.output):
            if x not in outputs:
                node.output[i] = "other_" + x
    del foreign.graph.value_info[:]
    q = convert(foreign, digits_data("calib"), 8, 8).model
    rep = build_report(r.float_model, q, digits_data(), sensitivity_samples=16)
    assert not rep.matched
    assert any("not derived" in n for n in rep.notes)
    assert rep.outputs[0].metrics.count == 4500 and rep.worst() == []
    assert all(t.accumulated is None for t in rep.tensors if t.kind == "activation")


def test_calibration_view_and_fails_under():
    r = digits_converted(4, 4, "kl")
    tensors = sorted(r.plan.activations)
    stats = collect_stats(r.float_model, tensors, digits_data("calib"), histograms=True, moments=True)
    rep = build_report(
        r.float_model, r.model, digits_data(), sensitivity_samples=0, stats=stats, table=r.table
    )
    assert set(rep.calibration) == set(tensors)
    view = rep.calibration["relu3_out"]
    assert set(view.ranges) == {"minmax", "percentile", "mse", "laplace", "gauss", "kl"}
    assert view.chosen == "kl" and view.chosen_range == pytest.approx(view.ranges["kl"])
    top = view.ranges["minmax"][1]  # the histogram ends at the upper edge of the bin holding max|x|
    assert view.lo == 0.0 and top <= view.hi <= top * (1 + 1 / 2048)
    assert view.counts.sum() == stats["relu3_out"].count
    pooled = rep.calibration["relu2_out"]  # calibrated on the statistics of the MaxPool after it
    assert pooled.chosen_range == pytest.approx(rep.calibration["pool_out"].ranges["kl"])
    assert rep.fails_under(-100) == []
    msgs = rep.fails_under(rep.outputs[0].sqnr_db + 1)
    assert len(msgs) == 1 and msgs[0].startswith("output logits: SQNR")


def test_per_channel_activation_widths_are_matched_to_the_float_model():
    rules = preset().with_cli(wbits=4, abits=4, method="laplace")
    r = api.convert(digits_model(), rules, data=digits_data("calib"), bit_alloc="activations")
    g = analyze(r.model, r.float_model)
    per_channel = {t: e for t, e in r.table.tensors.items() if e.axis == 1}
    assert per_channel and all(la.matched for la in g.layers)
    by_name = {t.name: t for t in g.activations}
    for name, entry in per_channel.items():
        qt = by_name[name]  # found behind its Max → Min clip, under the float model's name
        assert qt.matched and len(qt.chain) == 4 and qt.bits == 4
        if not entry.signed and not np.any(entry.zero_point):  # Relu outputs: codes 0 .. 2^b − 1 per channel
            assert (qt.qmin, qt.qmax) == (0, 2 ** int(np.max(entry.bits)) - 1)
    rep = build_report(r.float_model, r.model, digits_data(), sensitivity_samples=16)
    assert not any("not found alike" in n for n in rep.notes)


def _sequence_first_model() -> onnx.ModelProto:
    """Fixed batch 1, output (T, 1, C): the sequence axis first, as CRNN text recognizers export it."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((5, 6, 1, 1)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Reshape", ["c2", "shape"], ["seq"], name="flat"),
        helper.make_node("Transpose", ["seq"], ["y"], name="time_first", perm=[2, 0, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 1, 5])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.array([1, 5, 32], np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_isolated_sensitivity_of_a_sequence_first_output_with_batch_one():
    model = _sequence_first_model()
    x = np.random.default_rng(4).standard_normal((6, 3, 4, 8)).astype(np.float32)
    result = api.convert(model, None, data={"x": x}, wbits=4, abits=8, method="minmax")
    report = build_report(
        result.float_model, result.model, api.as_data({"x": x}, model), sensitivity_samples=2
    )
    assert report.ranked_by == "sensitivity" and {la.name for la in report.worst()} >= {"conv1", "conv2"}
    f = make_session(result.float_model)
    q = make_session(result.model)
    ref = np.concatenate([f.run(None, {"x": x[i : i + 1]})[0] for i in range(6)])
    got = np.concatenate([q.run(None, {"x": x[i : i + 1]})[0] for i in range(6)])
    expected = 10 * np.log10(
        (ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum()
    )
    assert abs(report.output_sqnr()["y"] - expected) < 0.01

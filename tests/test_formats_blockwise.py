"""Block-wise weights (granularity per_block): ranges per block against a hand-written loop over blocks, the
stored DequantizeLinear against a hand-written block fake quantization (run in ONNX Runtime), the table's
N-D scale lists read back, and the stored size in convert's summary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxquant import api
from onnxquant.calib.blocks import block_range, stored_bits
from onnxquant.cli import main
from onnxquant.errors import BadDataError
from onnxquant.model import make_session, with_outputs
from onnxquant.tables import CalibrationTable

RNG = np.random.default_rng(7)


def reference_blocks(w: np.ndarray, axis: int, size: int, fn) -> np.ndarray:
    """`fn(values of one block)` for every block, by an explicit loop over the other axes and the blocks."""
    moved = np.moveaxis(w, axis, -1)
    n = moved.shape[-1]
    out = np.empty((*moved.shape[:-1], -(-n // size)))
    for index in np.ndindex(*moved.shape[:-1]):
        for j in range(out.shape[-1]):
            out[(*index, j)] = fn(moved[index][j * size : (j + 1) * size])
    return np.moveaxis(out, -1, axis)


def mse_amax(values: np.ndarray, bits: int) -> float:
    """Brute force over f = 1/100..1 of the symmetric range f·max|v| with the smallest squared error."""
    qmax = 2 ** (bits - 1) - 1
    best, best_amax = np.inf, 0.0
    amax = float(np.abs(values).max())
    for k in range(1, 101):
        s = max(amax * k / 100 / qmax, np.finfo(np.float64).tiny)
        err = float(((values - s * np.clip(np.rint(values / s), -qmax - 1, qmax)) ** 2).sum())
        if err < best:
            best, best_amax = err, amax * k / 100
    return best_amax


@pytest.mark.parametrize(
    ("shape", "axis", "size"), [((8, 40, 3, 3), 1, 16), ((70, 6), 0, 32), ((5, 64), 1, 32)]
)
def test_block_ranges_are_those_of_each_block(shape, axis, size):
    w = RNG.standard_normal(shape).astype(np.float32)
    lo, hi = block_range(w, axis, size, 4, "minmax", symmetric=True)
    np.testing.assert_array_equal(lo, reference_blocks(w, axis, size, np.min))
    np.testing.assert_array_equal(hi, reference_blocks(w, axis, size, np.max))
    lo, hi = block_range(w, axis, size, 4, "mse", symmetric=True)
    want = reference_blocks(w.astype(np.float64), axis, size, lambda v: mse_amax(v, 4))
    np.testing.assert_allclose(np.maximum(-lo, hi), want, rtol=1e-12)


def matmul_conv_model(k: int = 64, n: int = 16, cin: int = 40) -> onnx.ModelProto:
    """x (N, k) → MatMul W1 (k, n); y (N, cin, 6, 6) → Conv W2 (4, cin, 3, 3); each weight has an outlier
    input row."""
    w1 = RNG.standard_normal((k, n)).astype(np.float32)
    w1[3] *= 30  # an outlier input row: per channel it spoils every channel, per block one block
    w2 = RNG.standard_normal((4, cin, 3, 3)).astype(np.float32)
    w2[:, 5] *= 30
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm"),
            helper.make_node("Conv", ["y", "w2"], ["b"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cin, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, 4, 4]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def data(model: onnx.ModelProto, count: int = 16) -> dict[str, np.ndarray]:
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return {k: RNG.standard_normal((count, *v[1:])).astype(np.float32) for k, v in shapes.items()}


def convert(model, bits: int, block: int | None, **cli):
    rules = api.resolve_rules("default", wbits=bits, abits=8, method="minmax").with_cli(
        block_size=block, **cli
    )
    return api.convert(model, rules, data=data(model))


@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_runtime_dequantizes_each_block_with_its_own_scale(bits):
    model = matmul_conv_model()
    result = convert(model, bits, 16)
    session = make_session(with_outputs(result.model, ["w1_dequantized", "w2_dequantized"]), optimize=False)
    got = dict(zip(["w1", "w2"], session.run(["w1_dequantized", "w2_dequantized"], data(model, 1))))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qmax = 2 ** (bits - 1) - 1
    for name, axis in (("w1", 0), ("w2", 1)):
        w = weights[name]
        scale = reference_blocks(w, axis, 16, lambda v: np.float32(np.abs(v).max() / qmax))
        scale = scale.astype(np.float16)  # block scales are stored as float16, codes rounded with them
        s = np.repeat(scale, 16, axis=axis)[tuple(slice(0, d) for d in w.shape)].astype(np.float32)
        want = np.clip(np.rint(w / s), -qmax - 1, qmax) * s
        np.testing.assert_array_equal(got[name], want.astype(np.float32))
    dq = {n.output[0]: n for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
    assert [a.i for a in dq["w1_dequantized"].attribute if a.name == "block_size"] == [16]
    assert len(dq["w1_dequantized"].input) == 2  # symmetric: no zero point stored
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert stored["w1_quantized"] == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
    assert stored["w1_scale"] == TensorProto.FLOAT16


def sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / ((reference - got) ** 2).sum()))


def test_blocks_beat_channels_on_an_outlier_row_in_onnx_runtime():
    model = matmul_conv_model()
    feed = data(model, 8)
    reference = make_session(model).run(None, feed)
    scores = {}
    for block in (None, 16):
        quant = make_session(convert(model, 4, block).model).run(None, feed)  # all optimizations on
        scores[block] = [sqnr(r, q) for r, q in zip(reference, quant)]
    assert all(b > c + 3 for b, c in zip(scores[16], scores[None])), scores


def test_table_holds_block_lists_and_reads_back():
    model = matmul_conv_model()
    result = convert(model, 4, 32)
    entry = result.table.tensors["w2"]
    assert entry.block_size == 32 and entry.axis == 1
    assert np.shape(entry.scale) == (4, 2, 3, 3) and np.shape(entry.zero_point) == (4, 2, 3, 3)
    back = CalibrationTable.from_json(result.table.to_json())
    assert back == result.table
    back.check_shapes(model)
    bad = result.table.to_json()
    bad["tensors"]["w2"]["scale"] = bad["tensors"]["w2"]["scale"][:3]
    bad["tensors"]["w2"]["min"] = bad["tensors"]["w2"]["min"][:3]
    bad["tensors"]["w2"]["max"] = bad["tensors"]["w2"]["max"][:3]
    bad["tensors"]["w2"]["amax"] = bad["tensors"]["w2"]["amax"][:3]
    bad["tensors"]["w2"]["zero_point"] = bad["tensors"]["w2"]["zero_point"][:3]
    with pytest.raises(BadDataError, match="block-wise scale of shape"):
        CalibrationTable.from_json(bad).check_shapes(model)
    ragged = result.table.to_json()
    ragged["tensors"]["w1"]["scale"][0] = [1.0]
    with pytest.raises(BadDataError, match="w1"):
        CalibrationTable.from_json(ragged)


def test_stored_bits_count_codes_scales_and_zero_points():
    assert stored_bits((64, 16), 0, 32, 4, signed=True) == 4 + 32 / 32
    assert stored_bits((70, 16), 0, 32, 4, signed=True) == (70 * 16 * 4 + 3 * 16 * 32) / (70 * 16)
    assert stored_bits((64, 16), 0, 32, 4, signed=False) == 4 + (32 + 4) / 32
    assert stored_bits((64, 16), 0, 32, 4, signed=True, scale_bits=16) == 4 + 16 / 32


def test_cli_summary_reports_bits_per_weight_stored(tmp_path):
    model = matmul_conv_model(k=64, cin=64)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **data(model))
    args = ["convert", tmp_path / "m.onnx", "--wbits", "4", "--abits", "8", "--block-size", "32"]
    args += ["--calib-data", tmp_path / "calib.npz", "-o", tmp_path / "q.onnx"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    # MatMul (64, 16): 4 + 16/32 bits (float16 scales); Conv (4, 64, 3, 3): the same, 2 blocks of 32 per
    # kernel position
    assert "weights quantized: 2 at 4 bits (per block 32: 4.5 bits/weight stored)" in result.output
    assert "weights stored: 4.50 bits/weight" in result.output  # counted from the written model's arrays


def test_scales_outside_float16s_normal_range_stay_float32():
    model = matmul_conv_model()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1e-6), t.name))
    result = convert(model, 4, 16)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert stored["w1_scale"] == TensorProto.FLOAT and stored["w2_scale"] == TensorProto.FLOAT
    assert "Cast" not in [n.op_type for n in result.model.graph.node]


def test_a_weight_whose_input_axis_is_shorter_than_a_block_is_quantized_per_channel(tmp_path):
    """A depthwise Conv (1 input channel per group) and a MatMul with K = 8 < 16 fall back to per channel:
    blocks there would cost a scale per few weights."""
    w1 = RNG.standard_normal((8, 16)).astype(np.float32)
    w2 = RNG.standard_normal((40, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm"),
            helper.make_node("Conv", ["y", "w2"], ["b"], name="dw", group=40),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 40, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 40, 4, 4]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert(model, 4, 16)
    assert result.table.tensors["w1"].block_size is None and result.table.tensors["w1"].axis == 1
    assert result.table.tensors["w2"].block_size is None and result.table.tensors["w2"].axis == 0
    dq = [
        n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")
    ]
    assert all("block_size" not in [a.name for a in n.attribute] for n in dq)
    mixed = matmul_conv_model()  # blocks apply to both of its weights
    assert all(e.block_size == 16 for e in convert(mixed, 4, 16).table.tensors.values() if e.kind == "weight")

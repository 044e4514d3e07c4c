"""Tiny float models for the runtime tests, quantized with ONNX Runtime's quantize_static (QDQ)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def conv_net(seed: int = 0, channels: int = 8, size: int = 12) -> onnx.ModelProto:
    """Conv-Relu, strided Conv-Relu, depthwise Conv, residual Add, MaxPool, Concat, AveragePool, GAP, Gemm."""
    rng = np.random.default_rng(seed)
    c = channels

    def w(*shape):
        return (rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5).astype(np.float32)

    def b(n):
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    inits = [
        _init("w1", w(c, 3, 3, 3)),
        _init("b1", b(c)),
        _init("w2", w(c, c, 3, 3)),
        _init("b2", b(c)),
        _init("w3", w(c, 1, 3, 3)),
        _init("b3", b(c)),
        _init("w4", w(c, 2 * c, 1, 1)),
        _init("b4", b(c)),
        _init("wf", w(10, c)),
        _init("bf", b(10)),
        _init("shape", np.array([0, -1], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], group=c, name="dw3"),
        helper.make_node("Add", ["c3", "r1"], ["a3"], name="add3"),
        helper.make_node("MaxPool", ["a3"], ["p3"], kernel_shape=[2, 2], strides=[2, 2], name="pool3"),
        helper.make_node(
            "AveragePool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="avg1"
        ),
        helper.make_node("Concat", ["p3", "p1"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "w4", "b4"], ["c4"], strides=[1, 1], name="conv4"),
        helper.make_node("Relu", ["c4"], ["r4"], name="relu4"),
        helper.make_node("GlobalAveragePool", ["r4"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=IR_VERSION)


def quantize(
    model: onnx.ModelProto, calib: np.ndarray, per_channel: bool = True, input_name: str = "x", **extra
) -> onnx.ModelProto:
    """QDQ, uint8 activations, int8 weights, via onnxruntime.quantization.quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: calib[i : i + 4]} for i in range(0, len(calib), 4)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            **extra,
        )
        return onnx.load(dst)


def matmul_net(seed: int = 0, k: int = 16, n: int = 12) -> onnx.ModelProto:
    """3-D MatMul with a bias Add, Relu, Transpose and a second MatMul: the transformer-style GEMM path."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", (rng.standard_normal((k, n)) / k**0.5).astype(np.float32)),
        _init("b1", (rng.standard_normal(n) * 0.1).astype(np.float32)),
        _init("w2", (rng.standard_normal((5, 7)) / 5**0.5).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 2, 1], name="tr"),
        helper.make_node("MatMul", ["t1", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n, 7])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=IR_VERSION)


def int4_conv_net(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    """W4A4 QDQ (opset 21, uint4 activations, int4 per-channel weights): Conv → Relu → Q → DQ → Conv → Q."""
    rng = np.random.default_rng(seed)
    u4, i4 = TensorProto.UINT4, TensorProto.INT4
    inits = [
        _init("sx", np.float32(0.07)),
        helper.make_tensor("zx", u4, [], [3]),
        helper.make_tensor("w1", i4, [c, 3, 3, 3], rng.integers(-8, 8, c * 27).tolist()),
        _init("sw1", (rng.random(c) * 0.05 + 0.01).astype(np.float32)),
        helper.make_tensor("zw1", i4, [c], [0] * c),
        _init("b1f", (rng.standard_normal(c) * 0.3).astype(np.float32)),
        _init("s1", np.float32(0.2)),
        helper.make_tensor("z1", u4, [], [0]),
        helper.make_tensor("w2", i4, [c, c, 1, 1], rng.integers(-8, 8, c * c).tolist()),
        _init("sw2", np.float32(0.03)),
        helper.make_tensor("zw2", i4, [], [0]),
        _init("s2", np.float32(0.1)),
        helper.make_tensor("z2", u4, [], [8]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1", "sw1", "zw1"], ["w1d"], axis=0),
        helper.make_node("Conv", ["xd", "w1d", "b1f"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("QuantizeLinear", ["r1", "s1", "z1"], ["r1q"]),
        helper.make_node("DequantizeLinear", ["r1q", "s1", "z1"], ["r1d"]),
        helper.make_node("DequantizeLinear", ["w2", "sw2", "zw2"], ["w2d"]),
        helper.make_node("Conv", ["r1d", "w2d"], ["c2"], name="conv2"),
        helper.make_node("QuantizeLinear", ["c2", "s2", "z2"], ["c2q"]),
        helper.make_node("DequantizeLinear", ["c2q", "s2", "z2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int4_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 10, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def const(name: str, value, dtype=None) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def qdq_input(scale: float = 0.02, zp: int = 0) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers of ``x → Q → DQ → xd`` (uint8)."""
    inits = [const("sx", np.float32(scale)), const("zx", np.uint8(zp))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
    ]
    return nodes, inits


def single_input_model(nodes, inits, out_shape, opset: int = 13, in_shape=(1, 2, 6, 6)) -> onnx.ModelProto:
    """A hand-built model with float input `x` and float output `y`."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 21 else IR_VERSION
    )

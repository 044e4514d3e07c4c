"""Small float models built in code from a drawn `ModelSpec`: Conv/Gemm/MatMul/Add/Relu/pool chains at opsets
11-21, weights as initializers or Constant nodes, a fixed or dynamic batch, inline or external data.

The spec is plain data, so a failing case prints as something a person can rebuild by hand; the weights come
from a seeded generator, so the same spec always gives the same bytes (the determinism property needs that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

CNN_BLOCKS = ("conv", "conv_bn", "relu", "maxpool", "avgpool", "residual", "depthwise")
MLP_BLOCKS = ("gemm", "matmul", "matmul_add", "relu", "add_const")
INPUT = "x"
OUTPUT = "y"


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "cnn" (NCHW input, pooled head) or "mlp" (NF input)
    opset: int
    blocks: tuple[str, ...]
    channels: int
    size: int
    head: str  # "gemm" or "matmul": the classifier after the CNN body
    classes: int
    dynamic_batch: bool
    constant_weights: bool
    external: bool
    seed: int

    def input_shape(self, batch: int) -> tuple[int, ...]:
        if self.kind == "cnn":
            return (batch, self.channels, self.size, self.size)
        return (batch, self.channels)

    def describe(self) -> str:
        weights = "Constant-node weights" if self.constant_weights else "initializers"
        storage = "external data" if self.external else "inline"
        batch = "dynamic batch" if self.dynamic_batch else "batch 1"
        return (
            f"{self.kind} opset {self.opset} [{' '.join(self.blocks)} | {self.head}] C={self.channels} "
            f"S={self.size} {batch}, {weights}, {storage}, seed {self.seed}"
        )


@st.composite
def model_specs(draw, kinds=("cnn", "mlp")) -> ModelSpec:
    kind = draw(st.sampled_from(kinds))
    blocks = CNN_BLOCKS if kind == "cnn" else MLP_BLOCKS
    return ModelSpec(
        kind=kind,
        opset=draw(st.integers(11, 21)),
        blocks=tuple(draw(st.lists(st.sampled_from(blocks), min_size=1, max_size=4))),
        channels=draw(st.integers(1, 4)),
        size=draw(st.sampled_from((4, 6, 8))),
        head=draw(st.sampled_from(("gemm", "matmul"))),
        classes=draw(st.integers(1, 5)),
        dynamic_batch=draw(st.booleans()),
        constant_weights=draw(st.booleans()),
        external=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


class _Builder:
    """Accumulates nodes and weights; a weight is an initializer or a Constant node as the spec says."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def weight(self, stem: str, shape: tuple[int, ...], scale: float = 0.5, positive: bool = False) -> str:
        values = self.rng.standard_normal(shape).astype(np.float32) * scale
        if positive:
            values = np.abs(values) + 0.5
        name = self.name(stem)
        tensor = numpy_helper.from_array(values, name)
        if self.spec.constant_weights:
            self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_const", value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], stem: str, **attrs) -> str:
        out = self.name(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out


def _conv(b: _Builder, x: str, cin: int, cout: int, group: int = 1) -> str:
    w = b.weight("w", (cout, cin // group, 3, 3))
    bias = b.weight("b", (cout,), 0.1)
    return b.node("Conv", [x, w, bias], "conv", pads=[1, 1, 1, 1], group=group)


def _cnn_block(b: _Builder, block: str, x: str, c: int) -> str:
    if block == "conv":
        return _conv(b, x, c, c)
    if block == "conv_bn":
        y = _conv(b, x, c, c)
        params = [b.weight(s, (c,), 0.3, positive=True) for s in ("gamma", "beta", "mean", "var")]
        return b.node("BatchNormalization", [y, *params], "bn", epsilon=1e-5)
    if block == "relu":
        return b.node("Relu", [x], "relu")
    if block == "maxpool":
        return b.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    if block == "avgpool":
        return b.node("AveragePool", [x], "avgpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    if block == "residual":
        return b.node("Add", [x, b.node("Relu", [_conv(b, x, c, c)], "relu")], "add")
    if block == "depthwise":
        return _conv(b, x, c, c, group=c)
    raise ValueError(block)


def _mlp_block(b: _Builder, block: str, x: str, f: int) -> str:
    if block == "gemm":
        return b.node("Gemm", [x, b.weight("w", (f, f)), b.weight("b", (f,), 0.1)], "gemm", transB=1)
    if block == "matmul":
        return b.node("MatMul", [x, b.weight("w", (f, f))], "matmul")
    if block == "matmul_add":
        return b.node(
            "Add", [b.node("MatMul", [x, b.weight("w", (f, f))], "matmul"), b.weight("b", (f,))], "add"
        )
    if block == "relu":
        return b.node("Relu", [x], "relu")
    if block == "add_const":
        return b.node("Add", [x, b.weight("c", (f,), 0.2)], "add")
    raise ValueError(block)


def _head(b: _Builder, x: str, features: int) -> str:
    spec = b.spec
    if spec.head == "gemm":
        w, bias = b.weight("w", (spec.classes, features)), b.weight("b", (spec.classes,), 0.1)
        return b.node("Gemm", [x, w, bias], "gemm", transB=1)
    return b.node("MatMul", [x, b.weight("w", (features, spec.classes))], "matmul")


def build_model(spec: ModelSpec) -> onnx.ModelProto:
    b = _Builder(spec)
    x = INPUT
    if spec.kind == "cnn":
        for block in spec.blocks:
            x = _cnn_block(b, block, x, spec.channels)
        x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
        x = _head(b, x, spec.channels)
        out_shape = ["N" if spec.dynamic_batch else 1, spec.classes]
    else:
        for block in spec.blocks:
            x = _mlp_block(b, block, x, spec.channels)
        out_shape = ["N" if spec.dynamic_batch else 1, spec.channels]
    b.nodes.append(helper.make_node("Identity", [x], [OUTPUT], name="output_identity"))
    batch = "N" if spec.dynamic_batch else 1
    graph = helper.make_graph(
        b.nodes,
        f"fuzz_{spec.kind}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, *spec.input_shape(1)[1:]])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)],
        b.inits,
    )
    opsets = [helper.make_opsetid("", spec.opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxquant-fuzz")
    model.ir_version = max(7, helper.find_min_ir_version_for(opsets))
    return model


def write_model(model: onnx.ModelProto, path: Path, external: bool) -> list[str]:
    """Save `model` at `path` (and its external data beside it); the names of the files written."""
    if not external:
        path.write_bytes(model.SerializeToString(deterministic=True))
        return [path.name]
    data = path.stem + ".data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=0,
    )
    return [path.name, data]


def value_names(model: onnx.ModelProto) -> set[str]:
    """Every name an error about this model could blame: tensors, nodes, inputs and outputs."""
    names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    names.update(v.name for v in model.graph.input)
    names.update(v.name for v in model.graph.output)
    names.discard("")
    return names

"""Loading real-world model shapes: Constant-node weights, external data, dynamic batch, opsets 11..21."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.errors import BadModelError, OnnxQuantError
from onnxquant.ir import name_nodes
from onnxquant.model import (
    check_output_path,
    constants_to_initializers,
    load_model,
    make_session,
    opset_of,
    save_model,
    upgrade_opset,
)

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
B = RNG.standard_normal(4).astype(np.float32)


def conv_model(opset: int = 13, constant_nodes: bool = False, batch: int | str = "N") -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")]
    if constant_nodes:
        nodes = [
            helper.make_node("Constant", [], ["w"], value=inits[0]),
            helper.make_node("Constant", [], ["b"], value=inits[1]),
        ] + nodes
        inits = []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 21 else 10
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_loads_opsets_and_keeps_numbers(tmp_path, opset):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(opset), path)
    model = load_model(path)
    assert opset_of(model) == opset
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(model, x), run(conv_model(opset), x))


def test_constant_node_weights_become_initializers(tmp_path):
    path = tmp_path / "paddle_style.onnx"
    onnx.save(conv_model(constant_nodes=True), path)
    model = load_model(path)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), W)
    assert constants_to_initializers(model) == 0


def test_external_data_is_loaded(tmp_path):
    onnx.save(
        conv_model(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0
    )
    assert (tmp_path / "ext.bin").exists()
    loaded = load_model(tmp_path / "ext.onnx")
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(loaded, x), run(conv_model(), x))


def test_external_data_outside_model_directory_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save(
        conv_model(), tmp_path / "tmp.onnx", save_as_external_data=True, location="w.bin", size_threshold=0
    )
    model = onnx.load(tmp_path / "tmp.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(model, inner / "evil.onnx")
    with pytest.raises(BadModelError, match=r"outside the model's directory"):
        load_model(inner / "evil.onnx")


def test_dynamic_batch_survives_loading(tmp_path):
    onnx.save(conv_model(batch="batch"), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert run(model, RNG.standard_normal((5, 3, 6, 6)).astype(np.float32)).shape == (5, 4, 6, 6)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a model at all", "not a readable ONNX model|not an ONNX model|invalid ONNX model"),
        (None, "truncated|not a readable ONNX model|invalid ONNX model"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    data = conv_model().SerializeToString()
    path.write_bytes(content if content is not None else data[: len(data) // 2])
    with pytest.raises(BadModelError, match=message) as err:
        load_model(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(BadModelError, match="is a directory"):
        load_model(tmp_path)


def test_old_opset_and_ir3_are_lifted_with_the_same_numbers(tmp_path):
    old = conv_model(opset=9)
    old.ir_version = 3  # initializers must also be graph inputs
    old.graph.input.extend(
        [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in old.graph.initializer]
    )
    onnx.save(old, tmp_path / "old.onnx")
    lifted = load_model(tmp_path / "old.onnx")
    assert opset_of(lifted) == 13 and lifted.ir_version >= 7
    assert [i.name for i in lifted.graph.input] == ["x"]  # the weights are constants now
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(lifted, x), run(conv_model(13), x), rtol=1e-6)


def test_upgrade_to_opset_21_keeps_numbers():
    model = conv_model(13)
    upgraded = upgrade_opset(model, 21)
    assert opset_of(upgraded) == 21
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(upgraded, x), run(model, x), rtol=1e-6)


def test_unnamed_nodes_get_unique_names():
    model = conv_model()
    model.graph.node[1].name = model.graph.node[0].name = ""
    name_nodes(model.graph)
    assert [n.name for n in model.graph.node] == ["Conv_0", "Relu_1"]


def test_naming_never_renames_a_user_named_node():
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Relu", ["y"], ["z"], name="Relu_0"),
            helper.make_node("Relu", ["z"], ["u"], name="Relu_0"),
        ],
        "g",
        [],
        [],
    )
    name_nodes(graph)
    assert [n.name for n in graph.node] == ["Relu_0_1", "Relu_0", "Relu_0_2"]


def test_save_is_atomic_and_output_checks(tmp_path):
    path = tmp_path / "out.onnx"
    save_model(conv_model(), path)
    assert onnx.load(path).graph.node[0].op_type == "Conv"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    with pytest.raises(OnnxQuantError, match="equals the input"):
        check_output_path(path, path)
    with pytest.raises(OnnxQuantError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.onnx")
    with pytest.raises(OnnxQuantError, match="is a directory"):
        check_output_path(tmp_path)


def test_upgrade_drops_declared_output_shapes_that_inference_contradicts():
    text = """
    <ir_version: 7, opset_import: ["" : 13]>
    g (float[2, 12] x) => (float[2, 12] y) {
      a = Constant <value = int64[1] {2}> ()
      b = Constant <value = int64[2] {3, 4}> ()
      s = Concat <axis = 0> (a, b)
      y = Reshape (x, s)
    }
    """
    model = onnx.parser.parse_model(text)  # declares y as rank 2; the Reshape makes it [2, 3, 4]
    upgraded = upgrade_opset(model, 21)
    dims = upgraded.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 4]  # the contradicted declaration gave way to inference
    onnx.checker.check_model(upgraded, full_check=True)
    x = RNG.standard_normal((2, 12)).astype(np.float32)
    assert make_session(upgraded).run(None, {"x": x})[0].shape == (2, 3, 4)


def test_sessions_are_exact_where_int8_kernels_saturate():
    """uint8 activations at 255 times int8 weights at ±127: pairs of products exceed int16, which x86 CPUs
    without VNNI saturate in ONNX Runtime's fused QLinearConv unless the session asks for exact kernels."""
    rng = np.random.default_rng(0)
    w = rng.choice([-127, 127], size=(4, 16, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(0.01, np.float32), "sw"),
        numpy_helper.from_array(np.array(0.2, np.float32), "sy"),
        numpy_helper.from_array(np.array(128, np.uint8), "zy"),
    ]
    graph = helper.make_graph(
        nodes,
        "sat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = {"x": np.where(rng.uniform(size=(1, 16, 8, 8)) > 0.5, 1.0, 0.0).astype(np.float32)}
    fused = make_session(model, optimize=True).run(None, x)[0]
    reference = make_session(model, optimize=False).run(None, x)[0]
    np.testing.assert_allclose(fused, reference, atol=0.2 + 1e-6)

"""Models and conversions shared by the report tests (tiny, built in code; the digits demo is cached)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxquant import api
from onnxquant.calib.methods import METHODS
from onnxquant.calib.readers import input_specs, open_data
from onnxquant.calib.weights import WEIGHT_METHODS
from onnxquant.model import load_model
from onnxquant.passes import PASS_NAMES
from onnxquant.rules import Rules, load_rules

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "calib_data" / "digits"


def fragile_model(seed: int = 0, outlier: float = 25.0) -> onnx.ModelProto:
    """conv_a → Relu → fragile → Relu → conv_c → Relu → GAP → Flatten → fc; `fragile` has one weight per
    output channel `outlier` times the others, so 4-bit per-channel weights round nearly all of it to 0."""
    rng = np.random.default_rng(seed)

    def conv_w(cout, cin):
        return (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)

    wa, wf, wc = conv_w(8, 3), conv_w(8, 8), conv_w(8, 8)
    std = wf.std()
    for o in range(8):
        wf[o, o % 8, 1, 1] = outlier * std
    fc = (rng.standard_normal((4, 8)) * 0.5).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in (
            (wa, "conv_a.weight"),
            (wf, "fragile.weight"),
            (wc, "conv_c.weight"),
            (fc, "fc.weight"),
            (np.zeros(4, np.float32), "fc.bias"),
        )
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_a.weight"], ["a_out"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a_out"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "fragile.weight"], ["f_out"], name="fragile", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f_out"], ["f_relu"], name="relu_f"),
        helper.make_node("Conv", ["f_relu", "conv_c.weight"], ["c_out"], name="conv_c", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c_out"], ["c_relu"], name="relu_c"),
        helper.make_node("GlobalAveragePool", ["c_relu"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model)


def batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def random_inputs(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def preset(name: str = "default") -> Rules:
    """A shipped rule preset."""
    return load_rules(
        name, pass_names=PASS_NAMES, method_names=tuple(METHODS), weight_method_names=WEIGHT_METHODS
    )


def convert(
    model: onnx.ModelProto, data, wbits: int, abits: int, method: str = "minmax", rules: Rules | None = None
):
    """`model` converted with `rules` (default: the default preset) at the given widths."""
    rules = preset() if rules is None else rules
    return api.convert(model, rules.with_cli(wbits=wbits, abits=abits, method=method), data=data)


@cache
def digits_model() -> onnx.ModelProto:
    return load_model(DIGITS / "model.onnx")


def digits_data(name: str = "eval", batch_size: int = 64):
    m = digits_model()
    return open_data(DIGITS / f"{name}.npz", input_specs(m), batch_size=batch_size, extra_keys=("labels",))


@cache
def digits_converted(wbits: int = 4, abits: int = 4, method: str = "minmax"):
    return convert(digits_model(), digits_data("calib"), wbits, abits, method)

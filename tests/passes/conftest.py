"""Helpers for pass tests: tiny models from ONNX text plus numpy weights, and a numeric equivalence check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant.model import make_session


def build(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Parse `text` and add `weights` as initializers; the model must pass the full checker."""
    model = onnx.parser.parse_model(text)
    for name, value in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def bn_weights(prefix: str, channels: int, seed: int, dtype=np.float32, zero_shift: bool = False):
    """BN parameters `{prefix}_g/_b/_m/_v` with negative scales, nonzero means and positive variances."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = np.zeros(channels) if zero_shift else rng.normal(0, 1, channels)
    mean = np.zeros(channels) if zero_shift else rng.normal(0, 1, channels)
    var = rng.uniform(0.2, 3.0, channels)
    return {f"{prefix}_{k}": v.astype(dtype) for k, v in zip("gbmv", (gamma, beta, mean, var))}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model, optimize=False).run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.normal(0, 1, shape).astype(dtype)
    return feeds


def assert_equivalent(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, tol: float = 1e-5, batch: int = 2
) -> None:
    """Same outputs (names and values, max error relative to max |output|), valid and tidy model."""
    onnx.checker.check_model(rewritten, full_check=True)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in original.graph.output]
    used = {i for n in rewritten.graph.node for i in n.input} | {o.name for o in rewritten.graph.output}
    assert all(t.name in used for t in rewritten.graph.initializer), "dangling initializer"
    feeds = random_feeds(original, batch=batch)
    for a, b in zip(run(original, feeds), run(rewritten, feeds)):
        assert a.shape == b.shape and a.dtype == b.dtype
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        err = np.max(np.abs(a64 - b64)) / max(np.max(np.abs(a64)), 1e-30)
        assert err <= tol, f"relative error {err:.3g} > {tol}"


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture
def tools():
    """The helpers above, for test modules (pytest does not make conftest importable by name)."""
    import types

    return types.SimpleNamespace(
        build=build,
        bn_weights=bn_weights,
        run=run,
        random_feeds=random_feeds,
        assert_equivalent=assert_equivalent,
        op_types=op_types,
    )

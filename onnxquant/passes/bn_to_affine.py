"""Lowering a BatchNormalization that nothing could absorb to `Mul` + `Add`.

In inference mode BN is `y = s·x + t` per channel (axis 1), `s = γ / sqrt(var + ε)`, `t = β − μ·s`; the
constants are stored with shape `[C, 1, …, 1]` (rank of x minus one) so they broadcast over axis 1, in the
element type of x. Runs last, on whatever BN the fold passes left, and only when asked for.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxquant.passes.base import Graph, Match, bn_affine

log = logging.getLogger(__name__)


class BNToAffine:
    name = "bn_to_affine"
    description = "standalone BatchNormalization → Mul + Add with per-channel constants"

    def find(self, graph: Graph) -> list[Match]:
        return [Match(self.name, (bn.name,)) for bn in graph.nodes("BatchNormalization")]

    def check(self, graph: Graph, match: Match) -> str | None:
        bn = graph.node(match.nodes[0])
        if bn is None:
            return "node no longer in the graph"
        affine = bn_affine(graph, bn)
        if isinstance(affine, str):
            return affine
        rank = graph.rank(bn.input[0]) or graph.rank(bn.output[0])
        if rank is None:
            return "BN input rank unknown: cannot shape the Mul/Add constants"
        if rank < 2:
            return f"BN input is {rank}-D; expected at least [N, C]"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        bn = graph.node(match.nodes[0])
        affine = bn_affine(graph, bn)
        rank = graph.rank(bn.input[0]) or graph.rank(bn.output[0])
        dtype = _elem_dtype(graph, bn.input[0]) or graph.constant(bn.input[1]).dtype
        shape = (-1,) + (1,) * (rank - 2)
        x, y, name = bn.input[0], bn.output[0], bn.name
        scale = graph.add_constant(f"{name}_scale", affine.scale.reshape(shape).astype(dtype))
        shift = graph.add_constant(f"{name}_shift", affine.shift.reshape(shape).astype(dtype))
        mid = graph.unique_name(f"{y}_scaled")
        graph.copy_type(y, mid)
        graph.remove_node(name)
        graph.add_node("Mul", [x, scale], [mid], f"{name}_mul")
        graph.add_node("Add", [mid, shift], [y], f"{name}_add")


def _elem_dtype(graph: Graph, tensor: str) -> np.dtype | None:
    t = graph.types.get(tensor)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
        return None
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type))

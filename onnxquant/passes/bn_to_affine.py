"""Lowering a BatchNormalization that nothing could absorb to `Mul` + `Add`.

In inference mode BN is `y = s·x + t` per channel (axis 1), `s = γ / sqrt(var + ε)`, `t = β − μ·s`; the
constants are stored with shape `[C, 1, …, 1]` (rank of x minus one) so they broadcast over axis 1, in the
element type of x. Runs last, on whatever BN the fold passes left, and only when asked for.
"""

from __future__ import annotations

import logging

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
        rank = graph.rank(bn.inputs[0]) or graph.rank(bn.outputs[0])
        if rank is None:
            return "BN input rank unknown: cannot shape the Mul/Add constants"
        if rank < 2:
            return f"BN input is {rank}-D; expected at least [N, C]"
        return None

    def done(self, match: Match) -> str:
        return f"lowered BN '{match.nodes[0]}' to Mul + Add"

    def rewrite(self, graph: Graph, match: Match) -> None:
        bn = graph.node(match.nodes[0])
        affine = bn_affine(graph, bn)
        x, y, name = bn.inputs[0], bn.outputs[0], bn.name
        rank = graph.rank(x) or graph.rank(y)
        dtype = graph.dtype(x)
        dtype = graph.constant(bn.inputs[1]).dtype if dtype is None else dtype
        shape = (-1,) + (1,) * (rank - 2)
        scale = graph.add_constant(f"{name}_scale", affine.scale.reshape(shape).astype(dtype))
        shift = graph.add_constant(f"{name}_shift", affine.shift.reshape(shape).astype(dtype))
        mid = graph.new_variable(f"{y.name}_scaled", like=y)
        graph.replace_node(
            bn,
            [
                graph.make_node("Mul", [x, scale], [mid], f"{name}_mul"),
                graph.make_node("Add", [mid, shift], [y], f"{name}_add"),
            ],
        )

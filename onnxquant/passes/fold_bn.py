"""Folding an inference-mode BatchNormalization into the linear layer before or after it.

With `s = γ / sqrt(var + ε)` and `t = β − μ·s` per channel, BN computes `y = s·x + t`.

- Conv→BN (any `group`, depthwise included): output channel o of a Conv has its own filter, so
  `W'[o] = W[o]·s_o`, `b' = (b − μ)·s + β = b·s + t` (a missing bias counts as zero and is added).
- ConvTranspose→BN: the weight is `[C_in, M/group, k...]`; output channel `o = g·(M/group) + j` is produced
  by `W[g·(C_in/group):(g+1)·(C_in/group), j]`, so axis 1 is scaled per group; the bias as for Conv.
- Gemm→BN: `Y = α·A'·B' + β_g·C`; the output feature m is column m of B' (row m of B when transB=1), so
  `B'[:, m] ·= s_m` and `C' = β_g·C·s + t` with `β_g` set to 1. MatMul→BN with a 2-D constant weight
  `W[K, M]`: `W'[:, m] = W[:, m]·s_m`, then `Add(t)`. Legal only when BN's channel axis (1) is the feature
  axis, i.e. the output is 2-D: a 3-D MatMul output `[N, T, M]` has BN normalize T, not M.
- BN→Conv: `Conv(s·x + t) = Conv_{W'}(x) + b''` with `W'[o, c] = W[o, c]·s_{in(o, c)}` and
  `b''_o = b_o + Σ_{c,k} W[o, c, k]·t_{in(o, c)}`, where in(o, c) is the input channel that filter o reads
  at position c of its group. Legal only when the Conv has no padding (padded zeros would not receive
  the shift) or every shift `t` is zero.

A fold is refused when the tensor between the two nodes has another consumer or is a graph output, when a
weight or bias to be rewritten is not a float constant initializer or is shared with another node, and
when BN's parameters are not constants or BN is in training mode.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxquant.passes.base import BNAffine, Graph, Match, attr, bn_affine, input_at, is_op, producer

log = logging.getLogger(__name__)

BN = "BatchNormalization"


def _nodes_and_affine(graph: Graph, match: Match) -> tuple[gs.Node, gs.Node, BNAffine] | str:
    """The matched BN, its partner node and the BN's affine form, or why the match no longer holds."""
    bn, other = (graph.node(n) for n in match.nodes)
    if bn is None or other is None:
        return "node no longer in the graph"
    affine = bn_affine(graph, bn)
    return affine if isinstance(affine, str) else (bn, other, affine)


def _set_input_constant(graph: Graph, node: gs.Node, slot: int, value: np.ndarray, dtype: np.dtype) -> None:
    """Write `value` into the node's constant input `slot`, adding a constant if the slot is empty."""
    tensor = input_at(node, slot)
    if tensor is not None:
        graph.set_constant(tensor, value)
        return
    tensor = graph.add_constant(f"{node.name}_bias", np.asarray(value).astype(dtype))
    while len(node.inputs) <= slot:
        node.inputs.append(gs.Variable.empty())
    node.inputs[slot] = tensor


def _constant_or_zero(graph: Graph, node: gs.Node, slot: int) -> np.ndarray | float:
    tensor = input_at(node, slot)
    return 0.0 if tensor is None else graph.constant(tensor)


class _FoldIntoProducer:
    """Pattern: producer → BN, where the producer is one of `producers`; BN's output takes its place."""

    name = ""
    description = ""
    producers: tuple[str, ...] = ()

    def find(self, graph: Graph) -> list[Match]:
        matches = []
        for bn in graph.nodes(BN):
            prod = producer(bn.inputs[0])
            if is_op(prod, *self.producers):
                matches.append(Match(self.name, (bn.name, prod.name)))
        return matches

    def check(self, graph: Graph, match: Match) -> str | None:
        found = _nodes_and_affine(graph, match)
        if isinstance(found, str):
            return found
        bn, prod, affine = found
        return graph.sole_consumer_reason(prod.outputs[0], bn, f"{prod.op} output") or self.check_weights(
            graph, prod, affine.scale.size
        )

    def done(self, match: Match) -> str:
        return f"folded BN '{match.nodes[0]}' into '{match.nodes[1]}'"

    def rewrite(self, graph: Graph, match: Match) -> None:
        bn, prod, affine = _nodes_and_affine(graph, match)  # check() has passed
        self.fold(graph, prod, affine.scale, affine.shift)
        self.take_output(graph, prod, bn)

    @staticmethod
    def take_output(graph: Graph, prod: gs.Node, bn: gs.Node) -> None:
        """The producer now writes BN's output tensor directly; BN goes."""
        graph.forget_tensor(prod.outputs[0])
        y = bn.outputs[0]
        graph.replace_node(bn, [])
        prod.outputs[0] = y

    def check_weights(self, graph: Graph, node: gs.Node, channels: int) -> str | None:
        raise NotImplementedError

    def fold(self, graph: Graph, node: gs.Node, s: np.ndarray, t: np.ndarray) -> None:
        raise NotImplementedError


class FoldConvBN(_FoldIntoProducer):
    name = "fold_conv_bn"
    description = "Conv → BatchNormalization: scale each output filter, fold the shift into the bias"
    producers = ("Conv",)

    def check_weights(self, graph: Graph, node: gs.Node, channels: int) -> str | None:
        reason = graph.weight_reason(node, 1, "Conv weight") or graph.weight_reason(node, 2, "Conv bias")
        if reason:
            return reason
        w = graph.constant(node.inputs[1])
        if w.ndim < 3 or w.shape[0] != channels:
            return f"Conv weight shape {list(w.shape)} does not match BN's {channels} channels"
        return None

    def fold(self, graph: Graph, node: gs.Node, s: np.ndarray, t: np.ndarray) -> None:
        w = graph.constant(node.inputs[1])
        bias = _constant_or_zero(graph, node, 2)
        graph.set_constant(node.inputs[1], w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1)))
        _set_input_constant(graph, node, 2, np.asarray(bias, np.float64) * s + t, w.dtype)


class FoldConvTransposeBN(_FoldIntoProducer):
    name = "fold_convtranspose_bn"
    description = "ConvTranspose → BatchNormalization: scale weight axis 1 per group, fold the shift"
    producers = ("ConvTranspose",)

    def check_weights(self, graph: Graph, node: gs.Node, channels: int) -> str | None:
        reason = graph.weight_reason(node, 1, "ConvTranspose weight") or graph.weight_reason(
            node, 2, "ConvTranspose bias"
        )
        if reason:
            return reason
        w, group = graph.constant(node.inputs[1]), int(attr(node, "group", 1))
        if w.ndim < 3 or w.shape[0] % group or w.shape[1] * group != channels:
            return (
                f"ConvTranspose weight shape {list(w.shape)} with group={group} does not match "
                f"BN's {channels} channels"
            )
        return None

    def fold(self, graph: Graph, node: gs.Node, s: np.ndarray, t: np.ndarray) -> None:
        w, group = graph.constant(node.inputs[1]), int(attr(node, "group", 1))
        c_in, m_g, kernel = w.shape[0], w.shape[1], w.shape[2:]
        grouped = w.astype(np.float64).reshape(group, c_in // group, m_g, *kernel)
        scaled = grouped * s.reshape(group, 1, m_g, *(1,) * len(kernel))
        bias = _constant_or_zero(graph, node, 2)
        graph.set_constant(node.inputs[1], scaled.reshape(w.shape))
        _set_input_constant(graph, node, 2, np.asarray(bias, np.float64) * s + t, w.dtype)


class FoldGemmBN(_FoldIntoProducer):
    name = "fold_gemm_bn"
    description = (
        "Gemm / MatMul with a 2-D constant weight → BatchNormalization on its 2-D output: "
        "scale the output-feature axis of the weight, fold the shift into a bias"
    )
    producers = ("Gemm", "MatMul")

    def check_weights(self, graph: Graph, node: gs.Node, channels: int) -> str | None:
        op = node.op
        reason = graph.weight_reason(node, 1, f"{op} weight")
        if reason:
            return reason
        w = graph.constant(node.inputs[1])
        if w.ndim != 2:
            return f"{op} weight '{node.inputs[1].name}' is {w.ndim}-D; accepted: 2-D"
        if op == "MatMul":
            rank = graph.rank(node.outputs[0]) or graph.rank(node.inputs[0])
            if rank is None:
                return "MatMul output rank unknown: cannot tell whether BN's axis 1 is the feature axis"
            if rank != 2:
                return f"MatMul output is {rank}-D: BN normalizes axis 1, not the feature axis (last)"
            features = w.shape[1]
        else:
            reason = graph.weight_reason(node, 2, "Gemm bias C")
            if reason:
                return reason
            features = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
            c = input_at(node, 2)
            if c is not None and graph.constant(c).ndim > 2:
                return f"Gemm bias C '{c.name}' has rank > 2"
        if features != channels:
            return f"{op} has {features} output features but BN has {channels} channels"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        bn, prod, affine = _nodes_and_affine(graph, match)  # check() has passed
        if prod.op == "Gemm":
            self.fold(graph, prod, affine.scale, affine.shift)
            self.take_output(graph, prod, bn)
            return
        w = graph.constant(prod.inputs[1])
        graph.set_constant(prod.inputs[1], w.astype(np.float64) * affine.scale[None, :])
        if not np.any(affine.shift):
            self.take_output(graph, prod, bn)
            return
        shift = graph.add_constant(f"{prod.name}_bias", affine.shift.astype(w.dtype))
        x, y = prod.outputs[0], bn.outputs[0]
        graph.replace_node(bn, [graph.make_node("Add", [x, shift], [y], f"{prod.name}_bias_add")])

    def fold(self, graph: Graph, node: gs.Node, s: np.ndarray, t: np.ndarray) -> None:
        w = graph.constant(node.inputs[1])
        trans_b = attr(node, "transB", 0)
        graph.set_constant(node.inputs[1], w.astype(np.float64) * (s[:, None] if trans_b else s[None, :]))
        beta = float(attr(node, "beta", 1.0))
        c = input_at(node, 2)
        c = graph.constant(c).astype(np.float64) * beta if c is not None else 0.0
        _set_input_constant(graph, node, 2, c * s + t, w.dtype)
        node.attrs.pop("beta", None)
        node.attrs["beta"] = 1.0


class FoldBNConv(_FoldIntoProducer):
    name = "fold_bn_conv"
    description = (
        "BatchNormalization → Conv: scale each input channel of the filters and add the shift's "
        "response to the bias; only without padding, or when the BN shift is zero"
    )

    def find(self, graph: Graph) -> list[Match]:
        matches = []
        for bn in graph.nodes(BN):
            conv = next((c for c in bn.outputs[0].outputs if is_op(c, "Conv")), None)
            if conv is not None:
                matches.append(Match(self.name, (bn.name, conv.name)))
        return matches

    def check(self, graph: Graph, match: Match) -> str | None:
        found = _nodes_and_affine(graph, match)
        if isinstance(found, str):
            return found
        bn, conv, affine = found
        reason = (
            graph.sole_consumer_reason(bn.outputs[0], conv, "BN output")
            or graph.weight_reason(conv, 1, "Conv weight")
            or graph.weight_reason(conv, 2, "Conv bias")
        )
        if reason:
            return reason
        if conv.inputs[0] is not bn.outputs[0]:
            return "BN output feeds the Conv's weight, not its data input"
        w, group = graph.constant(conv.inputs[1]), int(attr(conv, "group", 1))
        if w.ndim < 3 or w.shape[0] % group or w.shape[1] * group != affine.scale.size:
            return (
                f"Conv weight shape {list(w.shape)} with group={group} does not match "
                f"BN's {affine.scale.size} channels"
            )
        if np.any(affine.shift) and _pads(conv, w.shape[2:]):
            return (
                f"Conv '{conv.name}' has padding and the BN shift β − μ·s is nonzero: "
                "the padded border would miss the shift"
            )
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        bn, conv, affine = _nodes_and_affine(graph, match)  # check() has passed
        w, group = graph.constant(conv.inputs[1]), int(attr(conv, "group", 1))
        w64 = w.astype(np.float64)
        m, c_g = w.shape[:2]
        # per (output filter, input position in its group): the BN channel that position reads
        s = np.repeat(affine.scale.reshape(group, c_g), m // group, axis=0)
        t = np.repeat(affine.shift.reshape(group, c_g), m // group, axis=0)
        extra = (w64.sum(axis=tuple(range(2, w.ndim))) * t).sum(axis=1)
        graph.set_constant(conv.inputs[1], w64 * s.reshape(m, c_g, *(1,) * (w.ndim - 2)))
        has_bias = input_at(conv, 2) is not None
        if has_bias or np.any(extra):
            bias = graph.constant(conv.inputs[2]).astype(np.float64) if has_bias else 0.0
            _set_input_constant(graph, conv, 2, bias + extra, w.dtype)
        graph.forget_tensor(bn.outputs[0])
        x = bn.inputs[0]
        graph.replace_node(bn, [])
        conv.inputs[0] = x


def _pads(conv: gs.Node, kernel: tuple[int, ...]) -> bool:
    """Whether the Conv pads its input (SAME auto-padding pads nothing only for 1×…×1 kernels)."""
    auto_pad = attr(conv, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(k > 1 for k in kernel)
    return any(int(p) != 0 for p in attr(conv, "pads", []))

"""Data-free cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019, section 4.1).

For two linear layers `L1 → f → L2` with `f` positively homogeneous per channel (`f(s·x) = s·f(x)` for
`s > 0`, channel by channel: Relu, LeakyRelu, PRelu, Identity, MaxPool over spatial axes, Clip without an
upper bound, any sequence of them, or nothing), dividing output channel i of L1 (its weights and bias) by
`s_i` and multiplying input channel i of L2 by `s_i` leaves the network function unchanged. With
`r1_i = max|W1|` over output channel i and `r2_i = max|W2|` over input channel i, the choice
`s_i = sqrt(r1_i / r2_i)` makes both ranges `sqrt(r1_i·r2_i)`, which is what per-tensor weight quantization
wants: no channel far below the tensor's range. A channel with `r1_i = 0` or `r2_i = 0` keeps `s_i = 1`.

Layers: Conv (weight `[M, C, k…]`, out axis 0, in axis 1; depthwise `group = C`, weight `[C·m, 1, k…]`, whose
input channel i feeds output channels `i·m … i·m+m−1`, so the in axis is also axis 0), Gemm (B `[K, N]`, or
`[N, K]` with transB; its bias C is broadcast to the N features and `beta` folded in) and MatMul with a
constant 2-D weight `[K, N]`. Conv chains with Conv (channels on axis 1), Gemm/MatMul with Gemm/MatMul
(features on the last axis). Consecutive pairs form chains (`Conv → Conv → Conv`, MobileNet's pointwise →
depthwise → pointwise); rescaling one pair changes the ranges its neighbours see, so the pass sweeps the
chain pair by pair until every scale of a sweep is within `TOLERANCE` of 1, as the paper iterates.

Refused: an intermediate tensor that is a graph output or read by another node, a weight or L1 bias that is
not a float constant initializer (or is shared, or a graph input can override it), Clip with a finite upper
bound (ReLU6: `clip(s·x, 0, 6) ≠ s·clip(x, 0, 6)`) or a nonzero finite lower bound, grouped convs that are not
depthwise, mismatched channel counts, and Gemm reading the tensor transposed (transA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import onnx_graphsurgeon as gs

from onnxquant.passes.base import Graph, Match, attr, input_at, is_op

log = logging.getLogger(__name__)

NAME = "equalize_layers"
LAYERS = ("Conv", "Gemm", "MatMul")
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity", "MaxPool")
BETWEEN = (*HOMOGENEOUS, "Clip")  # what `find` walks through; Clip's bounds are judged by `check`
MAX_SWEEPS = 100
TOLERANCE = 1e-7  # |log s_i| below which a sweep counts as converged
UNBOUNDED = float(np.finfo(np.float32).max)  # Clip's old default bounds are ±FLT_MAX


@dataclass(frozen=True)
class _Layer:
    """Where a layer's weight keeps its channels: output channel i is index i of `out_axis`; input channel i
    is indices `i·in_repeat … i·in_repeat + in_repeat − 1` of `in_axis` (in_repeat > 1: depthwise with a
    channel multiplier)."""

    node: gs.Node
    out_axis: int
    in_axis: int
    in_repeat: int
    channels_last: bool

    @property
    def weight(self) -> gs.Tensor:
        return self.node.inputs[1]


def _layer(graph: Graph, node: gs.Node) -> _Layer | str:
    """The channel layout of `node`'s constant weight, or why it cannot be rescaled."""
    what = f"{node.op} weight"
    reason = graph.weight_reason(node, 1, what)
    if reason:
        return reason
    w = graph.constant(node.inputs[1])
    if node.op == "Conv":
        return _conv_layer(node, w)
    if w.ndim != 2:
        return f"{what} '{node.inputs[1].name}' is {w.ndim}-D; accepted: 2-D"
    trans_b = node.op == "Gemm" and attr(node, "transB", 0)
    return _Layer(
        node, out_axis=0 if trans_b else 1, in_axis=1 if trans_b else 0, in_repeat=1, channels_last=True
    )


def _conv_layer(node: gs.Node, w: np.ndarray) -> _Layer | str:
    if w.ndim < 3:
        return f"Conv weight '{node.inputs[1].name}' is {w.ndim}-D; accepted: [M, C/group, k…]"
    group = int(attr(node, "group", 1))
    if group == 1:
        return _Layer(node, out_axis=0, in_axis=1, in_repeat=1, channels_last=False)
    if w.shape[1] == 1 and w.shape[0] % group == 0:
        return _Layer(node, out_axis=0, in_axis=0, in_repeat=w.shape[0] // group, channels_last=False)
    return (
        f"grouped Conv '{node.name}' (group={group}, {w.shape[1]} input channels per group) is not "
        "depthwise; accepted: group 1 or depthwise (one input channel per group)"
    )


def _out_channels(graph: Graph, layer: _Layer) -> int:
    return graph.constant(layer.weight).shape[layer.out_axis]


def _in_channels(graph: Graph, layer: _Layer) -> int:
    return graph.constant(layer.weight).shape[layer.in_axis] // layer.in_repeat


def _bias_reason(graph: Graph, node: gs.Node) -> str | None:
    """Why L1's bias cannot be rescaled per output channel, or None."""
    label = "Gemm bias C" if node.op == "Gemm" else f"{node.op} bias"
    reason = graph.weight_reason(node, 2, label) if node.op != "MatMul" else None
    if reason or node.op != "Gemm" or input_at(node, 2) is None:
        return reason
    c = graph.constant(node.inputs[2])
    return (
        f"Gemm bias C '{node.inputs[2].name}' has rank {c.ndim}; accepted: at most 2" if c.ndim > 2 else None
    )


# -- the pattern: L1 → (homogeneous ops)* → L2 -------------------------------------------------------------
def _followers(node: gs.Node) -> list[tuple[tuple[gs.Node, ...], gs.Node]]:
    """Every layer reading `node`'s output as its data input through a run of `BETWEEN` ops, with the run."""
    found: list[tuple[tuple[gs.Node, ...], gs.Node]] = []
    queue: list[tuple[tuple[gs.Node, ...], gs.Tensor]] = [((), node.outputs[0])]
    for path, tensor in queue:
        readers = list({id(r): r for r in tensor.outputs if r.inputs and r.inputs[0] is tensor}.values())
        for reader in readers:
            if is_op(reader, *LAYERS):
                found.append((path, reader))
            elif is_op(reader, *BETWEEN) and reader.outputs:
                queue.append(((*path, reader), reader.outputs[0]))
    return found


def _path(l1: gs.Node, l2: gs.Node) -> tuple[gs.Node, ...] | None:
    return next((path for path, reader in _followers(l1) if reader is l2), None)


def _pair_reason(graph: Graph, l1: gs.Node, path: tuple[gs.Node, ...], l2: gs.Node) -> str | None:
    """Why `L1 → path → L2` cannot be equalized, or None."""
    first, second = _layer(graph, l1), _layer(graph, l2)
    for found in (first, second):
        if isinstance(found, str):
            return found
    reason = _bias_reason(graph, l1) or _family_reason(first, second)
    if reason:
        return reason
    chain = (l1, *path, l2)
    for node, reader in pairwise(chain):
        reason = graph.sole_consumer_reason(node.outputs[0], reader, f"{node.op} output")
        reason = reason or (
            _homogeneous_reason(graph, reader, first.channels_last) if reader is not l2 else None
        )
        if reason:
            return reason
    if is_op(l2, "Gemm") and attr(l2, "transA", 0):
        return f"Gemm '{l2.name}' reads the tensor transposed (transA=1): its rows are not the channels"
    out, into = _out_channels(graph, first), _in_channels(graph, second)
    if out != into:
        return f"'{l1.name}' has {out} output channels but '{l2.name}' reads {into}"
    return None


def _family_reason(first: _Layer, second: _Layer) -> str | None:
    if first.channels_last == second.channels_last:
        return None
    return (
        f"{first.node.op} '{first.node.name}' feeds {second.node.op} '{second.node.name}': their channel "
        "axes differ; accepted: Conv → Conv, Gemm/MatMul → Gemm/MatMul"
    )


def _homogeneous_reason(graph: Graph, node: gs.Node, channels_last: bool) -> str | None:
    """Why `node` is not positively homogeneous per channel (`f(s·x) = s·f(x)`, s > 0), or None."""
    if is_op(node, "MaxPool") and channels_last:
        return f"MaxPool '{node.name}' after Gemm/MatMul pools over the feature axis; accepted: between Convs"
    if is_op(node, "Clip"):
        return _clip_reason(graph, node)
    return None


def _clip_reason(graph: Graph, node: gs.Node) -> str | None:
    bounds = []
    for slot, key, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        tensor = input_at(node, slot)
        if tensor is None:
            bounds.append(float(attr(node, key, default)))
            continue
        value = graph.constant(tensor)
        if value is None or value.size != 1:
            return f"Clip '{node.name}' bound '{tensor.name}' is not a constant scalar"
        bounds.append(float(value.reshape(())))
    lo, hi = bounds
    if hi < UNBOUNDED:
        return (
            f"Clip '{node.name}' has the finite upper bound {hi:g} (ReLU6-like): clip(s·x) ≠ s·clip(x), not "
            "positively homogeneous; accepted: Relu, LeakyRelu, PRelu, Identity, MaxPool, Clip without max"
        )
    if lo != 0 and lo > -UNBOUNDED:
        return f"Clip '{node.name}' has the lower bound {lo:g}: clip(s·x) ≠ s·clip(x); accepted: 0 or none"
    return None


# -- the equalization -------------------------------------------------------------------------------------
def _axis_max(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != axis))


def _scale_axis(w: np.ndarray, axis: int, s: np.ndarray) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = -1
    return w * s.reshape(shape)


def pair_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """`s_i = sqrt(r1_i / r2_i)`, and 1 where that is not finite and positive (a channel with zero range)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0)


def _out_ranges(layer: _Layer, w: np.ndarray) -> np.ndarray:
    return _axis_max(w, layer.out_axis)


def _in_ranges(layer: _Layer, w: np.ndarray) -> np.ndarray:
    return _axis_max(w, layer.in_axis).reshape(-1, layer.in_repeat).max(axis=1)


def _equalize_chain(layers: list[_Layer], weights: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Sweep the pairs of the chain, rescaling `weights` (float64, in place in the list) until converged.

    Returns each pair's total scales `s` (L1's output channels were divided by them) and the sweeps run.
    """
    totals = [np.ones(w.shape[layer.out_axis]) for layer, w in zip(layers[:-1], weights)]
    for sweep in range(1, MAX_SWEEPS + 1):
        worst = 0.0
        for k, (first, second) in enumerate(pairwise(layers)):
            s = pair_scales(_out_ranges(first, weights[k]), _in_ranges(second, weights[k + 1]))
            weights[k] = _scale_axis(weights[k], first.out_axis, 1.0 / s)
            weights[k + 1] = _scale_axis(weights[k + 1], second.in_axis, np.repeat(s, second.in_repeat))
            totals[k] *= s
            worst = max(worst, float(np.max(np.abs(np.log(s)))))
        if worst < TOLERANCE:
            break
    return totals, sweep


def _scale_bias(graph: Graph, node: gs.Node, inv: np.ndarray) -> None:
    """Multiply L1's bias by `inv` per output channel (Gemm: C broadcast to the features, beta folded in)."""
    tensor = input_at(node, 2)
    if tensor is None or node.op == "MatMul":
        return
    bias = graph.constant(tensor).astype(np.float64)
    if node.op == "Gemm":
        bias = bias * float(attr(node, "beta", 1.0))
        bias = np.broadcast_to(bias, (*bias.shape[:-1], inv.size) if bias.ndim else (inv.size,))
        node.attrs.pop("beta", None)
        node.attrs["beta"] = 1.0
    graph.set_constant(tensor, bias * inv)


class EqualizeLayers:
    name = NAME
    description = (
        "cross-layer equalization (Nagel et al. 2019): rescale output channel i of a Conv/Gemm/MatMul by "
        "1/s_i and input channel i of the next by s_i across Relu/LeakyRelu/PRelu/Identity/MaxPool, so "
        "both ranges become sqrt(r1_i·r2_i); chains are swept until the scales converge"
    )

    def find(self, graph: Graph) -> list[Match]:
        """One match per chain of legal pairs (its layers in order), one per refused pair."""
        follower: dict[str, str] = {}
        refused = []
        for l1 in graph.nodes(*LAYERS):
            for path, l2 in _followers(l1):
                if _pair_reason(graph, l1, path, l2) is None:
                    follower[l1.name] = l2.name
                else:
                    refused.append(Match(self.name, (l1.name, l2.name)))
        return [*_chains(self.name, follower), *refused]

    def check(self, graph: Graph, match: Match) -> str | None:
        nodes = [graph.node(n) for n in match.nodes]
        if any(n is None for n in nodes):
            return "node no longer in the graph"
        for l1, l2 in pairwise(nodes):
            path = _path(l1, l2)
            if path is None:
                return f"'{l2.name}' no longer reads '{l1.name}'"
            reason = _pair_reason(graph, l1, path, l2)
            if reason:
                return reason
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        layers = [_layer(graph, graph.node(n)) for n in match.nodes]  # check() has passed
        weights = [graph.constant(layer.weight).astype(np.float64) for layer in layers]
        totals, sweeps = _equalize_chain(layers, weights)
        for layer, w in zip(layers, weights):
            graph.set_constant(layer.weight, w)
        for layer, s in zip(layers, totals):
            _scale_bias(graph, layer.node, 1.0 / s)
        log.info("%s: %s equalized in %d sweeps", self.name, " → ".join(match.nodes), sweeps)

    def done(self, match: Match) -> str:
        """The outcome line for an applied match."""
        return f"equalized the weight ranges of {' → '.join(repr(n) for n in match.nodes)}"


def _chains(pass_name: str, follower: dict[str, str]) -> list[Match]:
    """The maximal paths of the follower links (each layer has at most one follower and one leader)."""
    led = set(follower.values())
    chains = []
    for start in follower:
        if start in led:
            continue
        chain = [start]
        while chain[-1] in follower:
            chain.append(follower[chain[-1]])
        chains.append(Match(pass_name, tuple(chain)))
    return chains

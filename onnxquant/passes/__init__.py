"""Graph rewrites that run before quantization, and `run_passes`, which applies a chosen subset.

`PASS_NAMES` lists every pass a rule file may name, in the order they run: `canonicalize` first (constant
folding and the bias/activation fusions real exports leave undone, through onnxscript: see canonicalize.py),
then the `PASSES` registry: folds into a preceding layer, then BN into a following Conv, then lowering of any
BN left over, then cross-layer equalization (`equalize_layers`, off in the presets: --cle). Each pass reports
an `Outcome` per match (done, or the reason it refused); a BatchNormalization that no enabled pass matched
gets an outcome under the name `UNFOLDED` saying why, so `inspect` can show every BN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx
import onnx_graphsurgeon as gs

from onnxquant.errors import BadRulesError
from onnxquant.model import declared_weights, infer_shapes, is_big
from onnxquant.passes.base import Graph, Match, Outcome, Pass, is_op, producer, stable_toposort
from onnxquant.passes.bn_to_affine import BNToAffine
from onnxquant.passes.canonicalize import NAME as CANONICALIZE
from onnxquant.passes.canonicalize import canonicalize as canonicalize_model
from onnxquant.passes.equalize_layers import EqualizeLayers
from onnxquant.passes.fold_bn import FoldBNConv, FoldConvBN, FoldConvTransposeBN, FoldGemmBN

__all__ = ["PASSES", "PASS_NAMES", "UNFOLDED", "Graph", "Match", "Outcome", "Pass", "run_passes"]

log = logging.getLogger(__name__)

PASSES: list[Pass] = [
    FoldConvBN(),
    FoldConvTransposeBN(),
    FoldGemmBN(),
    FoldBNConv(),
    BNToAffine(),
    EqualizeLayers(),
]
PASS_NAMES: tuple[str, ...] = (CANONICALIZE, *(p.name for p in PASSES))
UNFOLDED = "unfolded"

_FOLD_AFTER = {
    "Conv": "fold_conv_bn",
    "ConvTranspose": "fold_convtranspose_bn",
    "Gemm": "fold_gemm_bn",
    "MatMul": "fold_gemm_bn",
}


def run_passes(
    model: onnx.ModelProto, names: Sequence[str], dry_run: bool = False
) -> tuple[onnx.ModelProto, list[Outcome]]:
    """Apply the named passes (in registry order) to a copy of `model`.

    Returns the rewritten model, topologically sorted and without unused initializers, and one outcome
    per match plus one per BN left untouched. With `dry_run` the rewrite happens on a scratch copy and
    the input model itself is returned unchanged, with the outcomes a real run would give. Unnamed (or
    duplicate-named) nodes are given unique names (`ir.import_graph`) so outcomes can refer to them.
    """
    wanted = _validate(names)
    outcomes: list[Outcome] = []
    source = model
    if CANONICALIZE in wanted:
        model, outcomes = canonicalize_model(model)
    graph = Graph(model, _infer_types(model))
    for p in PASSES:
        if p.name in wanted:
            outcomes += _run_pass(p, graph)
    outcomes += _unfolded(graph, outcomes, wanted)
    for o in outcomes:
        log.info("%s %s: %s", o.pass_name, ",".join(o.nodes), o.reason)
    if dry_run:
        return source, outcomes
    stable_toposort(graph.gs)
    if is_big(model) and _unchanged(graph, model, outcomes):
        return model, outcomes  # its export would be a second copy of every weight, byte for byte the same
    return graph.export(), outcomes


def _unchanged(graph: Graph, model: onnx.ModelProto, outcomes: list[Outcome]) -> bool:
    """Whether exporting `graph` would give `model` again: no rewrite applied, the nodes already in
    topological order, and no initializer unused (the export drops those)."""
    used = {t.name for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    return (
        not any(o.applied for o in outcomes)
        and [n.name for n in graph.gs.nodes] == [n.name for n in model.graph.node]
        and used == {t.name for t in model.graph.initializer}
    )


def _validate(names: Sequence[str]) -> set[str]:
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in PASS_NAMES]
    if unknown:
        raise BadRulesError(f"passes: unknown pass {unknown[0]!r}; accepted: {', '.join(PASS_NAMES)}")
    return set(names)


def _run_pass(p: Pass, graph: Graph) -> list[Outcome]:
    """Apply `p` at every match; look again after a round that changed something (chains like BN→BN)."""
    seen: set[Match] = set()
    outcomes = []
    while True:
        fresh = [m for m in p.find(graph) if m not in seen]
        applied = False
        for match in fresh:
            seen.add(match)
            if any(graph.node(n) is None for n in match.nodes):
                continue  # an earlier rewrite in this round removed it
            reason = p.check(graph, match)
            if reason is None:
                p.rewrite(graph, match)
                applied = True
                outcomes.append(Outcome(p.name, match.nodes, True, p.done(match)))
            else:
                outcomes.append(Outcome(p.name, match.nodes, False, reason))
        if not applied:
            return outcomes


def _unfolded(graph: Graph, outcomes: list[Outcome], wanted: set[str]) -> list[Outcome]:
    """An outcome for each BN still in the graph that no enabled pass matched."""
    reported = {o.nodes[0] for o in outcomes if o.nodes}
    extra = []
    for bn in graph.nodes("BatchNormalization"):
        if bn.name in reported:
            continue
        prod = producer(bn.inputs[0])
        after = prod.op if prod is not None else "graph input"
        if prod is not None and _FOLD_AFTER.get(after) and _FOLD_AFTER[after] not in wanted:
            reason = f"BN after {after}: {_FOLD_AFTER[after]} is not enabled"
        elif any(is_op(c, "Conv") for c in bn.outputs[0].outputs) and "fold_bn_conv" not in wanted:
            reason = f"BN after {after}, before Conv: fold_bn_conv is not enabled"
        else:
            reason = (
                f"BN after {after}: no preceding Conv/ConvTranspose/Gemm/MatMul "
                "or following Conv to fold into"
            )
            if "bn_to_affine" not in wanted:
                reason += "; enable bn_to_affine to lower it to Mul+Add"
        extra.append(Outcome(UNFOLDED, (bn.name,), False, reason))
    return extra


def _infer_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types and shapes of all tensors, inferred on a copy whose large weights are only declared."""
    inferred = infer_shapes(declared_weights(model)).graph
    return {v.name: v.type for v in (*inferred.input, *inferred.output, *inferred.value_info)}

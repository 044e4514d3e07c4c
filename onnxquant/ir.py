"""The one graph IR every stage works on: onnx-graphsurgeon's `gs.Graph`.

`import_graph` names the nodes (the one place node names are made) and imports a model; `export_model` writes
a graph back as a model that keeps the source model's header (IR version, opsets, producer, metadata,
functions). Navigation is graph-surgeon's own: `tensor.inputs` is the producer (at most one), `tensor.outputs`
the consumers, `node.i(k)` / `node.o(k)` the neighbours; `producer`, `consumers` and `constant` below add the
None/empty cases that graph-surgeon raises on.

Node naming keeps every name a user gave once; an unnamed node becomes `<op_type>_<index>`, and a repeated
name gets `_<k>`, always avoiding names that are taken, so a rule written for a user's node never hits another.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = ("", "ai.onnx")


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node of `graph` (not its subgraphs) a unique name, never renaming a uniquely named node."""
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.name:
            counts[node.name] = counts.get(node.name, 0) + 1
    taken = set(counts)
    kept: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.name and node.name not in kept:
            kept.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        kept.add(name)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """`model` as a graph-surgeon graph, its nodes named uniquely (the model itself is not modified)."""
    if all(n.name for n in model.graph.node) and len({n.name for n in model.graph.node}) == len(model.graph.node):
        return gs.import_onnx(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    name_nodes(work.graph)
    return gs.import_onnx(work)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` as a model with `like`'s header; initializers sorted by name so the bytes are deterministic."""
    exported = gs.export_onnx(graph, do_type_check=False)
    inits = sorted(exported.graph.initializer, key=lambda t: t.name)
    del exported.graph.initializer[:]
    exported.graph.initializer.extend(inits)
    model = onnx.ModelProto()
    model.CopyFrom(like)
    model.graph.CopyFrom(exported.graph)
    return model


def is_op(node: gs.Node | None, *op_types: str) -> bool:
    return node is not None and node.op in op_types and (node.domain or "") in DEFAULT_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node writing `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes reading `tensor`, once per input slot."""
    return list(tensor.outputs)


def constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor, or None for variables."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None

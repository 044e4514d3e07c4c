"""The one graph IR every stage works on: onnx-graphsurgeon's `gs.Graph`.

`import_graph` names the nodes (the one place node names are made) and imports a model; `export_model` writes
a graph back as a model with the source model's header (IR version, opsets, producer, metadata, functions).
Navigation is graph-surgeon's own: `tensor.inputs` is the producer (at most one), `tensor.outputs` the
consumers, `node.i(k)` / `node.o(k)` the neighbours; `producer`, `consumers` and `constant` below add the
None/empty cases graph-surgeon raises on.

Node naming keeps every name a user gave once; an unnamed node becomes `<op_type>_<index>`, and a repeated
name gets `_<k>`, always avoiding names that are taken, so a rule written for a user's node never hits
another. Constants are read without replacing graph-surgeon's stored TensorProto (`Constant.values` would), so
an untouched constant is exported as it was read: raw or typed data, INT4 packing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxquant.errors import BadModelError

DEFAULT_DOMAINS = ("", "ai.onnx")


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node of `graph` (not its subgraphs) a unique name, never renaming a uniquely named node."""
    taken = {node.name for node in graph.node if node.name}
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
    names = [n.name for n in model.graph.node]
    if all(names) and len(set(names)) == len(names):
        return gs.import_onnx(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    name_nodes(work.graph)
    return gs.import_onnx(work)


def export_model(graph: gs.Graph, like: onnx.ModelProto, order: Sequence[str] = ()) -> onnx.ModelProto:
    """`graph` as a model with `like`'s header, written so that an unchanged graph gives `like`'s bytes.

    Initializers keep `like`'s order, then `order` (names of constants made since, in creation order), then
    any others by name; initializers that `like` also lists as
    graph inputs (overridable, which graph-surgeon drops on import) stay inputs while used; nodes without a
    domain are written without one.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    exported = model.graph
    rank: dict[str, int] = {}
    for name in (*(t.name for t in like.graph.initializer), *order):
        rank.setdefault(name, len(rank))
    exported.initializer.sort(key=lambda t: (rank.get(t.name, len(rank)), t.name))  # in place: no copy
    live = {t.name for t in exported.initializer} | {t.name for t in graph.inputs}
    inputs = [i for i in like.graph.input if i.name in live]
    del exported.input[:]
    exported.input.extend(inputs)
    for node in _all_nodes(exported):
        if not node.domain:
            node.ClearField("domain")
    _copy_header(like, model)
    return model


def _copy_header(like: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Give `model` every field of `like` but its graph. Field by field, because `CopyFrom(like)` would copy
    `like`'s weights too, only to replace them: a transient copy of every weight, which a model of several
    GB cannot afford."""
    for fd, _ in model.ListFields():
        if fd.name != "graph":
            model.ClearField(fd.name)
    for fd, value in like.ListFields():
        if fd.name == "graph":
            continue
        if fd.is_repeated:
            getattr(model, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(model, fd.name).CopyFrom(value)
        else:
            setattr(model, fd.name, value)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                yield from _all_nodes(g)


def is_op(node: gs.Node | None, *op_types: str) -> bool:
    return node is not None and node.op in op_types and (node.domain or "") in DEFAULT_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node writing `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes reading `tensor`, once per input slot."""
    return list(tensor.outputs)


def constant(tensor: gs.Tensor | None, readonly: bool = False) -> np.ndarray | None:
    """The value of a constant, or None for variables; the stored TensorProto is kept (see the module doc).
    `readonly`: a read-only array over the bytes protobuf hands out, without graph-surgeon's second copy (a
    big model's weights)."""
    if not isinstance(tensor, gs.Constant):
        return None
    values = tensor._values
    if isinstance(values, LazyValues):
        return numpy_helper.to_array(values.tensor) if readonly else values.load()
    return np.asarray(values)


def stored(name: str, value: np.ndarray) -> LazyValues:
    """`value` as graph-surgeon constant storage, serialized by `numpy_helper.from_array` (INT4 packed)."""
    return LazyValues(numpy_helper.from_array(np.asarray(value), name))


def reads(node: gs.Node) -> Iterator[gs.Tensor]:
    """Tensors `node` reads, those read inside its subgraphs included."""
    yield from node.inputs
    for g in node.subgraphs():
        for inner in g.nodes:
            yield from reads(inner)


def stable_toposort(graph: gs.Graph) -> None:
    """Order the nodes so each comes after the producers of what it reads, always taking the ready node that
    is listed first (Kahn's algorithm): a sorted list keeps its order, and a node listed early is placed
    right after the last producer it needs."""
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {index[id(p)] for t in reads(node) for p in t.inputs if id(p) in index} - {i}
        waiting[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(n.name for i, n in enumerate(nodes) if waiting[i])
        raise BadModelError(f"model: the graph has a cycle through node '{stuck}'; accepted: acyclic graphs")
    graph.nodes = [nodes[i] for i in order]

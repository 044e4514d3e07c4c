"""What every rewrite pass shares: the match/outcome records, the `Pass` protocol, and `Graph`, a small
mutable view over an `onnx.ModelProto` with producer/consumer lookup and constant access.

A pass is pattern + check + rewrite: `find` lists the places where its pattern occurs, `check` returns
None when the rewrite is legal there or a one-line reason when it refuses, and `rewrite` applies it.
Also here: reading a BatchNormalization's constants as the affine map it computes in inference mode,
`y = s·x + t` with `s = γ / sqrt(var + ε)` and `t = β − μ·s` per channel (axis 1).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

FLOAT_TYPES = (np.float16, np.float32, np.float64)
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Match:
    """One place where a pass's pattern occurs; `nodes` are node names, the anchor (the BN) first."""

    pass_name: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What a pass did at a match (`applied`), or why it refused; `reason` says which, in one line."""

    pass_name: str
    nodes: tuple[str, ...]
    applied: bool
    reason: str


class Pass(Protocol):
    name: str
    description: str

    def find(self, graph: Graph) -> list[Match]: ...

    def check(self, graph: Graph, match: Match) -> str | None: ...

    def rewrite(self, graph: Graph, match: Match) -> None: ...


def is_op(node: onnx.NodeProto | None, *op_types: str) -> bool:
    return node is not None and node.op_type in op_types and node.domain in DEFAULT_DOMAINS


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


class Graph:
    """A view over `model.graph` for passes. The lookup index is rebuilt lazily after each change, so
    callers look nodes up by name again after a rewrite instead of keeping NodeProto references."""

    def __init__(self, model: onnx.ModelProto, types: dict[str, onnx.TypeProto] | None = None):
        self.model = model
        self.proto = model.graph
        self.types: dict[str, onnx.TypeProto] = dict(types or {})
        self._index: _Index | None = None
        self._names: set[str] | None = None
        self.new_tensors: set[str] = set()

    # -- lookup -------------------------------------------------------------------------------------
    @property
    def index(self) -> _Index:
        if self._index is None:
            self._index = _Index(self.proto)
        return self._index

    def changed(self) -> None:
        """Forget the lookup index; call after any structural change."""
        self._index = None

    def nodes(self, *op_types: str) -> list[onnx.NodeProto]:
        return [n for n in self.proto.node if not op_types or is_op(n, *op_types)]

    def node(self, name: str) -> onnx.NodeProto | None:
        return self.index.by_name.get(name)

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return self.index.producers.get(tensor)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        """Nodes reading `tensor`, once per input slot; a node whose subgraph reads it counts too."""
        return self.index.consumers.get(tensor, [])

    def is_output(self, tensor: str) -> bool:
        return tensor in self.index.outputs

    def uses(self, tensor: str) -> int:
        return len(self.consumers(tensor)) + self.is_output(tensor)

    def rank(self, tensor: str) -> int | None:
        t = self.types.get(tensor)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of initializer `name`, or None if it is not one or a graph input can override it."""
        tensor = self.index.initializers.get(name)
        if tensor is None or name in self.index.inputs:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError, OSError):  # external data not loaded, exotic dtypes
            return None

    # -- legality helpers shared by passes ------------------------------------------------------------
    def sole_consumer_reason(self, tensor: str, consumer: onnx.NodeProto, what: str) -> str | None:
        """Why `tensor` cannot disappear into `consumer`: a graph output, or read by another node."""
        if self.is_output(tensor):
            return f"{what} '{tensor}' is a graph output"
        readers = self.consumers(tensor)
        if len(readers) != 1 or readers[0] is not consumer:
            return f"{what} '{tensor}' has {len(readers)} consumers"
        return None

    def weight_reason(self, node: onnx.NodeProto, slot: int, what: str) -> str | None:
        """Why input `slot` of `node` cannot be rewritten in place: not a float constant, or shared."""
        name = node.input[slot] if len(node.input) > slot else ""
        if not name:
            return None
        reason = self.constant_reason(name, what)
        if reason:
            return reason
        value = self.constant(name)
        if value.dtype.type not in FLOAT_TYPES:
            return f"{what} '{name}' has dtype {value.dtype}; accepted: float16, float32, float64"
        others = [n.name for n in self.consumers(name) if n is not node]
        if others:
            return f"{what} '{name}' is shared with node '{others[0]}'"
        if self.uses(name) > 1:
            return f"{what} '{name}' is also {'a graph output' if self.is_output(name) else 'another input'}"
        return None

    def constant_reason(self, name: str, what: str) -> str | None:
        """Why `name` is not a constant this pass may read, or None."""
        if name in self.index.initializers and name in self.index.inputs:
            return f"{what} '{name}' is an initializer that is also a graph input (it can be overridden)"
        if self.constant(name) is None:
            return f"{what} '{name}' is not a constant initializer"
        return None

    # -- changes ---------------------------------------------------------------------------------------
    def set_constant(self, name: str, value: np.ndarray) -> None:
        """Replace initializer `name` with `value`, keeping the initializer's dtype."""
        tensor = self.index.initializers[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), name))

    def add_constant(self, base: str, value: np.ndarray) -> str:
        """Add an initializer under a fresh name derived from `base`; returns the name."""
        name = self.unique_name(base)
        self.proto.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.changed()
        return name

    def add_node(self, op_type: str, inputs: list[str], outputs: list[str], base_name: str,
                 **attrs) -> str:
        """Append a node (the final topological sort puts it in place); returns its name."""
        name = self.unique_name(base_name)
        self.proto.node.append(onnx.helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        self.changed()
        return name

    def remove_node(self, name: str) -> None:
        for i, node in enumerate(self.proto.node):
            if node.name == name:
                del self.proto.node[i]
                self.changed()
                return
        raise KeyError(name)

    def unique_name(self, base: str) -> str:
        """A name used by no node, tensor or initializer yet (it is reserved on return)."""
        if self._names is None:
            self._names = _all_names(self.proto)
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def copy_type(self, src: str, dst: str) -> None:
        """Record that new tensor `dst` has the type and shape of `src` (it gets a value_info entry)."""
        if src in self.types:
            self.types[dst] = self.types[src]
            self.new_tensors.add(dst)

    def forget_tensor(self, name: str) -> None:
        """Drop the shape record of a tensor that no longer exists."""
        self.types.pop(name, None)


class _Index:
    def __init__(self, graph: onnx.GraphProto):
        self.by_name: dict[str, onnx.NodeProto] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            self.by_name[node.name] = node
            for out in node.output:
                if out:
                    self.producers[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            for name in subgraph_reads(node):
                self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.initializers = {t.name: t for t in graph.initializer}


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read inside the node's subgraphs (a superset of the outer names they capture)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(n for n in inner.input if n)
                names |= subgraph_reads(inner)
            names.update(o.name for o in g.output)
    return names


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {n.name for n in graph.node}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    names.update(t.name for t in graph.initializer)
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    return names


@dataclass(frozen=True)
class BNAffine:
    """A BatchNormalization in inference mode as `y = scale·x + shift` per channel (float64)."""

    scale: np.ndarray
    shift: np.ndarray


def bn_affine(graph: Graph, bn: onnx.NodeProto) -> BNAffine | str:
    """`s = γ / sqrt(var + ε)`, `t = β − μ·s`; or the reason the BN cannot be read as constants."""
    if attr(bn, "training_mode", 0):
        return "BN is in training mode (training_mode=1)"
    if any(bn.output[1:]):
        return "BN computes running statistics (extra outputs): training mode"
    if len(bn.input) != 5:
        return f"BN has {len(bn.input)} inputs; expected 5"
    values = []
    for label, name in zip(("scale", "bias", "mean", "var"), bn.input[1:]):
        reason = graph.constant_reason(name, f"BN {label}")
        if reason:
            return reason
        value = graph.constant(name)
        if value.dtype.type not in FLOAT_TYPES or value.ndim != 1:
            return f"BN {label} '{name}' is not a 1-D float tensor"
        values.append(value.astype(np.float64))
    gamma, beta, mean, var = values
    if len({v.size for v in values}) != 1:
        return "BN parameters differ in length"
    eps = float(attr(bn, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return BNAffine(scale=scale, shift=beta - mean * scale)

"""What every rewrite pass shares: the match/outcome records, the `Pass` protocol, and `Graph`, a thin wrapper
over onnx-graphsurgeon's `gs.Graph` (the one IR, and its one producer/consumer index) adding what
graph-surgeon lacks: inferred types for legality checks, fresh names, reasons for refusals, and an export that
keeps the source model's initializer order and overridable (graph-input) initializers.

A pass is pattern + check + rewrite: `find` lists the places where its pattern occurs, `check` returns
None when the rewrite is legal there or a one-line reason when it refuses, and `rewrite` applies it.
Also here: reading a BatchNormalization's constants as the affine map it computes in inference mode,
`y = s·x + t` with `s = γ / sqrt(var + ε)` and `t = β − μ·s` per channel (axis 1), and `stable_toposort`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxquant.ir import constant as constant_value
from onnxquant.ir import export_model, import_graph, is_op, producer, stable_toposort, stored

__all__ = [
    "BNAffine",
    "Graph",
    "Match",
    "Outcome",
    "Pass",
    "attr",
    "bn_affine",
    "constant_value",
    "input_at",
    "is_op",
    "producer",
    "stable_toposort",
    "stored",
]

log = logging.getLogger(__name__)

FLOAT_TYPES = (np.float16, np.float32, np.float64)


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

    def done(self, match: Match) -> str: ...


class Graph:
    """A `gs.Graph` imported from `model` (nodes named by `ir.import_graph`) with the helpers passes share.

    `types` are inferred types by tensor name, consulted for ranks; they reach the model only for tensors a
    pass creates (`new_variable`). Nodes and tensors are navigated with graph-surgeon (`tensor.inputs` is
    the producer, `tensor.outputs` the consumers).
    """

    def __init__(self, model: onnx.ModelProto, types: dict[str, onnx.TypeProto] | None = None):
        self.model = model
        self.gs = import_graph(model)
        self.types: dict[str, onnx.TypeProto] = dict(types or {})
        self.order = [t.name for t in model.graph.initializer]
        inputs = {i.name for i in model.graph.input}
        self.overridable = {name for name in self.order if name in inputs}
        self._names: set[str] | None = None

    # -- lookup -------------------------------------------------------------------------------------
    def nodes(self, *op_types: str) -> list[gs.Node]:
        return [n for n in self.gs.nodes if not op_types or is_op(n, *op_types)]

    def node(self, name: str) -> gs.Node | None:
        return next((n for n in self.gs.nodes if n.name == name), None)

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.gs.tensors()

    def is_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.gs.outputs)

    def uses(self, tensor: gs.Tensor) -> int:
        return len(tensor.outputs) + self.is_output(tensor)

    def rank(self, tensor: gs.Tensor) -> int | None:
        t = self.types.get(tensor.name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def dtype(self, tensor: gs.Tensor) -> np.dtype | None:
        """The inferred element type of `tensor`, if known."""
        t = self.types.get(tensor.name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
            return None
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type))

    def constant(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The value of a constant input, or None if it is not one or a graph input can override it."""
        if tensor is None or tensor.name in self.overridable:
            return None
        try:
            return constant_value(tensor)
        except (ValueError, TypeError, OSError):  # external data not loaded, exotic dtypes
            return None

    # -- legality helpers shared by passes ------------------------------------------------------------
    def sole_consumer_reason(self, tensor: gs.Tensor, consumer: gs.Node, what: str) -> str | None:
        """Why `tensor` cannot disappear into `consumer`: a graph output, or read by another node."""
        if self.is_output(tensor):
            return f"{what} '{tensor.name}' is a graph output"
        readers = tensor.outputs
        if len(readers) != 1 or readers[0] is not consumer:
            return f"{what} '{tensor.name}' has {len(readers)} consumers"
        return None

    def weight_reason(self, node: gs.Node, slot: int, what: str) -> str | None:
        """Why input `slot` of `node` cannot be rewritten in place: not a float constant, or shared."""
        tensor = input_at(node, slot)
        if tensor is None:
            return None
        reason = self.constant_reason(tensor, what)
        if reason:
            return reason
        value, name = self.constant(tensor), tensor.name
        if value.dtype.type not in FLOAT_TYPES:
            return f"{what} '{name}' has dtype {value.dtype}; accepted: float16, float32, float64"
        others = [n.name for n in tensor.outputs if n is not node]
        if others:
            return f"{what} '{name}' is shared with node '{others[0]}'"
        if self.uses(tensor) > 1:
            return (
                f"{what} '{name}' is also {'a graph output' if self.is_output(tensor) else 'another input'}"
            )
        return None

    def constant_reason(self, tensor: gs.Tensor, what: str) -> str | None:
        """Why `tensor` is not a constant this pass may read, or None."""
        if tensor.name in self.overridable:
            return (
                f"{what} '{tensor.name}' is an initializer that is also a graph input (it can be overridden)"
            )
        if self.constant(tensor) is None:
            return f"{what} '{tensor.name}' is not a constant initializer"
        return None

    # -- changes ---------------------------------------------------------------------------------------
    def set_constant(self, tensor: gs.Constant, value: np.ndarray) -> None:
        """Give constant `tensor` a new value, keeping its dtype."""
        tensor.values = stored(tensor.name, np.asarray(value).astype(constant_value(tensor).dtype))

    def add_constant(self, base: str, value: np.ndarray) -> gs.Constant:
        """A constant under a fresh name derived from `base`; it is exported after the existing ones."""
        name = self.unique_name(base)
        self.order.append(name)
        return gs.Constant(name, stored(name, value))

    def new_variable(self, base: str, like: gs.Tensor | None = None) -> gs.Variable:
        """A tensor under a fresh name; with `like`, it has the inferred type and shape of `like`."""
        name = self.unique_name(base)
        dtype = None if like is None else self.dtype(like)
        if dtype is None:
            return gs.Variable(name)
        t = self.types[name] = self.types[like.name]
        dims = (
            None
            if not t.tensor_type.HasField("shape")
            else [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in t.tensor_type.shape.dim
            ]
        )
        return gs.Variable(name, dtype, dims)

    def make_node(
        self, op: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor], base_name: str, **attrs
    ) -> gs.Node:
        """A node under a fresh name, connected but not yet listed in the graph."""
        return gs.Node(op, self.unique_name(base_name), attrs, inputs, outputs)

    def replace_node(self, old: gs.Node, new: list[gs.Node]) -> None:
        """Disconnect `old` and list `new` in its place (the order stays topological when `new` reads what
        `old` read and writes what it wrote)."""
        i = next(k for k, n in enumerate(self.gs.nodes) if n is old)
        old.inputs.clear()
        old.outputs.clear()
        self.gs.nodes[i : i + 1] = new

    def unique_name(self, base: str) -> str:
        """A name used by no node or tensor yet (it is reserved on return)."""
        if self._names is None:
            self._names = set(self.gs.tensors()) | {n.name for n in self.gs.nodes} | set(self.order)
            self._names |= {v.name for v in (*self.model.graph.input, *self.model.graph.value_info)}
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def forget_tensor(self, tensor: gs.Tensor) -> None:
        """Drop the type record of a tensor that no longer exists."""
        self.types.pop(tensor.name, None)

    # -- export ----------------------------------------------------------------------------------------
    def export(self) -> onnx.ModelProto:
        """The graph as a model with the source model's header and initializer order (see
        `ir.export_model`)."""
        return export_model(self.gs, self.model, self.order)


def input_at(node: gs.Node, slot: int) -> gs.Tensor | None:
    """Input `slot` of `node`, or None when it is absent or empty (an omitted optional input)."""
    if len(node.inputs) <= slot or node.inputs[slot].is_empty():
        return None
    return node.inputs[slot]


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


@dataclass(frozen=True)
class BNAffine:
    """A BatchNormalization in inference mode as `y = scale·x + shift` per channel (float64)."""

    scale: np.ndarray
    shift: np.ndarray


def bn_affine(graph: Graph, bn: gs.Node) -> BNAffine | str:
    """`s = γ / sqrt(var + ε)`, `t = β − μ·s`; or the reason the BN cannot be read as constants."""
    if attr(bn, "training_mode", 0):
        return "BN is in training mode (training_mode=1)"
    if any(not t.is_empty() for t in bn.outputs[1:]):
        return "BN computes running statistics (extra outputs): training mode"
    if len(bn.inputs) != 5:
        return f"BN has {len(bn.inputs)} inputs; expected 5"
    values = []
    for label, tensor in zip(("scale", "bias", "mean", "var"), bn.inputs[1:]):
        reason = graph.constant_reason(tensor, f"BN {label}")
        if reason:
            return reason
        value = graph.constant(tensor)
        if value.dtype.type not in FLOAT_TYPES or value.ndim != 1:
            return f"BN {label} '{tensor.name}' is not a 1-D float tensor"
        values.append(value.astype(np.float64))
    gamma, beta, mean, var = values
    if len({v.size for v in values}) != 1:
        return "BN parameters differ in length"
    eps = float(attr(bn, "epsilon", 1e-5))
    if not all(np.isfinite(v).all() for v in values) or not (var + eps > 0).all():
        return "BN parameters hold NaN/Inf or var + epsilon <= 0"
    scale = gamma / np.sqrt(var + eps)
    return BNAffine(scale=scale, shift=beta - mean * scale)

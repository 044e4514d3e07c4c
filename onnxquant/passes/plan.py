"""Quantization planning: which nodes are quantized at which widths, and which tensors carry Q/DQ.

Placement `ort` quantizes the float inputs and outputs of every quantized node; an output whose sole consumer
is a Relu or Clip is quantized after that activation instead, so ONNX Runtime fuses DQ→Conv→Relu→Q into
QLinearConv. Placement `tensorrt` quantizes only the inputs of quantized nodes (compute ops and residual Adds).
Graph outputs stay float. A tensor requested at several widths gets the widest.

A MaxPool's input is calibrated on its output's statistics (`QuantPlan.shared`), at its own width, when the
MaxPool is its only consumer: max commutes with clipping, so at equal widths both Q/DQ pairs act as one and
the integer MaxPool gets one scale for both, and the range fits the values that travel on (the window maxima)
rather than the mostly discarded rest (a Laplace fit to a post-Relu tensor would clip exactly those).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxquant.rules import COMPUTE_OPS, QuantSpec, Rules

FUSED_ACTIVATIONS = ("Relu", "Clip")
ORDER_PRESERVING = ("MaxPool",)
FLOAT_TYPES = (onnx.TensorProto.FLOAT,)
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class NodeDecision:
    name: str
    op_type: str
    quantize: bool
    reason: str
    weights: QuantSpec
    activations: QuantSpec
    weight: str | None = None


@dataclass(frozen=True)
class ActivationSpec:
    bits: int
    symmetric: bool
    method: str


@dataclass
class QuantPlan:
    placement: str
    nodes: list[NodeDecision] = field(default_factory=list)
    activations: dict[str, ActivationSpec] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose statistics calibrate it

    def range_source(self, tensor: str) -> str:
        """The tensor whose statistics calibrate `tensor` (itself unless shared)."""
        while tensor in self.shared:
            tensor = self.shared[tensor]
        return tensor

    @property
    def weight_bits(self) -> set[int]:
        return {d.weights.bits for d in self.nodes if d.quantize and d.weight}


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (inputs, outputs, value_info, initializers)."""
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def tensor_shapes(model: onnx.ModelProto) -> dict[str, onnx.TensorShapeProto]:
    """Shape of every graph input and intermediate tensor whose shape is recorded (rank known)."""
    return {vi.name: vi.type.tensor_type.shape for vi in (*model.graph.input, *model.graph.value_info)
            if vi.type.tensor_type.HasField("shape")}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                users.setdefault(name, []).append(node)
    return users


def compute_positions(model: onnx.ModelProto) -> dict[str, frozenset[str]]:
    """`first`/`last` for the first and last compute node (Conv, ConvTranspose, Gemm, MatMul) with a weight."""
    inits = {t.name for t in model.graph.initializer}
    compute = [n.name for n in model.graph.node
               if n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in inits]
    positions: dict[str, set[str]] = {}
    if compute:
        positions.setdefault(compute[0], set()).add("first")
        positions.setdefault(compute[-1], set()).add("last")
    return {k: frozenset(v) for k, v in positions.items()}


def plan_quantization(model: onnx.ModelProto, rules: Rules) -> QuantPlan:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    types = tensor_types(model)
    users = consumers(model)
    graph_outputs = {o.name for o in graph.output}
    positions = compute_positions(model)
    plan = QuantPlan(placement=rules.placement)

    def request(tensor: str, spec: QuantSpec) -> None:
        if tensor in graph_outputs or tensor in inits or types.get(tensor) not in FLOAT_TYPES:
            return
        old = plan.activations.get(tensor)
        if old is None or spec.bits > old.bits:
            plan.activations[tensor] = ActivationSpec(spec.bits, spec.symmetric, spec.method)

    for node in graph.node:
        rule = rules.for_node(node.name, node.op_type, positions.get(node.name, frozenset()))
        quantize, reason, weight = rule.quantize, rule.reason, None
        if quantize and node.op_type in WEIGHT_INPUT:
            candidate = node.input[WEIGHT_INPUT[node.op_type]]
            if candidate in inits:
                weight = candidate
            elif node.op_type != "MatMul":
                quantize, reason = False, f"weight {candidate!r} is not a constant"
        if quantize and not any(types.get(t) in FLOAT_TYPES for t in node.input if t and t not in inits):
            quantize, reason = False, "no float activation input"
        plan.nodes.append(NodeDecision(node.name, node.op_type, quantize, reason, rule.weights,
                                       rule.activations, weight))
        if not quantize:
            continue
        data_inputs = [t for i, t in enumerate(node.input) if t and t not in inits
                       and not (node.op_type in COMPUTE_OPS and i == 2)]
        for tensor in data_inputs:
            request(tensor, rule.activations)
        if rules.placement == "ort":
            for tensor in node.output:
                request(_fused_output(tensor, users, graph_outputs), rule.activations)
    _mark_fused(plan, model)
    _share_ranges(plan, model, users)
    return plan


def _share_ranges(plan: QuantPlan, model: onnx.ModelProto, users: dict[str, list[onnx.NodeProto]]) -> None:
    quantized = {d.name for d in plan.nodes if d.quantize}
    for node in model.graph.node:
        if node.op_type in ORDER_PRESERVING and node.name in quantized and len(node.output) == 1:
            src, dst = node.input[0], node.output[0]
            if src in plan.activations and dst in plan.activations and len(users.get(src, [])) == 1:
                plan.shared[src] = dst


def _mark_fused(plan: QuantPlan, model: onnx.ModelProto) -> None:
    """A float Relu/Clip whose output carries Q/DQ runs fused into the quantized node before it."""
    by_name = {n.name: n for n in model.graph.node}
    for i, d in enumerate(plan.nodes):
        node = by_name[d.name]
        if not d.quantize and d.op_type in FUSED_ACTIVATIONS and node.output[0] in plan.activations:
            plan.nodes[i] = NodeDecision(d.name, d.op_type, True, "fused into the quantized node before it",
                                         d.weights, d.activations)


def _fused_output(tensor: str, users: dict[str, list[onnx.NodeProto]], graph_outputs: set[str]) -> str:
    after = users.get(tensor, [])
    if len(after) == 1 and after[0].op_type in FUSED_ACTIVATIONS and tensor not in graph_outputs:
        return after[0].output[0]
    return tensor

"""Quantization planning: which nodes are quantized at which widths, and which tensors carry Q/DQ.

A tensor gets Q/DQ only where the target runtime computes on its codes: as a float input of a quantized node
(both placements). Placement `ort` quantizes the nodes of `quantize_ops` (ONNX Runtime's QDQ transformer fuses
DQ→op→Q groups into QLinear kernels); a Relu/Clip after a quantized node is fused with it (its output is the
next node's quantized input, and Q saturates as the activation would). A quantized node's output that only a
float op reads (Conv → HardSwish, a squeeze-excite gate) gets no Q/DQ: the runtime would dequantize it at once
and compute in float, so a Q/DQ there only adds error. Under `ort`, a quantized non-compute op (Add, Concat,
pooling) whose output no quantized node reads, directly or across data movement, is left float too: ONNX
Runtime computes it in integer only with its output quantized (a transformer's residual Add before its
LayerNorm). Placement `tensorrt` quantizes the inputs of compute ops and of residual Adds that a Conv feeds
(TensorRT fuses those into the Conv's epilogue; a transformer's residual Add stays float). An element-wise op
with a constant operand (an Add of a bias or a +3, a Mul by a scale) stays float under both: no runtime fuses
it into integer work. Graph outputs stay float. A tensor requested at several widths gets the widest.
Rule key `quantize_outputs` (placement `ort`; the `integer` preset lists the compute ops) also quantizes the
output of every quantized node of those op types, even where only a float op reads it, so that ONNX Runtime
runs each as an integer kernel, as its own quantizer does: faster where int8 kernels are, less accurate.
Placement `weights` is weight-only quantization: the constant weights of the quantized compute nodes get DQ,
no activation gets Q/DQ (nothing to calibrate). ONNX Runtime fuses an int4 DQ → MatMul into MatMulNBits,
which at its default accuracy level (4) also rounds the MatMul's input to int8 per block: a dynamic W4A8;
session option `session.qdq_matmulnbits_accuracy_level` = 0 keeps it float.

With `depthwise_inputs: per_channel`, the input x of a depthwise Conv (group = channels, the Conv its only
reader) is quantized per channel and equalized into the Conv (`QuantPlan.equalized`): with per-channel scales
s_c and s = max_c s_c, Q/DQ inserts `x·k` with k_c = s/s_c, quantizes that per tensor at scale s (its codes
equal x's per-channel codes), and divides the Conv's per-channel weight scales by k_c, which is exact because
each output channel of a depthwise Conv reads one input channel. Runtimes see a per-tensor input scale (ONNX
Runtime's QLinearConv, TensorRT) and the channels keep their own resolution: real depthwise inputs spread
their channel ranges 10-100× (after HardSwish in MobileNetV3-style nets), which one scale wipes out.
Equalized codes are symmetric, or unsigned with zero point 0 for one-sided tensors (one zero point cannot
serve channels of different offsets); calibration keeps the per-tensor range instead where that gives the
Conv's output less rounding error (api.calibrate). k is capped at 2^16, below which a channel is dead.

A MatMul of two activations that reads a Softmax output (attention's probabilities · V) stays float: most of
the probability mass sits in values below one 8-bit step of the maximum (a ViT-S: 28.5 → 31.9 dB W8A8).

A MaxPool's input is calibrated on its output's statistics (`QuantPlan.shared`), at its own width, when the
MaxPool is its only consumer: max commutes with clipping, so at equal widths both Q/DQ pairs act as one and
the integer MaxPool gets one scale for both, and the range fits the values that travel on (the window maxima)
rather than the mostly discarded rest (a Laplace fit to a post-Relu tensor would clip exactly those).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxquant.ir import import_graph, is_op
from onnxquant.rules import COMPUTE_OPS, QuantSpec, Rules

FUSED_ACTIVATIONS = ("Relu", "Clip")
ORDER_PRESERVING = ("MaxPool",)
FLOAT_TYPES = (np.dtype(np.float32),)
DATA_MOVEMENT = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
ELEMENTWISE = ("Add", "Sub", "Mul", "Div")  # quantized only between two activations (residual Adds)
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
ATTENTION_REASON = (
    "reads attention probabilities (a Softmax output): 8-bit codes of step max/255 zero the small "
    "probabilities that carry most of the mass"
)


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
    format: str = "int"  # or an FP8 format (symmetric, zero point 0)
    scale: str = "float"  # or "pow2"


@dataclass
class QuantPlan:
    placement: str
    nodes: list[NodeDecision] = field(default_factory=list)
    activations: dict[str, ActivationSpec] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose statistics calibrate it
    equalized: dict[str, str] = field(default_factory=dict)  # depthwise input -> the Conv that absorbs k
    unmatched_overrides: list[str] = field(default_factory=list)  # rule overrides matching no node

    def range_source(self, tensor: str) -> str:
        """The tensor whose statistics calibrate `tensor` (itself unless shared)."""
        while tensor in self.shared:
            tensor = self.shared[tensor]
        return tensor

    @property
    def weight_bits(self) -> set[int]:
        return {d.weights.bits for d in self.nodes if d.quantize and d.weight}


def tensor_shapes(model: onnx.ModelProto) -> dict[str, onnx.TensorShapeProto]:
    """Shape of every graph input and intermediate tensor whose shape is recorded (rank known)."""
    return {
        vi.name: vi.type.tensor_type.shape
        for vi in (*model.graph.input, *model.graph.value_info)
        if vi.type.tensor_type.HasField("shape")
    }


def weight_axis(node: gs.Node, ndim: int) -> int:
    """The output-channel axis of a compute node's weight."""
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return ndim - 1
    return 0


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) in FLOAT_TYPES


def compute_positions(graph: gs.Graph) -> dict[str, frozenset[str]]:
    """`first`/`last` for the first and last compute node (Conv, ConvTranspose, Gemm, MatMul) with a
    weight."""
    compute = [
        n.name
        for n in graph.nodes
        if n.op in COMPUTE_OPS and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)
    ]
    positions: dict[str, set[str]] = {}
    if compute:
        positions.setdefault(compute[0], set()).add("first")
        positions.setdefault(compute[-1], set()).add("last")
    return {k: frozenset(v) for k, v in positions.items()}


def plan_quantization(model: onnx.ModelProto, rules: Rules) -> QuantPlan:
    """Which nodes are quantized at which widths, and which tensors get Q/DQ (see the module docstring)."""
    graph = import_graph(model)
    graph_outputs = {o.name for o in graph.outputs}
    positions = compute_positions(graph)
    plan = QuantPlan(placement=rules.placement)
    plan.unmatched_overrides = rules.unmatched_overrides(
        (n.name, n.op, positions.get(n.name, frozenset())) for n in graph.nodes
    )

    requests: dict[str, dict[str, QuantSpec]] = {}  # tensor -> {requesting node: its activation spec}

    def request(tensor: gs.Tensor, node: str, spec: QuantSpec) -> None:
        if tensor.name in graph_outputs or isinstance(tensor, gs.Constant) or not _is_float(tensor):
            return
        requests.setdefault(tensor.name, {})[node] = spec

    for node in graph.nodes:
        rule = rules.for_node(node.name, node.op, positions.get(node.name, frozenset()))
        quantize, reason, weight = rule.quantize, rule.reason, None
        if quantize and node.op in WEIGHT_INPUT:
            candidate = node.inputs[WEIGHT_INPUT[node.op]]
            if isinstance(candidate, gs.Constant):
                weight = candidate.name
            elif node.op != "MatMul":
                quantize, reason = False, f"weight {candidate.name!r} is not a constant"
        if quantize and rules.placement == "weights" and weight is None:
            quantize, reason = False, "weight-only placement: no constant weight to quantize"
        variables = [
            (i, t) for i, t in enumerate(node.inputs) if not t.is_empty() and isinstance(t, gs.Variable)
        ]
        if quantize and not any(_is_float(t) for _, t in variables):
            quantize, reason = False, "no float activation input"
        elif quantize and weight is None and node.op == "MatMul" and _reads_softmax(node):
            quantize, reason = False, ATTENTION_REASON
        elif quantize and node.op in ELEMENTWISE and len(variables) < len(node.inputs):
            quantize, reason = False, f"{node.op} of a constant: nothing to fuse, it stays float"
        elif quantize and rules.placement == "tensorrt" and node.op == "Add" and not _after_conv(node):
            quantize, reason = (
                False,
                "TensorRT fuses a residual Add into a Conv's epilogue only; none feeds it",
            )
        plan.nodes.append(
            NodeDecision(node.name, node.op, quantize, reason, rule.weights, rule.activations, weight)
        )
        if not quantize or rules.placement == "weights":
            continue
        for i, tensor in variables:
            if not (node.op in COMPUTE_OPS and i == 2):
                request(tensor, node.name, rule.activations)
    if rules.placement == "ort":
        _quantize_outputs(plan, graph, rules.quantize_outputs, request)
        _demote_float_read(plan, graph, requests)
    for name, specs in requests.items():
        if specs:
            widest = max(specs.values(), key=lambda spec: spec.bits)
            plan.activations[name] = ActivationSpec(
                widest.bits,
                widest.symmetric or widest.format != "int",
                widest.method,
                widest.format,
                widest.scale,
            )
    _mark_fused(plan, graph)
    _share_ranges(plan, graph)
    if rules.depthwise_inputs == "per_channel":
        _equalize_depthwise(plan, graph)
    return plan


def _reads_softmax(node: gs.Node) -> bool:
    """Whether an input of `node` is a Softmax output, directly or across data movement."""
    for tensor in node.inputs:
        while tensor.inputs and tensor.inputs[0].op in DATA_MOVEMENT:
            tensor = tensor.inputs[0].inputs[0]
        if tensor.inputs and tensor.inputs[0].op == "Softmax":
            return True
    return False


def _after_conv(node: gs.Node) -> bool:
    """Whether an input of `node` is a Conv's output (through a Relu/Clip at most)."""
    for tensor in node.inputs:
        p = tensor.inputs[0] if tensor.inputs else None
        if p is not None and p.op in FUSED_ACTIVATIONS and p.inputs[0].inputs:
            p = p.inputs[0].inputs[0]
        if p is not None and p.op in ("Conv", "ConvTranspose"):
            return True
    return False


def _quantize_outputs(plan: QuantPlan, graph: gs.Graph, op_types: tuple[str, ...], request) -> None:
    """Request Q/DQ on the output of each quantized node of `op_types` (after a fused Relu/Clip), whatever
    reads it: ONNX Runtime then runs the node as an integer kernel (rule key `quantize_outputs`)."""
    by_name = {n.name: n for n in graph.nodes}
    for d in plan.nodes:
        if not d.quantize or d.op_type not in op_types:
            continue
        out = by_name[d.name].outputs[0]
        while len(out.outputs) == 1 and out.outputs[0].op in FUSED_ACTIVATIONS:
            out = out.outputs[0].outputs[0]
        request(out, d.name, d.activations)


def _demote_float_read(plan: QuantPlan, graph: gs.Graph, requests: dict[str, dict[str, QuantSpec]]) -> None:
    """Leave float each quantized non-compute node (Add, Concat, pooling) that no quantized node reads: ONNX
    Runtime fuses such a node into integer work only with its output quantized, so Q/DQ on its inputs
    would be dequantized at once (a transformer's residual Add before LayerNorm). Repeats until stable."""
    index = {d.name: i for i, d in enumerate(plan.nodes)}
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            d = plan.nodes[index[node.name]]
            if not d.quantize or d.op_type in COMPUTE_OPS or not node.outputs:
                continue
            out = node.outputs[0]
            while len(out.outputs) == 1 and out.outputs[0].op in (*FUSED_ACTIVATIONS, *DATA_MOVEMENT):
                out = out.outputs[0].outputs[0]  # ONNX Runtime moves Q/DQ across these
            if requests.get(out.name):
                continue
            plan.nodes[index[node.name]] = replace(d, quantize=False, reason="its output is read in float")
            for tensor in node.inputs:
                if node.name in requests.get(tensor.name, {}):
                    del requests[tensor.name][node.name]
            changed = True


def _equalize_depthwise(plan: QuantPlan, graph: gs.Graph) -> None:
    """Record depthwise Convs whose sole input x is planned, for per-channel equalized quantization."""
    quantized = {d.name: d for d in plan.nodes if d.quantize and d.weight}
    for node in graph.nodes:
        decision = quantized.get(node.name)
        if decision is None or node.op != "Conv":
            continue
        x, w = node.inputs[0], node.inputs[1]
        channels = w.shape[0] if isinstance(w, gs.Constant) and len(w.shape) == 4 else 0
        depthwise = channels > 1 and w.shape[1] == 1 and node.attrs.get("group", 1) == channels
        depthwise = depthwise and len(w.outputs) == 1  # the weight's scales change for this Conv alone
        planned = plan.activations.get(x.name)
        integer = planned is not None and planned.format == "int"  # FP8 has one scale per tensor
        if depthwise and integer and len(x.outputs) == 1 and x.name not in plan.shared:
            plan.equalized[x.name] = node.name


def _share_ranges(plan: QuantPlan, graph: gs.Graph) -> None:
    quantized = {d.name for d in plan.nodes if d.quantize}
    for node in graph.nodes:
        if is_op(node, *ORDER_PRESERVING) and node.name in quantized and len(node.outputs) == 1:
            src, dst = node.inputs[0], node.outputs[0]
            if src.name in plan.activations and dst.name in plan.activations and len(src.outputs) == 1:
                plan.shared[src.name] = dst.name


def _mark_fused(plan: QuantPlan, graph: gs.Graph) -> None:
    """A float Relu/Clip whose output carries Q/DQ runs fused into the quantized node before it."""
    by_name = {n.name: n for n in graph.nodes}
    for i, d in enumerate(plan.nodes):
        node = by_name[d.name]
        if not d.quantize and d.op_type in FUSED_ACTIVATIONS and node.outputs[0].name in plan.activations:
            plan.nodes[i] = NodeDecision(
                d.name, d.op_type, True, "fused into the quantized node before it", d.weights, d.activations
            )

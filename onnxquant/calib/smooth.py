"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models"
(ICML 2023). A linear layer `Y = X·W` contracts X's channel axis j (K channels) with W's rows. Real
transformer activations put most of their range in a few channels (outliers tens of times larger than the
rest), so one per-tensor activation scale leaves the other channels a handful of codes; weights are quantized
per output channel and do not care about one large row. For any positive s,

    Y = (X · diag(s)⁻¹) · (diag(s) · W),

so dividing channel j of X by s_j and multiplying row j of W by s_j leaves the float function unchanged while
it moves range from the activation into the weight. The paper balances the two with a migration strength α:

    s_j = max|X_j|^α / max|W_j|^(1−α),

where max|X_j| is channel j's absolute maximum over the calibration data and max|W_j| row j's absolute
maximum. At α = 0.5 both sides end with the same per-channel maximum, √(max|X_j|·max|W_j|); α = 0 puts all
of it on the activation (s = 1/max|W_j|, every weight row's maximum becomes 1), α = 1 on the weight (every
activation channel's maximum becomes 1). Here s is clamped to [1e-5, 1e5], and s_j = 1 where either maximum
is 0 (a dead channel or row carries nothing to balance).

Layers reading the same activation (the Q, K and V projections of one LayerNorm output) share one s, from the
maximum over all their weight rows. The 1/s is folded into the activation's producer when it can absorb it
exactly: LayerNormalization (its Scale and B), a Mul or Div by a constant, or a MatMul/Gemm with a constant
weight (its columns, its C, and a constant bias Add after it); folding needs every reader of the activation
to be smoothed. Otherwise one `Mul(X, 1/s)` is inserted and only the smoothed readers read its output. An
activation that a MatMul/Gemm multiplies with another activation (attention's Q·Kᵀ) is left alone.

In `convert` an activation is smoothed only where `predicted_error` (rounding noise of the activation and
of the weights, propagated through the layer, at the rules' widths) is lower with s than without: on
transformers with moderate activation ranges (a ViT-S measured at W8A8) smoothing every input cost 4.7 dB.

Activations are processed from the last to the first, each s from the weights as they are at that point: a
fold into a producer's weight columns (a later activation's 1/s) then precedes the balancing of that
weight's rows, so every smoothed activation is balanced against the weights it ends up with. Statistics come
from the unchanged model: smoothing one activation leaves every other activation unchanged.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxquant.calib.engine import stream_tensors
from onnxquant.calib.segments import DEFAULT_BUDGET
from onnxquant.errors import BadDataError, BadOptionError
from onnxquant.model import infer_shapes
from onnxquant.passes.base import Graph, attr, input_at, is_op, producer

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]

MIN_SCALE, MAX_SCALE = 1e-5, 1e5
LINEAR = ("MatMul", "Gemm")


@dataclass(frozen=True)
class SmoothResult:
    """What happened to one activation read by constant-weight MatMul/Gemm nodes.

    `readers`: the nodes whose weight rows were scaled; `how`: where the 1/s went, or why nothing was done
    (`applied` False); `scale`: s per channel (float64), None when not applied."""

    tensor: str
    readers: tuple[str, ...]
    applied: bool
    how: str
    scale: np.ndarray | None = None


@dataclass(frozen=True)
class _Reader:
    node: gs.Node
    axis: int  # X's contracted axis: -1, or -2 for a Gemm with transA
    weight: gs.Constant
    row_axis: int  # the weight's axis along the contracted channels: 0, or 1 for a Gemm with transB


@dataclass
class _Group:
    tensor: gs.Tensor
    readers: list[_Reader]
    position: int  # index of the producer among the graph's nodes; -1 for a graph input
    skip: str | None = None


def smooth(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    alpha: float = 0.5,
    *,
    widths: tuple[int, int] | None = None,
    progress: bool = False,
) -> tuple[onnx.ModelProto, list[SmoothResult]]:
    """`model` with SmoothQuant applied at migration strength `alpha` (0..1), and one result per activation
    read by a MatMul/Gemm with a constant weight. `batches`: {input_name: array} calibration batches, read
    once. The float function is unchanged (up to rounding); `model` itself is not modified.

    `widths` (activation bits, weight bits): smooth an activation only where that lowers the predicted
    output error of its layers (`predicted_error`) at those widths; None smooths every one it can."""
    check_alpha(alpha)
    graph = Graph(model, _types(model))
    groups = _groups(graph)
    wanted = {g.tensor.name: g.readers[0].axis for g in groups if g.skip is None}
    stats = channel_statistics(model, wanted, batches, progress=progress) if wanted else {}
    results = [_smooth_group(graph, g, stats.get(g.tensor.name), alpha, widths) for g in reversed(groups)]
    results.reverse()
    for r in results:
        log.info("smoothquant %s: %s", r.tensor, r.how)
    if not any(r.applied for r in results):
        return model, results
    return infer_shapes(graph.export()), results


def check_alpha(alpha: float) -> None:
    """Refuse a migration strength outside [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise BadOptionError(f"smooth-quant alpha={alpha!r}; accepted: a number in [0, 1] (default 0.5)")


def smoothing_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α), clamped to [MIN_SCALE, MAX_SCALE]; 1 where either maximum is 0."""
    x_max, w_max = np.asarray(x_max, np.float64), np.asarray(w_max, np.float64)
    dead = (x_max == 0) | (w_max == 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha)
    return np.where(dead, 1.0, np.clip(s, MIN_SCALE, MAX_SCALE))


def channel_statistics(
    model: onnx.ModelProto,
    axes: Mapping[str, int],
    batches: Iterable[Batch],
    *,
    progress: bool = False,
    budget: int = DEFAULT_BUDGET,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(max|x|, mean x²) per channel along axis `axes[name]` of each named tensor, over all `batches` in one
    streaming pass of the model's segments (`calib.engine`): memory is a few vectors per tensor, whatever the
    samples."""
    maxima: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def update(name: str, x: np.ndarray) -> None:
        if x.size == 0:
            return
        axis = axes[name] % x.ndim
        rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
        m, sq = np.abs(rows).max(axis=0), (rows * rows).sum(axis=0)
        maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
        squares[name] = sq if name not in squares else squares[name] + sq
        counts[name] = counts.get(name, 0) + len(rows)

    samples = stream_tensors(
        model, list(axes), batches, update, label="smoothquant statistics", progress=progress, budget=budget
    )
    if samples == 0:
        raise BadDataError("smoothquant: calibration data is empty; accepted: at least one sample")
    return {name: (maxima[name], squares[name] / counts[name]) for name in maxima}


def predicted_error(
    x_max: np.ndarray,
    x_square: np.ndarray,
    weights: Iterable[np.ndarray],
    s: np.ndarray,
    widths: tuple[int, int],
) -> float:
    """The output error power the quantization of X·diag(s)⁻¹ (per tensor, `widths[0]` bits, range from the
    channel maxima) and of each diag(s)·W (K, N) (per output column, `widths[1]` bits, symmetric) adds, with
    independent rounding noise of variance Δ²/12 per value:
        Δ_x²·Σ_{j,n} (s_j W_jn)² + Σ_n Δ_n²·Σ_j E[X_j²]/s_j²   (the 1/12 dropped).
    It compares candidate scales, not absolute errors."""
    a_bits, w_bits = widths
    x_step = 2.0 * np.max(x_max / s) / (2**a_bits - 1)
    activation_power = float(np.sum(x_square / s**2))
    total = 0.0
    for w in weights:
        scaled = np.abs(w) * s[:, None]
        w_step = scaled.max(axis=0) / (2 ** (w_bits - 1) - 1)
        total += x_step**2 * float(np.sum(scaled**2)) + float(np.sum(w_step**2)) * activation_power
    return total


# -- which activations, read by which layers ---------------------------------------------------------------
def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    g = model.graph
    return {v.name: v.type for v in (*g.input, *g.output, *g.value_info)}


def _groups(graph: Graph) -> list[_Group]:
    """Every activation read as input A of a MatMul/Gemm with a constant weight, in graph order."""
    position = {id(n): k for k, n in enumerate(graph.gs.nodes)}
    groups = []
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) or not any(is_op(n, *LINEAR) for n in tensor.outputs):
            continue
        group = _group(graph, tensor)
        if group is not None:
            prod = producer(tensor)
            group.position = -1 if prod is None else position[id(prod)]
            groups.append(group)
    return sorted(groups, key=lambda g: (g.position, g.tensor.name))


def _group(graph: Graph, tensor: gs.Tensor) -> _Group | None:
    """The smoothable readers of `tensor` (None when there are none), with the reason to skip it if any."""
    readers, skip = [], None
    for node in _unique(tensor.outputs):
        found = _reader(graph, node, tensor)
        if isinstance(found, str):
            skip = skip or found
        elif found is not None:
            readers.append(found)
    if not readers:
        return None
    axis = readers[0].axis
    mixed = [r.node.name for r in readers if r.axis != axis]
    if mixed:
        skip = skip or f"node '{mixed[0]}' contracts another axis than node '{readers[0].node.name}'"
    return _Group(tensor, readers, -1, skip)


def _unique(nodes: Iterable[gs.Node]) -> list[gs.Node]:
    seen, out = set(), []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out


def _reader(graph: Graph, node: gs.Node, x: gs.Tensor) -> _Reader | str | None:
    """`node` as a smoothable reader of `x`; a reason string when `node` multiplies `x` with another
    activation (the tensor is then skipped); None for any other reader (it keeps reading `x`)."""
    if not is_op(node, *LINEAR):
        return None
    a, b = input_at(node, 0), input_at(node, 1)
    if graph.constant(a) is None and graph.constant(b) is None:
        return f"node '{node.name}' ({node.op}) multiplies it with another activation"
    if a is not x or any(t is x for t in node.inputs[1:]):
        return None  # x as the right-hand operand (or as Gemm's C too): not a scaling of the weight's rows
    if graph.weight_reason(node, 1, "weight") is not None or graph.constant(b).ndim != 2:
        return None
    if node.op == "MatMul":
        return _Reader(node, -1, b, 0)
    return _Reader(node, -2 if attr(node, "transA", 0) else -1, b, 1 if attr(node, "transB", 0) else 0)


# -- one activation ----------------------------------------------------------------------------------------
def _smooth_group(
    graph: Graph,
    group: _Group,
    stats: tuple[np.ndarray, np.ndarray] | None,
    alpha: float,
    widths: tuple[int, int] | None,
) -> SmoothResult:
    name = group.tensor.name
    names = tuple(r.node.name for r in group.readers)
    reason = group.skip or _statistics_reason(group, None if stats is None else stats[0])
    if reason is not None:
        return SmoothResult(name, names, False, f"not smoothed: {reason}")
    x_max, x_square = stats
    w_max = np.max([_row_absmax(graph, r) for r in group.readers], axis=0)
    s = smoothing_scale(x_max, w_max, alpha)
    if np.all(s == 1.0):
        return SmoothResult(name, names, False, "not smoothed: every channel's scale is 1")
    if widths is not None:
        weights = [_rows_first(graph, r) for r in group.readers]
        smoothed, plain = (predicted_error(x_max, x_square, weights, v, widths) for v in (s, np.ones_like(s)))
        if smoothed >= plain:
            return SmoothResult(
                name,
                names,
                False,
                f"not smoothed: predicted output error {smoothed:.3g} >= {plain:.3g} as is",
            )
    how = _divide_activation(graph, group, s)
    for r in group.readers:
        _scale_rows(graph, r, s)
    return SmoothResult(name, names, True, how, s)


def _statistics_reason(group: _Group, x_max: np.ndarray | None) -> str | None:
    if x_max is None:
        return "no calibration values"
    if not np.isfinite(x_max).all():
        return "the calibration values hold NaN or Inf"
    for r in group.readers:
        k = r.weight.shape[r.row_axis]
        if k != x_max.size:
            return f"node '{r.node.name}': {k} weight rows for {x_max.size} activation channels"
    return None


def _rows_first(graph: Graph, reader: _Reader) -> np.ndarray:
    """The reader's weight as (K, N): contracted channels first."""
    w = graph.constant(reader.weight).astype(np.float64)
    return w if reader.row_axis == 0 else w.T


def _row_absmax(graph: Graph, reader: _Reader) -> np.ndarray:
    return np.abs(_rows_first(graph, reader)).max(axis=1)


def _scale_rows(graph: Graph, reader: _Reader, s: np.ndarray) -> None:
    w = graph.constant(reader.weight).astype(np.float64)
    graph.set_constant(reader.weight, w * _along(s, reader.row_axis - 2))


def _along(v: np.ndarray, axis: int) -> np.ndarray:
    """`v` shaped to broadcast along negative `axis` (-1: (K,), -2: (K, 1))."""
    return v.reshape((-1,) + (1,) * (-axis - 1))


def _scale_constant(graph: Graph, tensor: gs.Constant, factor: np.ndarray) -> None:
    graph.set_constant(tensor, graph.constant(tensor).astype(np.float64) * factor)


# -- where the 1/s goes ------------------------------------------------------------------------------------
def _divide_activation(graph: Graph, group: _Group, s: np.ndarray) -> str:
    """Divide the activation by s: folded into its producer when possible, else through an inserted Mul."""
    axis = group.readers[0].axis
    prod = producer(group.tensor)
    if prod is not None and _only_smoothed_readers(graph, group):
        for fold in (_fold_layernorm, _fold_scale, _fold_linear):
            done = fold(graph, prod, group.tensor, s, axis)
            if done is not None:
                return done
    return _insert_mul(graph, group, s)


def _only_smoothed_readers(graph: Graph, group: _Group) -> bool:
    smoothed = {id(r.node) for r in group.readers}
    return not graph.is_output(group.tensor) and all(id(n) in smoothed for n in group.tensor.outputs)


def _foldable(graph: Graph, node: gs.Node, slot: int) -> bool:
    """Whether input `slot` of `node` is a float constant only `node` reads."""
    tensor = input_at(node, slot)
    return tensor is not None and graph.weight_reason(node, slot, "constant") is None


def _fold_layernorm(graph: Graph, ln: gs.Node, x: gs.Tensor, s: np.ndarray, axis: int) -> str | None:
    """LayerNormalization: y = n·Scale + B, so y/s = n·(Scale/s) + B/s along its last axis."""
    if not is_op(ln, "LayerNormalization") or ln.outputs[0] is not x or axis != -1:
        return None
    if not _foldable(graph, ln, 1) or (input_at(ln, 2) is not None and not _foldable(graph, ln, 2)):
        return None
    for slot in (1, 2):
        if input_at(ln, slot) is not None:
            _scale_constant(graph, ln.inputs[slot], 1.0 / s)
    return f"1/s folded into LayerNormalization '{ln.name}'"


def _fold_scale(graph: Graph, node: gs.Node, x: gs.Tensor, s: np.ndarray, axis: int) -> str | None:
    """Mul by a constant c: x = p·c, x/s = p·(c/s); Div by a constant d: x = p/d, x/s = p/(d·s)."""
    if not is_op(node, "Mul", "Div") or node.outputs[0] is not x or len(node.inputs) != 2:
        return None
    slots = [k for k in (0, 1) if graph.constant(node.inputs[k]) is not None]
    if len(slots) != 1 or (node.op == "Div" and slots != [1]) or not _foldable(graph, node, slots[0]):
        return None
    factor = _along(1.0 / s if node.op == "Mul" else s, axis)
    _scale_constant(graph, node.inputs[slots[0]], factor)
    return f"1/s folded into the constant of {node.op} '{node.name}'"


def _fold_linear(graph: Graph, node: gs.Node, x: gs.Tensor, s: np.ndarray, axis: int) -> str | None:
    """A MatMul/Gemm with a constant weight (and a constant bias Add after it): its output column j, bias
    included, is divided by s_j through weight column j, Gemm's C and the Add's constant."""
    if axis != -1:
        return None
    bias_add, compute = None, node
    if is_op(node, "Add") and len(node.inputs) == 2:
        slots = [k for k in (0, 1) if graph.constant(node.inputs[k]) is not None]
        if len(slots) != 1 or not _foldable(graph, node, slots[0]):
            return None
        bias_add, compute = (node, slots[0]), producer(node.inputs[1 - slots[0]])
        if compute is None or graph.sole_consumer_reason(compute.outputs[0], node, "output") is not None:
            return None
    if not is_op(compute, *LINEAR) or not _linear_foldable(graph, compute):
        return None
    column_axis = -2 if is_op(compute, "Gemm") and attr(compute, "transB", 0) else -1
    _scale_constant(graph, compute.inputs[1], _along(1.0 / s, column_axis))
    if is_op(compute, "Gemm") and input_at(compute, 2) is not None:
        _scale_constant(graph, compute.inputs[2], 1.0 / s)
    if bias_add is not None:
        _scale_constant(graph, bias_add[0].inputs[bias_add[1]], 1.0 / s)
    return f"1/s folded into {compute.op} '{compute.name}'" + (
        f" and Add '{bias_add[0].name}'" if bias_add else ""
    )


def _linear_foldable(graph: Graph, node: gs.Node) -> bool:
    w = graph.constant(input_at(node, 1))
    if w is None or w.ndim != 2 or graph.constant(input_at(node, 0)) is not None:
        return False
    if not _foldable(graph, node, 1):
        return False
    return node.op == "MatMul" or input_at(node, 2) is None or _foldable(graph, node, 2)


def _insert_mul(graph: Graph, group: _Group, s: np.ndarray) -> str:
    """`Mul(x, 1/s)` read by the smoothed readers in place of x; other readers keep x."""
    x, axis = group.tensor, group.readers[0].axis
    dtype = graph.constant(group.readers[0].weight).dtype
    inverse = graph.add_constant(f"{x.name}_smooth_inv_scale", _along(1.0 / s, axis).astype(dtype))
    out = graph.new_variable(f"{x.name}_smoothed", like=x)
    mul = graph.make_node("Mul", [x, inverse], [out], f"{x.name}_smooth")
    for r in group.readers:
        r.node.inputs[0] = out
    graph.gs.nodes.insert(group.position + 1, mul)
    return f"Mul '{mul.name}' inserted"

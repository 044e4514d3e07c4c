"""Streaming layer-input statistics for GPTQ (`calib.gptq`): the rows X of each Conv/Gemm/MatMul input and
the float64 sums Σ XᵀX with their row count, so that H = 2·XᵀX / rows.

A layer y = W x with W viewed as (outputs, K) sees its input as rows of K values: a Gemm's A (Aᵀ with transA),
a MatMul's input with every leading axis a row, and a Conv's im2col patches, one row per sample and output
position, the K = Cin·kh·kw columns in the weight's (c, i, j) order. Position o along a spatial axis reads
input index o·stride − pad_begin + i·dilation for kernel offset i, zero outside the input (explicit pads, or
auto_pad VALID; SAME_* is refused with a reason).

A Conv with group = G > 1 (depthwise: G = Cin) splits its Cin input and Cout output channels into G
consecutive parts, and output channel o reads only part o // (Cout/G). Its im2col row is then G independent
blocks of K_g = Cin/G·kh·kw columns (block g: the channels of part g, in the weight's (c, i, j) order), and
the cross terms between blocks never meet a weight: each group has its own H_g = 2·X_gᵀX_g / rows over its
own block. The sums are kept as one (G, K_g, K_g) array (G = 1 for every other layer), G·K_g² values instead
of K²: 256·25² for a 256-channel 5x5 depthwise Conv.

The sums merge across batches and shards, so memory is G·K_g² float64 per layer whatever the number of
samples; rows are materialized about `CHUNK` values at a time; layers that read one tensor the same way share
one sum; and layers are collected in groups (one pass over the data each) when their sums exceed a budget. The
model runs through the calibration engine's segment runner, as activation calibration does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxquant.calib.engine import stream_tensors
from onnxquant.calib.stats import NonFiniteError
from onnxquant.errors import InternalError

log = logging.getLogger(__name__)

HESSIAN_BUDGET = 512 * 2**20  # bytes of float64 Σ XᵀX held during one pass over the data
CHUNK = 2**22  # elements of float64 rows materialized at a time
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class RowsView:
    """How a layer's input batch becomes rows of K columns. Layers with equal views share one Hessian."""

    input: str
    op_type: str
    k: int  # columns per group
    kernel: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # all begins, then all ends (ONNX order)
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_a: bool = False
    groups: int = 1  # a grouped Conv's group attribute: its rows are `groups` blocks of k columns

    @property
    def width(self) -> int:
        """Columns of one row: all groups' blocks side by side."""
        return self.groups * self.k


@dataclass(frozen=True)
class Layer:
    node: str
    weight: str
    view: RowsView
    k_first: bool = False  # the weight is stored (K, outputs): Gemm without transB, MatMul


@dataclass
class HessianStats:
    """Σ X_gᵀX_g per group (float64, (groups, K_g, K_g)) and the number of rows of one layer's inputs;
    `hessian()` is H_g = 2·X_gᵀX_g / rows for every group (one group unless the layer is a grouped Conv)."""

    xtx: np.ndarray
    rows: int = 0

    @classmethod
    def empty(cls, k: int, groups: int = 1) -> HessianStats:
        return cls(np.zeros((groups, k, k), np.float64))

    def update(self, rows: np.ndarray) -> None:
        """Add rows (n × groups·K_g): block g of every row goes into group g's sum."""
        groups, k = self.xtx.shape[:2]
        rows = np.asarray(rows, np.float64)
        self.add_blocks(rows[None] if groups == 1 else rows.reshape(len(rows), groups, k).transpose(1, 0, 2))

    def add_blocks(self, blocks: np.ndarray) -> None:
        """Add each group's rows, `blocks` (groups, n, K_g) float64."""
        if len(blocks) == 1:
            self.xtx[0] += blocks[0].T @ blocks[0]  # numpy's 2-D AᵀA is one symmetric rank-k update (syrk)
        else:
            self.xtx += blocks.transpose(0, 2, 1) @ blocks
        self.rows += blocks.shape[1]

    def merge(self, other: HessianStats) -> HessianStats:
        return HessianStats(self.xtx + other.xtx, self.rows + other.rows)

    def hessian(self) -> np.ndarray:
        return np.multiply(self.xtx, 2.0 / max(self.rows, 1))  # one new array


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> tuple[int, ...]:
    found = next((a for a in node.attribute if a.name == name), None)
    return tuple(int(v) for v in helper.get_attribute_value(found)) if found is not None else tuple(default)


def _attr(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    value = helper.get_attribute_value(found) if found is not None else default
    return value.decode() if isinstance(value, bytes) else value


def describe_layer(node: onnx.NodeProto, weight_shape: Sequence[int]) -> Layer | str:
    """The GPTQ view of a Conv/Gemm/MatMul whose input 1 is a constant of `weight_shape`, or why it has
    none."""
    shape = tuple(int(d) for d in weight_shape)
    if node.op_type == "Conv":
        return _conv_layer(node, shape)
    if node.op_type == "Gemm":
        if len(shape) != 2:
            return f"Gemm weight of rank {len(shape)}: not 2-D"
        k_first = not _attr(node, "transB", 0)
        view = RowsView(
            node.input[0], "Gemm", shape[0 if k_first else 1], trans_a=bool(_attr(node, "transA", 0))
        )
        return Layer(node.name, node.input[1], view, k_first)
    if node.op_type == "MatMul":
        if len(shape) != 2:
            return f"MatMul weight of rank {len(shape)}: only 2-D weights"
        return Layer(node.name, node.input[1], RowsView(node.input[0], "MatMul", shape[0]), True)
    return f"{node.op_type}: not supported by GPTQ (accepted: {', '.join(SUPPORTED_OPS)})"


def _conv_layer(node: onnx.NodeProto, shape: tuple[int, ...]) -> Layer | str:
    dims = len(shape) - 2
    if dims not in (1, 2):
        return f"Conv with {dims} spatial dims: only 1-D and 2-D Convs"
    group = int(_attr(node, "group", 1))
    if group < 1 or shape[0] % group:
        return f"Conv with group={group}: not a divisor of its {shape[0]} output channels"
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"Conv with auto_pad={auto_pad}: only NOTSET (explicit pads) or VALID"
    pads = _ints(node, "pads", [0] * 2 * dims) if auto_pad == "NOTSET" else (0,) * 2 * dims
    view = RowsView(
        node.input[0],
        "Conv",
        int(np.prod(shape[1:])),
        kernel=shape[2:],
        pads=pads,
        strides=_ints(node, "strides", [1] * dims),
        dilations=_ints(node, "dilations", [1] * dims),
        groups=group,
    )
    return Layer(node.name, node.input[1], view)


def layer_rows(x: np.ndarray, view: RowsView) -> np.ndarray:
    """The rows X (rows × K) of one input batch `x` of a layer: Conv im2col patches (row = sample × output
    position, column = (c, kernel offset) in the weight's order, over all Cin channels: a grouped Conv's group
    g is the block of columns g·K_g..(g+1)·K_g), Gemm's A (transposed with transA), MatMul's input with all
    leading axes as rows."""
    x = np.asarray(x)
    if view.op_type == "Conv":
        return _im2col(x, view)
    if view.op_type == "Gemm":
        return x.T if view.trans_a else x.reshape(-1, view.k)
    return x.reshape(-1, view.k)


def grouped_rows(x: np.ndarray, view: RowsView) -> np.ndarray:
    """A Conv's rows of one input batch `x` split by group, (groups, rows, K_g) float64: block g of
    `layer_rows`, made in one copy (no im2col matrix, float64 copy and transpose one after another)."""
    dims = len(view.kernel)
    patches = _patches(x, view)  # (N, C, *out, *kernel)
    n, _, *rest = patches.shape
    split = patches.reshape(n, view.groups, -1, *rest)  # (N, G, C/G, *out, *kernel)
    order = (1, 0, *range(3, 3 + dims), 2, *range(3 + dims, 3 + 2 * dims))  # (G, N, *out, C/G, *kernel)
    blocks = np.empty(tuple(split.shape[i] for i in order), np.float64)
    blocks[...] = split.transpose(order)
    return blocks.reshape(view.groups, -1, view.k)


def _im2col(x: np.ndarray, view: RowsView) -> np.ndarray:
    dims = len(view.kernel)
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # (N, *out, C, *kernel)
    return _patches(x, view).transpose(order).reshape(-1, view.width)


def _patches(x: np.ndarray, view: RowsView) -> np.ndarray:
    """The Conv's input patches as a strided view (N, C, *out, *kernel)."""
    dims = len(view.kernel)
    if x.ndim != dims + 2 or x.shape[1] * int(np.prod(view.kernel)) != view.width:
        raise InternalError(f"Conv input of shape {x.shape} for a {dims}-D kernel of {view.width} columns")
    pad = [(0, 0), (0, 0)] + [(view.pads[i], view.pads[i + dims]) for i in range(dims)]
    padded = np.pad(x, pad)
    span = tuple(d * (k - 1) + 1 for k, d in zip(view.kernel, view.dilations))
    axes = tuple(range(2, 2 + dims))
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=axes)  # (N, C, *pos, *span)
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in view.strides) + tuple(
        slice(None, None, d) for d in view.dilations
    )
    return windows[index]


def accumulate(stats: HessianStats, x: np.ndarray, view: RowsView) -> None:
    """Add one batch to `stats`, materializing at most about `CHUNK` float64 row elements at a time."""
    x = np.asarray(x)
    if view.op_type == "Conv":
        positions = int(np.prod(x.shape[2:]))  # about one patch row per input position (stride 1)
        step = max(1, CHUNK // max(1, positions * view.width))
        for start in range(0, x.shape[0], step):
            stats.add_blocks(grouped_rows(x[start : start + step], view))
        return
    rows = layer_rows(x, view)
    step = max(1, CHUNK // max(view.k, 1))
    for start in range(0, rows.shape[0], step):
        stats.update(rows[start : start + step])


def _budget_groups(views: list[RowsView], budget: int) -> list[list[RowsView]]:
    """Consecutive groups of views whose G·K_g² float64 sums fit `budget` (a view over it forms its own
    group)."""
    groups: list[list[RowsView]] = []
    used = budget + 1
    for view in views:
        size = 8 * view.groups * view.k * view.k
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(view)
        used += size
    return groups


def collect_hessians(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    budget: int = HESSIAN_BUDGET,
    progress: bool = False,
) -> dict[str, HessianStats]:
    """Σ XᵀX and row count of each layer's input over `batches`, keyed by node name, streamed through the
    calibration engine's segment runner. One pass per group of layers whose sums fit `budget` bytes (the data
    must then be re-iterable). A layer whose input holds NaN/Inf is left out, with a warning."""
    views = list(dict.fromkeys(layer.view for layer in layers))
    groups = _budget_groups(views, budget)
    if len(groups) > 1 and isinstance(batches, Iterator):
        raise InternalError(f"GPTQ needs {len(groups)} passes over re-iterable data, got a one-shot iterator")
    found: dict[RowsView, HessianStats] = {}
    for number, group in enumerate(groups, 1):
        found.update(_collect_group(model, group, batches, progress, f"GPTQ pass {number}/{len(groups)}"))
    return {layer.node: found[layer.view] for layer in layers if layer.view in found}


def _collect_group(
    model: onnx.ModelProto,
    views: list[RowsView],
    batches: Iterable[Mapping[str, np.ndarray]],
    progress: bool,
    label: str,
) -> dict[RowsView, HessianStats]:
    readers: dict[str, list[RowsView]] = {}
    for view in views:
        readers.setdefault(view.input, []).append(view)
    stats = {view: HessianStats.empty(view.k, view.groups) for view in views}

    def update(name: str, x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            raise NonFiniteError(f"tensor {name}: NaN or Inf")
        for view in readers[name]:
            accumulate(stats[view], x, view)

    unusable: set[str] = set()
    stream_tensors(model, sorted(readers), batches, update, label=label, progress=progress, unusable=unusable)
    for name in sorted(unusable):
        log.warning("GPTQ: tensor %s holds NaN or Inf; the layers reading it keep round-to-nearest", name)
    return {view: s for view, s in stats.items() if view.input not in unusable}

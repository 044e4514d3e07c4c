"""Weights on non-uniform levels (APoT, k-means; see calib/codebook.py) in a graph every runtime loads.

A weight W becomes integer indices i (one per element) into a small float32 codebook, decoded by standard
ops:
    W' = Gather(codebook, Cast(DequantizeLinear(i, 1) → int32))          k-means per tensor, APoT per tensor
                                                                        (codebook = α·levels)
    W' = Gather(codebook, Cast(DequantizeLinear(i, 1) → int32)) · α      per channel (α shaped to broadcast
                                                                        on W's output-channel axis)
Per channel, k-means clusters W_c/α_c with α_c = max|W_c| (one codebook, one factor per channel, the form
and the cost of APoT's); per tensor it is Deep Compression's per-layer codebook.
Indices are stored in the smallest integer type that holds them: UINT4 (two per byte) from opset 21 for
at most 16 levels, else UINT8 (UINT16 above 256). Gather takes int32/int64 indices only, hence the Cast.
The DequantizeLinear (scale 1, exact for these integers) is there for ONNX Runtime: it does not
constant-fold DequantizeLinear in a Q/DQ model, while it folds Cast/Gather/Mul of constants into a float
initializer and then re-quantizes a float Conv/Gemm weight whose input is dequantized to int8 per tensor (its
WeightBiasQuantization transformer), which would replace the codebook by a far coarser grid. So the node
reading W' computes in float with the codebook's values; its activations keep their Q/DQ, and its bias stays
float. A depthwise Conv whose input is equalized (x·k, passes/plan.py) reads W'/k: 1/k joins α (or is a Mul
of its own).

`read_codebook` recognizes the form again (with or without the DequantizeLinear), for the report and the
storage accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxquant.calib.codebook import apot_quantize, kmeans_codebook
from onnxquant.errors import BadModelError
from onnxquant.ir import constant, consumers, import_graph, producer
from onnxquant.model import INT4_OPSET
from onnxquant.passes.plan import weight_axis
from onnxquant.rules import QuantSpec

INDEX_TYPES = {TensorProto.UINT4: ml_dtypes.uint4, TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16}


def index_type(levels: int, opset: int) -> int:
    """The ONNX element type of indices into `levels` entries."""
    if levels <= 16 and opset >= INT4_OPSET:
        return TensorProto.UINT4
    return TensorProto.UINT8 if levels <= 256 else TensorProto.UINT16


def codebook_bits(spec: QuantSpec) -> int:
    """The nominal width of a codebook weight: bits of its index (APoT: the spec's width)."""
    if spec.levels == "kmeans":
        return max(1, int(np.ceil(np.log2(spec.clusters or 2**spec.bits))))
    return spec.bits


def codebook_label(spec: QuantSpec) -> str:
    """How the summary names a codebook weight's levels."""
    if spec.levels == "kmeans":
        return f"k-means codebook of {spec.clusters or 2**spec.bits}"
    return "APoT levels"


def encode(
    w: np.ndarray, spec: QuantSpec, axis: int | None, name: str = "weight"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(int64 indices shaped like `w`, float64 codebook, α per channel or None) of `w` under `spec`:
    W ≈ codebook[i] (· α along `axis`)."""
    if spec.levels == "apot":
        indices, levels, alpha = apot_quantize(w, axis, spec.bits, spec.method, name)
        if axis is None:
            return indices, levels * float(alpha.reshape(-1)[0]), None
        return indices, levels, alpha
    alpha = None if axis is None else channel_amax(w, axis)
    scaled = w if alpha is None else w / _along(alpha, axis, w.ndim)
    codebook, indices = kmeans_codebook(scaled, spec.clusters or 2**spec.bits, name)
    return indices, codebook, alpha


def channel_amax(w: np.ndarray, axis: int) -> np.ndarray:
    """max |W_c| per channel along `axis` (1 for an all-zero channel), float64."""
    amax = np.abs(np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    return np.where(amax > 0, amax, 1.0)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(values, shape)


def insert_codebook(
    build,
    node: gs.Node,
    decision,
    dequantized: dict[str, gs.Tensor],
    summary,
    opset: int,
    gain: np.ndarray | None = None,
) -> None:
    """Feed `node`'s weight (input 1) through Gather(codebook, indices) as `decision.weights` says; one
    decoded tensor per weight (`dequantized`, by initializer name), counted once in `summary.weights`.
    `build` is insert_qdq's builder (`constant`, `node`); `gain` the equalization k of a depthwise input."""
    name, spec = decision.weight, decision.weights
    if name not in dequantized:
        w = np.asarray(constant(node.inputs[1], readonly=True), np.float32)
        axis = weight_axis(node, w.ndim) if spec.granularity == "per_channel" else None
        indices, codebook, alpha = encode(w, spec, axis, name)
        scale, scale_axis = _scale(alpha, axis, gain, w.shape)
        dequantized[name] = _insert(build, name, indices, codebook, scale, scale_axis, w.ndim, opset)
        summary.weights[codebook_bits(spec)] += 1
        summary.weight_formats[(codebook_bits(spec), codebook_label(spec))] += 1
    node.inputs[1] = dequantized[name]


def _scale(
    alpha: np.ndarray | None, axis: int | None, gain: np.ndarray | None, shape: tuple[int, ...]
) -> tuple[np.ndarray | None, int | None]:
    """Per-channel factor after the Gather and its axis: α, divided by an equalizer's k (a depthwise Conv's,
    whose channel axis is 0)."""
    if gain is None:
        return alpha, axis
    k = np.asarray(gain, np.float64).ravel()
    return (np.ones(shape[0]) if alpha is None else np.asarray(alpha, np.float64)) / k, 0


def _insert(build, name, indices, codebook, scale, axis, ndim, opset) -> gs.Tensor:
    elem = index_type(codebook.size, opset)
    stored = build.constant(f"{name}_indices", indices.astype(INDEX_TYPES[elem]))
    one = build.constant(f"{name}_indices_scale", np.ones((), np.float32))
    held = build.node("DequantizeLinear", [stored, one], f"{name}_indices_float")
    as_int = build.node("Cast", [held], f"{name}_indices_int32", to=TensorProto.INT32)
    table = build.constant(f"{name}_codebook", np.asarray(codebook, np.float32))
    decoded = build.node("Gather", [table, as_int], f"{name}_decoded", axis=0)
    if scale is None:
        return decoded
    factor = build.constant(f"{name}_alpha", _along(np.asarray(scale, np.float32), axis, ndim))
    return build.node("Mul", [decoded, factor], f"{name}_dequantized")


@dataclass(frozen=True)
class Codebook:
    """A weight stored as `indices` into `codebook`, decoded by `nodes` (the last first: [Mul,] Gather, Cast,
    DequantizeLinear) to `output`."""

    indices: gs.Constant
    codebook: np.ndarray
    scale: np.ndarray | None
    nodes: tuple[gs.Node, ...]
    output: gs.Tensor

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        """(int64 indices, float32 decoded weight), as the graph computes it."""
        idx = np.asarray(constant(self.indices)).astype(np.int64)
        values = self.codebook.astype(np.float32)[idx]
        if self.scale is not None:
            values = values * self.scale.astype(np.float32)
        return idx, values

    def side_arrays(self) -> list[np.ndarray]:
        """What is stored beside the indices: the codebook and the per-channel factor."""
        return [self.codebook] + ([] if self.scale is None else [self.scale])


def read_codebook(gather: gs.Node) -> Codebook | None:
    """The codebook form ending at `gather` (or at the Mul by a constant that alone reads it), or None."""
    if gather.op != "Gather" or len(gather.inputs) != 2 or gather.attrs.get("axis", 0) != 0:
        return None
    table = constant(gather.inputs[0])
    cast = producer(gather.inputs[1])
    if table is None or table.ndim != 1 or table.dtype != np.float32 or cast is None or cast.op != "Cast":
        return None
    found = _stored_indices(cast)
    if found is None:
        return None
    stored, nodes = found
    nodes, output, scale = (*nodes, gather), gather.outputs[0], None
    readers = consumers(output)
    if len(readers) == 1 and readers[0].op == "Mul" and readers[0].inputs[0] is output:
        factor = constant(readers[0].inputs[1])
        if factor is not None and factor.dtype == np.float32:
            nodes, output, scale = (*nodes, readers[0]), readers[0].outputs[0], factor
    return Codebook(stored, table, scale, tuple(reversed(nodes)), output)


def _stored_indices(cast: gs.Node) -> tuple[gs.Constant, tuple[gs.Node, ...]] | None:
    """The integer constant a Cast reads, directly or through a DequantizeLinear of scale 1 and zero point 0,
    with the nodes in between (graph order)."""
    source, nodes = cast.inputs[0], (cast,)
    held = producer(source)
    if held is not None and held.op == "DequantizeLinear":
        scale = constant(held.inputs[1]) if len(held.inputs) > 1 else None
        zero = constant(held.inputs[2]) if len(held.inputs) > 2 else np.zeros(())
        if scale is None or zero is None or np.any(scale != 1) or np.any(zero.astype(np.int64) != 0):
            return None
        source, nodes = held.inputs[0], (held, cast)
    if not isinstance(source, gs.Constant) or np.dtype(source.dtype).kind not in "uiV":
        return None
    return source, nodes


def codebook_weights(model: onnx.ModelProto | gs.Graph) -> list[Codebook]:
    """Every codebook-decoded weight of `model` (a graph-surgeon graph, or a model to import)."""
    from_graph = model if isinstance(model, gs.Graph) else import_graph(model)
    found = (read_codebook(n) for n in from_graph.nodes if n.op == "Gather")
    return [c for c in found if c is not None]


def refuse_codebook(model: onnx.ModelProto) -> None:
    """One line when `model` holds codebook weights: the nodes reading them compute in float, so the integer
    runtime (`onnxquant validate`) has nothing to run for them."""
    found = codebook_weights(model)
    if found:
        readers = consumers(found[0].output)
        node = readers[0].name if readers else found[0].output.name
        raise BadModelError(
            f"node {node!r}: its weight is decoded by Gather from a codebook ({len(found)} such weights: "
            "APoT / k-means levels), so it computes in float: the integer runtime does not apply to codebook "
            "weights; accepted: a model with uniform integer weights (run codebook models in ONNX Runtime)"
        )

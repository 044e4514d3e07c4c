"""What quantized weights cost to store: as written in the model, and Huffman-coded.

A weight of n elements stored as codes of a c-bit container (INT4/UINT4: 4, INT8/UINT8 and FP8: 8, also for
2/3/5–7-bit codes) costs n·c bits plus its side information: the scales and zero points of its
DequantizeLinear, or the codebook and per-channel factors of its Gather form (passes/insert_codebook.py),
each at its own type's width (float32: 32). Huffman-coded, the codes cost Σ_s count_s·l_s bits, l_s the
Huffman code lengths of the code histogram (calib/codebook.py: the Deep Compression stage), plus the same
side information; the code-length table itself (a few bits per used code) is not counted. Bits per weight
= bits / n. The uniform (DequantizeLinear) and codebook (Gather) forms are read alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxquant.calib.codebook import code_counts, huffman_bits
from onnxquant.ir import constant, import_graph
from onnxquant.passes.insert_codebook import Codebook, codebook_weights

NIBBLE_TYPES = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


@dataclass(frozen=True)
class WeightSize:
    """One quantized weight's size in bits: its codes as stored, Huffman-coded, and its side information."""

    name: str
    count: int  # weights
    code_bits: int  # container width of one stored code
    side_bits: int  # scales, zero points, codebook, per-channel factors
    huffman_bits: int  # the codes, Huffman-coded

    @property
    def stored_bits(self) -> int:
        return self.count * self.code_bits + self.side_bits

    @property
    def coded_bits(self) -> int:
        return self.huffman_bits + self.side_bits

    @property
    def stored_per_weight(self) -> float:
        return self.stored_bits / self.count

    @property
    def coded_per_weight(self) -> float:
        return self.coded_bits / self.count


def array_bits(values: np.ndarray) -> int:
    """Bits `values` take in a model: 4 per element of INT4/UINT4, else the element size."""
    dtype = np.asarray(values).dtype
    return int(np.size(values)) * (4 if dtype in NIBBLE_TYPES else 8 * dtype.itemsize)


def code_histogram(codes: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Counts of the distinct stored codes. One- and two-byte codes (INT4/UINT4, INT8/UINT8, FP8, 16-bit) are
    counted by their bytes in chunks, without a wide copy of a big weight."""
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.dtype.itemsize not in (1, 2):
        return code_counts(flat)
    flat = flat.view(np.uint8 if flat.dtype.itemsize == 1 else np.uint16)
    size = 1 << (8 * flat.dtype.itemsize)
    counts = np.zeros(size, np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start : start + chunk], minlength=size)
    return counts[counts > 0]


def weight_size(
    name: str,
    codes: np.ndarray,
    side: Iterable[np.ndarray],
    code_bits: int | None = None,
    counts: np.ndarray | None = None,
) -> WeightSize:
    """The size of a weight stored as `codes` (`code_bits` each: by default their dtype's width) beside the
    arrays `side`; `counts`: the codes' histogram (`code_histogram`) when the caller already has it."""
    codes = np.asarray(codes)
    if code_bits is None:
        code_bits = array_bits(codes.reshape(-1)[:1]) if codes.size else 0
    return WeightSize(
        name=name,
        count=int(codes.size),
        code_bits=code_bits,
        side_bits=sum(array_bits(a) for a in side),
        huffman_bits=huffman_bits(code_histogram(codes) if counts is None else counts),
    )


def model_weight_sizes(model: onnx.ModelProto) -> list[WeightSize]:
    """The sizes of every weight of `model` stored as codes: a DequantizeLinear of a constant (not int32: a
    bias; not the indices' DequantizeLinear of a codebook), then the codebook forms."""
    graph = import_graph(model)
    return _graph_weight_sizes(graph, codebook_weights(graph))


def _graph_weight_sizes(graph: gs.Graph, codebooks: list[Codebook]) -> list[WeightSize]:
    inside = {id(n) for cb in codebooks for n in cb.nodes}
    sizes = []
    for node in graph.nodes:
        codes = constant(node.inputs[0], readonly=True) if node.op == "DequantizeLinear" else None
        if codes is not None and codes.dtype != np.int32 and id(node) not in inside:
            side = [_stored(x) for x in node.inputs[1:]]
            sizes.append(weight_size(node.inputs[0].name, codes, [s for s in side if s is not None]))
    for cb in codebooks:
        sizes.append(weight_size(cb.indices.name, constant(cb.indices, readonly=True), cb.side_arrays()))
    return sizes


def _stored(tensor: gs.Tensor) -> np.ndarray | None:
    """The array a DequantizeLinear input is stored as: a constant, or the constant a Cast reads (float16
    block scales, calib/blocks.py)."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Cast":
        tensor = producer.inputs[0]
    return constant(tensor, readonly=True)


def _size(bits: int) -> str:
    """Bytes as the convert summary writes sizes (1024-based: `1.2 MB`)."""
    n = bits / 8
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def storage_lines(model: onnx.ModelProto) -> list[str]:
    """The convert summary's lines about weight storage: sizes (see `storage_line`), and the codebook weights,
    whose nodes compute in float."""
    graph = import_graph(model)
    codebooks = codebook_weights(graph)
    lines = [storage_line(_graph_weight_sizes(graph, codebooks))]
    if codebooks:
        lines.append(
            f"codebook weights: {len(codebooks)} decoded by Gather(codebook, indices); "
            "the nodes reading them compute in float (their activations keep Q/DQ)"
        )
    return [line for line in lines if line]


def storage_line(sizes: Iterable[WeightSize]) -> str | None:
    """`weights stored: 4.00 bits/weight (1.2 MB); Huffman-coded 3.10 bits/weight (0.93 MB)` over `sizes`,
    or None when there are none."""
    sizes = list(sizes)
    count = sum(s.count for s in sizes)
    if not count:
        return None
    stored, coded = sum(s.stored_bits for s in sizes), sum(s.coded_bits for s in sizes)
    return (
        f"weights stored: {stored / count:.2f} bits/weight ({_size(stored)}); "
        f"Huffman-coded {coded / count:.2f} bits/weight ({_size(coded)})"
    )

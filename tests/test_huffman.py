"""Huffman code lengths (calib/codebook.py) against a hand-written construction, Kraft's equality, the
entropy bounds and a textbook example; the stored / Huffman-coded weight sizes (report/storage.py) by hand."""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.calib.codebook import huffman_bits, huffman_lengths
from onnxquant.report.storage import model_weight_sizes, storage_line, weight_size


def tree_depths(counts) -> dict[int, int]:
    """Reference: build the Huffman tree as nested tuples with heapq, then read each leaf's depth."""
    tick = itertools.count()
    heap = [(c, next(tick), s) for s, c in enumerate(counts) if c > 0]
    heapq.heapify(heap)
    if len(heap) == 1:
        return {heap[0][2]: 0}
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, (a[0] + b[0], next(tick), (a[2], b[2])))
    depths = {}
    stack = [(heap[0][2], 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, tuple):
            stack += [(node[0], d + 1), (node[1], d + 1)]
        else:
            depths[node] = d
    return depths


def entropy(counts) -> float:
    p = np.asarray([c for c in counts if c > 0], np.float64)
    p /= p.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("seed", range(12))
def test_lengths_match_a_tree_construction_and_kraft(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 300))
    counts = rng.integers(0, 50, size) * (rng.random(size) < 0.8)
    counts[rng.integers(size)] += 1  # at least one used symbol
    counts[(rng.integers(size) + 1) % size] += 3
    lengths = huffman_lengths(counts)
    ref = tree_depths(counts)
    used = np.nonzero(counts)[0]
    assert set(np.nonzero(lengths)[0]) <= set(used)
    total = sum(int(counts[s]) * d for s, d in ref.items())
    assert huffman_bits(counts) == total  # optimal codes differ under ties; their cost does not
    assert math.isclose(sum(2.0 ** -int(lengths[s]) for s in used), 1.0)  # Kraft's equality
    n = counts.sum()
    assert entropy(counts) <= total / n < entropy(counts) + 1


def test_textbook_example():
    """CLRS §16.3: frequencies a..f = 45, 13, 12, 16, 9, 5 give lengths 1, 3, 3, 3, 4, 4 (224 bits)."""
    counts = [45, 13, 12, 16, 9, 5]
    assert huffman_lengths(counts).tolist() == [1, 3, 3, 3, 4, 4]
    assert huffman_bits(counts) == 224


def test_uniform_histogram_and_single_symbol():
    assert huffman_lengths([7] * 16).tolist() == [4] * 16
    assert huffman_lengths([0, 9, 0]).tolist() == [0, 0, 0]
    assert huffman_bits([0, 9, 0]) == 0


def test_weight_size_by_hand():
    codes = np.array([0, 0, 0, 0, 1, 1, 2, 3], np.int8)  # Huffman lengths 1, 2, 3, 3 -> 4 + 4 + 3 + 3 bits
    scale, zero = np.ones(2, np.float32), np.zeros(2, np.int8)
    size = weight_size("w", codes, [scale, zero])
    assert size.count == 8 and size.code_bits == 8
    assert size.side_bits == 2 * 32 + 2 * 8
    assert size.huffman_bits == 14
    assert size.stored_per_weight == (64 + 80) / 8 and size.coded_per_weight == (14 + 80) / 8


def test_model_weight_sizes_reads_int4_and_skips_int32_bias():
    w = np.array([[1, -2, 3, 0], [0, 0, 0, -7]], np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"]),
        helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
    ]
    inits = [
        helper.make_tensor("wq", TensorProto.INT4, w.shape, w.ravel().tolist()),
        numpy_helper.from_array(np.array([0.1, 0.2], np.float32), "ws"),
        helper.make_tensor("wz", TensorProto.INT4, [2], [0, 0]),
        numpy_helper.from_array(np.array([5, 6], np.int32), "bq"),
        numpy_helper.from_array(np.float32(0.01), "bs"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    (size,) = model_weight_sizes(model)
    assert (size.name, size.count, size.code_bits) == ("wq", 8, 4)
    assert size.side_bits == 2 * 32 + 2 * 4
    # codes 0 ×4, then 1, −2, 3, −7 once each: lengths 1, 3, 3, 3, 3 -> 4 + 12 bits
    assert size.huffman_bits == 16
    line = storage_line([size])
    assert line.startswith(f"weights stored: {(32 + 72) / 8:.2f} bits/weight")
    assert f"Huffman-coded {(16 + 72) / 8:.2f} bits/weight" in line
    assert storage_line([]) is None

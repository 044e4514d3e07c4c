"""Run a float model in consecutive segments, so that calibration holds one segment's tensors at a time.

Exposing every calibrated activation as a graph output makes ONNX Runtime keep all of them alive until the
end of a run: a batch then costs the sum of its activations instead of the few that plain inference keeps.
Here the topologically sorted nodes that the calibrated tensors depend on are cut into segments whose
calibrated tensors hold at most `budget` bytes each (estimated from shapes inferred at the batch's input
shape; a single larger tensor gets a segment of its own). Each segment is an ONNX Runtime session of its own,
without the memory arena, whose outputs are its calibrated tensors and the tensors later segments read. A
batch runs segment after segment; a tensor is dropped as soon as no later segment reads it, and nodes that
feed no calibrated tensor are not run at all. Memory: the model, the tensors crossing the current cut, and
the outputs of the segment being read plus the one being computed, whatever the number of tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxquant.errors import BadModelError
from onnxquant.model import graph_inputs, make_session

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 64 * 2**20
SHAPE_LIKE = 64  # initializers of at most this many elements are kept for shape inference
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 2**20) -> None:
    """Have glibc serve allocations of `threshold` bytes or more with mmap, returned to the system on free.

    Without it glibc raises its threshold after the first large free (up to 32 MB) and keeps later
    activations' buffers in its heap, so segment after segment the process grows to hold them all."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, threshold)
    except OSError:  # not glibc: the system allocator decides
        pass


@dataclass
class Segment:
    session: object
    feeds: tuple[str, ...]  # tensors it reads from the batch or from earlier segments
    outputs: tuple[str, ...]  # its calibrated tensors, then the tensors later segments read
    release: tuple[str, ...]  # carried tensors no later segment reads
    nodes: tuple[str, ...]  # the names of its nodes


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads, with those its subgraphs (If, Loop, Scan) read from the enclosing scope."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for sub in g.node:
                local.update(o for o in sub.output if o)
            for sub in g.node:
                names.update(n for n in node_inputs(sub) if n not in local)
    return names


def _static_shapes(model: onnx.ModelProto, batch: Mapping[str, np.ndarray]) -> dict[str, onnx.ValueInfoProto]:
    """Types and shapes of every tensor shape inference can reach, with the inputs fixed to the batch's."""
    graph = onnx.GraphProto(name=model.graph.name)
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    declared = {i.name for i in graph.input}
    for t in model.graph.initializer:  # weights as inputs: shape inference needs only shape-like values
        if np.prod(t.dims, dtype=np.int64) <= SHAPE_LIKE:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    probe = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    for vi in probe.graph.input:
        if vi.name in batch and vi.type.HasField("tensor_type"):
            shape = np.shape(batch[vi.name])
            vi.type.tensor_type.shape.Clear()
            for d in shape:
                vi.type.tensor_type.shape.dim.add().dim_value = int(d)
    try:
        probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - an unknown shape only makes the size estimate coarser
        log.debug("shape inference failed; segment sizes are estimates")
    infos = {vi.name: vi for vi in [*probe.graph.input, *probe.graph.value_info, *probe.graph.output]}
    return infos


def _nbytes(vi: onnx.ValueInfoProto | None) -> int | None:
    if vi is None or not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return int(np.prod([d.dim_value for d in tt.shape.dim], dtype=np.int64)) * itemsize


def _typed(vi: onnx.ValueInfoProto | None) -> bool:
    return vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type != 0


class SegmentedModel:
    """`model` cut into segments whose calibrated tensors (`tensors`, all produced by nodes) hold about
    `budget` bytes each at the shapes of `first_batch`. `run(feed)` yields one {tensor: array} per segment."""

    def __init__(
        self,
        model: onnx.ModelProto,
        tensors: Sequence[str],
        first_batch: Mapping[str, np.ndarray],
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        map_large_allocations()
        wanted = set(tensors)
        nodes = _ancestors(model, wanted)
        infos = _static_shapes(model, first_batch)
        for vi in graph_inputs(model):
            infos.setdefault(vi.name, vi)
        known = [b for t in wanted if (b := _nbytes(infos.get(t))) is not None]
        unknown_size = max(known, default=budget)
        size = {t: _nbytes(infos.get(t)) or unknown_size for t in wanted}
        groups = _cut(nodes, wanted, size, budget, infos)
        self.segments = _build(model, groups, wanted, infos)
        log.info(
            "calibration runs the model in %d segment(s) of at most %d MB of calibrated tensors each",
            len(self.segments),
            budget // 2**20,
        )

    def run(
        self, feed: Mapping[str, np.ndarray], needed: set[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """One {tensor: array} per segment for one batch; with `needed`, only up to the last segment that
        computes one of those tensors."""
        last = len(self.segments) - 1
        if needed is not None:
            last = max((k for k, s in enumerate(self.segments) if needed.intersection(s.outputs)), default=-1)
        carried = dict(feed)
        for seg in self.segments[: last + 1]:
            values = seg.session.run(list(seg.outputs), {n: carried[n] for n in seg.feeds})
            produced = dict(zip(seg.outputs, values))
            carried.update(produced)
            for name in seg.release:
                carried.pop(name, None)
            yield produced


def _ancestors(model: onnx.ModelProto, wanted: set[str]) -> list[onnx.NodeProto]:
    """The nodes (in graph order) that the wanted tensors depend on."""
    needed, keep = set(wanted), []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= node_inputs(node)
    return keep[::-1]


def _cut(
    nodes: list[onnx.NodeProto],
    wanted: set[str],
    size: Mapping[str, int],
    budget: int,
    infos: Mapping[str, onnx.ValueInfoProto],
) -> list[list[onnx.NodeProto]]:
    """Consecutive groups of nodes; a cut only where every tensor crossing it has a known type."""
    reads_after = _last_reader(nodes)
    groups: list[list[onnx.NodeProto]] = [[]]
    held = 0
    produced: set[str] = set()
    for i, node in enumerate(nodes):
        adds = sum(size[o] for o in node.output if o in wanted)
        if groups[-1] and held and held + adds > budget and _cuttable(produced, reads_after, i, infos):
            groups.append([])
            held = 0
        groups[-1].append(node)
        held += adds
        produced.update(o for o in node.output if o)
    return groups


def _last_reader(nodes: list[onnx.NodeProto]) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node_inputs(node):
            last[name] = i
    return last


def _cuttable(
    produced: set[str], reads_after: Mapping[str, int], at: int, infos: Mapping[str, onnx.ValueInfoProto]
) -> bool:
    return all(_typed(infos.get(t)) for t in produced if reads_after.get(t, -1) >= at)


def _build(
    model: onnx.ModelProto,
    groups: list[list[onnx.NodeProto]],
    wanted: set[str],
    infos: Mapping[str, onnx.ValueInfoProto],
) -> list[Segment]:
    inits = {t.name: t for t in model.graph.initializer}
    reads = [set().union(*(node_inputs(n) for n in g)) - set(inits) for g in groups]
    makes = [{o for n in g for o in n.output if o} for g in groups]
    later = [set().union(*reads[k + 1 :]) for k in range(len(groups))]
    segments = []
    carried: set[str] = set()
    for k, group in enumerate(groups):
        feeds = tuple(sorted(reads[k] - makes[k]))
        outputs = tuple(sorted(makes[k] & wanted) + sorted((makes[k] & later[k]) - wanted))
        carried |= set(feeds) | set(outputs)
        release = tuple(sorted(n for n in carried if n not in later[k]))
        carried -= set(release)
        used = set().union(*(node_inputs(n) for n in group)) & set(inits)
        graph = helper.make_graph(
            group,
            f"{model.graph.name or 'model'}_segment{k}",
            [_input_info(n, infos) for n in feeds],
            [onnx.ValueInfoProto(name=n) for n in outputs],
            [inits[n] for n in sorted(used)],
        )
        sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        sub.functions.extend(model.functions)
        segments.append(
            Segment(make_session(sub, arena=False), feeds, outputs, release, tuple(n.name for n in group))
        )
    return segments


def _input_info(name: str, infos: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    vi = infos.get(name)
    if not _typed(vi):
        raise BadModelError(f"tensor {name}: no type known; cannot run calibration segments across it")
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    out.type.tensor_type.ClearField("shape")  # batches after the first may differ in size
    return out

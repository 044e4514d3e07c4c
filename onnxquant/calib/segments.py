"""Run a float model in consecutive segments, so that calibration holds one segment's tensors at a time.

Exposing every calibrated activation as a graph output makes ONNX Runtime keep all of them alive until the end
of a run: a batch then costs the sum of its activations instead of the few that plain inference keeps. Here
the topologically sorted nodes that the calibrated tensors depend on are cut into segments whose calibrated
tensors hold about `budget` bytes each (estimated from shapes inferred at the batch's input shape; a segment
ends with the tensor that reaches the budget). Each segment is an ONNX Runtime session of its own, without the
memory arena, whose outputs are its calibrated tensors and the tensors later segments read. Nodes computing no
wanted tensor run just before their first reader, so a DequantizeLinear stays with the node it feeds and ONNX
Runtime fuses them as in one session. A batch runs segment after segment; a tensor is dropped as soon as no
later segment reads it, and nodes that feed no calibrated tensor are not run at all. Memory: the model, the
tensors crossing the current cut, and the outputs of the segment being read plus the one being computed,
whatever the number of tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxquant.errors import BadDataError, BadModelError, InternalError, first_line
from onnxquant.model import declared_weights, graph_inputs, is_big, make_session, tensor_bytes

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 64 * 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
SEGMENT_WEIGHTS = 256 * 2**20  # bytes of weights per segment of a big model (`model.is_big`)
WEIGHTS_FILE = "weights.data"
ALIGN = 4096  # external tensors start on a page, as onnx.save writes them, so ONNX Runtime can map them


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
    probe = declared_weights(model)
    del probe.graph.value_info[:]  # recorded at symbolic shapes; inferred again at the batch's
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
        big = is_big(model)
        weights = _node_weights(model, nodes) if big else None
        groups = _cut(nodes, wanted, size, budget, infos, weights)
        self._scratch = tempfile.TemporaryDirectory(prefix="onnxquant-segments-") if big else None
        self.segments = _build(model, groups, wanted, infos, self._scratch)
        log.info(
            "calibration runs the model in %d segment(s) of about %d MB of calibrated tensors each",
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
            try:
                values = seg.session.run(list(seg.outputs), {n: carried[n] for n in seg.feeds})
            except Exception as exc:  # ONNX Runtime's own exception types; the message says what
                raise BadDataError(f"ONNX Runtime rejects the data: {first_line(exc)}") from exc
            produced = dict(zip(seg.outputs, values))
            carried.update(produced)
            for name in seg.release:
                carried.pop(name, None)
            yield produced


def model_inputs(batch: Mapping[str, np.ndarray], inputs: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The batch's arrays for the model's `inputs`; a batch without one is one line naming `what` it is."""
    missing = [i for i in inputs if i not in batch]
    if missing:
        raise BadDataError(
            f"{what} lacks model input(s) {', '.join(missing)}; "
            f"accepted: batches with keys {', '.join(inputs)}"
        )
    return {i: np.asarray(batch[i]) for i in inputs}


def _ancestors(model: onnx.ModelProto, wanted: set[str]) -> list[onnx.NodeProto]:
    """The nodes that the wanted tensors depend on, each node that computes no wanted tensor moved to just
    before its first reader (still a topological order)."""
    needed, keep = set(wanted), []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= node_inputs(node)
    keep = _unique_dequantize(keep[::-1], wanted)
    readers = _readers(keep, node_inputs)
    anchor = [0] * len(keep)
    for i in reversed(range(len(keep))):
        if any(o in wanted for o in keep[i].output):
            anchor[i] = i
        else:
            anchor[i] = min((anchor[j] for o in keep[i].output for j in readers.get(o, ())), default=i)
    lazy = [anchor[i] != i or not any(o in wanted for o in keep[i].output) for i in range(len(keep))]
    order = sorted(range(len(keep)), key=lambda i: (anchor[i], not lazy[i], i))
    return [keep[i] for i in order]


def _unique_dequantize(nodes: list[onnx.NodeProto], wanted: set[str]) -> list[onnx.NodeProto]:
    """`nodes` with a copy of each DequantizeLinear per reader (as ONNX Runtime does before it fuses Q/DQ),
    so each copy can run beside its reader: a shared one would hand the readers of later segments a float
    tensor and keep ONNX Runtime from fusing them into integer kernels."""
    readers = _readers(nodes, lambda node: node.input)  # subgraph readers keep the shared one
    out: list[onnx.NodeProto] = []
    renamed: dict[int, dict[str, str]] = {}
    for i, node in enumerate(nodes):
        if i in renamed:
            node = _with_inputs(node, renamed[i])
        shared = node.op_type == "DequantizeLinear" and node.output[0] not in wanted
        users = sorted(set(readers.get(node.output[0], ()))) if shared else []
        out.append(node)
        for k, j in enumerate(users[1:], start=1):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}__copy{k}"
            copy.output[0] = f"{node.output[0]}__copy{k}"
            out.append(copy)
            renamed.setdefault(j, {})[node.output[0]] = copy.output[0]
    return out


def _with_inputs(node: onnx.NodeProto, renames: Mapping[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for k, name in enumerate(copy.input):
        copy.input[k] = renames.get(name, name)
    return copy


def _cut(
    nodes: list[onnx.NodeProto],
    wanted: set[str],
    size: Mapping[str, int],
    budget: int,
    infos: Mapping[str, onnx.ValueInfoProto],
    weights: Mapping[str, int] | None = None,
) -> list[list[onnx.NodeProto]]:
    """Consecutive groups of nodes; a cut only where every tensor crossing it has a known type. With
    `weights` (bytes of initializers by node name, for a big model) a group also ends before its weights
    would pass `SEGMENT_WEIGHTS`."""
    reads_after = {name: at[-1] for name, at in _readers(nodes, node_inputs).items()}
    groups: list[list[onnx.NodeProto]] = [[]]
    held = held_weights = 0
    produced: set[str] = set()
    for i, node in enumerate(nodes):
        adds = sum(size[o] for o in node.output if o in wanted)
        more = weights.get(node.name, 0) if weights else 0
        if (
            held_weights
            and held_weights + more > SEGMENT_WEIGHTS
            and _cuttable(produced, reads_after, i, infos)
        ):
            groups.append([])
            held = held_weights = 0
        groups[-1].append(node)
        held += adds
        held_weights += more
        produced.update(o for o in node.output if o)
        # a group ends right after the tensor that fills it, so the nodes between two wanted tensors (a
        # DequantizeLinear, the op, its QuantizeLinear) stay together and ONNX Runtime fuses them as before
        if adds and held >= budget and i + 1 < len(nodes) and _cuttable(produced, reads_after, i + 1, infos):
            groups.append([])
            held = held_weights = 0
    return groups


def _readers(nodes: list[onnx.NodeProto], inputs_of) -> dict[str, list[int]]:
    """Tensor name -> the positions (ascending) of the nodes reading it, by `inputs_of(node)`."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in inputs_of(node):
            readers.setdefault(name, []).append(i)
    return readers


def _cuttable(
    produced: set[str], reads_after: Mapping[str, int], at: int, infos: Mapping[str, onnx.ValueInfoProto]
) -> bool:
    return all(_typed(infos.get(t)) for t in produced if reads_after.get(t, -1) >= at)


def _build(
    model: onnx.ModelProto,
    groups: list[list[onnx.NodeProto]],
    wanted: set[str],
    infos: Mapping[str, onnx.ValueInfoProto],
    scratch: tempfile.TemporaryDirectory | None = None,
) -> list[Segment]:
    """One session per group; with a `scratch` folder (a big model), each group's weights are written there
    as external data and its session is opened from that path for each run (`OnDemandSession`)."""
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
        folder = Path(scratch.name) / f"segment{k}" if scratch is not None else None
        weights = [inits[n] for n in sorted(used)]
        graph = helper.make_graph(
            group,
            f"{model.graph.name or 'model'}_segment{k}",
            [_input_info(n, infos) for n in feeds],
            [onnx.ValueInfoProto(name=n) for n in outputs],
            weights if folder is None else _write_external(weights, folder),
        )
        sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        sub.functions.extend(model.functions)
        session = make_session(sub, arena=False) if folder is None else OnDemandSession(sub, folder)
        segments.append(Segment(session, feeds, outputs, release, tuple(n.name for n in group)))
    return segments


def _node_weights(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> dict[str, int]:
    """Bytes of the initializers each node reads (counted from dims, without touching the data)."""
    sizes = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    return {n.name: sum(sizes.get(i, 0) for i in node_inputs(n)) for n in nodes}


def _write_external(tensors: Sequence[onnx.TensorProto], folder: Path) -> list[onnx.TensorProto]:
    """Write the raw data of `tensors` to `folder/weights.data` one tensor at a time, and return stand-ins
    that point there (ONNX external data): the segment's model is then small, and no second in-memory copy
    of its weights is made. Tensors without raw data (small, typed fields) are returned as they are."""
    folder.mkdir()
    stand_ins, offset = [], 0
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for tensor in tensors:
            if not tensor.HasField("raw_data"):
                stand_ins.append(tensor)
                continue
            offset += f.write(b"\0" * (-offset % ALIGN))
            length = f.write(tensor.raw_data)
            stand_in = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            stand_in.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                stand_in.external_data.add(key=key, value=value)
            stand_ins.append(stand_in)
            offset += length
    return stand_ins


class OnDemandSession:
    """An ONNX Runtime session of a big segment, opened from its folder (the model and its external data)
    for each run and closed after it, so only one big segment's weights are in memory at a time. Opening
    costs a read of the weights per batch: the price of calibrating a model that does not fit twice."""

    def __init__(self, model: onnx.ModelProto, folder: Path) -> None:
        self.path = folder / "segment.onnx"
        self.path.write_bytes(model.SerializeToString())
        make_session(self.path, arena=False)  # a model ONNX Runtime rejects fails here, as in-memory ones do

    def run(self, names: list[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        session = make_session(self.path, arena=False)
        try:
            return session.run(names, feed)
        finally:
            del session


def _input_info(name: str, infos: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    vi = infos.get(name)
    if not _typed(vi):
        raise BadModelError(f"tensor {name}: no type known; cannot run calibration segments across it")
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    out.type.tensor_type.ClearField("shape")  # batches after the first may differ in size
    return out


@dataclass(frozen=True)
class Job:
    """A callback that needs tensors of two models run side by side: `call(first_values, second_values)`."""

    first: tuple[str, ...]
    second: tuple[str, ...]
    call: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]


def run_paired(
    first: SegmentedModel | None,
    second: SegmentedModel | None,
    feed: Mapping[str, np.ndarray],
    jobs: list[Job],
) -> None:
    """Run two models' segments on `feed` and call every job as soon as the tensors it needs exist.

    The second model leads; the first runs only as far as a job waiting on it needs, and a tensor is dropped
    once no waiting job needs it, so memory is a segment of each model plus the tensors waiting for their
    partner (few when both models compute in the same order, as a Q/DQ model and its float model do)."""
    need = [Counter(n for job in jobs for n in job.first), Counter(n for job in jobs for n in job.second)]
    held: list[dict[str, np.ndarray]] = [
        {n: v for n, v in feed.items() if n in need[0]},
        {n: v for n, v in feed.items() if n in need[1]},
    ]
    waiting = list(jobs)
    runs = [first.run(feed) if first else iter(()), second.run(feed) if second else iter(())]

    def complete() -> None:
        nonlocal waiting
        still = []
        for job in waiting:
            if all(n in held[0] for n in job.first) and all(n in held[1] for n in job.second):
                job.call({n: held[0][n] for n in job.first}, {n: held[1][n] for n in job.second})
                for side, names in enumerate((job.first, job.second)):
                    for n in names:
                        need[side][n] -= 1
                        if need[side][n] == 0:
                            del held[side][n]
            else:
                still.append(job)
        waiting = still

    def advance(side: int) -> bool:
        outs = next(runs[side], None)
        if outs is None:
            return False
        held[side].update((n, v) for n, v in outs.items() if need[side][n] > 0)
        complete()
        return True

    complete()
    while waiting:
        blocked = [job for job in waiting if all(n in held[1] for n in job.second)]
        if not (advance(0) if blocked else advance(1) or advance(0)):
            missing = sorted({n for job in waiting for n in job.first if n not in held[0]})
            missing += sorted({n for job in waiting for n in job.second if n not in held[1]})
            raise InternalError(f"tensors never computed: {', '.join(missing[:10])}")

"""Validation of the integer plan against ONNX Runtime running the same QDQ model with all optimizations.

Per integer step the comparison is *isolated*: the step is fed ONNX Runtime's values of its integer inputs
(the Q outputs exposed as extra graph outputs; those are node boundaries, so ORT's QDQ fusion into
QLinearConv / QGemm / QLinearAdd / … is unaffected) and its codes are compared with ORT's at the step's Q
output. Per graph output the comparison is end to end. Differences are counted in steps of the quantized
tensor (LSB): integer outputs directly, float outputs of a per-tensor DequantizeLinear as ``|Δ| / s``; other
float outputs by absolute difference.

Criteria (`ValidationResult.passed`): ``float`` requant — every integer node and every LSB-measured output
bit-exact, other float outputs within ``1e-5 + 1e-5·|ref|``; ``fixed`` requant — every integer node within
1 LSB (outputs are reported: fixed-point rounding differences propagate through later layers).
In fixed mode each node is also compared with the float-requant result on the same inputs (``vs_float``).
An output computed through a float fallback node (an op without an integer kernel, run alone in ONNX Runtime)
measures ONNX Runtime's float arithmetic against itself, not the integer plan: it is reported with its error
and left out of the verdict, and the verdict line says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxquant.calib.segments import DEFAULT_BUDGET, Job, SegmentedModel, run_paired
from onnxquant.errors import BadDataError, BadModelError, BadOptionError, InternalError
from onnxquant.model import constants_to_initializers, graph_inputs
from onnxquant.passes.insert_codebook import refuse_codebook
from onnxquant.runtime import plan as P
from onnxquant.runtime.backends import get_backend
from onnxquant.runtime.lower import lower
from onnxquant.runtime.requant import REQUANT_MODES

log = logging.getLogger(__name__)

FLOAT_RTOL = FLOAT_ATOL = 1e-5


@dataclass
class Comparison:
    """Element counts and differences at one tensor; `hist` maps |Δ| in LSB to a count (unit "lsb")."""

    name: str
    op: str
    tensor: str
    kind: str
    unit: str = "lsb"
    count: int = 0
    differ: int = 0
    max_lsb: int = 0
    max_abs: float = 0.0
    hist: dict[int, int] = field(default_factory=dict)
    vs_float: Comparison | None = None
    through_float: tuple[str, ...] = ()  # float fallback steps on an output's path (then not judged)

    def add(self, got, ref, scale: float | None = None) -> None:
        got, ref = np.asarray(got), np.asarray(ref)
        if got.shape != ref.shape:
            raise InternalError(f"{self.name}: shape {got.shape} differs from ONNX Runtime's {ref.shape}")
        self.count += int(ref.size)
        if self.unit == "abs":
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
            bad = diff > FLOAT_ATOL + FLOAT_RTOL * np.abs(ref.astype(np.float64))
            self.differ += int(np.count_nonzero(diff))
            self.max_lsb = max(self.max_lsb, int(np.count_nonzero(bad) > 0))
            return
        if scale is None:
            lsb = np.abs(got.astype(np.int64) - ref.astype(np.int64))
        else:
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
            lsb = np.rint(diff / float(scale)).astype(np.int64)
        values, counts = np.unique(lsb, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            self.hist[int(v)] = self.hist.get(int(v), 0) + int(c)
        self.differ += int(np.count_nonzero(lsb))
        self.max_lsb = max(self.max_lsb, int(lsb.max(initial=0)))

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "op": self.op,
            "tensor": self.tensor,
            "kind": self.kind,
            "unit": self.unit,
            "elements": self.count,
            "differ": self.differ,
        }
        if self.unit == "lsb":
            out.update(max_lsb=self.max_lsb, histogram={str(k): v for k, v in sorted(self.hist.items())})
        if self.unit == "abs" or self.max_abs:
            out["max_abs"] = self.max_abs
        if self.vs_float is not None:
            out["vs_float_requant"] = self.vs_float.to_json()
        if self.kind == "output":
            out["through_float_fallback"] = list(self.through_float)
            out["judged"] = not self.through_float
        return out

    def error_text(self) -> str:
        """The largest difference, in the comparison's unit."""
        return f"max |diff| {self.max_abs:.3g}" if self.unit == "abs" else f"max {self.max_lsb} LSB"

    def line(self) -> str:
        if self.through_float:
            shown = ", ".join(self.through_float[:3]) + (", ..." if len(self.through_float) > 3 else "")
            return (
                f"  {self.kind:<8} {self.name} ({self.op} -> {self.tensor}): {self.count} elements, "
                f"{self.differ} differ, {self.error_text()}; computed through {len(self.through_float)} "
                f"float fallback node(s) ({shown}): float arithmetic, not judged bit-exact"
            )
        if self.unit == "abs":
            return (
                f"  {self.kind:<8} {self.name} ({self.op} -> {self.tensor}): {self.count} elements, "
                f"{self.differ} differ, max |diff| {self.max_abs:.3g}"
            )
        hist = ", ".join(f"{k}:{v}" for k, v in sorted(self.hist.items()) if k)
        text = (
            f"  {self.kind:<8} {self.name} ({self.op} -> {self.tensor}): {self.count} elements, "
            f"{self.differ} differ, max {self.max_lsb} LSB" + (f" [{hist}]" if hist else "")
        )
        if self.vs_float is not None:
            text += f"; vs float requant: {self.vs_float.differ} differ, max {self.vs_float.max_lsb} LSB"
        return text


@dataclass
class ValidationResult:
    """Per integer node and per output comparisons, plus the plan's node statuses."""

    backend: str
    requant: str
    samples: int
    nodes: list[Comparison]
    outputs: list[Comparison]
    plan: list[P.NodeStatus]

    @property
    def judged_outputs(self) -> list[Comparison]:
        """Outputs computed by the integer plan alone (no float fallback on their path)."""
        return [c for c in self.outputs if not c.through_float]

    @property
    def passed(self) -> bool:
        if self.requant == "fixed":
            return all(c.max_lsb <= (1 if c.kind == P.KIND_INTEGER else 0) for c in self.nodes)
        return all(c.differ == 0 for c in self.nodes) and all(c.max_lsb == 0 for c in self.judged_outputs)

    def criteria(self) -> str:
        """What the verdict covers, in words: the nodes and outputs it judged, and the outputs it did not."""
        steps = f"{len(self.nodes)} integer/quantize node(s)"
        judged = self.judged_outputs
        if self.requant == "float":
            exact = [c for c in judged if c.unit == "lsb"]
            close = [c for c in judged if c.unit == "abs"]
            text = f"bit-exact at all {steps}" + (f" and {len(exact)} integer output(s)" if exact else "")
            if close:
                text += f"; {len(close)} float output(s) within {FLOAT_ATOL:g} + {FLOAT_RTOL:g}·|ref|"
        else:
            text = f"all {steps} within 1 LSB; outputs reported, not judged"
        unjudged = [c for c in self.outputs if c.through_float]
        if unjudged:
            errors = ", ".join(f"{c.name} {c.error_text()}" for c in unjudged[:3])
            more = f" and {len(unjudged) - 3} more" if len(unjudged) > 3 else ""
            text += (
                f"; not judged: {len(unjudged)} output(s) computed through float fallback nodes "
                f"({errors}{more})"
            )
        return text

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "requant": self.requant,
            "samples": self.samples,
            "passed": self.passed,
            "criteria": self.criteria(),
            "nodes": [c.to_json() for c in self.nodes],
            "outputs": [c.to_json() for c in self.outputs],
            "plan": [s.to_json() for s in self.plan],
        }

    def summary_lines(self) -> list[str]:
        kinds: dict[str, int] = {}
        for s in self.plan:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        lines = [
            f"validate: backend {self.backend}, requant {self.requant}, {self.samples} samples",
            (
                f"plan: {kinds.get(P.KIND_INTEGER, 0)} nodes in {len(self.nodes)} integer/quantize steps, "
                f"{kinds.get(P.KIND_FLOAT, 0)} float fallback nodes"
            ),
        ]
        lines += [f"  float    {s.op} {s.node!r}: {s.reason}" for s in self.plan if s.kind == P.KIND_FLOAT]
        lines.append("nodes (fed ONNX Runtime's inputs):")
        lines += [c.line() for c in self.nodes]
        lines.append("outputs (end to end):")
        lines += [c.line() for c in self.outputs]
        lines.append(f"{'PASSED' if self.passed else 'FAILED'} ({self.requant} requant: {self.criteria()})")
        return lines


FLOAT8_TYPES = {
    onnx.TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN",
    onnx.TensorProto.FLOAT8E4M3FNUZ: "FLOAT8E4M3FNUZ",
    onnx.TensorProto.FLOAT8E5M2: "FLOAT8E5M2",
    onnx.TensorProto.FLOAT8E5M2FNUZ: "FLOAT8E5M2FNUZ",
}


def refuse_float8(model: onnx.ModelProto) -> None:
    """One line when `model` quantizes to FP8: its Q/DQ hold floating-point values, not integer codes, so
    there is no integer plan to run (ONNX Runtime and TensorRT run FP8 models)."""
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), None)
        if dtype is None and node.op_type == "DequantizeLinear":
            dtype = initializers.get(node.input[0])
        if dtype is None and len(node.input) > 2:
            dtype = initializers.get(node.input[2])
        if dtype in FLOAT8_TYPES:
            raise BadModelError(
                f"node {node.name!r}: {node.op_type} of {FLOAT8_TYPES[dtype]} (FP8): the integer runtime "
                "does not apply to FP8; accepted: an integer Q/DQ model (run FP8 in ONNX Runtime or TensorRT)"
            )


def validate(
    model: onnx.ModelProto,
    data: Iterable[Mapping[str, np.ndarray]],
    backend: str = "numpy",
    requant: str = "float",
    budget: int = DEFAULT_BUDGET,
) -> ValidationResult:
    """Run the integer plan and ONNX Runtime on the same batches and compare them (see module docstring).

    ONNX Runtime's reference runs in segments of about `budget` bytes of checked tensors
    (`calib.segments`), and the backend frees each tensor after its last reader: memory is a few batches of
    activations, not all of them."""
    if requant not in REQUANT_MODES:
        raise BadOptionError(f"requant mode {requant!r} is unknown; accepted: {', '.join(REQUANT_MODES)}")
    refuse_float8(model)
    refuse_codebook(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    constants_to_initializers(work)
    plan = lower(work)
    be = get_backend(backend)
    checked = [s for s in plan.steps if s.kind in (P.KIND_INTEGER, P.KIND_QUANTIZE)]
    exposed = sorted(
        {
            n
            for s in checked
            for n in [*s.inputs, *s.outputs]
            if n
            and n not in plan.constants
            and n not in plan.inputs
            and not (isinstance(s, P.AddStep) and n in s.const)
        }
    )
    widened = _widen_sub_byte(work, exposed, plan)
    producers = {o: s for s in plan.steps for o in s.outputs}
    nodes = [Comparison(s.name, s.op, s.outputs[0], s.kind) for s in checked]
    if requant == "fixed":
        for c in nodes:
            if c.kind == P.KIND_INTEGER:
                c.vs_float = Comparison(c.name, c.op, c.tensor, c.kind)
    outputs = []
    for name in plan.outputs:
        prod = producers.get(name)
        lsb = name in plan.int_dtypes or (isinstance(prod, P.DequantizeStep) and np.size(prod.scale) == 1)
        comp = Comparison(name, prod.op if prod else "input", name, "output", "lsb" if lsb else "abs")
        comp.through_float = _float_fallbacks_before(name, producers)
        outputs.append(comp)
    input_infos = graph_inputs(widened)
    shown = {n: _alias(n, plan) for n in exposed}
    wanted = list(dict.fromkeys([*shown.values(), *(n for n in plan.outputs if n not in shown)]))
    wanted = [n for n in wanted if n not in plan.inputs]
    segments = None
    samples = 0
    for batch in data:
        feeds = _feeds(batch, input_infos)
        samples += len(next(iter(feeds.values()))) if feeds and np.ndim(next(iter(feeds.values()))) else 1
        jobs = [_step_check(be, plan, step, comp, feeds, requant) for step, comp in zip(checked, nodes)]
        env = be.run(plan, feeds, requant, keep=[c.tensor for c in outputs])
        jobs += [_output_check(comp, env, producers, shown) for comp in outputs if comp.tensor not in feeds]
        segments = segments or SegmentedModel(widened, wanted, feeds, budget)
        run_paired(None, segments, feeds, jobs)
    if samples == 0:
        raise BadDataError("the data holds no samples; accepted: at least one batch of model inputs")
    result = ValidationResult(backend, requant, samples, nodes, outputs, plan.status)
    log.info("validation %s", "passed" if result.passed else "failed")
    return result


def _step_check(be, plan: P.Plan, step: P.Step, comp: Comparison, feeds, requant: str) -> Job:
    """Run `step` on ONNX Runtime's values of its inputs and compare with ONNX Runtime's output."""
    names = [n for n in [*step.inputs, *step.outputs] if n and _exposed_name(n, step, plan)]

    def call(_none, ref):
        known = {**{_unalias(k): v for k, v in ref.items()}, **feeds}
        args = [be.arg(known, step, n) for n in step.inputs]
        got = be.run_step(plan, step, args, requant)[0]
        comp.add(got, known[step.outputs[0]])
        if comp.vs_float is not None:
            comp.vs_float.add(got, be.run_step(plan, step, args, "float")[0])

    return Job((), tuple(_alias(n, plan) for n in names), call)


def _exposed_name(n: str, step: P.Step, plan: P.Plan) -> bool:
    return (
        n not in plan.constants
        and n not in plan.inputs
        and not (isinstance(step, P.AddStep) and n in step.const)
    )


def _output_check(
    comp: Comparison, env: Mapping[str, np.ndarray], producers: Mapping[str, P.Step], shown: Mapping[str, str]
) -> Job:
    """Compare the backend's end-to-end value of a model output with ONNX Runtime's."""
    prod = producers.get(comp.tensor)
    scale = float(np.asarray(prod.scale).reshape(-1)[0]) if isinstance(prod, P.DequantizeStep) else None
    name = shown.get(comp.tensor, comp.tensor)

    def call(_none, ref):
        comp.add(env[comp.tensor], ref[name], scale if comp.unit == "lsb" else None)

    return Job((), (name,), call)


def _float_fallbacks_before(tensor: str, producers: Mapping[str, P.Step]) -> tuple[str, ...]:
    """Names of the float fallback steps `tensor` depends on, in plan order of discovery."""
    found: dict[str, None] = {}
    seen, todo = set(), [tensor]
    while todo:
        step = producers.get(todo.pop())
        if step is None or step.name in seen:
            continue
        seen.add(step.name)
        if step.kind == P.KIND_FLOAT:
            found[f"{step.op} {step.name!r}"] = None
        todo.extend(n for n in step.inputs if n)
    return tuple(found)


SUB_BYTE = {
    "int4": onnx.TensorProto.INT8,
    "uint4": onnx.TensorProto.UINT8,
    "int2": onnx.TensorProto.INT8,
    "uint2": onnx.TensorProto.UINT8,
}
ALIAS = "__oq_widened"


def _alias(name: str, plan: P.Plan) -> str:
    return name + ALIAS if plan.int_dtypes.get(name) in SUB_BYTE else name


def _unalias(name: str) -> str:
    return name.removesuffix(ALIAS)


def _widen_sub_byte(model: onnx.ModelProto, names: list[str], plan: P.Plan) -> onnx.ModelProto:
    """ONNX Runtime cannot hand 4-bit tensors to numpy: expose a Cast to the 8-bit container instead."""
    wide = [n for n in names if plan.int_dtypes.get(n) in SUB_BYTE]
    if not wide:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in wide:
        out.graph.node.append(
            onnx.helper.make_node(
                "Cast", [name], [name + ALIAS], to=SUB_BYTE[plan.int_dtypes[name]], name=name + ALIAS
            )
        )
    return out


def _feeds(batch, inputs) -> dict[str, np.ndarray]:
    if not isinstance(batch, Mapping):
        raise BadDataError(
            f"a data batch is a {type(batch).__name__}; accepted: a mapping input name -> array"
        )
    expected = {i.name: i for i in inputs}
    missing = sorted(set(expected) - set(batch))
    extra = sorted(set(batch) - set(expected))
    if missing or extra:
        raise BadDataError(
            f"data keys {sorted(batch)} do not match the model inputs {sorted(expected)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {extra})" if extra else "")
        )
    feeds = {}
    for name, info in expected.items():
        arr = np.asarray(batch[name])
        tt = info.type.tensor_type
        want = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        if want is not None and arr.dtype != want:
            if not np.can_cast(arr.dtype, np.float64, "same_kind") and arr.dtype.kind not in "iuf":
                raise BadDataError(f"input {name!r}: dtype {arr.dtype} is not numeric; accepted: {want}")
            arr = arr.astype(want)
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        if not tt.HasField("shape"):
            feeds[name] = arr
            continue
        if len(shape) != arr.ndim:
            raise BadDataError(
                f"input {name!r}: array has shape {arr.shape}, the model expects rank {len(shape)} {shape}"
            )
        for axis, (dim, have) in enumerate(zip(shape, arr.shape)):
            if isinstance(dim, int) and dim and dim != have:
                raise BadDataError(f"input {name!r}: axis {axis} has size {have}, the model expects {dim}")
        feeds[name] = arr
    return feeds

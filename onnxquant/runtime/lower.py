"""Lowering a QDQ model to an integer plan.

Patterns (every intermediate tensor must have exactly one consumer and must not be a graph output):

* ``DQ(x) → {Conv, ConvTranspose, Gemm, MatMul}(DQ(w) [, bias]) [→ Add(bias)] [→ Relu | Clip]* → Q``:
  ``acc = Σ (x − z_x)(w − z_w) + b`` in int32 with ``b = round(bias / (s_x s_w))`` (an int32 bias already at
  scale ``s_x s_w`` is used as is), then ``y = clip(requant(acc) + z_y, lo, hi)`` where the real multiplier is
  ``s_x s_w / s_y`` (times ``alpha`` for Gemm) and ``[lo, hi]`` is the code range narrowed by the activation:
  Q is monotone, so ``Q(clip(v, a, b)) = clip(Q(v), Q(a), Q(b))`` and ``Q(relu(v)) = max(Q(v), Q(0))``.
  The node is refused (runs in float) unless ``max|x − z_x| · Σ_k |w_k − z_w| + |b| < 2^31`` for every
  output channel, a proof that the int32 accumulator cannot overflow.
* ``DQ(a) + DQ(b) [→ Relu | Clip]* → Q``: quantized Add with requantization of both operands.
* ``DQ → {MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool} → Q``; pooling sums stay integer.
* ``DQ → {Concat, Reshape, Flatten, Transpose, Squeeze, Unsqueeze} → Q``: codes are moved, and requantized
  only where the output (scale, zero point) differs from the input's.

Weights may be stored quantized (an integer initializer feeding DQ) or in float behind a constant Q → DQ pair
(folded here). Every other node runs in float between a DequantizeLinear and a QuantizeLinear, and the plan
records why.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxquant.errors import OnnxQuantError
from onnxquant.runtime import plan as P
from onnxquant.runtime.lower_gemm import GemmPatterns, Refused, _attr
from onnxquant.runtime.requant import INT32_MAX, quantize_f32

log = logging.getLogger(__name__)

DTYPE_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "uint4": (0, 15), "int4": (-8, 7),
               "uint2": (0, 3), "int2": (-2, 1), "uint16": (0, 65535), "int16": (-32768, 32767),
               "int32": (-(1 << 31), INT32_MAX)}
GEMM_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
MOVE_OPS = ("Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


@dataclass
class QInfo:
    """Quantization parameters of one Q or DQ node (scale float32, zero point int64, per-axis or scalar)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    dtype: str

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def range(self) -> tuple[int, int]:
        return DTYPE_RANGE[self.dtype]

    def scalar(self) -> tuple[float, int]:
        return np.float32(self.scale.reshape(-1)[0]), int(self.zero_point.reshape(-1)[0])


def _to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def _dtype_name(arr) -> str:
    name = np.asarray(arr).dtype.name
    return {"float8_e4m3fn": "unsupported"}.get(name, name)


def lower(model: onnx.ModelProto) -> P.Plan:
    """Lower a QDQ model to an integer plan; an OnnxQuantError when the model has no Q/DQ nodes."""
    ops = {n.op_type for n in model.graph.node}
    if not ops & {"QuantizeLinear", "DequantizeLinear"}:
        raise OnnxQuantError(f"{model.graph.name or 'model'}: has no QuantizeLinear/DequantizeLinear nodes; "
                             "accepted: a QDQ model (onnxquant convert, or onnxruntime quantize_static with "
                             "QuantFormat.QDQ)")
    return _Lowering(model).run()


class _Lowering(GemmPatterns):
    def __init__(self, model: onnx.ModelProto):
        from onnxquant.model import infer_shapes

        self.model = infer_shapes(model)
        g = self.model.graph
        self.nodes = list(g.node)
        self.names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(self.nodes)]
        self.consts: dict[str, np.ndarray] = {t.name: _to_array(t) for t in g.initializer}
        self.graph_outputs = [o.name for o in g.output]
        self.inputs = [i.name for i in g.input if i.name not in self.consts]
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for idx, n in enumerate(self.nodes):
            for name in n.input:
                if name:
                    self.consumers[name].append(idx)
        self.shapes = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                        for d in vi.type.tensor_type.shape.dim]
        self.status: dict[int, P.NodeStatus] = {}
        self.weights: dict[str, tuple[np.ndarray, QInfo]] = {}  # DQ(const) output -> (codes, params)
        self.dq: dict[str, tuple[str, QInfo]] = {}  # DQ(activation) output -> (source codes, params)
        self.int_dtypes: dict[str, str] = {}
        self.ranges: dict[str, tuple[int, int]] = {}

    # ---------------------------------------------------------------- parameters and constants
    def _qinfo(self, node: onnx.NodeProto) -> QInfo:
        if _attr(node, "block_size", 0):
            raise Refused("blocked quantization (block_size) is not lowered")
        scale = self.consts.get(node.input[1])
        if scale is None:
            raise Refused(f"scale {node.input[1]!r} is not a constant")
        zname = node.input[2] if len(node.input) > 2 else ""
        if zname:
            zp = self.consts.get(zname)
            if zp is None:
                raise Refused(f"zero point {zname!r} is not a constant")
            dtype = _dtype_name(zp)
        else:
            zp = np.zeros((), dtype=np.int64)
            out_type = _attr(node, "output_dtype", 0)
            if node.op_type == "DequantizeLinear" and node.input[0] in self.int_dtypes:
                dtype = self.int_dtypes[node.input[0]]
            elif node.op_type == "DequantizeLinear" and node.input[0] in self.consts:
                dtype = _dtype_name(self.consts[node.input[0]])
            elif out_type:
                dtype = _dtype_name(np.zeros((), helper.tensor_dtype_to_np_dtype(out_type)))
            else:
                dtype = "uint8"
        if dtype not in DTYPE_RANGE or scale.dtype != np.float32:
            raise Refused(f"quantized type {dtype}/{scale.dtype} is not lowered")
        scale = np.asarray(scale, dtype=np.float32)
        axis = int(_attr(node, "axis", 1)) if scale.size > 1 else None
        return QInfo(scale.reshape(-1) if scale.size > 1 else scale.reshape(()),
                     np.asarray(zp).astype(np.int64).reshape(-1) if np.size(zp) > 1
                     else np.asarray(zp).astype(np.int64).reshape(()), axis, dtype)

    def _fold_constants(self) -> None:
        for idx, node in enumerate(self.nodes):
            op = node.op_type
            if op == "Constant" and _attr(node, "value") is not None:
                self.consts[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
                self._set(idx, P.KIND_CONSTANT, "")
            elif op == "QuantizeLinear":
                try:
                    qi = self._qinfo(node)
                except Refused:
                    continue
                self.int_dtypes[node.output[0]] = qi.dtype
                if node.input[0] in self.consts:
                    x = np.asarray(self.consts[node.input[0]], dtype=np.float32)
                    s, z = _bcast(qi.scale, qi.axis, x.ndim), _bcast(qi.zero_point, qi.axis, x.ndim)
                    lo, hi = qi.range
                    self.consts[node.output[0]] = quantize_f32(x, s, z, lo, hi)
                    self._set(idx, P.KIND_CONSTANT, "")
                else:
                    self.ranges[node.output[0]] = qi.range
            elif op == "DequantizeLinear":
                try:
                    qi = self._qinfo(node)
                except Refused:
                    continue
                src = node.input[0]
                if src in self.consts:
                    codes = np.asarray(self.consts[src]).astype(np.int64)
                    if qi.axis is not None:
                        qi.axis = qi.axis % codes.ndim
                    self.weights[node.output[0]] = (codes, qi)
                    s, z = _bcast(qi.scale, qi.axis, codes.ndim), _bcast(qi.zero_point, qi.axis, codes.ndim)
                    self.consts[node.output[0]] = ((codes - z).astype(np.float32) * s).astype(np.float32)
                    self._set(idx, P.KIND_CONSTANT, "")
                else:
                    self.dq[node.output[0]] = (src, qi)

    def _set(self, idx: int, kind: str, step: str, reason: str = "") -> None:
        self.status[idx] = P.NodeStatus(self.names[idx], self.nodes[idx].op_type, kind, step, reason)

    # ---------------------------------------------------------------- helpers for matching
    def _act(self, name: str, what: str) -> tuple[str, QInfo]:
        if name not in self.dq:
            raise Refused(f"{what} {name!r} is not the output of a DequantizeLinear")
        src, qi = self.dq[name]
        if not qi.per_tensor:
            raise Refused(f"{what} {name!r} is quantized per channel")
        return src, qi

    def _range_of(self, src: str, qi: QInfo) -> tuple[int, int]:
        lo, hi = qi.range
        if src in self.ranges:
            rlo, rhi = self.ranges[src]
            lo, hi = max(lo, rlo), min(hi, rhi)
        return lo, hi

    def _single_consumer(self, tensor: str) -> int:
        users = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs:
            raise Refused(f"intermediate {tensor!r} is a graph output")
        if len(users) != 1:
            raise Refused(f"{tensor!r} has {len(users)} consumers, expected one")
        return users[0]

    def _chain(self, tensor: str, allow_bias: bool):
        """Follow [Add(const)] [Relu|Clip]* → Q from `tensor`: (q index, float lo, float hi, bias, nodes)."""
        lo, hi, bias, covered = -np.inf, np.inf, None, []
        while True:
            idx = self._single_consumer(tensor)
            node = self.nodes[idx]
            if node.op_type == "QuantizeLinear":
                return idx, lo, hi, bias, covered
            if node.op_type == "Relu":
                lo = max(lo, 0.0)
            elif node.op_type == "Clip":
                cmin = _attr(node, "min") if len(node.input) < 2 else None
                cmax = _attr(node, "max") if len(node.input) < 2 else None
                for pos, name in ((1, "min"), (2, "max")):
                    if len(node.input) > pos and node.input[pos]:
                        if node.input[pos] not in self.consts:
                            raise Refused(f"Clip {name} is not a constant")
                        val = float(np.asarray(self.consts[node.input[pos]]).reshape(-1)[0])
                        cmin, cmax = (val, cmax) if pos == 1 else (cmin, val)
                if cmin is not None:
                    lo = max(lo, float(cmin))
                if cmax is not None:
                    hi = min(hi, float(cmax))
            elif node.op_type == "Add" and allow_bias and bias is None and not covered:
                other = [i for i in node.input if i != tensor]
                if len(other) != 1 or other[0] not in self.consts:
                    raise Refused(f"output feeds Add {self.names[idx]!r} whose other operand is not constant")
                bias = np.asarray(self.consts[other[0]], dtype=np.float64)
            else:
                raise Refused(f"output feeds {node.op_type} {self.names[idx]!r}, not QuantizeLinear")
            if lo > hi:
                raise Refused("activation clip range is empty")
            covered.append(idx)
            tensor = node.output[0]

    def _out(self, q_idx: int, lo_f: float, hi_f: float) -> tuple[QInfo, int, int]:
        qnode = self.nodes[q_idx]
        qi = self._qinfo(qnode)
        if not qi.per_tensor:
            raise Refused("output QuantizeLinear is per channel")
        s, z = qi.scale, qi.zero_point
        lo, hi = qi.range
        if lo_f > -np.inf:
            lo = max(lo, int(quantize_f32(np.float32(lo_f), s, z, *qi.range)))
        if hi_f < np.inf:
            hi = min(hi, int(quantize_f32(np.float32(hi_f), s, z, *qi.range)))
        return qi, lo, hi

    def _finish(self, step: P.Step, anchor: int, covered: list[int], q_idx: int, lo: int, hi: int,
                dtype: str) -> P.Step:
        out = self.nodes[q_idx].output[0]
        step.outputs = [out]
        step.nodes = [self.names[i] for i in [anchor, *covered, q_idx]]
        for i in [anchor, *covered, q_idx]:
            self._set(i, P.KIND_INTEGER, step.name)
        self.int_dtypes[out] = dtype
        self.ranges[out] = (lo, hi)
        return step

    # ---------------------------------------------------------------- run
    def run(self) -> P.Plan:
        self._fold_constants()
        matched: dict[int, P.Step] = {}
        reasons: dict[int, str] = {}
        for idx, node in enumerate(self.nodes):
            if idx in self.status or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            matcher = {**{op: self._gemm for op in GEMM_OPS}, **{op: self._pool for op in POOL_OPS},
                       **{op: self._move for op in MOVE_OPS}, "Add": self._add}.get(node.op_type)
            if matcher is None:
                reasons[idx] = f"no integer kernel for {node.op_type}"
                continue
            try:
                matched[idx] = matcher(idx, node)
            except Refused as exc:
                reasons[idx] = str(exc)
        steps: list[P.Step] = []
        for idx, node in enumerate(self.nodes):
            if idx in matched:
                steps.append(matched[idx])
                continue
            if idx in self.status:
                continue
            name, op = self.names[idx], node.op_type
            if op == "DequantizeLinear" and node.output[0] in self.dq:
                users = self.consumers.get(node.output[0], [])
                needed = node.output[0] in self.graph_outputs or any(u not in self.status for u in users)
                if needed:
                    src, qi = self.dq[node.output[0]]
                    steps.append(P.DequantizeStep(name, op, [src], [node.output[0]], [name],
                                                  kind=P.KIND_DEQUANTIZE, scale=qi.scale,
                                                  zero_point=qi.zero_point, axis=qi.axis))
                    self._set(idx, P.KIND_DEQUANTIZE, name)
                else:
                    self._set(idx, P.KIND_INTEGER, ",".join(self.status[u].step for u in users))
                continue
            if op == "QuantizeLinear" and node.output[0] in self.ranges:
                qi = self._qinfo(node)
                lo, hi = qi.range
                steps.append(P.QuantizeStep(name, op, [node.input[0]], [node.output[0]], [name],
                                            kind=P.KIND_QUANTIZE, scale=qi.scale, zero_point=qi.zero_point,
                                            axis=qi.axis, lo=lo, hi=hi))
                self._set(idx, P.KIND_QUANTIZE, name)
                continue
            reason = reasons.get(idx) or (f"{op} parameters are not constant" if op.endswith("Linear")
                                          else f"no integer kernel for {op}")
            steps.append(P.FloatStep(name, op, [i for i in node.input], list(node.output), [name],
                                     kind=P.KIND_FLOAT, info=reason, node=node))
            self._set(idx, P.KIND_FLOAT, name, reason)
        status = [self.status[i] for i in range(len(self.nodes))]
        used = {i for s in steps for i in s.inputs} | set(self.graph_outputs)
        consts = {k: v for k, v in self.consts.items() if k in used}
        plan = P.Plan(steps, consts, self.inputs, self.graph_outputs, self.int_dtypes, status,
                      list(self.model.opset_import), self.model.ir_version)
        log.info("%s", plan.report_lines()[0])
        return plan

    # ---------------------------------------------------------------- matchers
    def _add(self, idx: int, node: onnx.NodeProto) -> P.AddStep:
        srcs, params, const = [], [], {}
        for pos, name in enumerate(node.input[:2]):
            if name in self.weights:
                codes, qi = self.weights[name]
                if not qi.per_tensor:
                    raise Refused("constant Add operand is quantized per channel")
                key = f"{self.names[idx]}::const{pos}"
                const[key] = codes
                srcs.append(key)
            else:
                src, qi = self._act(name, "operand")
                srcs.append(src)
            params.append(qi.scalar())
        q_idx, lo_f, hi_f, _, covered = self._chain(node.output[0], allow_bias=False)
        yq, lo, hi = self._out(q_idx, lo_f, hi_f)
        step = P.AddStep(self.names[idx], "Add", srcs, [], [], a=params[0], b=params[1], out=yq.scalar(),
                         lo=lo, hi=hi, const=const)
        return self._finish(step, idx, covered, q_idx, lo, hi, yq.dtype)

    def _pool(self, idx: int, node: onnx.NodeProto) -> P.PoolStep:
        if len(node.output) > 1 and node.output[1] and self.consumers.get(node.output[1]):
            raise Refused("MaxPool indices output is used")
        src, xq = self._act(node.input[0], "input")
        attrs = {}
        if not node.op_type.startswith("Global"):
            kernel = list(_attr(node, "kernel_shape"))
            nk = len(kernel)
            if nk not in (1, 2):
                raise Refused(f"{nk}-D pooling is not lowered")
            attrs = {"kernel": kernel, "strides": list(_attr(node, "strides", [1] * nk)),
                     "pads": list(_attr(node, "pads", [0] * 2 * nk)),
                     "dilations": list(_attr(node, "dilations", [1] * nk)),
                     "ceil_mode": int(_attr(node, "ceil_mode", 0)),
                     "count_include_pad": int(_attr(node, "count_include_pad", 0)),
                     "auto_pad": _attr(node, "auto_pad", b"NOTSET").decode()}
            if node.op_type == "AveragePool" and any(d != 1 for d in attrs["dilations"]):
                raise Refused("dilated AveragePool is not lowered")
        q_idx, lo_f, hi_f, _, covered = self._chain(node.output[0], allow_bias=False)
        yq, lo, hi = self._out(q_idx, lo_f, hi_f)
        step = P.PoolStep(self.names[idx], node.op_type, [src], [], [], src=xq.scalar(), out=yq.scalar(),
                          lo=lo, hi=hi, attrs=attrs)
        return self._finish(step, idx, covered, q_idx, lo, hi, yq.dtype)

    def _move(self, idx: int, node: onnx.NodeProto) -> P.MoveStep:
        op = node.op_type
        data_inputs = list(node.input) if op == "Concat" else [node.input[0]]
        srcs, params, attrs = [], [], {}
        for name in data_inputs:
            src, qi = self._act(name, "input")
            srcs.append(src)
            params.append(qi.scalar())
        if op == "Concat":
            attrs["axis"] = int(_attr(node, "axis"))
        elif op == "Flatten":
            attrs["axis"] = int(_attr(node, "axis", 1))
        elif op == "Transpose":
            perm = _attr(node, "perm")
            attrs["perm"] = list(perm) if perm is not None else None
        elif op == "Reshape":
            if node.input[1] not in self.consts:
                raise Refused("Reshape shape is not constant")
            attrs["shape"] = [int(v) for v in np.asarray(self.consts[node.input[1]]).reshape(-1)]
            attrs["allowzero"] = int(_attr(node, "allowzero", 0))
        else:  # Squeeze / Unsqueeze: axes attribute (opset < 13) or constant input
            axes = _attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                if node.input[1] not in self.consts:
                    raise Refused(f"{op} axes are not constant")
                axes = np.asarray(self.consts[node.input[1]]).reshape(-1).tolist()
            attrs["axes"] = None if axes is None else [int(a) for a in axes]
        q_idx = self._single_consumer(node.output[0])
        if self.nodes[q_idx].op_type != "QuantizeLinear":
            raise Refused(f"output feeds {self.nodes[q_idx].op_type}, not QuantizeLinear")
        yq, lo, hi = self._out(q_idx, -np.inf, np.inf)
        step = P.MoveStep(self.names[idx], op, srcs, [], [], srcs=params, out=yq.scalar(), lo=lo, hi=hi,
                          attrs=attrs)
        return self._finish(step, idx, [], q_idx, lo, hi, yq.dtype)


def _bcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or np.ndim(values) == 0:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(values, shape)

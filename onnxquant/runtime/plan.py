"""The integer plan: an ordered list of steps over named tensors, produced by `lower` and run by a backend.

Integer tensors hold codes ``q`` (int64 arrays in the backends) of a real value ``s (q − z)``. An integer
step reads codes and writes codes; its requantization parameters are stored for both modes:
float (a float32 scale per output channel, computed as ONNX Runtime does) and fixed (``quantize_multiplier``
of the same real multiplier in float64). Float steps run one ONNX node in ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

KIND_INTEGER, KIND_FLOAT, KIND_QUANTIZE, KIND_DEQUANTIZE, KIND_CONSTANT = (
    "integer",
    "float",
    "quantize",
    "dequantize",
    "constant",
)


@dataclass
class Requant:
    """Output side of an integer step: codes ``clip(requant(acc) + zp, lo, hi)``.

    ``scale`` (float32) is the float-mode multiplier, ``multiplier``/``shift`` the fixed-mode one; both per
    output channel (shape (N,)) or scalar.
    """

    scale: np.ndarray
    multiplier: np.ndarray
    shift: np.ndarray
    zero_point: int
    lo: int
    hi: int


@dataclass
class Step:
    """One unit of execution; `nodes` are the ONNX nodes it covers (for reporting)."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    nodes: list[str]
    kind: str = KIND_INTEGER
    info: str = ""


@dataclass
class GemmStep(Step):
    """Conv / ConvTranspose / Gemm / MatMul with a fused requantization epilogue.

    `w` is the constant operand in the op's own layout (Conv: (M, C/g, *k); ConvTranspose: (C, M/g, *k);
    Gemm/MatMul: (K, N)); `w_zp` one zero point per output channel; `bias` int64 per output channel.
    For MatMul of two activations `w` is None and the second operand is `inputs[1]` with `b_zp`.
    """

    x_zp: int = 0
    x_range: tuple[int, int] = (0, 255)
    w: np.ndarray | None = None
    w_zp: np.ndarray | None = None
    w_bits: int = 8
    b_zp: int = 0
    b_range: tuple[int, int] = (0, 255)
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    requant: Requant | None = None
    bound: int = 0


@dataclass
class AddStep(Step):
    """Quantized elementwise Add of two code tensors (either may be a constant in `const`)."""

    a: tuple[float, int] = (1.0, 0)
    b: tuple[float, int] = (1.0, 0)
    out: tuple[float, int] = (1.0, 0)
    lo: int = 0
    hi: int = 255
    const: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class PoolStep(Step):
    """MaxPool, AveragePool, GlobalAveragePool or GlobalMaxPool on codes."""

    src: tuple[float, int] = (1.0, 0)
    out: tuple[float, int] = (1.0, 0)
    lo: int = 0
    hi: int = 255
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MoveStep(Step):
    """Concat, Reshape, Flatten, Transpose, Squeeze, Unsqueeze on codes, requantizing where scales differ."""

    srcs: list[tuple[float, int]] = field(default_factory=list)
    out: tuple[float, int] = (1.0, 0)
    lo: int = 0
    hi: int = 255
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizeStep(Step):
    """A QuantizeLinear at a float → integer boundary."""

    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int | None = None
    lo: int = 0
    hi: int = 255


@dataclass
class DequantizeStep(Step):
    """A DequantizeLinear at an integer → float boundary."""

    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int | None = None


@dataclass
class FloatStep(Step):
    """One ONNX node run in float by ONNX Runtime (a fallback)."""

    node: onnx.NodeProto | None = None


@dataclass
class NodeStatus:
    """How one ONNX node of the model is executed."""

    node: str
    op: str
    kind: str
    step: str
    reason: str = ""

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "kind": self.kind, "step": self.step, "reason": self.reason}


@dataclass
class Plan:
    """Steps in execution order, the constant tensors they need, and a status for every model node."""

    steps: list[Step]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    int_dtypes: dict[str, str]
    status: list[NodeStatus]
    opsets: list[onnx.OperatorSetIdProto]
    ir_version: int

    def integer_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind == KIND_INTEGER]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self.status:
            out[st.kind] = out.get(st.kind, 0) + 1
        return out

    def report_lines(self) -> list[str]:
        """One line per model node that is not part of an integer step: fallbacks with their reason."""
        counts = self.counts()
        lines = [
            (
                f"plan: {len(self.integer_steps())} integer steps covering "
                f"{counts.get(KIND_INTEGER, 0)} nodes, "
                f"{counts.get(KIND_FLOAT, 0)} float fallback nodes, {counts.get(KIND_QUANTIZE, 0)} quantize, "
                f"{counts.get(KIND_DEQUANTIZE, 0)} dequantize, {counts.get(KIND_CONSTANT, 0)} constant"
            )
        ]
        for st in self.status:
            if st.kind == KIND_FLOAT:
                lines.append(f"  float  {st.op} {st.node!r}: {st.reason}")
        return lines

    def to_json(self) -> list[dict]:
        return [s.to_json() for s in self.status]

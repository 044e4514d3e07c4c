"""The canonical table's records: `TensorRange` (one tensor's range and quantization parameters) and
`CalibrationTable`, with their validation from JSON objects.

Besides per-tensor (numbers) and per-channel entries (lists along `axis`), a weight entry may be block-wise:
`block_size` B and `axis` (the weight's input axis), with `min`/`max`/`amax`/`scale`/`zero_point` nested lists
of the weight's rank whose `axis` dimension is ceil(n / B) (one value per block of B consecutive weights,
the shape of the DequantizeLinear scale) and one width `bits`. An entry's `format` is "int" (omitted in
JSON) or an FP8 format (`fp8_e4m3`, `fp8_e5m2`: zero point 0, scale amax / the format's largest value).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnxquant.errors import BadDataError
from onnxquant.quant import MAX_BITS, MIN_BITS, QParams, qparams_from_range

FORMAT_NAME = "onnxquant-calibration"
FORMAT_VERSION = 1
TENSOR_KINDS = ("activation", "weight")
OPTIONAL_KEYS = ("kind", "bias_shift", "spread_ratio", "block_size")  # besides axis, note, format
NUMBER_FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")  # rules/schema.py FORMATS


@dataclass(frozen=True)
class TensorRange:
    """Calibrated range and quantization parameters of one tensor."""

    min: float | list[float]
    max: float | list[float]
    amax: float | list[float]
    scale: float | list[float]
    zero_point: int | list[int]
    bits: int | list[int]
    signed: bool
    method: str
    axis: int | None = None
    note: str | None = None
    kind: str = "activation"  # or "weight": a quantized initializer (per output channel along `axis`)
    bias_shift: list[float] | None = None  # weights: per-channel shift of the layer's bias (bias correction)
    spread_ratio: list[float] | None = (
        None  # weights: ξ_c, DequantizeLinear scale = scale·ξ_c (bias correction)
    )
    format: str = "int"  # or an FP8 format (NUMBER_FORMATS)
    block_size: int | None = None  # weights: block-wise along `axis`, nested lists of the weight's rank

    @classmethod
    def from_range(
        cls,
        lo,
        hi,
        bits,
        symmetric: bool,
        method: str,
        axis: int | None = None,
        block_size: int | None = None,
    ) -> TensorRange:
        """Entry for the clipping range [lo, hi] at `bits` (scalars, arrays for per-channel, or arrays of the
        weight's rank with `block_size` for block-wise)."""
        p = qparams_from_range(lo, hi, bits, symmetric, axis)
        lo64, hi64 = np.minimum(np.asarray(lo, np.float64), 0), np.maximum(np.asarray(hi, np.float64), 0)

        def plain(a, kind=float):
            a = np.asarray(a)
            if a.ndim == 0:
                return kind(a)
            if block_size:  # nested lists of the weight's rank
                return np.vectorize(kind, otypes=[object])(a).tolist()
            return [kind(v) for v in a.ravel()]

        return cls(
            min=plain(lo64),
            max=plain(hi64),
            amax=plain(np.maximum(-lo64, hi64)),
            scale=plain(p.scale),
            zero_point=plain(p.zero_point, int),
            bits=plain(p.bits if axis is None or block_size else np.broadcast_to(p.bits, p.scale.shape), int),
            signed=symmetric,
            method=method,
            axis=axis,
            block_size=block_size,
        )

    def qparams(self) -> QParams:
        bits = self.bits if isinstance(self.bits, int) else np.asarray(self.bits, np.int64)
        return QParams(
            scale=np.asarray(self.scale, np.float32),
            zero_point=np.asarray(self.zero_point, np.int64),
            bits=bits,
            signed=self.signed,
            axis=self.axis,
            block_size=self.block_size,
        )

    def to_json(self) -> dict:
        entry = {
            "min": self.min,
            "max": self.max,
            "amax": self.amax,
            "scale": self.scale,
            "zero_point": self.zero_point,
            "bits": self.bits,
            "signed": self.signed,
            "method": self.method,
        }
        if self.axis is not None:
            entry["axis"] = self.axis
        if self.note:
            entry["note"] = self.note
        if self.kind != "activation":
            entry["kind"] = self.kind
        if self.bias_shift is not None:
            entry["bias_shift"] = self.bias_shift
        if self.spread_ratio is not None:
            entry["spread_ratio"] = self.spread_ratio
        if self.format != "int":
            entry["format"] = self.format
        if self.block_size is not None:
            entry["block_size"] = self.block_size
        return entry

    def checked(self, where: str) -> TensorRange:
        """This entry, refused (`check_values`) when no runtime could use its parameters."""
        values = {k: getattr(self, k) for k in ("min", "max", "amax", "scale", "zero_point", "bits")}
        if self.block_size is not None:
            values = _flat_blocks(values)
        check_values(values, self.signed, self.spread_ratio, where)
        return self

    def with_note(self, note: str) -> TensorRange:
        return replace(self, note=note)

    @property
    def amax_max(self) -> float:
        """The overall amax (the largest channel's or block's for per-channel or block-wise entries)."""
        return float(np.max(self.amax))

    @classmethod
    def from_json(cls, entry: Any, where: str = "entry") -> TensorRange:
        """Validate and build an entry from its JSON form (errors name `where`)."""
        if not isinstance(entry, dict):
            raise BadDataError(f"{where}: expected an object, got {type(entry).__name__}")
        required = ("min", "max", "amax", "scale", "zero_point", "bits", "signed", "method")
        missing = [k for k in required if k not in entry]
        unknown = sorted(set(entry) - set(required) - {"axis", "note", "format", *OPTIONAL_KEYS})
        if missing or unknown:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
            )
            what = "; ".join(parts)
            raise BadDataError(
                f"{where}: {what}; accepted keys: {', '.join(required)}, axis, note, format, "
                f"{', '.join(OPTIONAL_KEYS)}"
            )
        if "block_size" in entry:
            return _block_entry(entry, where)
        axis = entry.get("axis")
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool) or axis < 0):
            raise BadDataError(f"{where}.axis: {axis!r}; accepted: a non-negative integer")
        per_channel = isinstance(entry["scale"], list)
        length = len(entry["scale"]) if per_channel else None
        if per_channel and (axis is None or length == 0):
            raise BadDataError(f"{where}: per-channel entries need a non-empty scale list and an axis")
        values = {}
        for key in ("min", "max", "amax", "scale", "zero_point", "bits"):
            kind = float if key in ("min", "max", "amax", "scale") else int
            values[key] = plain_values(entry[key], kind, length, f"{where}.{key}")
        if not isinstance(entry["signed"], bool):
            raise BadDataError(f"{where}.signed: expected true or false")
        if not isinstance(entry["method"], str):
            raise BadDataError(f"{where}.method: expected a string")
        note = entry.get("note")
        if note is not None and not isinstance(note, str):
            raise BadDataError(f"{where}.note: expected a string")
        kind = entry.get("kind", "activation")
        if kind not in TENSOR_KINDS:
            raise BadDataError(f"{where}.kind: {kind!r}; accepted: {', '.join(TENSOR_KINDS)}")
        channel_lists = {}
        for key in ("bias_shift", "spread_ratio"):
            if entry.get(key) is not None:
                if not per_channel:
                    raise BadDataError(f"{where}.{key}: only per-channel entries carry one")
                channel_lists[key] = plain_values(entry[key], float, length, f"{where}.{key}")
        check_values(values, entry["signed"], channel_lists.get("spread_ratio"), where)
        return cls(
            **values,
            signed=entry["signed"],
            method=entry["method"],
            axis=axis,
            note=note,
            kind=kind,
            **channel_lists,
            format=_number_format(entry, where),
        )


@dataclass(frozen=True)
class CalibrationTable:
    method: str
    bits: int
    tensors: dict[str, TensorRange] = field(default_factory=dict)

    def activations(self) -> dict[str, TensorRange]:
        """The entries of activation tensors (a table written by onnxquant also holds every weight's)."""
        return {name: e for name, e in self.tensors.items() if e.kind == "activation"}

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "bits": self.bits,
            "tensors": {name: self.tensors[name].to_json() for name in sorted(self.tensors)},
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "table") -> CalibrationTable:
        """Validate and build a table from its canonical JSON form."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise BadDataError(f'{where}: not an onnxquant calibration table (no "format": "{FORMAT_NAME}")')
        if obj.get("version") != FORMAT_VERSION:
            raise BadDataError(
                f"{where}: version {obj.get('version')!r} not supported; accepted: {FORMAT_VERSION}"
            )
        unknown = sorted(set(obj) - {"format", "version", "method", "bits", "tensors"})
        if unknown:
            raise BadDataError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if (
            not isinstance(obj.get("method"), str)
            or not isinstance(obj.get("bits"), int)
            or isinstance(obj.get("bits"), bool)
            or not isinstance(obj.get("tensors"), dict)
        ):
            raise BadDataError(f'{where}: needs "method" (string), "bits" (integer), "tensors" (object)')
        if obj["bits"] != 0 and not MIN_BITS <= obj["bits"] <= MAX_BITS:  # 0: a model without activations
            raise BadDataError(
                f"{where}: bits {obj['bits']} out of range; accepted: {MIN_BITS}..{MAX_BITS}, or 0 when no "
                "activation is calibrated"
            )
        tensors = {
            name: TensorRange.from_json(entry, f"{where}: tensor {name!r}")
            for name, entry in obj["tensors"].items()
        }
        return cls(method=obj["method"], bits=obj["bits"], tensors=tensors)

    def check_shapes(self, model: onnx.ModelProto) -> None:
        """Refuse per-channel entries whose axis is not a dim of the tensor's shape in `model` (tensors
        without a known shape are skipped), or whose channel count differs from that dim."""
        shapes = _model_shapes(model)
        for name, entry in sorted(self.tensors.items()):
            shape = shapes.get(name)
            if entry.axis is None or shape is None:
                continue
            if entry.block_size is not None:
                _check_block_shape(name, entry, shape)
                continue
            if entry.axis >= len(shape):
                raise BadDataError(
                    f"calibration table: tensor {name!r}: axis {entry.axis} but the tensor has rank "
                    f"{len(shape)}; accepted: an axis in 0..{len(shape) - 1}"
                )
            dim, count = shape[entry.axis], len(entry.scale)
            if isinstance(dim, int) and dim > 0 and dim != count:
                raise BadDataError(
                    f"calibration table: tensor {name!r}: {count} per-channel values but axis {entry.axis} "
                    f"has {dim} channels; accepted: one value per channel"
                )

    def check_tensors(self, known: Collection[str], required: Collection[str] = ()) -> None:
        """Refuse a table naming tensors the model lacks, or lacking `required` ones (both are listed)."""
        unknown = sorted(set(self.tensors) - set(known))
        missing = sorted(set(required) - set(self.tensors))
        problems = []
        if unknown:
            problems.append(f"names {len(unknown)} tensor(s) the model does not have: {_listing(unknown)}")
        if missing:
            problems.append(f"lacks {len(missing)} tensor(s) the model needs: {_listing(missing)}")
        if problems:
            raise BadDataError("calibration table " + "; and ".join(problems))


FLOAT32_TINY = float(np.finfo(np.float32).tiny)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_values(values: dict, signed: bool, spread_ratio: list[float] | None, where: str) -> None:
    """Refuse quantization parameters no runtime can use, per channel: a width outside MIN_BITS..MAX_BITS, a
    scale that is not a positive normal float32 (zero, negative, denormal or overflowing: the model would
    divide by zero or by Inf), a zero point outside the code range (signed tensors: exactly 0), min > max
    or a negative amax. `values` holds scalars (per tensor) or lists of one length (per channel)."""
    bits, scale, zero = (np.atleast_1d(values[k]) for k in ("bits", "scale", "zero_point"))
    ratio = np.ones(scale.shape) if spread_ratio is None else np.asarray(spread_ratio, np.float64)
    for c, (b, sc, z, r) in enumerate(zip(bits, scale, zero, ratio)):
        at = f"[{c}]" if scale.size > 1 else ""
        if not MIN_BITS <= b <= MAX_BITS:
            raise BadDataError(f"{where}.bits{at}: {b} out of range; accepted: {MIN_BITS}..{MAX_BITS}")
        if not (_normal_float32(sc) and _normal_float32(sc * r)):
            what = "is not positive" if min(sc, sc * r) <= 0 else "is denormal or overflows float32"
            raise BadDataError(
                f"{where}.scale{at}: {sc}" + (f" times spread_ratio {r}" if r != 1 else "") + f" {what}; "
                f"accepted: a float32 in {FLOAT32_TINY:.6g}..{FLOAT32_MAX:.6g}"
            )
        hi = 0 if signed else (1 << int(b)) - 1
        if not 0 <= z <= hi:
            accepted = (
                "0 for a signed (symmetric) tensor" if signed else f"0..{hi} for unsigned {b}-bit codes"
            )
            raise BadDataError(f"{where}.zero_point{at}: {z}; accepted: {accepted}")
    lo, hi, amax = (np.atleast_1d(values[k]) for k in ("min", "max", "amax"))
    if (lo > hi).any() or (amax < 0).any():
        raise BadDataError(f"{where}: min > max or a negative amax; accepted: min <= max, amax >= 0")


def _normal_float32(x: float) -> bool:
    return FLOAT32_TINY <= x <= FLOAT32_MAX


def _model_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shapes of the initializers and of the tensors whose rank shape inference recorded (None: unknown)."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def plain_values(value: Any, kind: type, length: int | None, where: str):
    """A JSON scalar/list as float/int (list when `length` is set), validated."""

    def one(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadDataError(f"{where}: expected a number, got {json.dumps(v)[:40]}")
        if kind is int:
            if isinstance(v, float) and not v.is_integer():
                raise BadDataError(f"{where}: expected an integer, got {v}")
            return int(v)
        if not math.isfinite(v):
            raise BadDataError(f"{where}: not finite")
        return float(v) + 0.0

    if length is None:
        if isinstance(value, list):
            raise BadDataError(f"{where}: a list in a per-tensor entry (scale is a number)")
        return one(value)
    if not isinstance(value, list) or len(value) != length:
        raise BadDataError(f"{where}: expected a list of {length} numbers (one per channel)")
    return [one(v) for v in value]


def _number_format(entry: dict, where: str) -> str:
    fmt = entry.get("format", "int")
    if fmt not in NUMBER_FORMATS:
        raise BadDataError(f"{where}.format: {fmt!r}; accepted: {', '.join(NUMBER_FORMATS)}")
    if fmt != "int" and (entry["bits"] != 8 and entry["bits"] != [8] * len(np.atleast_1d(entry["bits"]))):
        raise BadDataError(f"{where}.bits: {entry['bits']!r} with format {fmt}; accepted: 8")
    return fmt


def blocked_shape(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    """The scale shape of a block-wise weight: `shape` with `axis` divided by `block_size`, rounded up."""
    out = list(shape)
    out[axis] = -(-out[axis] // block_size)
    return tuple(out)


def _check_block_shape(name: str, entry: TensorRange, shape: tuple[int | None, ...]) -> None:
    got = np.shape(entry.scale)
    if entry.axis >= len(shape) or any(d is None for d in shape):
        return
    want = blocked_shape(tuple(shape), entry.axis, entry.block_size)
    if got != want:
        raise BadDataError(
            f"calibration table: tensor {name!r}: block-wise scale of shape {got} but a weight of shape "
            f"{tuple(shape)} in blocks of {entry.block_size} along axis {entry.axis} needs {want}; accepted: "
            "one value per block"
        )


def _flat_blocks(values: dict) -> dict:
    """Block-wise values as flat lists (one width repeated), for `check_values`."""
    flat = {k: np.asarray(values[k]).ravel().tolist() for k in ("min", "max", "amax", "scale", "zero_point")}
    return {**flat, "bits": [values["bits"]] * len(flat["scale"])}


def _nested(value: Any, where: str) -> np.ndarray:
    """A JSON nested list of numbers as a float64 array of at least one dimension (refused when ragged)."""
    if not isinstance(value, list):
        raise BadDataError(f"{where}: expected a nested list (one number per block)")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadDataError(f"{where}: expected a nested list of numbers (one per block)") from exc
    if arr.size == 0 or not np.isfinite(arr).all():
        raise BadDataError(f"{where}: expected a non-empty nested list of finite numbers")
    return arr


def _block_entry(entry: dict, where: str) -> TensorRange:
    """A block-wise weight entry from JSON (see the module docstring)."""
    size, axis, bits = entry["block_size"], entry.get("axis"), entry["bits"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise BadDataError(f"{where}.block_size: {size!r}; accepted: an integer >= 2")
    if entry.get("kind") != "weight" or entry.get("bias_shift") is not None or entry.get("spread_ratio"):
        raise BadDataError(f"{where}: block_size on an entry that is not a plain weight; accepted: weights")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise BadDataError(f"{where}.bits: {bits!r}; accepted: one integer width for a block-wise entry")
    arrays = {k: _nested(entry[k], f"{where}.{k}") for k in ("min", "max", "amax", "scale", "zero_point")}
    shape = arrays["scale"].shape
    if any(a.shape != shape for a in arrays.values()):
        raise BadDataError(
            f"{where}: min, max, amax, scale and zero_point differ in shape; accepted: one shape"
        )
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < len(shape):
        raise BadDataError(f"{where}.axis: {axis!r}; accepted: an axis of the {len(shape)}-D block lists")
    if not (arrays["zero_point"] == np.rint(arrays["zero_point"])).all():
        raise BadDataError(f"{where}.zero_point: expected integers")
    values = {k: a.tolist() for k, a in arrays.items() if k != "zero_point"}
    values["zero_point"] = arrays["zero_point"].astype(np.int64).tolist()
    values["bits"] = bits
    if not isinstance(entry["signed"], bool) or not isinstance(entry["method"], str):
        raise BadDataError(f"{where}: signed (true or false) and method (a string) are required")
    check_values(_flat_blocks(values), entry["signed"], None, where)
    return TensorRange(
        **values,
        signed=entry["signed"],
        method=entry["method"],
        axis=axis,
        note=entry.get("note") if isinstance(entry.get("note"), str) else None,
        kind="weight",
        format=_number_format(entry, where),
        block_size=size,
    )

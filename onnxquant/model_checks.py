"""Checks of a model at load: what a damaged or hostile file would otherwise turn into a traceback, a hang,
NaN outputs or a RuntimeWarning later. Each failure is one `BadModelError` line naming the file and tensor.

- Inputs are regular files (`regular_file_size`, by os.stat before any open(): a FIFO would block forever).
- Text: every string field is UTF-8 (`check_text`); protobuf parses a flipped byte in a name as bytes, which
  the checker does not look at and every later step would fail on.
- Structure: onnx.checker's full check, strict shape inference included (`check_structure`); every stored
  tensor holds the bytes its dims need (`check_tensor_sizes`); external data spans lie inside their file and
  match the dims (`external_target`, `external_span`).
- Weights (`check_weights`): no zero-size weight of a compute op, no NaN in any float initializer, no Inf in
  a weight, bias or BatchNormalization parameter, and var + epsilon > 0 for every BatchNormalization.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper, shape_inference

from onnxquant.errors import BadModelError, BadPathError, first_line

log = logging.getLogger(__name__)


def regular_file_size(path: Path, role: str, accepted: str, error: type[Exception] = BadPathError) -> int:
    """The size of `path`, refusing anything but an existing regular file. Checked with os.stat before any
    open(), so a FIFO or a device given as input is refused instead of blocking the read forever."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file; accepted: {accepted}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise error(f"{path}: cannot read the {role} ({first_line(exc)}); accepted: {accepted}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, expected {accepted}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is not a regular file (a FIFO, socket or device); accepted: {accepted}")
    return st.st_size


def check_text(message: Message, path: Path, where: str = "model") -> None:
    """Every string field of `message`, at any depth, decodes as UTF-8. upb parses an invalid one (a flipped
    bit in a node or tensor name) without complaint and hands it out as bytes, which onnx.checker does not
    inspect and which fails later, far from the file, in whatever first treats it as text."""
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_MESSAGE, field.TYPE_STRING):
            continue  # numbers and bytes (raw_data): nothing to decode
        single = isinstance(value, (str, bytes, Message))
        for i, item in enumerate([value] if single else value):
            named = f"{where}.{field.name}" + ("" if single else f"[{i}]")
            if field.type == field.TYPE_MESSAGE:
                check_text(item, path, named)
            elif isinstance(item, bytes):
                raise BadModelError(
                    f"{path}: {named} is not UTF-8 text ({item[:40]!r}); accepted: a model whose names and "
                    "strings are UTF-8"
                )


def check_structure(model: onnx.ModelProto, path: Path, big: bool = False) -> None:
    """onnx.checker's full check (strict shape inference included): a protobuf whose bits were flipped can
    still parse, and would otherwise fail later in a reshape, an ORT session or an InferenceError. The
    checker serializes the model, which a `big` one (over 2 GiB, `model.is_big`) cannot be: skipped then."""
    check_ir_version(model, path)
    if big:
        log.info("%s: over 2 GiB: onnx.checker skipped at load", path)
        return
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, UnicodeDecodeError of a corrupted name
        kind = "shape inference" if isinstance(exc, shape_inference.InferenceError) else "structure"
        raise BadModelError(
            f"{path}: invalid ONNX model ({kind}: {first_line(exc)}); accepted: a model that passes "
            "onnx.checker's full check"
        ) from exc


def check_ir_version(model: onnx.ModelProto, path: Path) -> None:
    """IR versions below 4 require every initializer to be a graph input; with an opset of IR 4 or later (old
    opsets are lifted before this check) that is a corrupted header, and the checker accepts it until a
    Constant weight becomes an initializer, so the converted model would fail the checker instead."""
    if model.ir_version >= 4:
        return
    needed = onnx.helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True)
    if needed >= 4:
        raise BadModelError(
            f"{path}: IR version {model.ir_version} is older than its opsets allow (IR version {needed} or "
            f"newer); accepted: a model whose IR version matches its opset imports"
        )


def check_tensor_sizes(
    model: onnx.ModelProto, path: Path, all_tensors: Callable[[onnx.ModelProto], Iterable[onnx.TensorProto]]
) -> None:
    """Every stored tensor holds as many values as its dims say (a flipped dim would fail a reshape later)."""
    for tensor in all_tensors(model):
        dims = tuple(tensor.dims)
        if any(d < 0 for d in dims):
            raise BadModelError(f"{path}: tensor {tensor.name!r} has negative dims {dims}")
        if tensor.data_type == onnx.TensorProto.STRING or not tensor.HasField("raw_data"):
            try:
                numpy_helper.to_array(tensor)
            except Exception as exc:  # numpy/onnx raise ValueError, TypeError or KeyError here
                raise BadModelError(
                    f"{path}: tensor {tensor.name!r} does not hold dims {dims} ({first_line(exc)}); "
                    "accepted: data matching the dims"
                ) from exc
            continue
        count = math.prod(dims)
        bits = element_bits(tensor.data_type)
        expected = (count * bits + 7) // 8 if bits else None
        if expected is not None and len(tensor.raw_data) != expected:
            raise BadModelError(
                f"{path}: tensor {tensor.name!r} has {len(tensor.raw_data)} bytes of data but dims {dims} "
                f"need {expected}; accepted: data matching the dims"
            )


def element_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type (sub-byte types packed), None for an unknown type."""
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 4
    try:
        return 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TENSOR_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)


def check_weights(model: onnx.ModelProto, path: Path) -> None:
    """Refuse constants that cannot be quantized or folded: a zero-size weight of a compute op, NaN in any
    float initializer, Inf in a weight, bias or BatchNormalization parameter (elsewhere, e.g. a mask or a
    Clip bound, Inf is legitimate), or var + epsilon <= 0 (its sqrt is NaN). Named here, at load, so the
    problem is not blamed on the calibration data later."""
    inits = {t.name: t for t in model.graph.initializer}
    strict: dict[str, onnx.NodeProto] = {}  # initializer -> a compute/BN node that uses it as a parameter
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in COMPUTE_OPS:
            for name in node.input:
                if name in inits:
                    strict.setdefault(name, node)
                    _check_not_empty(inits[name], node, path)
        elif node.op_type == "BatchNormalization":
            strict.update((name, node) for name in node.input[1:5] if name in inits)
            if len(node.input) > 4 and node.input[4] in inits:
                _check_variance(inits[node.input[4]], node, path)
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TENSOR_TYPES:
            _check_finite(tensor, strict.get(tensor.name), path)


def _check_not_empty(tensor: onnx.TensorProto, node: onnx.NodeProto, path: Path) -> None:
    if math.prod(tensor.dims) == 0:
        raise BadModelError(
            f"{path}: tensor {tensor.name!r} ({node.op_type} {node.name!r}): zero-size weight of shape "
            f"{tuple(tensor.dims)}; accepted: weights with at least one element"
        )


def _check_finite(tensor: onnx.TensorProto, user: onnx.NodeProto | None, path: Path) -> None:
    value = numpy_helper.to_array(tensor)
    nan = bool(np.isnan(value).any())
    if not nan and (user is None or np.isfinite(value).all()):
        return
    where = f"{path}: tensor {tensor.name!r}" + (f" ({user.op_type} {user.name!r})" if user else "")
    index = tuple(int(i) for i in np.argwhere(np.isnan(value) if nan else ~np.isfinite(value))[0])
    raise BadModelError(
        f"{where}: holds {'NaN' if nan else 'Inf'} at index {index}; accepted: finite weights and biases"
    )


def _check_variance(tensor: onnx.TensorProto, node: onnx.NodeProto, path: Path) -> None:
    if tensor.data_type not in FLOAT_TENSOR_TYPES:
        return
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    var = numpy_helper.to_array(tensor).astype(np.float64) + eps
    if var.size and not (var > 0).all():
        i = int(np.argmin(var > 0))
        raise BadModelError(
            f"{path}: tensor {tensor.name!r} (BatchNormalization {node.name!r}): variance + epsilon is "
            f"{var[i]:.6g} at channel {i}; accepted: var + epsilon > 0"
        )


def external_target(name: str, location: str, base: Path) -> Path:
    where = f"tensor {name!r}: external data location {location!r}"
    if not location or "\0" in location:
        raise BadModelError(f"{where} is empty or holds a NUL byte; accepted: a relative file name")
    target = (base / location).resolve()
    if Path(location).is_absolute() or base not in target.parents:
        raise BadModelError(
            f"{where} points outside the model's directory {base}; accepted: a relative path inside it"
        )
    return target


def external_span(tensor: onnx.TensorProto, info: dict[str, str], target: Path, size: int) -> tuple[int, int]:
    """(offset, length) of a tensor's bytes in `target` (`size` bytes long), checked before reading."""
    where = f"tensor {tensor.name!r}: external data in {target}"
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError:
        raise BadModelError(
            f"{where}: offset {info.get('offset')!r} / length {info.get('length')!r} are not integers; "
            "accepted: non-negative integers"
        ) from None
    if offset < 0 or length < 0 or offset + length > size:
        raise BadModelError(
            f"{where}: offset {offset} + length {length} is outside the file's {size} bytes; accepted: "
            "a span inside the file"
        )
    bits = element_bits(tensor.data_type)
    if tensor.data_type != onnx.TensorProto.STRING and bits is not None:
        expected = (math.prod(tensor.dims) * bits + 7) // 8
        if length != expected:
            raise BadModelError(
                f"{where}: {length} bytes but dims {tuple(tensor.dims)} need {expected}; accepted: "
                "a length matching the dims"
            )
    return offset, length

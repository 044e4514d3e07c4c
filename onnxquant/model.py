"""Loading, saving and inspecting ONNX models.

`load_model` accepts what real exporters write: opsets 11 to the newest, weights as initializers or as
`Constant` nodes (turned into initializers), external data files (which must stay inside the model's
directory), dynamic batch dimensions. `save_model` writes atomically. `make_session` builds an ONNX Runtime
session, asking for the CUDA provider only when it can actually load.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference, version_converter

from onnxquant.errors import BadModelError, BadPathError, first_line
from onnxquant.ir import name_nodes
from onnxquant.model_checks import (
    check_structure,
    check_tensor_sizes,
    check_text,
    check_weights,
    element_bits,
    external_span,
    external_target,
    regular_file_size,
)
from onnxquant.ort import ort
from onnxquant.outputs import atomic_write, check_writable, identity, staged_folder

log = logging.getLogger(__name__)

MIN_OPSET = 11
LIFT_OPSET = 13  # older models are converted to this opset on load
INT4_OPSET = 21
TWO_GIB = 2**31  # protobuf's limit; tests lower it so small models take the external-data paths
SHAPE_LIKE = 64  # elements; larger float initializers are only declared (as inputs) to shape inference


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise BadModelError(f"{model.graph.name or 'model'}: imports no default-domain opset")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load, validate and normalise a model: Constant weights become initializers, shapes are inferred."""
    path = Path(path)
    regular_file_size(path, "model", "an .onnx model file", BadModelError)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError or a bare message
        raise BadModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    if not model.graph.node and not model.graph.output:
        raise BadModelError(f"{path}: not an ONNX model (empty graph)")
    check_text(model, path)
    _load_external_data(model, path.parent)
    big = is_big(model)
    opset = opset_of(model)
    if opset < MIN_OPSET:
        model = _lift_old_opset(model, path)
    if opset > onnx.defs.onnx_opset_version():
        raise BadModelError(
            f"{path}: opset {opset} is newer than this onnx package knows "
            f"({onnx.defs.onnx_opset_version()}); upgrade onnx"
        )
    check_structure(model, path, big)
    check_tensor_sizes(model, path, _all_tensors)
    constants_to_initializers(model)
    drop_initializer_inputs(model)
    name_nodes(model.graph)
    check_weights(model, path)
    return infer_shapes(model)


def _lift_old_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """An opset below MIN_OPSET (and an IR version below 4, whose initializers must be graph inputs) lifted to
    opset 13 by onnx.version_converter; one line naming the file when the converter cannot."""
    old = opset_of(model)
    try:
        lifted = version_converter.convert_version(model, LIFT_OPSET)
        lifted.ir_version = max(lifted.ir_version, onnx.helper.find_min_ir_version_for(lifted.opset_import))
        onnx.checker.check_model(lifted)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        raise BadModelError(
            f"{path}: opset {old} could not be converted to {LIFT_OPSET} ({first_line(exc)}); accepted: "
            f"opset {MIN_OPSET} or newer"
        ) from exc
    log.warning("%s: opset %d lifted to %d by onnx.version_converter", path, old, LIFT_OPSET)
    return lifted


def drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Initializers also listed as graph inputs (old exporters) become plain constants (IR >= 4 allows it)."""
    if model.ir_version < 4:
        return
    inits = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    if len(real) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(real)


def _load_external_data(model: onnx.ModelProto, base: Path) -> None:
    """Read external tensors, refusing locations outside the model's directory, files that are not regular
    files, and offsets/lengths that do not fit the file or the tensor's dims."""
    base = base.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        target = external_target(tensor.name, info.get("location", ""), base)
        size = regular_file_size(target, "external data", "a regular file beside the model", BadModelError)
        offset, length = external_span(tensor, info, target, size)
        with open(target, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _all_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    def graph_tensors(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from graph_tensors(g)

    yield from graph_tensors(model.graph)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move top-level `Constant` nodes holding a tensor into initializers; returns how many moved."""
    graph = model.graph
    keep, moved = [], 0
    for node in graph.node:
        value = _constant_value(node)
        if value is None:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
        log.info("moved %d Constant nodes into initializers", moved)
    return moved


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_int"):
        dtype = np.float32 if attr.name == "value_float" else np.int64
        return np.array(onnx.helper.get_attribute_value(attr), dtype=dtype)
    if attr.name in ("value_floats", "value_ints"):
        dtype = np.float32 if attr.name == "value_floats" else np.int64
        return np.array(list(onnx.helper.get_attribute_value(attr)), dtype=dtype)
    return None


def model_bytes(model: onnx.ModelProto) -> int:
    """About the serialized size of `model`, computed without serializing it: upb's `ByteSize()` serializes
    the whole message (a transient copy of every weight) and raises past 2 GiB. Tensors with raw data count
    the bytes their dims need (`check_tensor_sizes` checks they hold that many); the rest is measured."""
    total = sum(tensor_bytes(t) for t in _all_tensors(model))
    return total + sum(node.ByteSize() for node in model.graph.node if not _holds_tensors(node))


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes `tensor` holds in memory, without copying its raw data out of the message (0 for external
    data that is not loaded)."""
    bits = element_bits(tensor.data_type)
    if tensor.HasField("raw_data") and bits is not None:
        return (math.prod(tensor.dims) * bits + 7) // 8
    return 0 if tensor.data_location == onnx.TensorProto.EXTERNAL else tensor.ByteSize()


def _holds_tensors(node: onnx.NodeProto) -> bool:
    return any(a.type in _TENSOR_ATTRIBUTES for a in node.attribute)


_TENSOR_ATTRIBUTES = (
    onnx.AttributeProto.TENSOR,
    onnx.AttributeProto.GRAPH,
    onnx.AttributeProto.GRAPHS,
    onnx.AttributeProto.TENSORS,
)


def is_big(model: onnx.ModelProto) -> bool:
    """Whether `model` is too large for one protobuf (`TWO_GIB`): it is then checked, shape-inferred, run
    and saved through paths that never serialize it whole."""
    return model_bytes(model) >= TWO_GIB


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that degrades to the unchanged model when the inferencer gives up. A big model
    (`is_big`) is inferred on a copy whose large weights are only declared (`declared_weights`), and the
    inferred value_info is written into `model` itself: no second copy of its weights."""
    try:
        if not is_big(model):
            return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        inferred = shape_inference.infer_shapes(declared_weights(model), strict_mode=False, data_prop=True)
        declared = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
        del model.graph.value_info[:]
        model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in declared)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        log.warning("shape inference failed: %s", first_line(exc))
    return model


def declared_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for shape inference: float initializers of more than `SHAPE_LIKE` elements are
    declared as graph inputs instead of carried (their values never matter to shapes), integer ones and small
    ones (shapes, axes) are kept."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, dst = model.graph, light.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if math.prod(t.dims) <= SHAPE_LIKE or t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            dst.initializer.append(t)
        elif t.name not in declared:
            dst.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def upgrade_opset(model: onnx.ModelProto, target: int = INT4_OPSET) -> onnx.ModelProto:
    """Convert to `target` opset (e.g. 21 for INT4 Q/DQ); an error if the converter cannot do it cleanly."""
    if opset_of(model) >= target:
        return model
    try:
        converted = version_converter.convert_version(model, target)
        del converted.graph.value_info[:]  # shapes recorded for the old opset may contradict the new ops
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise BadModelError(
            f"model: cannot upgrade opset {opset_of(model)} to {target} for INT4 storage "
            f"({first_line(exc)}); accepted: --bits 5..8, or a model that converts"
        ) from exc
    _clear_contradicted_output_shapes(converted)
    return infer_shapes(converted)


def _clear_contradicted_output_shapes(model: onnx.ModelProto) -> None:
    """Exporters sometimes declare output shapes that newer opsets' shape inference contradicts (rank 2 for a
    Reshape whose target shape propagates to rank 3); keep the outputs' types, drop their shapes."""
    probe = declared_weights(model) if is_big(model) else model
    try:
        shape_inference.infer_shapes(probe, check_type=True, strict_mode=True, data_prop=True)
    except shape_inference.InferenceError as exc:
        log.warning("declared output shapes contradict shape inference (%s): dropped", first_line(exc))
        for output in model.graph.output:
            output.type.tensor_type.ClearField("shape")


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` atomically (see `onnxquant.outputs`); a model over 2 GiB gets one external data file
    beside it, staged with the model so neither appears without the other."""
    if not is_big(model):
        with atomic_write(path) as tmp:
            tmp.write_bytes(model.SerializeToString(deterministic=True))
        return
    with staged_folder(path) as (folder, target):
        onnx.save_model(
            model, str(folder / target.name), save_as_external_data=True, location=target.name + ".data"
        )


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output that would overwrite one of `inputs` (path, symlink or hard link) or cannot be
    written. Commands use `onnxquant.outputs.guard_outputs`, which knows every input and output."""
    out = Path(out)
    check_writable(out)
    for inp in inputs:
        if inp is not None and identity(out) is not None and identity(out) == identity(Path(inp)):
            raise BadPathError(f"{out}: output path equals the input {inp}; accepted: a different file")
    return out


@lru_cache(maxsize=1)
def available_providers() -> tuple[str, ...]:
    """Execution providers that can actually run here: CUDA only when its libraries load and a GPU exists."""
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_loads():
        providers.insert(0, "CUDAExecutionProvider")
    return tuple(providers)


def _cuda_loads() -> bool:
    for lib in ("libcuda.so.1", "libcudart.so.12", "libcublas.so.12", "libcudnn.so.9"):
        try:
            ctypes.CDLL(lib)
        except OSError:
            return False
    return True


# x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake, SSE4.1) multiply uint8 by int8 with VPMADDUBSW,
# which saturates pairs of products at int16: ONNX Runtime's fused QLinearConv/MatMul then differ from the QDQ
# model by up to tens of steps. This option makes ONNX Runtime use exact u8u8 kernels there (no effect
# elsewhere).
X64_QUANT_PRECISION = "session.x64quantprecision"


def make_session(
    model: onnx.ModelProto | bytes | Path,
    optimize: bool = True,
    use_gpu: bool = False,
    spin: bool = False,
    arena: bool = True,
):
    """An ONNX Runtime session; `optimize=False` disables all graph optimizations. `spin=False` stops idle
    worker threads from spinning, which leaves the CPU to Python work that runs alongside inference. Integer
    kernels are exact on every x86 CPU (`X64_QUANT_PRECISION`), so results do not depend on the machine.
    `arena=False` returns a run's memory when it ends instead of keeping it for the next run."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry(X64_QUANT_PRECISION, "1")
    opts.enable_cpu_mem_arena = arena
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    providers = list(available_providers()) if use_gpu else ["CPUExecutionProvider"]
    if isinstance(model, Path):  # a model with external data beside it, which ONNX Runtime maps itself
        data = str(model)
    else:
        data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, opts, providers=providers)
    except Exception as exc:
        raise BadModelError(f"ONNX Runtime cannot load the model ({first_line(exc)})") from exc


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs the named intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return exposed


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def file_size(path: str | os.PathLike) -> int:
    """Size of a model on disk, its external data files included."""
    path = Path(path)
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)

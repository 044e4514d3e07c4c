"""The argument types the public API accepts, turned into the objects the stages take, with the CLI's checks.

A model is a path (str or os.PathLike) or an `onnx.ModelProto`; rules are a preset name, a rule-file path or
a `Rules`; data is a path (as `--calib-data` takes it), one batch (a mapping `{input_name: array}`, or a bare
array for a single-input model), an iterable of such batches, a function returning such an iterable, or a
`DataSource`. In-memory data goes through the same checks and conversions as files and `--calib-reader`
batches (input names, ranks and static dims, dtype kinds, float64 cast to float32, NaN/Inf refused), and
every problem is the same one-line `onnxquant.errors` exception.

A ModelProto that `load_model` did not produce (shapes not inferred, unnamed nodes, `Constant` weights) is
passed through `load_model` itself, via a temporary directory that is removed, so it gets exactly the checks
and normalization a model file gets; messages then call it `model`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxquant.calib.readers import DataSource, InputSpec, _ReaderSource, input_specs, open_data
from onnxquant.errors import BadDataError, BadModelError, BadOptionError, OnnxQuantError
from onnxquant.model import MIN_OPSET, load_model, opset_of, save_model
from onnxquant.rules import PRESETS, Rules

ModelLike = str | os.PathLike | onnx.ModelProto
RulesLike = str | os.PathLike | Rules | None
Batch = Mapping[str, np.ndarray] | np.ndarray
DataLike = str | os.PathLike | Batch | Iterable[Batch] | Callable[[], Iterable[Batch]] | DataSource | None

MODEL_ACCEPTED = "a path (str or os.PathLike) to an .onnx file, or an onnx.ModelProto"
DATA_ACCEPTED = (
    "a path (.npz, .npy, a directory), a mapping {input_name: array}, an array (single-input models), "
    "an iterable of those, or a function returning one"
)


def as_model(model: ModelLike, what: str = "model") -> onnx.ModelProto:
    """`model` loaded and normalized as the CLI loads a model file; `what` names it in messages."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if not isinstance(model, onnx.ModelProto):
        raise BadModelError(f"{what}: is a {type(model).__name__}; accepted: {MODEL_ACCEPTED}")
    if _is_loaded(model):
        return model
    with tempfile.TemporaryDirectory(prefix="onnxquant-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path)
        try:
            return load_model(path)
        except OnnxQuantError as exc:
            raise type(exc)(str(exc).replace(str(path), what)) from exc


def _is_loaded(model: onnx.ModelProto) -> bool:
    """Whether `model` looks like `load_model`'s output: nodes uniquely named, no Constant nodes or
    initializers among the inputs, shapes inferred. Such a model is used as it is (no second load)."""
    graph = model.graph
    names = [n.name for n in graph.node]
    outputs = {o.name for o in graph.output}
    intermediate = any(o not in outputs for n in graph.node for o in n.output)
    inits = {t.name for t in graph.initializer}
    return (
        opset_of(model) >= MIN_OPSET
        and all(names)
        and len(set(names)) == len(names)
        and not any(n.op_type == "Constant" for n in graph.node)
        and not any(i.name in inits for i in graph.input)
        and (bool(graph.value_info) or not intermediate)
    )


def as_rules(rules: RulesLike, load: Callable[[str | os.PathLike | None], Rules]) -> Rules:
    """`rules` as a `Rules`: None is the default preset; a string is a preset name or a rule-file path."""
    if rules is None or isinstance(rules, (str, os.PathLike)):
        return load(rules)
    if isinstance(rules, Rules):
        return rules
    raise BadOptionError(
        f"rules: is a {type(rules).__name__}; accepted: a preset name ({', '.join(PRESETS)}), a rule-file "
        "path or an onnxquant.rules.Rules"
    )


def as_data(
    data: DataLike, model: onnx.ModelProto, *, batch_size: int = 32, max_samples: int | None = None
) -> DataSource | None:
    """Batches of `data` for `model`'s inputs (None stays None); see the module docstring."""
    if data is None or isinstance(data, DataSource):
        return data
    specs = input_specs(model)
    if isinstance(data, (str, os.PathLike)):
        return open_data(data, specs, batch_size=batch_size, max_samples=max_samples)
    if isinstance(data, (bytes, bytearray)):
        raise BadDataError(f"data: is {type(data).__name__}; accepted: {DATA_ACCEPTED}")
    if isinstance(data, (Mapping, np.ndarray)):
        batches: Callable[[], Iterable[object]] = _once_more([data])
    elif callable(data):
        batches = data
    elif isinstance(data, Iterable):
        batches = _once_more(data)
    else:
        raise BadDataError(f"data: is a {type(data).__name__}; accepted: {DATA_ACCEPTED}")
    return _InMemory(batches, specs, **_batching(specs, batch_size, max_samples))


def _batching(specs: list[InputSpec], batch_size: int, max_samples: int | None) -> dict:
    """Batch size, sample limit and tail handling for in-memory data, checked as `open_data` checks them:
    a model with a fixed batch dimension B gets batches of exactly B."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadDataError(f"data: batch size {batch_size!r}; accepted: an integer >= 1")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise BadDataError(f"data: max samples {max_samples!r}; accepted: an integer >= 1")
    if not specs:
        raise BadDataError("data: the model has no inputs to feed")
    static = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    if len(static) > 1:
        raise BadDataError(
            f"data: inputs have different fixed batch sizes {sorted(static)}; accepted: one batch dimension"
        )
    fixed = next(iter(static), None)
    return {"batch_size": fixed or batch_size, "max_samples": max_samples, "drop_last": fixed is not None}


def _once_more(items: Iterable[object]) -> Callable[[], Iterable[object]]:
    """A function returning `items` for each pass; a one-shot iterator (a generator) serves one pass only,
    and a second pass is one line saying how to give data that can be read again."""
    one_shot = iter(items) is items
    used = False

    def fresh() -> Iterable[object]:
        nonlocal used
        if one_shot and used:
            raise BadDataError(
                "data: a one-shot iterator (e.g. a generator) was already read, and this step reads the data "
                "again; accepted: a list of batches, or a function returning a fresh iterable"
            )
        used = True
        return items

    return fresh


class _InMemory(_ReaderSource):
    """In-memory batches, checked and batched exactly as `--calib-reader` batches are; a bare array is the
    batch of a single-input model."""

    def __init__(self, batches: Callable[[], Iterable[object]], specs: list[InputSpec], **kw) -> None:
        DataSource.__init__(self, "data", specs, **kw)
        self._batches = batches
        self._fn = self._named
        self._path = None

    def _pieces(self) -> Iterator:
        """The reader's pieces; a one-line error of ours raised inside the user's iterable stays as it is
        instead of being reported as the reader's failure."""
        try:
            yield from super()._pieces()
        except BadDataError as exc:
            if isinstance(exc.__cause__, OnnxQuantError):
                raise exc.__cause__ from None
            raise

    def _named(self) -> Iterator[object]:
        result = self._batches()
        if not isinstance(result, Iterable) or isinstance(result, (Mapping, np.ndarray, str, bytes)):
            raise BadDataError(
                f"data: the function returned {type(result).__name__}; accepted: {DATA_ACCEPTED}"
            )
        for item in result:
            yield self._as_batch(item)

    def _as_batch(self, item: object) -> object:
        if not isinstance(item, np.ndarray):
            return item
        if len(self.specs) != 1:
            names = ", ".join(s.name for s in self.specs)
            raise BadDataError(
                f"data: a bare array feeds a single-input model, but the model has {len(self.specs)} inputs "
                f"({names}); accepted: a mapping {{input_name: array}}"
            )
        return {self.specs[0].name: item}

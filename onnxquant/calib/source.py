"""Data sources: a model's input specs and re-iterable `{input_name: array}` batches of a fixed size.

A `DataSource` reads raw pieces (`_pieces`), cuts them to `max_samples`, converts each array to its input's
dtype and regroups them into batches of `batch_size` samples along axis 0 (the last one possibly smaller, or
dropped when the model's batch dimension is fixed). Conversion: any float to any float, integers to integers
when the values fit; integer/float mixes are refused, as are NaN and Inf. Every problem is a one-line
`BadDataError`. The concrete sources are in `readers` (arrays, reader functions) and `images`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxquant.errors import BadDataError, BadModelError
from onnxquant.model import graph_inputs

log = logging.getLogger(__name__)

Dim = int | str | None
Piece = tuple[str, int, dict[str, np.ndarray]]  # (origin, index of its first sample in origin, arrays)


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (str/None = dynamic dim; shape None = unknown rank)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers excluded), in graph order."""
    specs = []
    for vi in graph_inputs(model):
        if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.elem_type:
            raise BadModelError(f"input '{vi.name}': not a typed tensor; accepted: tensor inputs")
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = None
        if tt.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            )
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


class DataSource:
    """Re-iterable batches `{input_name: array}`; each `iter()` starts again from the first sample."""

    def __init__(
        self, label: str, specs: list[InputSpec], batch_size: int, max_samples: int | None, drop_last: bool
    ) -> None:
        self.label = label
        self.specs = specs
        self.batch_size = batch_size
        self.max_samples = max_samples
        self._drop_last = drop_last
        self._num: int | None = None
        self._cast_logged: set[str] = set()

    def _pieces(self) -> Iterator[Piece]:
        """Raw data in pieces of at most `batch_size` samples, not yet converted."""
        raise NotImplementedError

    def _set_total(self, total: int) -> None:
        """Record the sample count found on disk and apply max_samples / static batch to it."""
        n = total if self.max_samples is None else min(total, self.max_samples)
        if self._drop_last:
            n -= n % self.batch_size
        if n == 0:
            need = f", the model's fixed batch needs {self.batch_size}" if self._drop_last else ""
            raise BadDataError(
                f"{self.label}: no usable samples ({total} found{need}); accepted: at least "
                f"{self.batch_size if self._drop_last else 1} sample(s)"
            )
        self._num = n

    @property
    def num_samples(self) -> int:
        """Samples one iteration yields (after max_samples); a reader function is run once to count."""
        if self._num is None:
            self._num = sum(len(next(iter(b.values()))) for b in self)
        return self._num

    @property
    def known_samples(self) -> int | None:
        """`num_samples` when known without reading (files: at once; a reader function: after one pass)."""
        return self._num

    def extra(self, key: str) -> np.ndarray | None:
        """A stored per-sample array that is not a model input (e.g. "labels"), or None."""
        return None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pieces = (self._conform(*p) for p in _limit(self._pieces(), self.max_samples))
        emitted = 0
        for batch in _rebatch(pieces, self.batch_size, self._drop_last):
            emitted += len(next(iter(batch.values())))
            yield batch
        if emitted == 0:
            need = self.batch_size if self._drop_last else 1
            raise BadDataError(f"{self.label}: no samples; accepted: at least {need} sample(s)")
        self._num = emitted

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, batch_size={self.batch_size})"

    def _conform(self, origin: str, offset: int, piece: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Convert each array to its input's dtype and refuse out-of-range or non-finite values."""
        out = {}
        for spec in self.specs:
            arr, target = piece[spec.name], spec.dtype
            if arr.dtype.kind in "iu" and not np.can_cast(arr.dtype, target) and arr.size:
                info = np.iinfo(target)
                bad = ((arr < info.min) | (arr > info.max)).reshape(len(arr), -1).any(axis=1)
                if bad.any():
                    raise BadDataError(
                        f"{origin}: input '{spec.name}' sample {offset + int(bad.argmax())} "
                        f"has values outside {target} [{info.min}, {info.max}]; "
                        "accepted: values that fit the model's input type"
                    )
            if arr.dtype != target and spec.name not in self._cast_logged:
                self._cast_logged.add(spec.name)
                log.info("%s: casting %s data to %s for input '%s'", origin, arr.dtype, target, spec.name)
            with np.errstate(over="ignore"):  # float64 -> float32 overflow is reported as Inf below
                conv = np.array(arr, dtype=target)
            if target.kind in "fc" and conv.size and not np.isfinite(conv).all():
                bad = ~np.isfinite(conv).reshape(len(conv), -1).all(axis=1)
                i = int(bad.argmax())
                what = "NaN" if np.isnan(conv[i]).any() else "Inf"
                raise BadDataError(
                    f"{origin}: input '{spec.name}' sample {offset + i} contains {what} "
                    f"(as {target}); accepted: finite values"
                )
            out[spec.name] = conv
        return out


def _limit(pieces: Iterable[Piece], limit: int | None) -> Iterator[Piece]:
    taken = 0
    for origin, offset, arrays in pieces:
        if limit is not None and taken >= limit:
            return
        n = rows(arrays)
        if limit is not None and taken + n > limit:
            n = limit - taken
            arrays = {k: v[:n] for k, v in arrays.items()}
        taken += n
        yield origin, offset, arrays


def _rebatch(
    pieces: Iterable[dict[str, np.ndarray]], batch_size: int, drop_last: bool
) -> Iterator[dict[str, np.ndarray]]:
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for arrays in pieces:
        n, start = rows(arrays), 0
        while start < n:
            take = min(batch_size - have, n - start)
            pending.append({k: v[start : start + take] for k, v in arrays.items()})
            have, start = have + take, start + take
            if have == batch_size:
                yield _concat(pending)
                pending, have = [], 0
    if have and not drop_last:
        yield _concat(pending)
    elif have:
        log.warning(
            "dropping the last %d samples: the model's batch dimension is fixed at %d", have, batch_size
        )


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def rows(arrays: Mapping[str, np.ndarray]) -> int:
    """Samples (axis-0 length) of a piece."""
    return len(next(iter(arrays.values())))


def check_array(where: str, what: str, shape: tuple[int, ...], dtype: np.dtype, spec: InputSpec) -> None:
    """Refuse an array (given by header) whose rank, static dims or dtype kind cannot feed `spec`.

    `what` names the array in messages, e.g. "key 'x'".
    """
    if dtype.hasobject:
        raise BadDataError(
            f"{where}: {what} is an object array; object arrays are not accepted (save numeric arrays)"
        )
    if not shape:
        raise BadDataError(f"{where}: {what} is a scalar; accepted: arrays with samples on axis 0")
    if spec.shape is not None:
        if len(shape) != len(spec.shape):
            raise BadDataError(
                f"{where}: {what} has rank {len(shape)} {tuple(shape)} but input "
                f"'{spec.name}' has rank {len(spec.shape)} {shape_text(spec.shape)} (axis 0 = samples)"
            )
        for axis, (got, want) in enumerate(zip(shape, spec.shape)):
            if axis and isinstance(want, int) and got != want:
                raise BadDataError(
                    f"{where}: {what} has shape {tuple(shape)} but input '{spec.name}' "
                    f"needs {shape_text(spec.shape)}: dim {axis} must be {want}"
                )
    want = spec.dtype
    ok = (
        dtype.kind == want.kind
        or (dtype.kind in "iu" and want.kind in "iu")
        or (dtype.kind == "f" and want.kind == "c")
    )
    if not ok:
        accepted = {"f": "float data", "i": "integer data", "u": "integer data", "b": "bool data"}
        raise BadDataError(
            f"{where}: {what} is {dtype} but input '{spec.name}' is {want}; accepted: "
            f"{accepted.get(want.kind, str(want) + ' data')}"
        )


def key_problem(missing: list[str], unknown: list[str]) -> str:
    """The missing/unknown keys of a batch or file, as a message part."""
    parts = [f"missing input(s) {', '.join(missing)}"] if missing else []
    return "; ".join(parts + ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []))


def shape_text(shape: tuple[Dim, ...]) -> str:
    """A shape for messages, `?` for dynamic dims."""
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def input_names(specs: Sequence[InputSpec]) -> str:
    """The inputs' names, comma-separated, for messages."""
    return ", ".join(s.name for s in specs)

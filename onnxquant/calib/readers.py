"""Calibration and evaluation data readers.

`open_data` turns a path (or a `package.module:function` reader) into a `DataSource`: a re-iterable stream of
`{input_name: array}` batches of `batch_size` samples along axis 0, the last one possibly smaller. Accepted:
an `.npz` (keys = model input names), an `.npy` (single-input models), a directory of those (sorted by name,
concatenated), a directory of jpg/png images, or a reader function. Arrays are read with
`allow_pickle=False`; `.npy` files are memory-mapped and `.npz` members streamed from the zip a batch at a
time, so memory stays bounded by the batch size. Every problem is a one-line `BadDataError`.

Data is converted to the model's input dtype: any float to any float, integers to integers when the values
fit; integer/float mixes are refused. Image pixels become `((x * scale) - mean) / std` per channel.
When the model has a static batch dimension B, batches are exactly B samples and a trailing remainder is
dropped (with a warning).
"""
from __future__ import annotations

import importlib
import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import onnx

from onnxquant.errors import BadDataError, BadModelError
from onnxquant.model import graph_inputs

log = logging.getLogger(__name__)

ARRAY_EXTS = (".npz", ".npy")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
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
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                          for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


@dataclass(frozen=True)
class ImageOptions:
    """How images become tensors: resize to `size` (H, W), `(x * scale - mean) / std` per channel, layout."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = 1 / 255
    grayscale: bool | None = None  # None: from the model's channel dim (1 = grayscale)


class DataSource:
    """Re-iterable batches `{input_name: array}`; each `iter()` starts again from the first sample."""

    def __init__(self, label: str, specs: list[InputSpec], batch_size: int, max_samples: int | None,
                 drop_last: bool) -> None:
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
            raise BadDataError(f"{self.label}: no usable samples ({total} found{need}); accepted: at least "
                               f"{self.batch_size if self._drop_last else 1} sample(s)")
        self._num = n

    @property
    def num_samples(self) -> int:
        """Samples one iteration yields (after max_samples); a reader function is run once to count."""
        if self._num is None:
            self._num = sum(len(next(iter(b.values()))) for b in self)
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
                    raise BadDataError(f"{origin}: input '{spec.name}' sample {offset + int(bad.argmax())} "
                                       f"has values outside {target} [{info.min}, {info.max}]; "
                                       "accepted: values that fit the model's input type")
            if arr.dtype != target and spec.name not in self._cast_logged:
                self._cast_logged.add(spec.name)
                log.info("%s: casting %s data to %s for input '%s'", origin, arr.dtype, target, spec.name)
            with np.errstate(over="ignore"):  # float64 -> float32 overflow is reported as Inf below
                conv = np.array(arr, dtype=target)
            if target.kind in "fc" and conv.size and not np.isfinite(conv).all():
                bad = ~np.isfinite(conv).reshape(len(conv), -1).all(axis=1)
                i = int(bad.argmax())
                what = "NaN" if np.isnan(conv[i]).any() else "Inf"
                raise BadDataError(f"{origin}: input '{spec.name}' sample {offset + i} contains {what} "
                                   f"(as {target}); accepted: finite values")
            out[spec.name] = conv
        return out


def _limit(pieces: Iterable[Piece], limit: int | None) -> Iterator[Piece]:
    taken = 0
    for origin, offset, arrays in pieces:
        if limit is not None and taken >= limit:
            return
        n = _rows(arrays)
        if limit is not None and taken + n > limit:
            n = limit - taken
            arrays = {k: v[:n] for k, v in arrays.items()}
        taken += n
        yield origin, offset, arrays


def _rebatch(pieces: Iterable[dict[str, np.ndarray]], batch_size: int, drop_last: bool
             ) -> Iterator[dict[str, np.ndarray]]:
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for arrays in pieces:
        n, start = _rows(arrays), 0
        while start < n:
            take = min(batch_size - have, n - start)
            pending.append({k: v[start:start + take] for k, v in arrays.items()})
            have, start = have + take, start + take
            if have == batch_size:
                yield _concat(pending)
                pending, have = [], 0
    if have and not drop_last:
        yield _concat(pending)
    elif have:
        log.warning("dropping the last %d samples: the model's batch dimension is fixed at %d", have, batch_size)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def _check_array(where: str, what: str, shape: tuple[int, ...], dtype: np.dtype, spec: InputSpec) -> None:
    """Refuse an array (given by header) whose rank, static dims or dtype kind cannot feed `spec`.

    `what` names the array in messages, e.g. "key 'x'".
    """
    if dtype.hasobject:
        raise BadDataError(f"{where}: {what} is an object array; object arrays are not accepted "
                           "(save numeric arrays)")
    if not shape:
        raise BadDataError(f"{where}: {what} is a scalar; accepted: arrays with samples on axis 0")
    if spec.shape is not None:
        if len(shape) != len(spec.shape):
            raise BadDataError(f"{where}: {what} has rank {len(shape)} {tuple(shape)} but input "
                               f"'{spec.name}' has rank {len(spec.shape)} {_fmt(spec.shape)} (axis 0 = samples)")
        for axis, (got, want) in enumerate(zip(shape, spec.shape)):
            if axis and isinstance(want, int) and got != want:
                raise BadDataError(f"{where}: {what} has shape {tuple(shape)} but input '{spec.name}' "
                                   f"needs {_fmt(spec.shape)}: dim {axis} must be {want}")
    want = spec.dtype
    ok = (dtype.kind == want.kind or (dtype.kind in "iu" and want.kind in "iu")
          or (dtype.kind == "f" and want.kind == "c"))
    if not ok:
        accepted = {"f": "float data", "i": "integer data", "u": "integer data", "b": "bool data"}
        raise BadDataError(f"{where}: {what} is {dtype} but input '{spec.name}' is {want}; accepted: "
                           f"{accepted.get(want.kind, str(want) + ' data')}")


def _key_problem(missing: list[str], unknown: list[str]) -> str:
    parts = [f"missing input(s) {', '.join(missing)}"] if missing else []
    return "; ".join(parts + ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []))


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _names(specs: Sequence[InputSpec]) -> str:
    return ", ".join(s.name for s in specs)


# ----------------------------------------------------------------------------------------- .npz / .npy files

@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    member: str = ""  # the zip member name, for .npz arrays


def _read_header(fp: BinaryIO, where: str, member: str = "") -> _Header:
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"format version {version}")
    except ValueError as exc:
        raise BadDataError(f"{where}: not a readable .npy array ({exc}); accepted: np.save/np.savez "
                           "output") from exc
    return _Header(tuple(shape), np.dtype(dtype), bool(fortran), member)


class _ArrayFiles(DataSource):
    """One .npz/.npy file or a directory of them, streamed file by file."""

    def __init__(self, label: str, files: list[Path], specs: list[InputSpec], extra_keys: Sequence[str],
                 **kw) -> None:
        super().__init__(label, specs, **kw)
        self._files: list[tuple[Path, dict[str, _Header], int]] = []
        self._extra_keys = tuple(extra_keys)
        for path in files:
            headers = self._headers(path, specs)
            counts = {s.name: headers[s.name].shape[0] for s in specs}
            if len(set(counts.values())) > 1:
                raise BadDataError(f"{path}: inputs have different sample counts (axis 0): "
                                   + ", ".join(f"{k}={n}" for k, n in counts.items())
                                   + "; accepted: the same number of samples for every key")
            self._files.append((path, headers, next(iter(counts.values()))))
        for key in self._extra_keys:
            having = [p.name for p, h, _ in self._files if key in h]
            if having and len(having) != len(self._files):
                missing = next(p for p, h, _ in self._files if key not in h)
                raise BadDataError(f"{missing}: has no key '{key}' but {having[0]} has; accepted: '{key}' in "
                                   "every file or in none")
        self._set_total(sum(n for _, _, n in self._files))

    def _headers(self, path: Path, specs: list[InputSpec]) -> dict[str, _Header]:
        """Headers of the input arrays (and extras) in one file, checked against the specs."""
        if path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise BadDataError(f"{path}: a .npy holds one array but the model has {len(specs)} inputs "
                                   f"({_names(specs)}); accepted: an .npz with those keys")
            with open(path, "rb") as fp:
                header = _read_header(fp, str(path))
            _check_array(str(path), "the array", header.shape, header.dtype, specs[0])
            return {specs[0].name: header}
        try:
            with zipfile.ZipFile(path) as zf:
                members = {n.removesuffix(".npy"): n for n in zf.namelist()}
                inputs = {s.name for s in specs}
                missing = [s.name for s in specs if s.name not in members]
                unknown = [k for k in members if k not in inputs and k not in self._extra_keys]
                if missing or unknown:
                    what = _key_problem(missing, unknown)
                    extra = f" (plus extra keys {', '.join(self._extra_keys)})" if self._extra_keys else ""
                    raise BadDataError(f"{path}: {what}; accepted keys: the model inputs "
                                       f"{_names(specs)}{extra}")
                headers = {}
                for key, member in members.items():
                    with zf.open(member) as fp:
                        headers[key] = _read_header(fp, f"{path}[{key}]", member)
        except zipfile.BadZipFile as exc:
            raise BadDataError(f"{path}: not a readable .npz ({exc}); accepted: np.savez output") from exc
        for spec in specs:
            _check_array(str(path), f"key '{spec.name}'", headers[spec.name].shape, headers[spec.name].dtype, spec)
        for key in self._extra_keys:
            if key in headers:
                h, n = headers[key], headers[specs[0].name].shape[0]
                if h.dtype.hasobject or not h.shape or h.shape[0] != n:
                    raise BadDataError(f"{path}: extra key '{key}' is {h.dtype} {h.shape}; accepted: a "
                                       f"numeric array with {n} samples on axis 0")
        return headers

    def _pieces(self) -> Iterator[Piece]:
        bs = self.batch_size
        for path, headers, n in self._files:
            if n == 0:
                continue
            if path.suffix.lower() == ".npy":
                name = self.specs[0].name
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                for start in range(0, n, bs):
                    yield str(path), start, {name: arr[start:start + bs]}
                del arr
                continue
            with zipfile.ZipFile(path) as zf:
                streams = {s.name: _member_rows(zf, s.name, headers[s.name], bs) for s in self.specs}
                for start in range(0, n, bs):
                    yield str(path), start, {k: next(s) for k, s in streams.items()}

    def extra(self, key: str) -> np.ndarray | None:
        if key not in self._extra_keys:
            return None
        parts = []
        for path, _, _ in self._files:
            if path.suffix.lower() == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    if key in z.files:
                        parts.append(z[key])
        return np.concatenate(parts)[:self.num_samples] if parts else None


def _member_rows(zf: zipfile.ZipFile, key: str, h: _Header, step: int) -> Iterator[np.ndarray]:
    """Rows of one .npz member, `step` at a time, read sequentially from the zip."""
    with zf.open(h.member) as fp:
        _read_header(fp, key)
        if h.fortran and len(h.shape) > 1:  # no row-wise layout on disk: read it whole
            fp.seek(0)
            whole = np.lib.format.read_array(fp, allow_pickle=False)
            for start in range(0, h.shape[0], step):
                yield whole[start:start + step]
            return
        row = h.dtype.itemsize * int(np.prod(h.shape[1:], dtype=np.int64))
        for start in range(0, h.shape[0], step):
            k = min(step, h.shape[0] - start)
            data = fp.read(k * row)
            if len(data) != k * row:
                raise BadDataError(f"{zf.filename}: key '{key}' is truncated; accepted: a complete np.savez file")
            yield np.frombuffer(data, dtype=h.dtype).reshape((k, *h.shape[1:]))


# ------------------------------------------------------------------------------------------------- images

class _ImageDir(DataSource):
    """A flat directory of jpg/png images for a single image input."""

    def __init__(self, label: str, files: list[Path], specs: list[InputSpec], options: ImageOptions,
                 **kw) -> None:
        super().__init__(label, specs, **kw)
        if len(specs) != 1:
            raise BadDataError(f"{label}: images can feed a single-input model, this one has {len(specs)} "
                               f"inputs ({_names(specs)}); accepted: an .npz with those keys")
        spec = specs[0]
        if spec.dtype.kind != "f":
            raise BadDataError(f"{label}: input '{spec.name}' is {spec.dtype}; images feed float inputs only "
                               "(give an .npy/.npz instead)")
        if spec.shape is not None and len(spec.shape) != 4:
            raise BadDataError(f"{label}: input '{spec.name}' has shape {_fmt(spec.shape)}; images feed "
                               "4-D inputs (NCHW or NHWC)")
        if options.layout not in ("NCHW", "NHWC"):
            raise BadDataError(f"{label}: layout {options.layout!r}; accepted: NCHW, NHWC")
        shape = spec.shape or (None,) * 4
        c, h, w = (shape[1], shape[2], shape[3]) if options.layout == "NCHW" else (shape[3], shape[1], shape[2])
        gray = options.grayscale if options.grayscale is not None else c == 1
        channels = 1 if gray else 3
        self._mean = _per_channel(label, "mean", options.mean, channels)
        self._std = _per_channel(label, "std", options.std, channels)
        if not np.all(self._std != 0):
            raise BadDataError(f"{label}: std {options.std} contains 0; accepted: non-zero values")
        self._files, self._options, self._gray = files, options, gray
        self._image = _pillow(label)
        size = options.size or ((h, w) if isinstance(h, int) and isinstance(w, int) else None)
        if size is None:  # no target size: all images must share the first one's size
            sizes = {}
            for f in files:
                with self._open(f) as im:
                    sizes[f] = im.size
            size = sizes[files[0]][::-1]
            odd = next((f for f in files if sizes[f][::-1] != size), None)
            if odd is not None:
                raise BadDataError(f"{odd}: is {sizes[odd][1]}x{sizes[odd][0]} but {files[0].name} is "
                                   f"{size[0]}x{size[1]} (HxW); accepted: one size, or an image size option")
        else:
            for f in files:
                self._open(f).close()
        self._size = (int(size[0]), int(size[1]))
        dims = (len(files), channels, *self._size) if options.layout == "NCHW" else (len(files), *self._size,
                                                                                     channels)
        _check_array(label, "the images", dims, np.dtype(np.float32), spec)
        self._set_total(len(files))

    def _open(self, path: Path):
        try:
            return self._image.open(path)
        except (OSError, ValueError) as exc:
            raise BadDataError(f"{path}: not a readable image ({exc}); accepted: jpg, png") from exc

    def _load(self, path: Path) -> np.ndarray:
        from PIL import ImageOps

        with self._open(path) as im:
            try:
                im = ImageOps.exif_transpose(im).convert("L" if self._gray else "RGB")
                h, w = self._size
                if im.size != (w, h):
                    im = im.resize((w, h), self._image.BILINEAR)
                x = np.asarray(im, dtype=np.float32)
            except (OSError, ValueError) as exc:
                raise BadDataError(f"{path}: not a readable image ({exc}); accepted: jpg, png") from exc
        x = x[..., None] if x.ndim == 2 else x
        return (x * np.float32(self._options.scale) - self._mean) / self._std

    def _pieces(self) -> Iterator[Piece]:
        bs = self.batch_size
        for start in range(0, len(self._files), bs):
            batch = np.stack([self._load(f) for f in self._files[start:start + bs]])
            if self._options.layout == "NCHW":
                batch = batch.transpose(0, 3, 1, 2)
            yield self.label, start, {self.specs[0].name: batch}


def _per_channel(label: str, what: str, values: Sequence[float], channels: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size == channels or arr.size == 1:
        return np.broadcast_to(arr, (channels,)).copy()
    if channels == 1 and np.all(arr == arr[0]):
        return arr[:1]
    accepted = "1 value" if channels == 1 else f"1 or {channels} values"
    raise BadDataError(f"{label}: {what} {tuple(values)} has {arr.size} values for {channels}-channel "
                       f"images; accepted: {accepted}")


def _pillow(label: str):
    try:
        from PIL import Image
    except ImportError as exc:
        raise BadDataError(f"{label}: reading images needs Pillow; install onnxquant[images]") from exc
    return Image


# ------------------------------------------------------------------------------------------ reader function

class _ReaderSource(DataSource):
    """Batches from a user function `package.module:function`, called afresh for each iteration."""

    def __init__(self, spec: str, path: Path | None, specs: list[InputSpec], **kw) -> None:
        super().__init__(f"reader {spec}", specs, **kw)
        self._fn = _import_reader(spec)
        self._path = path

    def _pieces(self) -> Iterator[Piece]:
        result = self._fn(str(self._path)) if self._path is not None else self._fn()
        if not isinstance(result, Iterable) or isinstance(result, Mapping):
            raise BadDataError(f"{self.label}: returned {type(result).__name__}; accepted: an iterable of "
                               "{input_name: array} batches")
        seen = 0
        for i, item in enumerate(result):
            where = f"{self.label} batch {i}"
            if not isinstance(item, Mapping):
                raise BadDataError(f"{where}: is a {type(item).__name__}; accepted: a dict "
                                   f"{{input_name: array}} with keys {_names(self.specs)}")
            missing = [s.name for s in self.specs if s.name not in item]
            unknown = [str(k) for k in item if k not in {s.name for s in self.specs}]
            if missing or unknown:
                raise BadDataError(f"{where}: {_key_problem(missing, unknown)}; accepted keys: "
                                   f"{_names(self.specs)}")
            arrays = {s.name: np.asarray(item[s.name]) for s in self.specs}
            for s in self.specs:
                _check_array(where, f"key '{s.name}'", arrays[s.name].shape, arrays[s.name].dtype, s)
            counts = {k: len(v) for k, v in arrays.items()}
            if len(set(counts.values())) > 1:
                raise BadDataError(f"{where}: inputs have different sample counts: "
                                   + ", ".join(f"{k}={n}" for k, n in counts.items()))
            n = _rows(arrays)
            for start in range(0, n, self.batch_size):
                yield self.label, seen + start, {k: v[start:start + self.batch_size] for k, v in arrays.items()}
            seen += n


def _import_reader(spec: str) -> Callable[..., object]:
    module_name, sep, attr = spec.partition(":")
    parts = module_name.split(".")
    if not sep or not attr.isidentifier() or not all(p.isidentifier() for p in parts):
        raise BadDataError(f"reader {spec!r}: malformed; accepted: package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadDataError(f"reader {spec}: module {module_name} cannot be imported ({exc}); accepted: an "
                           "importable module on PYTHONPATH") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadDataError(f"reader {spec}: module {module_name} has no function {attr}; accepted: "
                           "package.module:function")
    return fn


# ------------------------------------------------------------------------------------------------ open_data

def open_data(path: str | Path | None, specs: list[InputSpec], *, batch_size: int = 32,
              max_samples: int | None = None, image_options: ImageOptions | None = None,
              reader: str | None = None, extra_keys: Sequence[str] = ()) -> DataSource:
    """Open calibration/evaluation data for a model with inputs `specs`; see the module docstring.

    With `reader`, the function is called as `function(str(path))` when a path is given, else `function()`.
    """
    label = str(path) if path is not None else f"reader {reader}"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadDataError(f"{label}: batch size {batch_size!r}; accepted: an integer >= 1")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples <= 0):
        raise BadDataError(f"{label}: max samples {max_samples!r}; accepted: an integer >= 1")
    if not specs:
        raise BadDataError(f"{label}: the model has no inputs to feed")
    static = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    if len(static) > 1:
        raise BadDataError(f"{label}: inputs have different fixed batch sizes {sorted(static)}; accepted: "
                           "one batch dimension")
    fixed = next(iter(static), None)
    if fixed is not None and batch_size != fixed:
        log.info("the model's batch dimension is fixed at %d: using batches of %d, not %d", fixed, fixed,
                 batch_size)
    kw = {"batch_size": fixed or batch_size, "max_samples": max_samples, "drop_last": fixed is not None}
    if reader is not None:
        return _ReaderSource(reader, Path(path) if path is not None else None, specs, **kw)
    if path is None:
        raise BadDataError("no calibration data given; accepted: an .npz/.npy file, a directory, or a reader")
    path = Path(path)
    if not path.exists():
        raise BadDataError(f"{path}: no such file or directory; accepted: .npz, .npy, a directory of those "
                           "or of jpg/png images")
    if path.is_file():
        if path.suffix.lower() not in ARRAY_EXTS:
            raise BadDataError(f"{path}: unsupported file type '{path.suffix}'; accepted: .npz, .npy, or a "
                               "directory of those or of jpg/png images")
        return _ArrayFiles(label, [path], specs, extra_keys, **kw)
    entries = sorted((p for p in path.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    if not entries:
        raise BadDataError(f"{path}: empty directory; accepted: .npz/.npy files or jpg/png images")
    odd = next((p for p in entries if not p.is_file() or p.suffix.lower() not in ARRAY_EXTS + IMAGE_EXTS), None)
    if odd is not None:
        raise BadDataError(f"{odd}: not an .npz/.npy/.jpg/.jpeg/.png file; accepted: a flat directory of "
                           "arrays or of images")
    arrays = [p for p in entries if p.suffix.lower() in ARRAY_EXTS]
    if arrays and len(arrays) != len(entries):
        raise BadDataError(f"{path}: mixes arrays ({arrays[0].name}) and images; accepted: one kind")
    if arrays:
        return _ArrayFiles(label, entries, specs, extra_keys, **kw)
    return _ImageDir(label, entries, specs, image_options or ImageOptions(), **kw)

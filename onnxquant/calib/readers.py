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

The batching, dtype conversion and `InputSpec` live in `onnxquant.calib.source`, images in
`onnxquant.calib.images`; this module reads arrays and reader functions and dispatches in `open_data`.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onnxquant.calib.images import IMAGE_EXTS, ImageDir, ImageOptions
from onnxquant.calib.source import (
    DataSource,
    InputSpec,
    Piece,
    check_array,
    input_names,
    input_specs,
    key_problem,
    rows,
)
from onnxquant.errors import BadDataError, first_line

__all__ = ["ARRAY_EXTS", "IMAGE_EXTS", "DataSource", "ImageOptions", "InputSpec", "input_specs", "open_data"]

log = logging.getLogger(__name__)

ARRAY_EXTS = (".npz", ".npy")


# ----------------------------------------------------------------------------------------- .npz / .npy files


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    member: str = ""  # the zip member name, for .npz arrays


# Errors reading a damaged zip member: a bad CRC, a corrupt deflate stream, a member ending early.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)
# np.savez stores members, np.savez_compressed deflates them; nothing else is read.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


def _read_header(fp: BinaryIO, where: str, member: str = "", available: int | None = None) -> _Header:
    """The .npy header at `fp`; with `available` (bytes from the start of the array), the data size the
    header claims is checked against it before anything is read, so a lying header never allocates."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"format version {version}")
        header = _Header(tuple(shape), np.dtype(dtype), bool(fortran), member)
        start = fp.tell()
    except _ZIP_ERRORS as exc:
        raise BadDataError(
            f"{where}: damaged ({first_line(exc)}); accepted: a complete np.save/np.savez file"
        ) from exc
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, TokenError, ...
        raise BadDataError(
            f"{where}: not a readable .npy array ({first_line(exc)}); accepted: np.save/np.savez output"
        ) from exc
    if available is not None:
        need = math.prod(header.shape) * header.dtype.itemsize
        if start + need > available:
            raise BadDataError(
                f"{where}: the header claims {header.dtype} {header.shape} ({need} bytes) but only "
                f"{max(available - start, 0)} bytes follow it (truncated?); accepted: a complete "
                "np.save/np.savez array"
            )
    return header


def _check_member(path: Path, info: zipfile.ZipInfo) -> None:
    """Refuse what zipfile would fail on mid-read: an encrypted member or an unsupported compression."""
    if info.flag_bits & 0x1:
        raise BadDataError(
            f"{path}: member {info.filename!r} is encrypted; accepted: an unencrypted np.savez file"
        )
    if info.compress_type not in _ZIP_METHODS:
        raise BadDataError(
            f"{path}: member {info.filename!r} uses zip compression method {info.compress_type}; accepted: "
            "stored or deflated members (np.savez, np.savez_compressed)"
        )


class _ArrayFiles(DataSource):
    """One .npz/.npy file or a directory of them, streamed file by file."""

    def __init__(
        self, label: str, files: list[Path], specs: list[InputSpec], extra_keys: Sequence[str], **kw
    ) -> None:
        super().__init__(label, specs, **kw)
        self._files: list[tuple[Path, dict[str, _Header], int]] = []
        self._extra_keys = tuple(extra_keys)
        for path in files:
            headers = self._headers(path, specs)
            counts = {s.name: headers[s.name].shape[0] for s in specs}
            if len(set(counts.values())) > 1:
                raise BadDataError(
                    f"{path}: inputs have different sample counts (axis 0): "
                    + ", ".join(f"{k}={n}" for k, n in counts.items())
                    + "; accepted: the same number of samples for every key"
                )
            self._files.append((path, headers, next(iter(counts.values()))))
        for key in self._extra_keys:
            having = [p.name for p, h, _ in self._files if key in h]
            if having and len(having) != len(self._files):
                missing = next(p for p, h, _ in self._files if key not in h)
                raise BadDataError(
                    f"{missing}: has no key '{key}' but {having[0]} has; accepted: '{key}' in "
                    "every file or in none"
                )
        self._set_total(sum(n for _, _, n in self._files))

    def _headers(self, path: Path, specs: list[InputSpec]) -> dict[str, _Header]:
        """Headers of the input arrays (and extras) in one file, checked against the specs."""
        if path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise BadDataError(
                    f"{path}: a .npy holds one array but the model has {len(specs)} inputs "
                    f"({input_names(specs)}); accepted: an .npz with those keys"
                )
            with open(path, "rb") as fp:
                header = _read_header(fp, str(path), available=os.fstat(fp.fileno()).st_size)
            check_array(str(path), "the array", header.shape, header.dtype, specs[0])
            return {specs[0].name: header}
        try:
            with zipfile.ZipFile(path) as zf:
                members = {n.removesuffix(".npy"): n for n in zf.namelist()}
                inputs = {s.name for s in specs}
                missing = [s.name for s in specs if s.name not in members]
                unknown = [k for k in members if k not in inputs and k not in self._extra_keys]
                if missing or unknown:
                    what = key_problem(missing, unknown)
                    extra = f" (plus extra keys {', '.join(self._extra_keys)})" if self._extra_keys else ""
                    raise BadDataError(
                        f"{path}: {what}; accepted keys: the model inputs {input_names(specs)}{extra}"
                    )
                headers = {}
                for key, member in members.items():
                    info = zf.getinfo(member)
                    _check_member(path, info)
                    with zf.open(info) as fp:
                        headers[key] = _read_header(fp, f"{path}[{key}]", member, info.file_size)
        except _ZIP_ERRORS as exc:
            raise BadDataError(
                f"{path}: not a readable .npz ({first_line(exc)}); accepted: np.savez output"
            ) from exc
        for spec in specs:
            check_array(
                str(path), f"key '{spec.name}'", headers[spec.name].shape, headers[spec.name].dtype, spec
            )
        for key in self._extra_keys:
            if key in headers:
                h, n = headers[key], headers[specs[0].name].shape[0]
                if h.dtype.hasobject or not h.shape or h.shape[0] != n:
                    raise BadDataError(
                        f"{path}: extra key '{key}' is {h.dtype} {h.shape}; accepted: a "
                        f"numeric array with {n} samples on axis 0"
                    )
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
                    yield str(path), start, {name: arr[start : start + bs]}
                del arr
                continue
            with zipfile.ZipFile(path) as zf:
                streams = {s.name: _memberrows(zf, s.name, headers[s.name], bs) for s in self.specs}
                for start in range(0, n, bs):
                    yield str(path), start, {k: next(s) for k, s in streams.items()}

    def _extra_part(self, path: Path, key: str) -> np.ndarray | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                return z[key] if key in z.files else None
        except (ValueError, *_ZIP_ERRORS) as exc:
            raise BadDataError(
                f"{path}: key '{key}' is not readable ({first_line(exc)}); accepted: a complete np.savez file"
            ) from exc

    def extra(self, key: str) -> np.ndarray | None:
        if key not in self._extra_keys:
            return None
        parts = [self._extra_part(path, key) for path, _, _ in self._files if path.suffix.lower() == ".npz"]
        parts = [p for p in parts if p is not None]
        return np.concatenate(parts)[: self.num_samples] if parts else None


def _memberrows(zf: zipfile.ZipFile, key: str, h: _Header, step: int) -> Iterator[np.ndarray]:
    """Rows of one .npz member, `step` at a time; a damaged member (bad CRC, corrupt deflate data) is one
    line naming the file and key."""
    try:
        yield from _read_member(zf, key, h, step)
    except _ZIP_ERRORS as exc:
        raise BadDataError(
            f"{zf.filename}: key '{key}' is damaged ({first_line(exc)}); accepted: a complete np.savez file"
        ) from exc


def _read_member(zf: zipfile.ZipFile, key: str, h: _Header, step: int) -> Iterator[np.ndarray]:
    with zf.open(h.member) as fp:
        _read_header(fp, key)
        if h.fortran and len(h.shape) > 1:  # no row-wise layout on disk: read it whole
            fp.seek(0)
            whole = np.lib.format.read_array(fp, allow_pickle=False)
            for start in range(0, h.shape[0], step):
                yield whole[start : start + step]
            return
        row = h.dtype.itemsize * int(np.prod(h.shape[1:], dtype=np.int64))
        for start in range(0, h.shape[0], step):
            k = min(step, h.shape[0] - start)
            data = fp.read(k * row)
            if len(data) != k * row:
                raise BadDataError(
                    f"{zf.filename}: key '{key}' is truncated; accepted: a complete np.savez file"
                )
            yield np.frombuffer(data, dtype=h.dtype).reshape((k, *h.shape[1:]))


# ------------------------------------------------------------------------------------------ reader function


class _ReaderSource(DataSource):
    """Batches from a user function `package.module:function`, called afresh for each iteration."""

    def __init__(self, spec: str, path: Path | None, specs: list[InputSpec], **kw) -> None:
        super().__init__(f"reader {spec}", specs, **kw)
        self._fn = _import_reader(spec)
        self._path = path

    def _pieces(self) -> Iterator[Piece]:
        args = (str(self._path),) if self._path is not None else ()
        result = _user_call(self.label, "call", self._fn, *args)
        if not isinstance(result, Iterable) or isinstance(result, Mapping):
            raise BadDataError(
                f"{self.label}: returned {type(result).__name__}; accepted: an iterable of "
                "{input_name: array} batches"
            )
        seen = 0
        for i, item in enumerate(_user_items(self.label, result)):
            where = f"{self.label} batch {i}"
            if not isinstance(item, Mapping):
                raise BadDataError(
                    f"{where}: is a {type(item).__name__}; accepted: a dict "
                    f"{{input_name: array}} with keys {input_names(self.specs)}"
                )
            missing = [s.name for s in self.specs if s.name not in item]
            unknown = [str(k) for k in item if k not in {s.name for s in self.specs}]
            if missing or unknown:
                raise BadDataError(
                    f"{where}: {key_problem(missing, unknown)}; accepted keys: {input_names(self.specs)}"
                )
            arrays = {
                s.name: _user_call(where, f"key '{s.name}'", np.asarray, item[s.name]) for s in self.specs
            }
            for s in self.specs:
                check_array(where, f"key '{s.name}'", arrays[s.name].shape, arrays[s.name].dtype, s)
            counts = {k: len(v) for k, v in arrays.items()}
            if len(set(counts.values())) > 1:
                raise BadDataError(
                    f"{where}: inputs have different sample counts: "
                    + ", ".join(f"{k}={n}" for k, n in counts.items())
                )
            n = rows(arrays)
            for start in range(0, n, self.batch_size):
                yield (
                    self.label,
                    seen + start,
                    {k: v[start : start + self.batch_size] for k, v in arrays.items()},
                )
            seen += n


def _user_call(label: str, what: str, fn: Callable[..., object], *args: object) -> object:
    """`fn(*args)` where `fn` is (or runs) user code: whatever it raises, SystemExit included, becomes one
    line naming the reader and the exception's first line (Ctrl-C still interrupts)."""
    try:
        return fn(*args)
    except (Exception, SystemExit) as exc:
        raise _reader_failed(label, what, exc) from exc


def _user_items(label: str, batches: Iterable) -> Iterator[object]:
    """The items of a user iterable, each `next()` guarded like `_user_call`."""
    it = _user_call(label, "iter()", iter, batches)
    for i in itertools.count():
        try:
            yield next(it)
        except StopIteration:
            return
        except (Exception, SystemExit) as exc:
            raise _reader_failed(label, f"batch {i}", exc) from exc


def _reader_failed(label: str, what: str, exc: BaseException) -> BadDataError:
    if isinstance(exc, SystemExit):
        return BadDataError(
            f"{label}: {what} called sys.exit({exc.code!r}); accepted: a reader that returns or yields "
            "batches"
        )
    return BadDataError(
        f"{label}: {what} raised {type(exc).__name__}: {first_line(exc)}; accepted: a reader that "
        "returns or yields {input_name: array} batches"
    )


def _import_reader(spec: str) -> Callable[..., object]:
    module_name, sep, attr = spec.partition(":")
    parts = module_name.split(".")
    if not sep or not attr.isidentifier() or not all(p.isidentifier() for p in parts):
        raise BadDataError(f"reader {spec!r}: malformed; accepted: package.module:function")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # ImportError, or anything the module's own code raises
        reason = f"sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else first_line(exc)
        raise BadDataError(
            f"reader {spec}: module {module_name} cannot be imported ({type(exc).__name__}: {reason}); "
            "accepted: an importable module on PYTHONPATH"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadDataError(
            f"reader {spec}: module {module_name} has no function {attr}; accepted: package.module:function"
        )
    return fn


# ------------------------------------------------------------------------------------------------ open_data

_ACCEPTED_PATHS = ".npz, .npy, a directory of those or of jpg/png images"


def _is_regular_file(path: Path) -> bool:
    """True for a regular file, False for a directory; anything else (missing, a FIFO that would block the
    read, a device) is refused, by os.stat before any open()."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadDataError(f"{path}: no such file or directory; accepted: {_ACCEPTED_PATHS}") from None
    except (OSError, ValueError) as exc:
        raise BadDataError(f"{path}: cannot read ({first_line(exc)}); accepted: {_ACCEPTED_PATHS}") from None
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        raise BadDataError(
            f"{path}: not a regular file (a FIFO, socket or device); accepted: {_ACCEPTED_PATHS}"
        )
    return True


def open_data(
    path: str | Path | None,
    specs: list[InputSpec],
    *,
    batch_size: int = 32,
    max_samples: int | None = None,
    image_options: ImageOptions | None = None,
    reader: str | None = None,
    extra_keys: Sequence[str] = (),
) -> DataSource:
    """Open calibration/evaluation data for a model with inputs `specs`; see the module docstring.

    With `reader`, the function is called as `function(str(path))` when a path is given, else `function()`.
    """
    label = str(path) if path is not None else f"reader {reader}"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadDataError(f"{label}: batch size {batch_size!r}; accepted: an integer >= 1")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0
    ):
        raise BadDataError(f"{label}: max samples {max_samples!r}; accepted: an integer >= 1")
    if not specs:
        raise BadDataError(f"{label}: the model has no inputs to feed")
    static = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    if len(static) > 1:
        raise BadDataError(
            f"{label}: inputs have different fixed batch sizes {sorted(static)}; accepted: "
            "one batch dimension"
        )
    fixed = next(iter(static), None)
    if fixed is not None and batch_size != fixed:
        log.info(
            "the model's batch dimension is fixed at %d: using batches of %d, not %d",
            fixed,
            fixed,
            batch_size,
        )
    kw = {"batch_size": fixed or batch_size, "max_samples": max_samples, "drop_last": fixed is not None}
    if reader is not None:
        return _ReaderSource(reader, Path(path) if path is not None else None, specs, **kw)
    if path is None:
        raise BadDataError("no calibration data given; accepted: an .npz/.npy file, a directory, or a reader")
    path = Path(path)
    if _is_regular_file(path):
        if path.suffix.lower() not in ARRAY_EXTS:
            raise BadDataError(
                f"{path}: unsupported file type '{path.suffix}'; accepted: .npz, .npy, or a "
                "directory of those or of jpg/png images"
            )
        return _ArrayFiles(label, [path], specs, extra_keys, **kw)
    entries = sorted((p for p in path.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    if not entries:
        raise BadDataError(f"{path}: empty directory; accepted: .npz/.npy files or jpg/png images")
    odd = next(
        (p for p in entries if not p.is_file() or p.suffix.lower() not in ARRAY_EXTS + IMAGE_EXTS), None
    )
    if odd is not None:
        raise BadDataError(
            f"{odd}: not an .npz/.npy/.jpg/.jpeg/.png file; accepted: a flat directory of arrays or of images"
        )
    arrays = [p for p in entries if p.suffix.lower() in ARRAY_EXTS]
    if arrays and len(arrays) != len(entries):
        raise BadDataError(f"{path}: mixes arrays ({arrays[0].name}) and images; accepted: one kind")
    if arrays:
        return _ArrayFiles(label, entries, specs, extra_keys, **kw)
    return ImageDir(label, entries, specs, image_options or ImageOptions(), **kw)

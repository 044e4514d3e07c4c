"""Calibration data from a directory of jpg/png images (Pillow, imported only when images are read).

Each image is EXIF-rotated, converted to RGB (or L for single-channel inputs), resized bilinearly to the
input's H×W (or the `size` option; without either, all images must share one size) and becomes
`(x * scale − mean) / std` per channel, in NCHW or NHWC layout, as float32.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from onnxquant.calib.source import DataSource, InputSpec, Piece, check_array, input_names, shape_text
from onnxquant.errors import BadDataError, first_line

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# The most pixels an image may have (about 8k x 8k); larger ones are refused before they are decoded, as
# Pillow's own guard against decompression bombs would only warn up to twice its default limit.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImageOptions:
    """How images become tensors: resize to `size` (H, W), `(x * scale - mean) / std` per channel, layout."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = 1 / 255
    grayscale: bool | None = None  # None: from the model's channel dim (1 = grayscale)


class ImageDir(DataSource):
    """A flat directory of jpg/png images for a single image input."""

    def __init__(
        self, label: str, files: list[Path], specs: list[InputSpec], options: ImageOptions, **kw
    ) -> None:
        super().__init__(label, specs, **kw)
        if len(specs) != 1:
            raise BadDataError(
                f"{label}: images can feed a single-input model, this one has {len(specs)} "
                f"inputs ({input_names(specs)}); accepted: an .npz with those keys"
            )
        spec = specs[0]
        if spec.dtype.kind != "f":
            raise BadDataError(
                f"{label}: input '{spec.name}' is {spec.dtype}; images feed float inputs only "
                "(give an .npy/.npz instead)"
            )
        if spec.shape is not None and len(spec.shape) != 4:
            raise BadDataError(
                f"{label}: input '{spec.name}' has shape {shape_text(spec.shape)}; images feed "
                "4-D inputs (NCHW or NHWC)"
            )
        if options.layout not in ("NCHW", "NHWC"):
            raise BadDataError(f"{label}: layout {options.layout!r}; accepted: NCHW, NHWC")
        shape = spec.shape or (None,) * 4
        c, h, w = (
            (shape[1], shape[2], shape[3]) if options.layout == "NCHW" else (shape[3], shape[1], shape[2])
        )
        gray = options.grayscale if options.grayscale is not None else c == 1
        if gray and options.grayscale is None:
            log.info("%s: input '%s' has 1 channel: images are converted to grayscale", label, spec.name)
        channels = 1 if gray else 3
        self._mean = _per_channel(label, "mean", options.mean, channels)
        self._std = _per_channel(label, "std", options.std, channels)
        if not np.all(self._std != 0):
            raise BadDataError(f"{label}: std {options.std} contains 0; accepted: non-zero values")
        self._files, self._options, self._gray = files, options, gray
        self._image = _pillow(label)
        size = _image_size(label, options.size) or (
            (h, w) if isinstance(h, int) and isinstance(w, int) else None
        )
        if size is None:  # no target size: all images must share the first one's size
            sizes = {}
            for f in files:
                with self._open(f) as im:
                    sizes[f] = im.size
            size = sizes[files[0]][::-1]
            odd = next((f for f in files if sizes[f][::-1] != size), None)
            if odd is not None:
                raise BadDataError(
                    f"{odd}: is {sizes[odd][1]}x{sizes[odd][0]} but {files[0].name} is "
                    f"{size[0]}x{size[1]} (HxW); accepted: one size, or an image size option"
                )
        else:
            for f in files:
                self._open(f).close()
        self._size = (int(size[0]), int(size[1]))
        dims = (
            (len(files), channels, *self._size)
            if options.layout == "NCHW"
            else (len(files), *self._size, channels)
        )
        check_array(label, "the image batch", dims, np.dtype(np.float32), spec)
        self._set_total(len(files))

    def _open(self, path: Path):
        """The image, header read only; too many pixels (a decompression bomb) is refused here."""
        image = self._image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", image.DecompressionBombWarning)
                im = image.open(path)
        except (image.DecompressionBombWarning, image.DecompressionBombError) as exc:
            raise _too_large(path, first_line(exc)) from exc
        except (OSError, ValueError) as exc:
            raise _unreadable(path, exc) from exc
        if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
            im.close()
            raise _too_large(path, f"{im.size[0]}x{im.size[1]} pixels")
        return im

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
                raise _unreadable(path, exc) from exc
        x = x[..., None] if x.ndim == 2 else x
        return (x * np.float32(self._options.scale) - self._mean) / self._std

    def _pieces(self) -> Iterator[Piece]:
        bs = self.batch_size
        for start in range(0, len(self._files), bs):
            batch = np.stack([self._load(f) for f in self._files[start : start + bs]])
            if self._options.layout == "NCHW":
                batch = batch.transpose(0, 3, 1, 2)
            yield self.label, start, {self.specs[0].name: batch}


def _image_size(label: str, size: Sequence[int] | None) -> tuple[int, int] | None:
    """(H, W) from the size option: one number is a square, two are H and W; both positive."""
    if size is None:
        return None
    values = tuple(size)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) and 0 < v <= 65535 for v in values):
        raise BadDataError(
            f"{label}: image size {tuple(size)}; accepted: one or two integers in 1..65535 (S or HxW)"
        )
    return values


def _per_channel(label: str, what: str, values: Sequence[float], channels: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size == channels or arr.size == 1:
        return np.broadcast_to(arr, (channels,)).copy()
    if channels == 1 and np.all(arr == arr[0]):
        return arr[:1]
    accepted = "1 value" if channels == 1 else f"1 or {channels} values"
    raise BadDataError(
        f"{label}: {what} {tuple(values)} has {arr.size} values for {channels}-channel "
        f"images; accepted: {accepted}"
    )


def _pillow(label: str):
    try:
        from PIL import Image
    except ImportError as exc:
        raise BadDataError(f"{label}: reading images needs Pillow; install onnxquant[images]") from exc
    return Image


def _too_large(path: Path, what: str) -> BadDataError:
    return BadDataError(
        f"{path}: image too large ({what}); accepted: images of at most {MAX_IMAGE_PIXELS} pixels"
    )


def _unreadable(path: Path, exc: Exception) -> BadDataError:
    return BadDataError(f"{path}: not a readable image ({first_line(exc)}); accepted: jpg, png")

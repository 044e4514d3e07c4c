"""Damaged or hostile calibration data (issue #14): zip members with a bad CRC, an encrypted flag or an
unknown compression, truncated or lying .npy headers, a FIFO, image decompression bombs, a reader that raises
or exits. Each is one BadDataError line naming the file (or reader), never a traceback, a hang or a huge
allocation."""

from __future__ import annotations

import io
import logging
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxquant.calib.readers import ImageOptions, InputSpec, open_data
from onnxquant.cli import main
from onnxquant.errors import BadDataError

F32 = np.dtype(np.float32)
ONE = [InputSpec("x", F32, ("N", 3))]
X = np.arange(60, dtype=np.float32).reshape(20, 3)


def _raises(match: str, *args, **kw) -> str:
    """open_data(...) and a full iteration raise one BadDataError line containing `match`."""
    with pytest.raises(BadDataError) as info:
        list(open_data(*args, **kw))
    msg = str(info.value)
    assert match in msg and "\n" not in msg and "accepted" in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- .npz / .npy


def _set_zip_field(data: bytes, local_at: int, central_at: int, value: int) -> bytes:
    """Set a 2-byte field of every local (PK\\3\\4) and central (PK\\1\\2) header."""
    out = bytearray(data)
    for signature, at in ((b"PK\x03\x04", local_at), (b"PK\x01\x02", central_at)):
        start = out.find(signature)
        while start >= 0:
            old = struct.unpack_from("<H", out, start + at)[0]
            struct.pack_into("<H", out, start + at, value(old))
            start = out.find(signature, start + 4)
    return bytes(out)


def _npy_bytes(header: dict, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def _bad_npz(path: Path, kind: str) -> None:
    np.savez(path, x=X)
    data = path.read_bytes()
    if kind == "crc":  # one data byte changed: the member's CRC-32 no longer matches
        at = data.find(X.tobytes()[8:16])
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    elif kind == "encrypted":
        data = _set_zip_field(data, 6, 8, lambda flags: flags | 0x1)
    elif kind == "method":  # compression method 99 (AES), which zipfile cannot read
        data = _set_zip_field(data, 8, 10, lambda _: 99)
    elif kind == "deflate":  # compressed data garbled
        np.savez_compressed(path, x=np.zeros((2000, 3), np.float32))
        data = path.read_bytes()
        mid = len(data) // 2
        data = data[: mid - 8] + b"\xff" * 16 + data[mid + 8 :]
    elif kind in ("huge_fortran", "huge"):  # a header claiming 10^12 rows over 12 bytes of data
        header = {"descr": "<f4", "fortran_order": kind == "huge_fortran", "shape": (10**12, 3)}
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("x.npy", _npy_bytes(header, b"\0" * 12))
        return
    path.write_bytes(data)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("crc", "d.npz[x]: damaged (Bad CRC-32 for file 'x.npy'); accepted: a complete"),
        ("deflate", "d.npz[x]: damaged ("),
        ("encrypted", "member 'x.npy' is encrypted; accepted"),
        ("method", "member 'x.npy' uses zip compression method 99; accepted: stored or deflated"),
        ("huge_fortran", "the header claims float32 (1000000000000, 3) (12000000000000 bytes) but only 12"),
        ("huge", "the header claims float32 (1000000000000, 3)"),
    ],
)
def test_damaged_npz(tmp_path, kind, match):
    path = tmp_path / "d.npz"
    _bad_npz(path, kind)
    assert str(path) in _raises(match, path, ONE, batch_size=64)


def _bad_npy(path: Path, kind: str) -> None:
    np.save(path, X)
    data = path.read_bytes()
    if kind == "truncated":
        data = data[:-10]
    elif kind == "huge":
        data = _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)}, X.tobytes())
    elif kind == "garbage_header":
        data = data[:10] + b"{'descr': <f4, 'shape': ((((" + data[40:]
    elif kind == "short_header":
        data = data[:12]
    path.write_bytes(data)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated", "the header claims float32 (20, 3) (240 bytes) but only 230 bytes follow it"),
        ("huge", "the header claims float32 (1000000000000, 3)"),
        ("garbage_header", "not a readable .npy array"),
        ("short_header", "not a readable .npy array"),
    ],
)
def test_damaged_npy(tmp_path, kind, match):
    path = tmp_path / "d.npy"
    _bad_npy(path, kind)
    assert str(path) in _raises(match, path, ONE)


def test_fifo_as_data_is_refused_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "d.npz")
    _raises("d.npz: not a regular file (a FIFO, socket or device)", tmp_path / "d.npz", ONE)


# -------------------------------------------------------------------------------------------------- images


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (no pixel data: a decompression bomb's front)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _png(path: Path, shape: tuple[int, ...]) -> None:
    from PIL import Image

    Image.fromarray(np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)).save(path)


IMAGE = [InputSpec("img", F32, (None, 3, 8, 8))]


@pytest.mark.parametrize(
    "width, height, match",
    [
        (20000, 20000, "image too large (Image size (400000000 pixels) exceeds limit"),  # Pillow's error
        (10000, 10000, "image too large (Image size (100000000 pixels) exceeds limit"),  # Pillow's warning
        (9000, 9000, "image too large (9000x9000 pixels); accepted: images of at most 67108864 pixels"),
    ],
)
def test_decompression_bomb_is_one_line(tmp_path, width, height, match):
    _png(tmp_path / "a.png", (8, 8, 3))
    _png_header(tmp_path / "b.png", width, height)
    assert "b.png" in _raises(match, tmp_path, IMAGE)


def test_one_number_image_size_is_a_square(tmp_path):
    _png(tmp_path / "a.png", (5, 7, 3))
    spec = [InputSpec("img", F32, (None, 3, None, None))]
    batches = list(open_data(tmp_path, spec, image_options=ImageOptions(size=(6,))))
    assert batches[0]["img"].shape == (1, 3, 6, 6)
    _raises(
        "image size (0, 4); accepted: one or two integers",
        tmp_path,
        spec,
        image_options=ImageOptions(size=(0, 4)),
    )
    _raises("image size (2, 3, 4)", tmp_path, spec, image_options=ImageOptions(size=(2, 3, 4)))


def test_grayscale_conversion_is_said_at_info(tmp_path, caplog):
    _png(tmp_path / "a.png", (8, 8, 3))
    with caplog.at_level(logging.INFO, logger="onnxquant"):
        batches = list(open_data(tmp_path, [InputSpec("g", F32, (None, 1, 8, 8))]))
    assert batches[0]["g"].shape == (1, 1, 8, 8)
    assert f"{tmp_path}: input 'g' has 1 channel: images are converted to grayscale" in caplog.messages


def test_image_shape_message_grammar(tmp_path):
    _png(tmp_path / "a.png", (8, 8, 3))
    with pytest.raises(BadDataError) as info:
        open_data(tmp_path, IMAGE, image_options=ImageOptions(size=(4, 4)))
    assert str(info.value) == (
        f"{tmp_path}: the image batch has shape (1, 3, 4, 4) but input 'img' needs (?, 3, 8, 8): "
        "dim 2 must be 8"
    )


# ------------------------------------------------------------------------------------------- reader function

READER = """
import sys
import numpy as np

def raises(path=None):
    raise KeyError("no such shard\\nsecond line")

def raises_inside():
    yield {"x": np.zeros((2, 3), np.float32)}
    raise OSError("disk gone")

def exits():
    sys.exit(3)

def exits_inside():
    yield {"x": np.zeros((2, 3), np.float32)}
    sys.exit(4)

def ragged():
    yield {"x": [[1.0, 2.0, 3.0], [1.0]]}
"""


@pytest.fixture
def reader_module(tmp_path, monkeypatch):
    (tmp_path / "bad_reader_mod.py").write_text(READER)
    (tmp_path / "broken_import_mod.py").write_text("x = 1 / 0\n")
    (tmp_path / "exit_import_mod.py").write_text("import sys\nsys.exit(5)\n")
    (tmp_path / "syntax_mod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_reader_mod"


@pytest.mark.parametrize(
    "reader, match",
    [
        ("bad_reader_mod:raises", "reader bad_reader_mod:raises: call raised KeyError: 'no such shard"),
        (
            "bad_reader_mod:raises_inside",
            "reader bad_reader_mod:raises_inside: batch 1 raised OSError: disk gone",
        ),
        ("bad_reader_mod:exits", "reader bad_reader_mod:exits: call called sys.exit(3)"),
        ("bad_reader_mod:exits_inside", "reader bad_reader_mod:exits_inside: batch 1 called sys.exit(4)"),
        ("bad_reader_mod:ragged", "reader bad_reader_mod:ragged batch 0: key 'x' raised ValueError"),
        (
            "broken_import_mod:f",
            "module broken_import_mod cannot be imported (ZeroDivisionError: division by zero)",
        ),
        ("exit_import_mod:f", "module exit_import_mod cannot be imported (SystemExit: sys.exit(5))"),
        ("syntax_mod:f", "module syntax_mod cannot be imported (SyntaxError"),
    ],
)
def test_failing_reader_is_one_line(reader_module, reader, match):
    _raises(match, None, ONE, reader=reader)


def test_cli_reader_calling_sys_exit_exits_2(reader_module, tmp_path):
    model = Path("calib_data/digits/model.onnx").resolve()
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(
        main, ["convert", str(model), "--calib-reader", "bad_reader_mod:exits", "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    expected = (
        "error: reader bad_reader_mod:exits: call called sys.exit(3); accepted: a reader that returns or "
        "yields batches"
    )
    assert result.output.strip().splitlines() == [expected]
    assert not out.exists()

"""Calibration data readers: exact values out, one-line BadDataError for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxquant.calib.readers import ImageOptions, InputSpec, input_specs, open_data
from onnxquant.errors import BadDataError

F32, I64 = np.dtype(np.float32), np.dtype(np.int64)
TWO = [InputSpec("a", F32, ("N", 3, 4)), InputSpec("b", I64, (None, 5))]
ONE = [InputSpec("x", F32, ("N", 3))]


def _two_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((n, 3, 4)).astype(np.float32), "b": rng.integers(-9, 9, (n, 5))}


def _collect(source) -> dict[str, np.ndarray]:
    batches = list(source)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _sizes(source) -> list[int]:
    return [len(next(iter(b.values()))) for b in source]


def _raises(match: str, *args, **kw) -> str:
    """open_data(...) and a full iteration must raise BadDataError mentioning `match`; returns the message."""
    with pytest.raises(BadDataError) as info:
        list(open_data(*args, **kw))
    msg = str(info.value)
    assert match in msg and "\n" not in msg, msg
    return msg


def test_input_specs_skips_initializers_and_keeps_dynamic_dims():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [x, w, ids],
        [y],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [3], [1, 2, 3])],
    )
    specs = input_specs(helper.make_model(graph))
    assert specs == [InputSpec("x", F32, ("batch", 3, None)), InputSpec("ids", I64, None)]


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_npz_batches_concatenate_to_the_original(tmp_path, batch_size):
    data = _two_inputs(50)
    np.savez(tmp_path / "d.npz", **data)
    source = open_data(tmp_path / "d.npz", TWO, batch_size=batch_size)
    assert source.num_samples == 50
    sizes = _sizes(source)
    assert all(s == batch_size for s in sizes[:-1]) and sum(sizes) == 50
    out = _collect(source)
    assert out["a"].dtype == F32 and out["b"].dtype == I64
    np.testing.assert_array_equal(out["a"], data["a"])
    np.testing.assert_array_equal(out["b"], data["b"])


def test_compressed_npz_and_two_iterations_are_identical(tmp_path):
    data = _two_inputs(20)
    np.savez_compressed(tmp_path / "d.npz", **data)
    source = open_data(tmp_path / "d.npz", TWO, batch_size=6)
    first, second = list(source), list(source)
    assert len(first) == len(second) == 4
    for b1, b2 in zip(first, second):
        for k in ("a", "b"):
            np.testing.assert_array_equal(b1[k], b2[k])
    np.testing.assert_array_equal(_collect(source)["a"], data["a"])


def test_max_samples_truncates(tmp_path):
    data = _two_inputs(50)
    np.savez(tmp_path / "d.npz", **data)
    source = open_data(tmp_path / "d.npz", TWO, batch_size=7, max_samples=10)
    assert source.num_samples == 10 and _sizes(source) == [7, 3]
    np.testing.assert_array_equal(_collect(source)["b"], data["b"][:10])


def test_directory_of_npz_in_sorted_order_across_file_boundaries(tmp_path):
    parts = {"b.npz": _two_inputs(5, 1), "a.npz": _two_inputs(3, 2), "c.npz": _two_inputs(6, 3)}
    for name, arrays in parts.items():
        np.savez(tmp_path / name, **arrays)
    source = open_data(tmp_path, TWO, batch_size=4, max_samples=12)
    assert source.num_samples == 12 and _sizes(source) == [4, 4, 4]
    out = _collect(source)
    for k in ("a", "b"):
        expected = np.concatenate([parts[n][k] for n in ("a.npz", "b.npz", "c.npz")])[:12]
        np.testing.assert_array_equal(out[k], expected)


def test_npy_single_input_with_float64_cast(tmp_path):
    x = np.random.default_rng(0).standard_normal((23, 3))
    np.save(tmp_path / "x.npy", x)
    source = open_data(tmp_path / "x.npy", ONE, batch_size=7)
    assert source.num_samples == 23 and _sizes(source) == [7, 7, 7, 2]
    out = _collect(source)["x"]
    assert out.dtype == F32
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_fortran_order_npz_member(tmp_path):
    data = _two_inputs(11)
    np.savez(tmp_path / "f.npz", a=np.asfortranarray(data["a"]), b=np.asfortranarray(data["b"]))
    out = _collect(open_data(tmp_path / "f.npz", TWO, batch_size=4))
    np.testing.assert_array_equal(out["a"], data["a"])
    np.testing.assert_array_equal(out["b"], data["b"])


def test_directory_of_npy(tmp_path):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.save(tmp_path / "1.npy", x[:4])
    np.save(tmp_path / "2.npy", x[4:])
    np.testing.assert_array_equal(_collect(open_data(tmp_path, ONE, batch_size=3))["x"], x)


def test_int32_data_for_int64_input_and_extra_labels(tmp_path):
    data = _two_inputs(9)
    labels = np.arange(9) % 3
    np.savez(tmp_path / "d.npz", a=data["a"], b=data["b"].astype(np.int32), labels=labels)
    source = open_data(tmp_path / "d.npz", TWO, batch_size=4, max_samples=8, extra_keys=["labels"])
    out = _collect(source)
    assert out["b"].dtype == I64 and set(out) == {"a", "b"}
    np.testing.assert_array_equal(out["b"], data["b"][:8])
    np.testing.assert_array_equal(source.extra("labels"), labels[:8])
    assert source.extra("scores") is None


def test_fixed_batch_dimension_sets_the_batch_size(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(30, dtype=np.float32).reshape(10, 3))
    source = open_data(tmp_path / "x.npy", [InputSpec("x", F32, (4, 3))], batch_size=32)
    assert source.num_samples == 8 and _sizes(source) == [4, 4]
    assert _sizes(open_data(tmp_path / "x.npy", [InputSpec("x", F32, (1, 3))])) == [1] * 10


# ------------------------------------------------------------------------------------------------- images


def _pngs(tmp_path, pixels: list[np.ndarray]) -> None:
    from PIL import Image

    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"img{i}.png")


RGB = [
    np.array([[[0, 51, 102], [255, 0, 10]], [[20, 40, 60], [1, 2, 3]]], np.uint8),
    np.array([[[9, 8, 7], [6, 5, 4]], [[100, 110, 120], [130, 140, 150]]], np.uint8),
]
MEAN, STD = (0.5, 0.25, 0.125), (0.5, 2.0, 0.25)


def _expected(pixels: list[np.ndarray], scale: float = 1 / 255) -> np.ndarray:
    x = np.stack(pixels).astype(np.float64) * scale  # N, H, W, C
    return (x - np.array(MEAN)) / np.array(STD)


def test_images_nchw_normalized(tmp_path):
    _pngs(tmp_path, RGB)
    spec = [InputSpec("img", F32, ("N", 3, 2, 2))]
    source = open_data(tmp_path, spec, batch_size=1, image_options=ImageOptions(mean=MEAN, std=STD))
    assert source.num_samples == 2 and _sizes(source) == [1, 1]
    out = _collect(source)["img"]
    assert out.dtype == F32 and out.shape == (2, 3, 2, 2)
    np.testing.assert_allclose(out, _expected(RGB).transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)


def test_images_nhwc_resized_to_the_option_size(tmp_path):
    # bilinear 2x2 -> 1x1 is the mean of the four pixels; Pillow rounds after each axis, so every
    # pair of pixels here averages to an integer
    first = np.array([[[10, 0, 200], [30, 4, 100]], [[50, 8, 2], [70, 12, 250]]], np.uint8)
    pixels = [first, 255 - first]
    _pngs(tmp_path, pixels)
    spec = [InputSpec("img", F32, ("N", None, None, 3))]
    options = ImageOptions(size=(1, 1), mean=MEAN, std=STD, layout="NHWC", scale=1.0)
    out = _collect(open_data(tmp_path, spec, image_options=options))["img"]
    means = [p.reshape(4, 3).astype(np.float64).mean(axis=0).reshape(1, 1, 3) for p in pixels]
    assert out.shape == (2, 1, 1, 3)
    np.testing.assert_allclose(out, _expected(means, scale=1.0), rtol=1e-6)


def test_grayscale_inferred_from_channel_dim(tmp_path):
    gray = [np.array([[0, 255], [51, 102]], np.uint8)]
    _pngs(tmp_path, gray)
    out = _collect(open_data(tmp_path, [InputSpec("g", F32, (None, 1, 2, 2))]))["g"]
    np.testing.assert_allclose(out, gray[0][None, None] / 255.0, rtol=1e-6)


def test_image_errors(tmp_path):
    _pngs(tmp_path, RGB)
    _raises(
        "dim 1 must be 1",
        tmp_path,
        [InputSpec("g", F32, (None, 1, 2, 2))],
        image_options=ImageOptions(grayscale=False),
    )
    _raises(
        "dim 2 must be 5",
        tmp_path,
        [InputSpec("g", F32, (None, 3, 5, 5))],
        image_options=ImageOptions(size=(2, 2)),
    )
    _raises("mean", tmp_path, [InputSpec("g", F32, (None, 1, 2, 2))], image_options=ImageOptions(mean=(1, 2)))
    _raises("inputs (a, b)", tmp_path, TWO)
    (tmp_path / "img9.png").write_bytes(b"not a png")
    _raises("img9.png", tmp_path, [InputSpec("g", F32, (None, 3, 2, 2))])


# ------------------------------------------------------------------------------------------ reader function

READER = """
import numpy as np

def batches(path=None):
    x = np.arange(69, dtype=np.float64).reshape(23, 3)
    if path is not None:
        x = x + 1000
    for i in range(0, 23, 5):
        yield {"x": x[i:i + 5]}

def not_dicts():
    yield [1, 2, 3]

def nothing():
    return []

def wrong_key():
    yield {"y": np.zeros((2, 3), np.float32)}
"""


@pytest.fixture
def reader_module(tmp_path, monkeypatch):
    (tmp_path / "my_reader_mod.py").write_text(READER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_reader_mod"


def test_reader_function_rebatched_and_repeatable(reader_module):
    source = open_data(None, ONE, batch_size=7, reader=f"{reader_module}:batches")
    assert source.num_samples == 23
    assert _sizes(source) == [7, 7, 7, 2]
    expected = np.arange(69, dtype=np.float32).reshape(23, 3)
    np.testing.assert_array_equal(_collect(source)["x"], expected)
    np.testing.assert_array_equal(_collect(source)["x"], expected)
    with_path = open_data("anything", ONE, batch_size=7, reader=f"{reader_module}:batches")
    np.testing.assert_array_equal(_collect(with_path)["x"], expected + 1000)


def test_reader_errors(reader_module):
    _raises("not.a-module", None, ONE, reader="not.a-module:fn")
    _raises("nomodule", None, ONE, reader="nomodule")
    _raises("no_such_mod_xyz", None, ONE, reader="no_such_mod_xyz:fn")
    _raises("missing_fn", None, ONE, reader=f"{reader_module}:missing_fn")
    _raises("list", None, ONE, reader=f"{reader_module}:not_dicts")
    _raises("no samples", None, ONE, reader=f"{reader_module}:nothing")
    _raises("missing input(s) x", None, ONE, reader=f"{reader_module}:wrong_key")


# ------------------------------------------------------------------------------------------------- errors


def test_path_and_option_errors(tmp_path):
    _raises("nope.npz", tmp_path / "nope.npz", TWO)
    (tmp_path / "d.txt").write_text("1 2 3")
    _raises("d.txt", tmp_path / "d.txt", TWO)
    (tmp_path / "sub").mkdir()
    _raises("empty directory", tmp_path / "sub", TWO)
    np.savez(tmp_path / "d.npz", **_two_inputs(4))
    _raises("max samples 0", tmp_path / "d.npz", TWO, max_samples=0)
    _raises("batch size 0", tmp_path / "d.npz", TWO, batch_size=0)
    _raises("no calibration data", None, TWO)


def test_directory_content_errors(tmp_path):
    np.savez(tmp_path / "a.npz", **_two_inputs(4), labels=np.zeros(4))
    np.savez(tmp_path / "b.npz", **_two_inputs(4))
    _raises("a.npz", tmp_path, TWO, extra_keys=["labels"])  # labels in a.npz only
    _raises("unknown key(s) labels", tmp_path, TWO)
    (tmp_path / "notes.txt").write_text("x")
    _raises("notes.txt", tmp_path, TWO, extra_keys=["labels"])
    (tmp_path / "notes.txt").unlink()
    _pngs(tmp_path, RGB)
    _raises("mixes arrays", tmp_path, TWO, extra_keys=["labels"])


def test_npy_errors(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _raises(
        "obj.npy: the array is an object array; object arrays are not accepted", tmp_path / "obj.npy", ONE
    )
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    msg = _raises("x.npy", tmp_path / "x.npy", TWO)
    assert "a, b" in msg
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    _raises("empty.npy", tmp_path / "empty.npy", ONE)
    np.save(tmp_path / "s.npy", np.float32(1.0))
    _raises("s.npy: the array is a scalar", tmp_path / "s.npy", [InputSpec("x", F32, None)])
    np.save(tmp_path / "i.npy", np.zeros((4, 3), np.int64))
    _raises("int64", tmp_path / "i.npy", ONE)


def test_npz_content_errors(tmp_path):
    good = _two_inputs(6)

    def bad(name: str, match: str, **arrays) -> str:
        np.savez(tmp_path / name, **{**good, **arrays})
        return _raises(match, tmp_path / name, TWO)

    np.savez(tmp_path / "missing.npz", a=good["a"])
    assert "a, b" in _raises("missing input(s) b", tmp_path / "missing.npz", TWO)
    assert "a, b" in bad("unknown.npz", "unknown key(s) c", c=good["b"])
    np.savez(tmp_path / "both.npz", a=good["a"], c=good["b"])
    _raises("missing input(s) b; unknown key(s) c", tmp_path / "both.npz", TWO)
    bad("rank.npz", "'a' has rank 2", a=np.zeros((6, 12), np.float32))
    bad("dims.npz", "dim 2 must be 4", a=np.zeros((6, 3, 5), np.float32))
    bad("dtype.npz", "'b' is float32", b=good["b"].astype(np.float32))
    bad("dtype2.npz", "'a' is int64", a=good["a"].astype(np.int64))
    bad("counts.npz", "a=6, b=5", b=good["b"][:5])
    bad("empty.npz", "no usable samples", a=good["a"][:0], b=good["b"][:0])
    bad("obj.npz", "object arrays", b=np.array([None] * 6, dtype=object))
    bad(
        "range.npz",
        "'b' sample 2",
        b=np.where(np.arange(30).reshape(6, 5) == 12, 2**63 + 5, 0).astype(np.uint64),
    )
    (tmp_path / "junk.npz").write_bytes(b"junk")
    _raises("junk.npz", tmp_path / "junk.npz", TWO)


@pytest.mark.parametrize("value,what", [(np.nan, "NaN"), (np.inf, "Inf"), (1e300, "Inf")])
def test_non_finite_values_name_tensor_and_sample(tmp_path, value, what):
    a = np.zeros((40, 3, 4))
    a[33, 1, 2] = value
    np.savez(tmp_path / "d.npz", a=a, b=np.zeros((40, 5), np.int64))
    msg = _raises("'a' sample 33", tmp_path / "d.npz", TWO, batch_size=8)
    assert what in msg and "d.npz" in msg

"""The CLI end to end on the digits demo, and every kind of bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxquant.cli import main
from onnxquant.model import make_session

DEMO = Path("calib_data/digits")


@pytest.fixture()
def demo(tmp_path):
    for name in ("model.onnx", "calib.npz", "eval.npz"):
        shutil.copy(DEMO / name, tmp_path / name)
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def accuracy(model_path: Path) -> float:
    ev = np.load(DEMO / "eval.npz")
    logits = make_session(onnx.load(model_path)).run(None, {"input": ev["input"]})[0]
    return float((logits.argmax(1) == ev["labels"]).mean())


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_convert_w8a8_keeps_accuracy_and_shrinks_the_file(demo):
    out = demo / "w8.onnx"
    result = invoke(
        "convert",
        demo / "model.onnx",
        "--bits",
        "8",
        "--calib",
        "minmax",
        "--calib-data",
        demo / "calib.npz",
        "-o",
        out,
        "--table-out",
        demo / "t.json",
    )
    assert result.exit_code == 0, result.output
    assert (
        "folded 4 nodes: bn1 into conv1," in result.output
        and "weights quantized: 5 at 8 bits" in result.output
    )
    onnx.checker.check_model(onnx.load(out), full_check=True)
    float_acc, quant_acc = accuracy(demo / "model.onnx"), accuracy(out)
    assert quant_acc >= float_acc - 0.005, (float_acc, quant_acc)
    assert out.stat().st_size <= 0.30 * (demo / "model.onnx").stat().st_size
    table = json.loads((demo / "t.json").read_text())
    assert table["format"] == "onnxquant-calibration" and table["bits"] == 8


def test_convert_w4_stores_int4_weights(demo):
    out = demo / "w4.onnx"
    result = invoke(
        "convert",
        demo / "model.onnx",
        "--wbits",
        "4",
        "--abits",
        "8",
        "--calib-data",
        demo / "calib.npz",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    assert model.opset_import[0].version >= 21
    assert (
        sum(
            t.data_type == onnx.TensorProto.INT4 and t.name.endswith("weight_quantized")
            for t in model.graph.initializer
        )
        == 5
    )
    assert out.stat().st_size <= 0.18 * (demo / "model.onnx").stat().st_size


def test_w4a4_laplace_with_bias_correction_beats_minmax(demo):
    ev = np.load(DEMO / "eval.npz")
    reference = make_session(onnx.load(demo / "model.onnx")).run(None, {"input": ev["input"]})[0]
    scores = {}
    for name, flags in {
        "minmax": ("--calib", "minmax"),
        "laplace": ("--calib", "laplace", "--bias-correction"),
    }.items():
        out = demo / f"{name}.onnx"
        result = invoke(
            "convert",
            demo / "model.onnx",
            "--bits",
            "4",
            *flags,
            "--calib-data",
            demo / "calib.npz",
            "-o",
            out,
        )
        assert result.exit_code == 0, result.output
        logits = make_session(onnx.load(out)).run(None, {"input": ev["input"]})[0]
        sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - logits) ** 2))
        scores[name] = (accuracy(out), sqnr)
    assert scores["laplace"][0] >= accuracy(demo / "model.onnx") - 0.02
    one_sample = 1 / len(ev["labels"])  # top-1 differences of one sample are noise on 450 samples
    assert scores["laplace"][0] >= scores["minmax"][0] - one_sample, scores
    assert scores["laplace"][1] > scores["minmax"][1], scores


def test_default_output_goes_beside_the_model(demo, monkeypatch, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    result = invoke("convert", demo / "model.onnx", "--bits", "8", "--calib-data", demo / "calib.npz")
    assert result.exit_code == 0, result.output
    assert (demo / "model.int8.onnx").exists() and list(cwd.iterdir()) == []


def test_fold_and_inspect(demo):
    result = invoke("fold", demo / "model.onnx", "-o", demo / "folded.onnx")
    assert result.exit_code == 0, result.output
    folded = onnx.load(demo / "folded.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    ev = np.load(DEMO / "eval.npz")["input"][:64]
    ref = make_session(onnx.load(demo / "model.onnx")).run(None, {"input": ev})[0]
    got = make_session(folded).run(None, {"input": ev})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    result = invoke("inspect", demo / "model.onnx", "--rules", "tensorrt", "--bits", "4")
    assert result.exit_code == 0, result.output
    assert (
        "fold [fold_conv_bn] folded BN 'bn1' into 'conv1'" in result.output
        and "conv2 (Conv): W4 per_channel minmax, A4" in result.output
    )
    assert "relu1 (Relu): fused into the quantized node before it" in result.output
    assert "relu2 (Relu): float: op type Relu not in quantize_ops" in result.output


def _bad_npz(folder: Path, kind: str) -> Path:
    x = np.load(folder / "calib.npz")["input"]
    path = folder / f"bad_{kind}.npz"
    arrays = {
        "nan": {"input": np.where(np.arange(x.size).reshape(x.shape) == 77, np.nan, x)},
        "name": {"image": x},
        "rank": {"input": x[:, 0]},
        "shape": {"input": x[:, :, :4]},
        "dtype": {"input": (x * 16).astype(np.int32)},
        "empty": {"input": x[:0]},
    }[kind]
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("not_onnx", "not a readable ONNX model|not an ONNX model|invalid ONNX model"),
        ("truncated", "model.onnx"),
        ("directory", "is a directory"),
        ("bits0", "--bits"),
        ("bits9", "--bits"),
        ("same_output", "equals the input"),
        ("unwritable", "does not exist"),
        ("rules_unknown_key", "unknown key 'weight'"),
        ("rules_wrong_type", "weights.bits"),
        ("nan", "NaN|Inf"),
        ("name", "input"),
        ("rank", "input"),
        ("shape", "input"),
        ("dtype", "input"),
        ("empty", "empty|no samples|0 samples"),
        ("quantized", "already quantized \\(node '.*' is a QuantizeLinear\\); accepted: a float model"),
        (
            "bit_alloc_kl",
            "per-channel bit allocation needs a per-channel method; accepted: gauss, laplace, minmax",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(demo, case, pattern):
    model = demo / "model.onnx"
    args = ["convert", model, "--calib-data", demo / "calib.npz", "-o", demo / "out.onnx"]
    if case == "not_onnx":
        model.write_bytes(b"hello, this is not protobuf")
    elif case == "truncated":
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 3])
    elif case == "directory":
        args[1] = demo
    elif case in ("bits0", "bits9"):
        args += ["--bits", case[-1]]
    elif case == "same_output":
        args[-1] = model
    elif case == "unwritable":
        args[-1] = demo / "no" / "such" / "dir.onnx"
    elif case.startswith("rules"):
        rules = demo / "r.yaml"
        rules.write_text("weight: {bits: 4}" if case == "rules_unknown_key" else "weights: {bits: [4]}")
        args += ["--rules", rules]
    elif case == "bit_alloc_kl":
        args += ["--calib", "kl", "--bit-alloc", "activations"]
    elif case == "quantized":
        assert (
            invoke("convert", model, "--calib-data", demo / "calib.npz", "-o", demo / "q.onnx").exit_code == 0
        )
        shutil.move(demo / "q.onnx", model)
    else:
        args[3] = _bad_npz(demo, case)
    before = digest(demo)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert "Traceback" not in result.output
    assert any(__import__("re").search(pattern, ln) for ln in lines), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output  # click's usage errors too
    assert digest(demo) == before
    assert not (demo / "out.onnx").exists()


def test_debug_shows_the_traceback(demo):
    (demo / "model.onnx").write_bytes(b"garbage")
    result = CliRunner().invoke(
        main, ["convert", str(demo / "model.onnx"), "--calib-data", str(demo / "calib.npz"), "--debug"]
    )
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "BadModelError"


def test_every_command_has_help_with_an_example():
    for command in ("convert", "calibrate", "table", "fold", "inspect"):
        result = invoke(command, "--help")
        assert (
            result.exit_code == 0 and "Example:" in result.output and "onnxquant " + command in result.output
        )


def test_report_and_suggested_rules_end_to_end(demo):
    q4 = demo / "w4.onnx"
    result = invoke(
        "convert",
        demo / "model.onnx",
        "--bits",
        "4",
        "--calib",
        "laplace",
        "--calib-data",
        demo / "calib.npz",
        "-o",
        q4,
        "--report",
        demo / "conv.html",
        "--suggest-rules",
        demo / "s.yaml",
        "--top-k",
        "2",
    )
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith(f"wrote {demo / 's.yaml'}"))
    before, after = (float(v) for v in __import__("re").findall(r"logits (\S+) -> (\S+) dB", line)[0])
    assert "measured" in line and after > before + 1.0
    report = demo / "r.html"
    result = CliRunner().invoke(
        main,
        [
            "report",
            str(demo / "model.onnx"),
            str(q4),
            "--data",
            str(demo / "eval.npz"),
            "--labels",
            "labels",
            "-o",
            str(report),
            "--json",
            str(demo / "r.json"),
            "--fail-under-sqnr",
            "60",
        ],
    )
    assert result.exit_code == 1 and "below 60" in result.output
    data = json.loads((demo / "r.json").read_text())
    assert data["outputs"][0]["name"] == "logits" and report.read_text().startswith("<!DOCTYPE html>")
    result = CliRunner().invoke(
        main,
        [
            "report",
            str(demo / "model.onnx"),
            str(q4),
            "--data",
            str(demo / "eval.npz"),
            "--labels",
            "nolabels",
            "-o",
            str(demo / "r2.html"),
        ],
    )
    assert result.exit_code == 2 and not (demo / "r2.html").exists()


def test_validate_exit_codes(demo):
    q8 = demo / "w8.onnx"
    assert (
        invoke(
            "convert", demo / "model.onnx", "--bits", "8", "--calib-data", demo / "calib.npz", "-o", q8
        ).exit_code
        == 0
    )
    result = invoke("validate", q8, "--data", demo / "eval.npz", "--json", demo / "v.json")
    assert result.exit_code == 0 and "PASSED" in result.output, result.output
    assert json.loads((demo / "v.json").read_text())["passed"] is True
    result = CliRunner().invoke(
        main, ["validate", str(demo / "model.onnx"), "--data", str(demo / "eval.npz")]
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_a_bug_of_ours_exits_70_with_its_traceback(demo, monkeypatch):
    from onnxquant import api
    from onnxquant.errors import InternalError

    def broken(*args, **kwargs):
        raise InternalError("plan and graph disagree on tensor t")

    monkeypatch.setattr(api, "fold", broken)
    result = CliRunner().invoke(main, ["fold", str(demo / "model.onnx"), "-o", str(demo / "f.onnx")])
    assert result.exit_code == 70
    assert (
        "Traceback" in result.output
        and "internal error: plan and graph disagree on tensor t" in result.output
    )
    assert not (demo / "f.onnx").exists()


def _opset9_matmul(folder: Path) -> Path:
    """A MatMul model at opset 9: loading it logs a warning (the opset is lifted to 13)."""
    w = onnx.numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 9)], ir_version=4)
    onnx.save(model, folder / "old.onnx")
    return folder / "old.onnx"


def test_warnings_come_after_the_error_line(tmp_path):
    """DESIGN.md: on exit 2 the error line is first or alone; a warning logged on the way (here the opset
    lift) used to come first."""
    model = _opset9_matmul(tmp_path)
    np.savez(tmp_path / "bad.npz", x=np.ones((2, 5), np.float32))
    np.savez(tmp_path / "good.npz", x=np.ones((2, 3), np.float32))
    lifted = f"WARNING onnxquant.model: {model}: opset 9 lifted to 13 by onnx.version_converter"
    argv = ["convert", str(model), "-o", str(tmp_path / "q.onnx"), "--calib-data"]
    failed = CliRunner().invoke(main, [*argv, str(tmp_path / "bad.npz")])
    shape = "key 'x' has shape (2, 5) but input 'x' needs (N, 3): dim 1 must be 3"
    assert failed.exit_code == 2
    assert failed.stderr.splitlines() == [f"error: {tmp_path / 'bad.npz'}: {shape}", lifted]
    passed = CliRunner().invoke(main, [*argv, str(tmp_path / "good.npz")])
    assert passed.exit_code == 0 and passed.stderr.splitlines() == [lifted]
    usage = CliRunner().invoke(main, [*argv[:4], "--report", str(tmp_path / "r.html")])
    assert usage.exit_code == 2 and usage.stderr.splitlines()[1:] == [lifted]
    assert usage.stderr.startswith("error: --report needs --calib-data")


def test_first_line_of_an_empty_message_is_the_type_name():
    from onnxquant.errors import first_line

    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("\n\n  real cause\nmore")) == "real cause"


def test_a_table_written_by_convert_reproduces_the_model_byte_for_byte(demo):
    first, second, table = demo / "a.onnx", demo / "b.onnx", demo / "t.json"
    result = invoke(
        "convert",
        demo / "model.onnx",
        "--bits",
        "4",
        "--calib",
        "laplace",
        "--bias-correction",
        "--calib-data",
        demo / "calib.npz",
        "-o",
        first,
        "--table-out",
        table,
    )
    assert result.exit_code == 0, result.output
    entries = json.loads(table.read_text())["tensors"]
    weights = {name for name, e in entries.items() if e.get("kind") == "weight"}
    assert weights == {"conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight", "fc.weight"}
    assert all(isinstance(entries[w]["scale"], list) and entries[w]["axis"] is not None for w in weights)
    result = invoke("convert", demo / "model.onnx", "--bits", "4", "--table", table, "-o", second)
    assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()


def test_calibrate_writes_the_whole_model_and_tensorrt_keeps_activations(demo):
    table, cache = demo / "t.json", demo / "c.cache"
    result = invoke("calibrate", demo / "model.onnx", "--calib-data", demo / "calib.npz", "-o", table)
    assert result.exit_code == 0, result.output
    kinds = [e.get("kind", "activation") for e in json.loads(table.read_text())["tensors"].values()]
    assert kinds.count("weight") == 5 and kinds.count("activation") == 7
    assert "calibrated 7 activations with kl and 5 weights" in result.output
    result = invoke("table", table, "--format", "tensorrt", "-o", cache)
    assert result.exit_code == 0 and "wrote 7 activations as tensorrt" in result.output
    assert len(cache.read_text().splitlines()) == 1 + 7

"""What the report says it compared, its notes and hints, its layout, and the CLI lines around it."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from report_models import (
    DIGITS,
    batches,
    convert,
    digits_converted,
    digits_data,
    fragile_model,
    random_inputs,
)

from onnxquant import __version__
from onnxquant.cli import main
from onnxquant.cli_options import common
from onnxquant.cli_output import folded_line, print_convert_summary
from onnxquant.errors import BadModelError
from onnxquant.passes.base import Outcome
from onnxquant.progress import progress_iter
from onnxquant.report import build_report, render_html, render_text
from onnxquant.report.calibview import CalibView
from onnxquant.report.metrics import ErrorAccumulator, Metrics
from onnxquant.report.qdq import layer_label
from onnxquant.report.svg import calib_plot, layers_plot

ABOUT = {
    "float_model": "models/float.onnx",
    "quant_model": "out/q.onnx",
    "data": "eval.npz",
    "rules": "default",
}


@pytest.fixture(scope="module")
def digits_report():
    r = digits_converted(4, 4)
    return build_report(
        r.float_model, r.model, digits_data(), sensitivity_samples=16, table=r.table, about=ABOUT
    )


def test_report_names_models_settings_date_and_version(digits_report):
    about = json.loads(json.dumps(digits_report.to_json()))["about"]
    assert {k: about[k] for k in ABOUT} == ABOUT
    assert about["weights"] == "4 bits ×5" and about["activations"] == "4 bits ×7"
    assert about["method"] == "minmax" and about["onnxquant"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", about["date"])
    text = render_text(digits_report).splitlines()
    assert "  float model: models/float.onnx" in text and "  quantized model: out/q.onnx" in text
    assert "  weights: 4 bits ×5" in text and "  calibration: minmax" in text
    assert f"  made {about['date']} by onnxquant {__version__}" in text
    page = render_html(digits_report)
    assert '<td class="name">models/float.onnx</td>' in page and f"onnxquant {__version__}" in page


def test_models_in_memory_are_named_so():
    r = digits_converted(4, 4)
    rep = build_report(r.float_model, r.model, digits_data(), sensitivity_samples=0)
    assert rep.about["float_model"] == "in memory" and rep.about["method"] == "not recorded in the model"


def test_missing_calibration_histograms_are_explained(digits_report):
    assert any(
        n.startswith("calibration histograms not shown") and "report --stats FILE" in n
        for n in digits_report.notes
    )


def test_swapped_models_are_refused():
    r = digits_converted(4, 4)
    with pytest.raises(BadModelError, match="already quantized; the two models look swapped"):
        build_report(r.model, r.float_model, digits_data(), sensitivity_samples=0)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_swapped_models_and_calib_reader_are_one_line_exit_2(tmp_path):
    q = tmp_path / "q.onnx"
    onnx.save(digits_converted(4, 4).model, q)
    out = tmp_path / "r.html"
    result = _cli("report", q, DIGITS / "model.onnx", "--data", DIGITS / "eval.npz", "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already quantized" in lines[0]
    assert not out.exists()
    result = _cli(
        "report", DIGITS / "model.onnx", q, "--data", DIGITS / "eval.npz", "-o", out, "--calib-reader", "m:f"
    )
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip().splitlines() == [
        (
            "error: --calib-reader m:f: report reads its evaluation data from --data only; accepted: --data "
            "PATH (.npz/.npy/directory) without --calib-reader"
        )
    ]


def test_cli_report_suggests_labels_when_the_data_has_them(tmp_path):
    q = tmp_path / "q.onnx"
    onnx.save(digits_converted(4, 4).model, q)
    args = ["report", DIGITS / "model.onnx", q, "--data", DIGITS / "eval.npz", "--sensitivity-samples", "1"]
    result = _cli(*args, "--max-samples", "64", "-o", tmp_path / "r.html", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    hint = "the data holds a 'labels' array: add --labels labels for both models' accuracy"
    assert f"note: {hint}" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert hint in doc["notes"] and doc["about"]["quant_model"] == str(q)


def test_infinite_error_gives_minus_infinity_not_a_crash(digits_report):
    acc = ErrorAccumulator()
    acc.update(np.ones(4, np.float32), np.array([1, 1, np.inf, 1], np.float32))
    assert acc.result().sqnr_db == -math.inf
    layer = dataclasses.replace(digits_report.layers[0], sensitivity={"logits": acc.result()})
    rep = dataclasses.replace(digits_report, layers=(layer, *digits_report.layers[1:]))
    assert "−∞" in render_html(rep) and rep.worst(1)[0].name == layer.name
    render_text(rep)


def test_layer_labels_are_the_exporters_names():
    assert layer_label("Add_162", "Add", "/layer1/Add_output_0") == "/layer1/Add_output_0"
    assert layer_label("node_Add_3", "Add", "onnx::Add_9") == "onnx::Add_9"
    assert layer_label("Add.162", "Add", "x") == "x"
    assert layer_label("/layer1/Add", "Add", "/layer1/Add_output_0") == "/layer1/Add"
    assert layer_label("Add_162", "Add", "523") == "Add_162"
    model = fragile_model()
    for node in model.graph.node:
        if node.name in ("conv_a", "conv_c"):
            node.name = ""
    r = convert(model, batches(random_inputs(16), 16), wbits=8, abits=8)
    rep = build_report(r.float_model, r.model, batches(random_inputs(8, 2), 8), sensitivity_samples=4)
    labels = {la.op_type + ":" + la.output: la.shown for la in rep.layers}
    assert labels["Conv:a_out"] == "a_out" and labels["Conv:f_out"] == "fragile"
    text = render_text(rep, worst=10)
    assert re.search(r"^a_out\s+Conv", text, re.MULTILINE), text


def test_per_output_sensitivity_columns_are_shown(digits_report):
    two = tuple(dataclasses.replace(o, name=n) for o, n in zip(digits_report.outputs * 2, ("a", "b")))
    m = digits_report.outputs[0].metrics
    worse = dataclasses.replace(m, sqnr_db=3.0)
    layers = tuple(dataclasses.replace(la, sensitivity={"a": m, "b": worse}) for la in digits_report.layers)
    rep = dataclasses.replace(digits_report, outputs=two, layers=layers)
    text = render_text(rep)
    assert re.search(r"sens\. dB\s+sens\. a dB\s+sens\. b dB\s+isolated dB", text), text
    assert re.search(rf"\s3\.00\s+{m.sqnr_db:.2f}\s+3\.00\s", text), text
    assert '<th data-type="num">sens. b dB</th>' in render_html(rep)


def test_tables_fit_a_1400px_window(digits_report):
    page = render_html(digits_report)
    for ident in ("layers-table", "tensors-table"):
        head = re.search(rf'id="{ident}"><thead><tr>(.*?)</tr>', page).group(1)
        assert head.count("<th") <= 11, ident
    assert re.search(r"td\.name[^{]*\{[^}]*overflow-wrap: anywhere", page)
    assert re.search(r"table\.sortable th \{ white-space: normal", page)


def _text_baselines(svg: str) -> list[float]:
    return [float(y) for y in re.findall(r'<text x="[^"]+" y="([-\d.]+)"', svg)]


def test_plot_labels_stay_above_the_lines(digits_report):
    view = CalibView(
        tensor="t",
        lo=0.0,
        hi=4.0,
        counts=np.arange(1, 65, dtype=np.int64),
        bits=4,
        symmetric=False,
        ranges={"minmax": (0.0, 4.0), "kl": (0.0, 3.1), "mse": (0.0, 2.5)},
        chosen="kl",
        chosen_range=(0.0, 3.1),
    )
    svg = calib_plot(view)
    first_line = min(float(y) for y in re.findall(r'<line x1="[\d.]+" x2="[\d.]+" y1="([\d.]+)" y2', svg))
    chosen = re.search(r'<text x="[\d.]+" y="([\d.]+)"[^>]*>chosen: kl', svg)
    assert chosen and float(chosen.group(1)) + 3 <= first_line, svg
    plot = layers_plot(digits_report)
    top_tick = min(float(y) for y in re.findall(r'<line x1="56" x2="\d+" y1="([\d.]+)"', plot))
    legend = re.search(r'<text x="[\d.]+" y="([\d.]+)">sensitivity: output SQNR', plot)
    points = [float(y) for y in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)" r="3.2"', plot)]
    assert float(legend.group(1)) + 3 <= min(top_tick, *points), plot


def test_long_fold_lists_are_summarized():
    folded = [Outcome("fold_conv_bn", (f"bn{i}", f"conv{i}"), True, "") for i in range(18)]
    folded += [Outcome("bn_to_affine", (f"bn_x{i}",), True, "") for i in range(2)]
    assert folded_line(folded) == "folded 20 nodes: 2 by bn_to_affine, 18 by fold_conv_bn (-v lists them)"
    assert folded_line(folded[:2]) == "folded 2 nodes: bn0 into conv0, bn1 into conv1"


def test_convert_summary_says_a_float_nodes_output_is_quantized(capsys, tmp_path):
    r = digits_converted(4, 4)
    print_convert_summary(r, 100, 50, tmp_path / "q.onnx")
    out = capsys.readouterr().out
    flat = next(t for t in render_report_tensors(r) if t.name == "flat_out")
    assert flat.bits == 4
    assert (
        "  flatten (Flatten): op type Flatten not in quantize_ops; its output 'flat_out' is quantized (A4) "
        "as the next layer's input"
    ) in out.splitlines()


def render_report_tensors(r):
    return build_report(r.float_model, r.model, digits_data(), sensitivity_samples=0).tensors


def test_report_says_what_it_will_cost(capsys):
    r = digits_converted(4, 4)
    build_report(r.float_model, r.model, digits_data(), sensitivity_samples=8, progress=True)
    err = capsys.readouterr().err
    assert (
        "report: 8 more passes: both models on 450 samples, then 7 isolated-sensitivity passes (one per "
        "layer) on 8; cheaper: --max-samples N, and `onnxquant report --sensitivity-samples N` for the subset"
    ) in err


def test_metrics_are_unchanged_for_finite_errors():
    acc = ErrorAccumulator()
    acc.update(np.array([1.0, 2.0], np.float32), np.array([1.5, 2.0], np.float32))
    assert isinstance(acc.result(), Metrics) and acc.result().sqnr_db == pytest.approx(
        10 * math.log10(5 / 0.25)
    )


def test_progress_counts_samples_of_a_sized_source(capsys):
    data = digits_data()
    seen = sum(len(b["input"]) for b in progress_iter(data, True, "report: float vs quantized"))
    err = capsys.readouterr().err
    assert seen == 450 and "report: float vs quantized:" in err and "/450 [" in err and "sample/s" in err
    assert list(progress_iter([1, 2], False, "quiet")) == [1, 2] and capsys.readouterr().err == ""


def test_interrupted_message_starts_its_own_line():
    @click.command()
    @common
    def slow():
        for i in progress_iter(list(range(5)), True, "calibration pass 1"):
            if i == 2:
                raise KeyboardInterrupt

    result = CliRunner().invoke(slow, [])
    assert result.exit_code == 130
    text = result.stderr if hasattr(result, "stderr") and result.stderr else result.output
    before, found, _ = text.partition("interrupted")
    assert found and "calibration pass 1" in before and before.endswith(("\r", "\n")), repr(text)

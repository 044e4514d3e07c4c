"""The `onnxquant` command: parse options, call `onnxquant.api`, print. Nothing else lives here."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from onnxquant.calib.methods import METHODS, WEIGHT_METHODS
from onnxquant.errors import CheckFailed, OnnxQuantError
from onnxquant.quant import MAX_BITS, MIN_BITS

log = logging.getLogger("onnxquant")

CALIB_METHODS = tuple(METHODS)
BITS = click.IntRange(MIN_BITS, MAX_BITS)
MODEL = click.Path(exists=True, dir_okay=True, path_type=Path)


def _common(fn):
    """-v and --debug on every command; OnnxQuantError becomes one line on stderr and its exit code."""
    @click.option("-v", "--verbose", count=True, help="More logging (-vv for debug logging).")
    @click.option("--debug", is_flag=True, help="Show Python tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, verbose: int = 0, debug: bool = False, **kwargs):
        level = logging.WARNING - 10 * min(verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("onnxquant").setLevel(level)
        try:
            return fn(*args, **kwargs)
        except OnnxQuantError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing written", err=True)
            sys.exit(130)
    return wrapper


def _data_options(fn):
    for option in reversed([
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Samples per inference batch."),
        click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most N samples."),
        click.option("--calib-reader", metavar="MODULE:FUNCTION", default=None,
                     help="A function returning an iterable of {input_name: array} batches."),
        click.option("--image-size", metavar="HxW", default=None, help="Resize images (image directories)."),
        click.option("--image-mean", metavar="M[,M,M]", default=None, help="Per-channel mean after scaling."),
        click.option("--image-std", metavar="S[,S,S]", default=None, help="Per-channel std after scaling."),
        click.option("--image-layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
                     help="Layout of the model's image input."),
    ]):
        fn = option(fn)
    return fn


def _open_data(model, path, batch_size, max_samples, calib_reader, image_size, image_mean, image_std,
               image_layout, extra_keys=()):
    from onnxquant.calib.readers import ImageOptions, input_specs, open_data

    if path is None and calib_reader is None:
        return None
    images = None
    if any(v is not None for v in (image_size, image_mean, image_std, image_layout)):
        images = ImageOptions(
            size=_parse_floats(image_size, "--image-size", "x", int) if image_size else None,
            mean=_parse_floats(image_mean, "--image-mean") if image_mean else (0.0, 0.0, 0.0),
            std=_parse_floats(image_std, "--image-std") if image_std else (1.0, 1.0, 1.0),
            layout=image_layout or "NCHW")
    return open_data(path, input_specs(model), batch_size=batch_size, max_samples=max_samples,
                     image_options=images, reader=calib_reader, extra_keys=extra_keys)


def _suggest_options(fn):
    for option in reversed([
        click.option("--suggest-rules", type=click.Path(path_type=Path), default=None,
                     help="Write a rule file keeping the most sensitive layers at --high-bits."),
        click.option("--target-sqnr", type=float, default=None,
                     help="Keep the fewest layers predicted to reach this output SQNR (dB)."),
        click.option("--top-k", type=click.IntRange(min=0), default=None,
                     help="Keep this many layers (default 3 without --target-sqnr)."),
        click.option("--high-bits", type=BITS, default=8, show_default=True, help="Width of the kept layers."),
    ]):
        fn = option(fn)
    return fn


def _parse_floats(text: str, flag: str, sep: str = ",", kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(sep))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected numbers separated by {sep!r}", param_hint=flag) from None


def _load(path: Path):
    from onnxquant.model import load_model

    return load_model(path)


def _rules(rules_path, **cli):
    from onnxquant.rules import load_rules

    return load_rules(rules_path).with_cli(**cli)


def _bits(bits, wbits, abits):
    if bits is not None and (wbits is not None or abits is not None):
        raise click.UsageError("use --bits N, or --wbits N and --abits N, not both")
    return (wbits if wbits is not None else bits), (abits if abits is not None else bits)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxquant")
def main() -> None:
    """onnxquant: fold, calibrate and quantize ONNX models to Q/DQ form (2-8 bits).

    \b
    Example:
      onnxquant convert model.onnx --bits 4 --calib laplace --calib-data calib.npz
    """


@main.command()
@click.argument("model", type=MODEL)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Quantized model path [default: MODEL.int<bits>.onnx beside MODEL].")
@click.option("--bits", type=BITS, default=None, help="Weight and activation width.")
@click.option("--wbits", type=BITS, default=None, help="Weight width.")
@click.option("--abits", type=BITS, default=None, help="Activation width.")
@click.option("--calib", "method", type=click.Choice(CALIB_METHODS), default=None,
              help="Activation calibration method [default: the rule file's].")
@click.option("--calib-data", type=click.Path(exists=True, path_type=Path), default=None,
              help=".npz/.npy file, a directory of them, or a directory of images.")
@click.option("--rules", "rules_path", default=None, help="Rule file (YAML) or preset: default, tensorrt.")
@click.option("--table", "table_in", type=click.Path(exists=True, path_type=Path), default=None,
              help="Quantize from this calibration table (JSON or TensorRT cache) instead of calibrating.")
@click.option("--table-out", type=click.Path(path_type=Path), default=None, help="Write the calibration table.")
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.99, show_default=True,
              help="Percentile for --calib percentile.")
@click.option("--wcalib", type=click.Choice(WEIGHT_METHODS), default=None,
              help="Weight range method [default: the rule file's, minmax].")
@click.option("--bias-correction", type=click.Choice(["mean", "full"]), is_flag=False, flag_value="mean",
              default=None, help="Correct each weight channel's mean (and with =full its spread), ACIQ eq. 12-13.")
@click.option("--bit-alloc", type=click.Choice(["weights", "activations", "both"]), default=None,
              help="Per-channel widths at the same average width (ACIQ eq. 10-11); activations need "
                   "minmax, laplace or gauss.")
@click.option("--bins", type=click.IntRange(min=8), default=2048, show_default=True,
              help="Histogram resolution for percentile, mse and kl: at least this many bins over [0, max|x|].")
@click.option("--save-stats", type=click.Path(path_type=Path), default=None,
              help="Save the calibration statistics (to merge shards, or for the report's calibration view).")
@click.option("--load-stats", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use saved (possibly merged) statistics instead of running the model on data.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write an accuracy-diff report (HTML) of this conversion; needs --calib-data.")
@_suggest_options
@_data_options
@_common
def convert(model, output, bits, wbits, abits, method, calib_data, rules_path, table_in, table_out, percentile,
            wcalib, bias_correction, bit_alloc, bins, save_stats, load_stats, report_path, suggest_rules,
            target_sqnr, top_k, high_bits, **data_opts):
    """Fold, calibrate and insert Q/DQ: write a quantized model ONNX Runtime and TensorRT run.

    \b
    Example:
      onnxquant convert calib_data/digits/model.onnx --bits 4 --calib laplace \\
          --calib-data calib_data/digits/calib.npz -o digits.int4.onnx
    """
    from onnxquant import api, tables
    from onnxquant.model import check_output_path, file_size, save_model

    wbits, abits = _bits(bits, wbits, abits)
    out = output or model.with_name(f"{model.stem}.int{abits or wbits or 8}.onnx")
    for path in (out, table_out, save_stats, report_path, suggest_rules):
        if path is not None:
            check_output_path(path, model)
    if suggest_rules is not None and report_path is None:
        raise click.UsageError("--suggest-rules needs --report: the suggestion comes from the sensitivity ranking")
    rules = _rules(rules_path, wbits=wbits, abits=abits, method=method, wmethod=wcalib)
    float_model = _load(model)
    table = tables.load_table(table_in) if table_in else None
    stats = tables.load_stats(load_stats) if load_stats else None
    data = _open_data(float_model, calib_data, **data_opts)
    if report_path is not None and data is None:
        raise click.UsageError("--report needs --calib-data (or --calib-reader) to compare the models on")
    result = api.convert(float_model, rules, data=data, table=table, stats=stats, progress=sys.stderr.isatty(),
                         bias_correction=bias_correction, bit_alloc=bit_alloc, bins=bins,
                         percentile=percentile)
    report = suggestion = None
    if report_path is not None:
        report = api.report(result.float_model, result.model, data, stats=result.stats, table=result.table,
                            progress=sys.stderr.isatty())
        if suggest_rules is not None:
            suggestion = api.suggest(report, float_model, rules, data, target_sqnr=target_sqnr, k=top_k,
                                     high_bits=high_bits, bias_correction=bias_correction,
                                     bit_alloc=bit_alloc, bins=bins, percentile=percentile)
    save_model(result.model, out)
    if table_out is not None:
        tables.save_table(result.table, table_out)
    if save_stats is not None and result.stats:
        tables.save_stats(result.stats, save_stats)
    if report is not None:
        _write_report(report, report_path, None)
    if suggestion is not None:
        _write_suggestion(suggestion, suggest_rules)
    _print_convert_summary(result, file_size(model), file_size(out), out)


def _print_convert_summary(result, size_in: int, size_out: int, out: Path) -> None:
    s = result.summary
    folded = ", ".join(f"{o.nodes[0]} into {o.nodes[1]}" if len(o.nodes) > 1 else o.nodes[0]
                       for o in result.folded) or "none"
    click.echo(f"folded {len(result.folded)} nodes: {folded}")
    click.echo("weights quantized: " + (", ".join(f"{n} at {b} bits" for b, n in sorted(s.weights.items()))
                                        or "none"))
    click.echo("activations quantized: " + (", ".join(f"{n} at {b} bits" for b, n in sorted(s.activations.items()))
                                            or "none"))
    if s.float_nodes:
        click.echo(f"left in float: {len(s.float_nodes)} nodes")
        for name, op, reason in s.float_nodes[:12]:
            click.echo(f"  {name} ({op}): {reason}")
        if len(s.float_nodes) > 12:
            click.echo(f"  ... and {len(s.float_nodes) - 12} more (see `onnxquant inspect`)")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"size: {_human(size_in)} -> {_human(size_out)} ({size_out / size_in:.3f}x); wrote {out}")


@main.command()
@click.argument("model", type=MODEL)
@click.option("--calib-data", type=click.Path(exists=True, path_type=Path), default=None,
              help=".npz/.npy file, a directory of them, or a directory of images.")
@click.option("--calib", "method", type=click.Choice(CALIB_METHODS), default=None,
              help="Calibration method [default: the rule file's].")
@click.option("--bits", type=BITS, default=None, help="Activation width.")
@click.option("--rules", "rules_path", default=None, help="Rule file (YAML) or preset: default, tensorrt.")
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.99, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Table path (.json).")
@_data_options
@_common
def calibrate(model, calib_data, method, bits, rules_path, percentile, output, **data_opts):
    """Calibrate activation ranges and write a calibration table (JSON).

    \b
    Example:
      onnxquant calibrate calib_data/digits/model.onnx --calib-data calib_data/digits/calib.npz \\
          --calib kl -o table.json
    """
    from onnxquant import api
    from onnxquant.model import check_output_path
    from onnxquant.tables import save_table

    check_output_path(output, model)
    rules = _rules(rules_path, abits=bits, method=method)
    float_model = _load(model)
    folded, _, plan, _ = api.prepare(float_model, rules)
    data = _open_data(folded, calib_data, **data_opts)
    if data is None:
        raise click.UsageError("calibrate needs --calib-data PATH or --calib-reader MODULE:FUNCTION")
    table, _ = api.calibrate(folded, plan, data, progress=sys.stderr.isatty(), percentile=percentile)
    save_table(table, output)
    click.echo(f"calibrated {len(table.tensors)} tensors with {table.method}; wrote {output}")


@main.command()
@click.argument("table", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["json", "tensorrt", "ort"]), required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@_common
def table(table, fmt, output):
    """Convert a calibration table between formats (JSON, TensorRT cache, ONNX Runtime).

    \b
    Example:
      onnxquant table table.json --format tensorrt -o calibration.cache
    """
    from onnxquant.model import check_output_path
    from onnxquant.tables import load_table, save_table

    check_output_path(output, table)
    loaded = load_table(table)
    save_table(loaded, output, fmt)
    click.echo(f"wrote {len(loaded.tensors)} tensors as {fmt} to {output}")


@main.command()
@click.argument("model", type=MODEL)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--rules", "rules_path", default=None, help="Rule file (YAML) or preset: default, tensorrt.")
@_common
def fold(model, output, rules_path):
    """Run the rewrite passes (BatchNorm folding, ...) alone; no quantization.

    \b
    Example:
      onnxquant fold calib_data/digits/model.onnx -o folded.onnx
    """
    from onnxquant import api
    from onnxquant.model import check_output_path, save_model

    check_output_path(output, model)
    folded, outcomes = api.fold(_load(model), _rules(rules_path))
    save_model(folded, output)
    applied = [o for o in outcomes if o.applied]
    click.echo(f"applied {len(applied)} rewrites; wrote {output}")
    for o in outcomes:
        click.echo(f"  {'fold' if o.applied else 'keep'} [{o.pass_name}] {o.reason}")


@main.command()
@click.argument("model", type=MODEL)
@click.option("--rules", "rules_path", default=None, help="Rule file (YAML) or preset: default, tensorrt.")
@click.option("--bits", type=BITS, default=None, help="Weight and activation width.")
@_common
def inspect(model, rules_path, bits):
    """Show what would be folded and quantized, at which widths, and why not.

    \b
    Example:
      onnxquant inspect calib_data/digits/model.onnx --rules tensorrt
    """
    from onnxquant import api

    result = api.inspect(_load(model), _rules(rules_path, wbits=bits, abits=bits))
    click.echo("rewrites:")
    for o in result.outcomes:
        click.echo(f"  {'fold' if o.applied else 'keep'} [{o.pass_name}] {o.reason}")
    click.echo("nodes:")
    for d in result.plan.nodes:
        if d.quantize and d.weight:
            what = f"W{d.weights.bits} {d.weights.granularity} {d.weights.method}, A{d.activations.bits}"
        elif d.quantize:
            what = d.reason or f"A{d.activations.bits}"
        else:
            what = f"float: {d.reason}"
        click.echo(f"  {d.name} ({d.op_type}): {what}")
    click.echo(f"activation tensors with Q/DQ: {len(result.plan.activations)}")


@main.command()
@click.argument("float_model", type=MODEL)
@click.argument("quant_model", type=MODEL)
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="Evaluation data (.npz/.npy/directory), as for --calib-data.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="HTML report path.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write JSON.")
@click.option("--labels", "labels_key", default=None, help="Key of an integer labels array in the .npz data.")
@click.option("--sensitivity-samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Samples for the isolated (one layer quantized) sensitivity runs.")
@click.option("--stats", "stats_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Saved calibration statistics (convert/calibrate --save-stats) for the calibration view.")
@click.option("--rules", "rules_path", default=None,
              help="Rules the model was converted with (folding, and the base of --suggest-rules).")
@_suggest_options
@click.option("--fail-under-sqnr", type=float, default=None, help="Exit 1 when any output's SQNR is below DB.")
@_data_options
@_common
def report(float_model, quant_model, data_path, output, json_path, labels_key, sensitivity_samples, stats_path,
           rules_path, suggest_rules, target_sqnr, top_k, high_bits, fail_under_sqnr, **data_opts):
    """Compare a quantized model with its float original: per-layer error, sensitivity, outputs.

    \b
    Example:
      onnxquant report calib_data/digits/model.onnx digits.int4.onnx \\
          --data calib_data/digits/eval.npz --labels labels -o report.html
    """
    from onnxquant import api
    from onnxquant.model import check_output_path
    from onnxquant.tables import load_stats

    for path in (output, json_path, suggest_rules):
        if path is not None:
            check_output_path(path, float_model, quant_model)
    rules = _rules(rules_path)
    float_m, quant_m = api.fold(_load(float_model), rules)[0], _load(quant_model)
    extra = (labels_key,) if labels_key else ()
    data = _open_data(float_m, data_path, extra_keys=extra, **{**data_opts, "calib_reader": None})
    labels = data.extra(labels_key) if labels_key else None
    stats = load_stats(stats_path) if stats_path else None
    result = api.report(float_m, quant_m, data, labels=labels, sensitivity_samples=sensitivity_samples,
                        stats=stats, progress=sys.stderr.isatty())
    suggestion = None
    if suggest_rules is not None:
        from onnxquant.report import plan_suggestion
        from onnxquant.rules import dump_rules

        suggestion = plan_suggestion(result, dump_rules(rules), target_sqnr=target_sqnr, k=top_k,
                                     high_bits=high_bits)
        result.suggestion = suggestion
    _write_report(result, output, json_path)
    if suggestion is not None:
        _write_suggestion(suggestion, suggest_rules)
    _fail_under(result, fail_under_sqnr)


def _write_suggestion(suggestion, path: Path) -> None:
    from onnxquant.model import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(suggestion.rules, encoding="utf-8")
    gain = suggestion.measured or suggestion.predicted or {}
    kind = "measured" if suggestion.measured else "predicted"
    change = ", ".join(f"{name} {suggestion.before[name]:.1f} -> {db:.1f} dB" for name, db in gain.items()
                       if name in suggestion.before)
    click.echo(f"wrote {path}: {suggestion.k} layers at {suggestion.high_bits} bits; {kind} output SQNR {change}")


def _write_report(result, html_path: Path, json_path: Path | None) -> None:
    import json

    from onnxquant.model import atomic_write
    from onnxquant.report import render_html, render_text

    with atomic_write(html_path) as tmp:
        tmp.write_text(render_html(result), encoding="utf-8")
    if json_path is not None:
        with atomic_write(json_path) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=1, sort_keys=True), encoding="utf-8")
    click.echo(render_text(result))
    click.echo(f"wrote {html_path}" + (f" and {json_path}" if json_path else ""))


def _fail_under(result, threshold: float | None) -> None:
    if threshold is None:
        return
    failing = result.fails_under(threshold)
    if failing:
        raise CheckFailed(f"output SQNR below {threshold} dB: {', '.join(failing)}")


@main.command()
@click.argument("quant_model", type=MODEL)
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="Input data (.npz/.npy/directory), as for --calib-data.")
@click.option("--backend", type=click.Choice(["numpy", "cuda"]), default="numpy", show_default=True)
@click.option("--requant", type=click.Choice(["float", "fixed"]), default="float", show_default=True,
              help="float: float32 multiply like ONNX Runtime's CPU kernels; fixed: gemmlowp fixed point.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@_data_options
@_common
def validate(quant_model, data_path, backend, requant, json_path, **data_opts):
    """Execute the QDQ model in integer arithmetic and compare it with ONNX Runtime, node by node.

    \b
    Example:
      onnxquant validate digits.int8.onnx --data calib_data/digits/eval.npz --requant float
    """
    import json

    from onnxquant import api
    from onnxquant.model import atomic_write, check_output_path

    if json_path is not None:
        check_output_path(json_path, quant_model)
    model = _load(quant_model)
    data = _open_data(model, data_path, extra_keys=("labels",), **data_opts)
    result = api.validate(model, data, backend=backend, requant=requant)
    if json_path is not None:
        with atomic_write(json_path) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=1, sort_keys=True), encoding="utf-8")
    for line in result.summary_lines():
        click.echo(line)
    if not result.passed:
        raise CheckFailed("validate: the integer plan disagrees with ONNX Runtime beyond the criteria")


if __name__ == "__main__":
    main()

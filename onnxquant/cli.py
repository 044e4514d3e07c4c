"""The `onnxquant` command: parse options, call `onnxquant.api`, print. Nothing else lives here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from onnxquant import api, tables
from onnxquant.calib import stats_io
from onnxquant.cli_options import (
    BIAS_CHOICE,
    BIT_ALLOC_CHOICE,
    BITS,
    CALIB_CHOICE,
    FINITE_FLOAT,
    MODEL,
    PERCENTILE,
    WEIGHT_CHOICE,
    OneLineErrors,
    cli_model,
    cli_rules,
    common,
    data_options,
    open_cli_data,
    rules_file,
    rules_option,
    split_bits,
    suggest_options,
)
from onnxquant.cli_output import (
    fail_under,
    labels_hint,
    print_convert_summary,
    print_mixed_precision,
    report_about,
    report_data_options,
    report_extra_keys,
    write_json,
    write_report,
    write_suggestion,
)
from onnxquant.errors import CheckFailed
from onnxquant.mixed_precision import convert_to_target
from onnxquant.model import file_size, save_model
from onnxquant.outputs import Inputs, companion, guard_outputs, staged_outputs
from onnxquant.report import SuggestOptions
from onnxquant.rules.schema import FORMATS, LEVELS
from onnxquant.runtime import BACKENDS, REQUANT_MODES

log = logging.getLogger("onnxquant")


@click.group(name="onnxquant", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxquant")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug logging), for every command.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks, for every command.")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """onnxquant: fold, calibrate and quantize ONNX models to Q/DQ form (2-8 bits).

    \b
    Example:
      onnxquant convert model.onnx --bits 4 --calib laplace --calib-data calib.npz
    """
    ctx.obj = {"verbose": verbose, "debug": debug}


@main.command()
@click.argument("model", type=MODEL)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Quantized model path [default: MODEL.int<bits>.onnx beside MODEL].",
)
@click.option("--bits", type=BITS, default=None, help="Weight and activation width.")
@click.option("--wbits", type=BITS, default=None, help="Weight width.")
@click.option("--abits", type=BITS, default=None, help="Activation width.")
@click.option(
    "--calib",
    "method",
    type=CALIB_CHOICE,
    default=None,
    help="Activation calibration method [default: the rule file's].",
)
@click.option(
    "--calib-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help=".npz/.npy file, a directory of them, or a directory of images.",
)
@rules_option
@click.option(
    "--table",
    "table_in",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Quantize from this calibration table (JSON or TensorRT cache) instead of calibrating.",
)
@click.option(
    "--table-out", type=click.Path(path_type=Path), default=None, help="Write the calibration table."
)
@click.option(
    "--percentile",
    type=PERCENTILE,
    default=99.99,
    show_default=True,
    help="Percentile for --calib percentile.",
)
@click.option(
    "--wcalib",
    type=WEIGHT_CHOICE,
    default=None,
    help="Weight range method [default: the rule file's, minmax].",
)
@click.option(
    "--bias-correction",
    type=BIAS_CHOICE,
    is_flag=False,
    flag_value="mean",
    default=None,
    help="Correct each weight channel's mean (=mean; =full also its spread; ACIQ eq. 12-13), or each "
    "layer's measured output mean shift through its bias (=empirical).",
)
@click.option(
    "--weight-only",
    is_flag=True,
    help="Quantize the weights only; activations stay float (placement: weights; no calibration data).",
)
@click.option(
    "--cle",
    is_flag=True,
    help="Cross-layer equalization of consecutive layers' channel ranges (the equalize_layers pass).",
)
@click.option(
    "--format",
    "number_format",
    type=click.Choice(FORMATS),
    default=None,
    help="Number format of weights and activations: int codes, or FP8 (E4M3FN, E5M2) with one scale.",
)
@click.option(
    "--block-size",
    type=click.IntRange(2, 1 << 16),
    default=None,
    help="Weights per block along the input axis, each block its own scale (opset 21 block-wise).",
)
@click.option(
    "--pow2-scales", is_flag=True, help="Scales restricted to powers of two (shift requantization)."
)
@click.option(
    "--levels",
    type=click.Choice(LEVELS),
    default=None,
    help="Weight levels: uniform, additive powers of two (apot), or a k-means codebook (kmeans).",
)
@click.option(
    "--clusters",
    type=click.IntRange(2, 256),
    default=None,
    help="Codebook size for --levels kmeans [default: 2^bits].",
)
@click.option("--gptq", is_flag=True, help="Round weights with GPTQ's error compensation (calibration data).")
@click.option(
    "--smooth-quant",
    type=click.FloatRange(0, 1),
    is_flag=False,
    flag_value=0.5,
    default=None,
    metavar="ALPHA",
    help="Move activation outliers of MatMul/Gemm inputs into their weights (SmoothQuant; ALPHA 0.5).",
)
@click.option(
    "--bit-alloc",
    type=BIT_ALLOC_CHOICE,
    default=None,
    help="Per-channel widths at the same average width (ACIQ eq. 10-11); activations need "
    "minmax, laplace or gauss.",
)
@click.option(
    "--bins",
    type=click.IntRange(min=8),
    default=2048,
    show_default=True,
    help="Histogram resolution for percentile, mse and kl: at least this many bins over [0, max|x|].",
)
@click.option(
    "--save-stats",
    type=click.Path(path_type=Path),
    default=None,
    help="Save the calibration statistics (to merge shards, or for the report's calibration view).",
)
@click.option(
    "--load-stats",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Use saved (possibly merged) statistics instead of running the model on data.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write an accuracy-diff report (HTML) of this conversion; needs --calib-data.",
)
@suggest_options
@data_options
@common
def convert(
    model,
    output,
    bits,
    wbits,
    abits,
    method,
    calib_data,
    rules_path,
    table_in,
    table_out,
    percentile,
    wcalib,
    bias_correction,
    weight_only,
    cle,
    number_format,
    block_size,
    pow2_scales,
    levels,
    clusters,
    gptq,
    smooth_quant,
    bit_alloc,
    bins,
    save_stats,
    load_stats,
    report_path,
    suggest_rules,
    target_sqnr,
    top_k,
    high_bits,
    **data_opts,
):
    """Fold, calibrate and insert Q/DQ: write a quantized model ONNX Runtime and TensorRT run.

    \b
    Example:
      onnxquant convert calib_data/digits/model.onnx --bits 4 --calib laplace \\
          --calib-data calib_data/digits/calib.npz -o digits.int4.onnx
    """
    wbits, abits = split_bits(bits, wbits, abits)
    out = output or model.with_name(f"{model.stem}.int{abits or wbits or 8}.onnx")
    outputs = {"-o": out, "--table-out": table_out, "--save-stats": save_stats, "--report": report_path}
    guard_outputs(
        {**outputs, "--suggest-rules": suggest_rules, **companion("-o", out)},
        Inputs(
            paths={
                "--calib-data": calib_data,
                "--table": table_in,
                "--load-stats": load_stats,
                "--rules": rules_file(rules_path),
            },
            models={"MODEL": model},
            reader=data_opts["calib_reader"],
        ),
    )
    if suggest_rules is not None and report_path is None:
        raise click.UsageError(
            "--suggest-rules needs --report: the suggestion comes from the sensitivity ranking"
        )
    rules = cli_rules(
        rules_path,
        wbits=wbits,
        abits=abits,
        method=method,
        wmethod=wcalib,
        rounding="gptq" if gptq else None,
        smooth_quant=smooth_quant,
        bias_correction=bias_correction,
        equalize_layers=cle,
        weight_format=number_format,
        activation_format=number_format,
        block_size=block_size,
        pow2_scales=pow2_scales,
        levels=levels,
        clusters=clusters,
        weight_only=weight_only,
    )
    suggest = None
    if suggest_rules is not None:
        default_k = 3 if top_k is None and target_sqnr is None else top_k
        suggest = SuggestOptions(rules, k=default_k, target_sqnr=target_sqnr, high_bits=high_bits)
    # popped into api.convert's own frame: without --report nothing here holds the float model, which convert
    # then lets go of once the Q/DQ model exists (keep_float_model=False)
    handed = [cli_model(model)]
    float_model = handed[0] if report_path is not None else None
    table = tables.load_table(table_in) if table_in else None
    stats = stats_io.load_stats(load_stats) if load_stats else None
    data = open_cli_data(handed[0], calib_data, **data_opts)
    if report_path is not None and data is None:
        raise click.UsageError("--report needs --calib-data (or --calib-reader) to compare the models on")
    options = {"table": table, "stats": stats, "bit_alloc": bit_alloc, "bins": bins, "percentile": percentile}
    mixed = None
    if target_sqnr is not None and suggest is None:
        if data is None or table is not None:
            raise click.UsageError("--target-sqnr needs --calib-data (or --calib-reader) and no --table")
        result, mixed = convert_to_target(
            handed.pop(), rules, data=data, target_sqnr=target_sqnr, high_bits=high_bits, **options
        )
    else:
        result = api.convert(
            handed.pop(),
            rules,
            data=data,
            progress=sys.stderr.isatty(),
            keep_float_model=float_model is not None,
            **options,
        )
    report = None
    if report_path is not None:
        report = api.report(
            result.float_model,
            result.model,
            data,
            stats=result.stats,
            table=result.table,
            suggest=suggest,
            progress=sys.stderr.isatty(),
            about=report_about(model, out, calib_data or data_opts.get("calib_reader"), rules_path),
        )
        if suggest is not None:
            report = api.measure_suggestion(
                report,
                float_model,
                data,
                bit_alloc=bit_alloc,
                bins=bins,
                percentile=percentile,
            )
    with staged_outputs():
        save_model(result.model, out)
        if table_out is not None:
            tables.save_table(result.table, table_out)
        if save_stats is not None and result.stats:
            stats_io.save_stats(result.stats, save_stats)
        if report is not None:
            write_report(report, report_path, None)
        if report is not None and report.suggestion is not None:
            write_suggestion(report.suggestion, suggest_rules)
    print_convert_summary(result, file_size(model), file_size(out), out)
    if mixed is not None:
        print_mixed_precision(mixed)


@main.command()
@click.argument("model", type=MODEL)
@click.option(
    "--calib-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help=".npz/.npy file, a directory of them, or a directory of images.",
)
@click.option(
    "--calib",
    "method",
    type=CALIB_CHOICE,
    default=None,
    help="Calibration method [default: the rule file's].",
)
@click.option("--bits", type=BITS, default=None, help="Activation width.")
@rules_option
@click.option("--percentile", type=PERCENTILE, default=99.99, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Table path (.json).")
@data_options
@common
def calibrate(model, calib_data, method, bits, rules_path, percentile, output, **data_opts):
    """Calibrate activation and weight ranges and write a calibration table (JSON) of the whole model.

    \b
    Example:
      onnxquant calibrate calib_data/digits/model.onnx --calib-data calib_data/digits/calib.npz \\
          --calib kl -o table.json
    """
    guard_outputs(
        {"-o": output},
        Inputs(
            paths={"--calib-data": calib_data, "--rules": rules_file(rules_path)},
            models={"MODEL": model},
            reader=data_opts["calib_reader"],
        ),
    )
    rules = cli_rules(rules_path, abits=bits, method=method)
    float_model = cli_model(model)
    folded, _, plan, _ = api.prepare(float_model, rules)
    data = open_cli_data(folded, calib_data, **data_opts)
    if data is None:
        raise click.UsageError("calibrate needs --calib-data PATH or --calib-reader MODULE:FUNCTION")
    table, _ = api.calibrate(folded, plan, data, progress=sys.stderr.isatty(), percentile=percentile)
    table, _ = api.complete_table(folded, plan, table)
    tables.save_table(table, output)
    acts = len(table.activations())
    click.echo(
        f"calibrated {acts} activations with {table.method} and {len(table.tensors) - acts} weights; "
        f"wrote {output}"
    )


@main.command()
@click.argument("table", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(tuple(tables.FORMATS)), required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@common
def table(table, fmt, output):
    """Convert a calibration table between formats (JSON, TensorRT cache, ONNX Runtime).

    \b
    Example:
      onnxquant table table.json --format tensorrt -o calibration.cache
    """
    guard_outputs({"-o": output}, Inputs(paths={"TABLE": table}))
    loaded = tables.load_table(table)
    tables.save_table(loaded, output, fmt)
    acts, weights = len(loaded.activations()), len(loaded.tensors) - len(loaded.activations())
    held = f"{acts} activations" + (f" and {weights} weights" if weights and fmt != "tensorrt" else "")
    click.echo(f"wrote {held} as {fmt} to {output}")


@main.command()
@click.argument("model", type=MODEL)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@rules_option
@common
def fold(model, output, rules_path):
    """Run the rewrite passes (BatchNorm folding, ...) alone; no quantization.

    \b
    Example:
      onnxquant fold calib_data/digits/model.onnx -o folded.onnx
    """
    guard_outputs({"-o": output}, Inputs(paths={"--rules": rules_file(rules_path)}, models={"MODEL": model}))
    folded, outcomes = api.fold(cli_model(model), cli_rules(rules_path))
    save_model(folded, output)
    applied = [o for o in outcomes if o.applied]
    click.echo(f"applied {len(applied)} rewrites; wrote {output}")
    for o in outcomes:
        click.echo(f"  {'fold' if o.applied else 'keep'} [{o.pass_name}] {o.reason}")


@main.command()
@click.argument("model", type=MODEL)
@rules_option
@click.option("--bits", type=BITS, default=None, help="Weight and activation width.")
@common
def inspect(model, rules_path, bits):
    """Show what would be folded and quantized, at which widths, and why not.

    \b
    Example:
      onnxquant inspect calib_data/digits/model.onnx --rules tensorrt
    """
    result = api.inspect(cli_model(model), cli_rules(rules_path, wbits=bits, abits=bits))
    click.echo("rewrites:")
    for o in result.outcomes:
        click.echo(f"  {'fold' if o.applied else 'keep'} [{o.pass_name}] {o.reason}")
    click.echo("nodes:")
    equalized = {conv: tensor for tensor, conv in result.plan.equalized.items()}
    for d in result.plan.nodes:
        if d.quantize and d.weight:
            what = f"W{d.weights.bits} {d.weights.granularity} {d.weights.method}, A{d.activations.bits}"
        elif d.quantize:
            what = d.reason or f"A{d.activations.bits}"
        else:
            what = f"float: {d.reason}"
        if d.name in equalized:
            what += f"; input {equalized[d.name]!r} per channel, equalized into the weights where it pays"
        click.echo(f"  {d.name} ({d.op_type}): {what}")
    click.echo(f"activation tensors with Q/DQ: {len(result.plan.activations)}")


@main.command()
@click.argument("float_model", type=MODEL)
@click.argument("quant_model", type=MODEL)
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="Evaluation data (.npz/.npy/directory), as for --calib-data.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="HTML report path.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write JSON.")
@click.option("--labels", "labels_key", default=None, help="Key of an integer labels array in the .npz data.")
@click.option(
    "--sensitivity-samples",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Samples for the isolated (one layer quantized) sensitivity runs.",
)
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Saved calibration statistics (convert/calibrate --save-stats) for the calibration view.",
)
@click.option(
    "--rules",
    "rules_path",
    default=None,
    help="Rules the model was converted with (folding, and the base of --suggest-rules).",
)
@suggest_options
@click.option(
    "--fail-under-sqnr", type=FINITE_FLOAT, default=None, help="Exit 1 when any output's SQNR is below DB."
)
@data_options
@common
def report(
    float_model,
    quant_model,
    data_path,
    output,
    json_path,
    labels_key,
    sensitivity_samples,
    stats_path,
    rules_path,
    suggest_rules,
    target_sqnr,
    top_k,
    high_bits,
    fail_under_sqnr,
    **data_opts,
):
    """Compare a quantized model with its float original: per-layer error, sensitivity, outputs.

    \b
    Example:
      onnxquant report calib_data/digits/model.onnx digits.int4.onnx \\
          --data calib_data/digits/eval.npz --labels labels -o report.html
    """
    guard_outputs(
        {"-o": output, "--json": json_path, "--suggest-rules": suggest_rules},
        Inputs(
            paths={"--data": data_path, "--stats": stats_path, "--rules": rules_file(rules_path)},
            models={"FLOAT_MODEL": float_model, "QUANT_MODEL": quant_model},
        ),
    )
    rules = cli_rules(rules_path)
    float_m, quant_m = api.fold(cli_model(float_model), rules)[0], cli_model(quant_model)
    extra = report_extra_keys(labels_key)
    data = open_cli_data(float_m, data_path, extra_keys=extra, **report_data_options(data_opts))
    labels = data.extra(labels_key) if labels_key else None
    stats = stats_io.load_stats(stats_path) if stats_path else None
    suggest = None
    if suggest_rules is not None:
        suggest = SuggestOptions(rules, k=top_k, target_sqnr=target_sqnr, high_bits=high_bits)
    result = api.report(
        float_m,
        quant_m,
        data,
        labels=labels,
        sensitivity_samples=sensitivity_samples,
        stats=stats,
        suggest=suggest,
        progress=sys.stderr.isatty(),
        about=report_about(float_model, quant_model, data_path, rules_path),
        notes=labels_hint(data, labels_key),
    )
    with staged_outputs():
        write_report(result, output, json_path)
        if result.suggestion is not None:
            write_suggestion(result.suggestion, suggest_rules)
    fail_under(result, fail_under_sqnr)


@main.command()
@click.argument("quant_model", type=MODEL)
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="Input data (.npz/.npy/directory), as for --calib-data.",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="numpy", show_default=True)
@click.option(
    "--requant",
    type=click.Choice(REQUANT_MODES),
    default="float",
    show_default=True,
    help="float: float32 multiply like ONNX Runtime's CPU kernels; fixed: gemmlowp fixed point.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results as JSON."
)
@data_options
@common
def validate(quant_model, data_path, backend, requant, json_path, **data_opts):
    """Execute the QDQ model in integer arithmetic and compare it with ONNX Runtime, node by node.

    \b
    Example:
      onnxquant validate digits.int8.onnx --data calib_data/digits/eval.npz --requant float
    """
    guard_outputs(
        {"--json": json_path},
        Inputs(
            paths={"--data": data_path}, models={"QUANT_MODEL": quant_model}, reader=data_opts["calib_reader"]
        ),
    )
    model = cli_model(quant_model)
    data = open_cli_data(model, data_path, extra_keys=("labels",), **data_opts)
    result = api.validate(model, data, backend=backend, requant=requant)
    if json_path is not None:
        write_json(result, json_path)
    for line in result.summary_lines():
        click.echo(line)
    if not result.passed:
        raise CheckFailed("validate: the integer plan disagrees with ONNX Runtime beyond the criteria")


if __name__ == "__main__":
    main()

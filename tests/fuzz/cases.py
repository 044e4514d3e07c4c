"""The case families: hypothesis strategies that each draw one `Case` (a command on prepared files).

models   valid generated models through convert/calibrate/fold/inspect, and models with one defect
data     calibration data of the right and wrong shapes, dtypes, NaN/Inf, empty, as npz/npy/directory
rules    valid rule files and corrupted ones (unknown keys, wrong types, syntax, depth, alias bombs)
tables   JSON tables and TensorRT caches written by onnxquant, then one field or line corrupted
options  option combinations of every command, outputs colliding with inputs or each other
bytes    truncations, bit flips and splices of valid model, data, table and rule files
hangs    a FIFO given as an input (subprocess: an open() that blocks cannot be interrupted in process)
signals  SIGINT at a random moment of a convert with several outputs (subprocess)
"""

from __future__ import annotations

import yaml
from hypothesis import strategies as st

from fuzz.harness import DIR, Case
from fuzz.inputs import (
    DATA_KINDS,
    MODEL_EDITS,
    RULE_CORRUPTIONS,
    VALID_DATA,
    CacheEdit,
    MakeDir,
    MakeFifo,
    Mutate,
    RunCli,
    WriteBytes,
    WriteModel,
    byte_mutations,
    cache_edits,
    corrupt_rules,
    data_files,
    json_edits,
    model_with,
    valid_rules,
)
from fuzz.models import INPUT, ModelSpec, build_model, model_specs, value_names

METHODS = ("minmax", "percentile", "mse", "laplace", "gauss", "kl")


def d(name: str) -> str:
    return f"{DIR}/{name}"


def _names(spec: ModelSpec, *extra: str) -> set[str]:
    return value_names(build_model(spec)) | {"model.onnx", "model.data", *extra}


def _flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("-")}


def _finish(case: Case) -> Case:
    """Every case may blame its files (by name) and its flags."""
    case.names |= _flags(case.argv)
    case.names |= {a.rsplit("/", 1)[-1] for a in case.argv if a.startswith(DIR)}
    case.names |= {a for a in case.argv[1:] if len(a) >= 3 and not a.startswith(DIR) and not a.isdigit()}
    return case


@st.composite
def calib_options(draw, bits: bool = True) -> list[str]:
    argv = []
    if bits and draw(st.booleans()):
        argv += ["--bits", str(draw(st.integers(2, 8)))]
    if draw(st.booleans()):
        argv += ["--calib", draw(st.sampled_from(METHODS))]
    if draw(st.booleans()):
        argv += ["--batch-size", str(draw(st.integers(1, 5)))]
    if draw(st.booleans()):
        argv += ["--max-samples", str(draw(st.integers(1, 6)))]
    return argv


# --------------------------------------------------------------------------------------------- models


@st.composite
def model_cases(draw) -> Case:
    spec = draw(model_specs())
    command = draw(st.sampled_from(("convert", "calibrate", "fold", "inspect")))
    edit = draw(st.sampled_from((None,) * 4 + MODEL_EDITS))
    data, steps = data_files(spec, "ok", draw(st.integers(1, 8)), spec.seed)
    if edit is None:
        prepare = [WriteModel(spec), *steps]
    else:
        prepare = [WriteBytes("model.onnx", model_with(spec, edit).SerializeToString()), *steps]
    argv = {
        "convert": [
            "convert",
            d("model.onnx"),
            "--calib-data",
            d(data),
            "-o",
            d("out.onnx"),
            *draw(calib_options()),
        ],
        "calibrate": ["calibrate", d("model.onnx"), "--calib-data", d(data), "-o", d("t.json")],
        "fold": ["fold", d("model.onnx"), "-o", d("folded.onnx")],
        "inspect": ["inspect", d("model.onnx")],
    }[command]
    kind = f"defect:{edit}" if edit else f"valid:{command}"
    case = Case(
        "models", kind, spec.describe(), argv, prepare, _names(spec, data, "w.data"), valid=edit is None
    )
    return _finish(case)


# ----------------------------------------------------------------------------------------------- data


@st.composite
def data_cases(draw) -> Case:
    spec = draw(model_specs())
    kind = draw(st.sampled_from(DATA_KINDS))
    samples = draw(st.integers(1, 10))
    data, steps = data_files(spec, kind, samples, spec.seed)
    command = draw(st.sampled_from(("convert", "calibrate")))
    out = d("out.onnx") if command == "convert" else d("t.json")
    argv = [
        command,
        d("model.onnx"),
        "--calib-data",
        d(data),
        "-o",
        out,
        *draw(calib_options(command == "convert")),
    ]
    description = f"data {kind} ({samples} samples) for {spec.describe()}"
    names = _names(spec, data, "calib.npz", "calib.npy", "a.npz", "b.npz", INPUT, "input")
    valid = kind in VALID_DATA
    return _finish(Case("data", kind, description, argv, [WriteModel(spec), *steps], names, valid=valid))


# ---------------------------------------------------------------------------------------------- rules


@st.composite
def rules_cases(draw) -> Case:
    spec = draw(model_specs())
    doc = draw(valid_rules())
    how = draw(st.sampled_from((None, None, None) + RULE_CORRUPTIONS))
    text = (
        yaml.safe_dump(doc, sort_keys=True)
        if how is None
        else corrupt_rules(doc, how, draw(st.integers(0, 99)))
    )
    data, steps = data_files(spec, "ok", 6, spec.seed)
    command = draw(st.sampled_from(("convert", "fold", "inspect", "calibrate")))
    argv = {
        "convert": ["convert", d("model.onnx"), "--calib-data", d(data), "-o", d("out.onnx")],
        "calibrate": ["calibrate", d("model.onnx"), "--calib-data", d(data), "-o", d("t.json")],
        "fold": ["fold", d("model.onnx"), "-o", d("folded.onnx")],
        "inspect": ["inspect", d("model.onnx")],
    }[command] + ["--rules", d("rules.yaml")]
    names = _names(spec, "rules.yaml", *doc)
    kind = how or "valid"
    description = f"rules {kind}: {text[:120]!r} on {spec.describe()}"
    prepare = [WriteModel(spec), *steps, WriteBytes("rules.yaml", text.encode())]
    return _finish(Case("rules", kind, description, argv, prepare, names, valid=how is None))


# --------------------------------------------------------------------------------------------- tables


@st.composite
def table_cases(draw) -> Case:
    spec = draw(model_specs())
    data, steps = data_files(spec, "ok", 6, spec.seed)
    prepare = [WriteModel(spec), *steps]
    prepare.append(RunCli(("calibrate", d("model.onnx"), "--calib-data", d(data), "-o", d("t.json"))))
    source = draw(st.sampled_from(("json", "json", "tensorrt", "ort")))
    table = "t.json"
    if source != "json":
        table = "t.cache" if source == "tensorrt" else "t_ort.json"
        prepare.append(RunCli(("table", d("t.json"), "--format", source, "-o", d(table))))
    if source == "tensorrt":
        edit = draw(st.one_of(cache_edits, st.none()))
    elif source == "json":
        edit = draw(st.one_of(json_edits(), st.none()))
    else:
        edit = draw(st.one_of(byte_mutations, st.none()))
    if edit is not None:
        prepare.append(Mutate(table, edit))
    if draw(st.booleans()):
        fmt = draw(st.sampled_from(("json", "tensorrt", "ort")))
        argv = ["table", d(table), "--format", fmt, "-o", d("out." + fmt)]
    else:
        argv = ["convert", d("model.onnx"), "--table", d(table), "-o", d("out.onnx")]
        if draw(st.booleans()):
            argv += ["--bits", str(draw(st.integers(2, 8)))]
    kind = f"{source}:{type(edit).__name__ if edit else 'valid'}"
    if isinstance(edit, CacheEdit):
        kind = f"tensorrt:{edit.text.replace('{name}', 'T')}"
    elif edit is not None and hasattr(edit, "key"):
        kind = f"json:{edit.where}.{edit.key}"
    description = f"{source} table edited by {edit!r} on {spec.describe()}"
    names = _names(spec, table, "t.json", "tensors", "format", "version")
    if edit is not None and hasattr(edit, "key"):
        names.add(edit.key)
    return _finish(Case("tables", kind, description, argv, prepare, names, valid=edit is None))


# -------------------------------------------------------------------------------------------- options

OUTPUT_TARGETS = (
    "fresh",
    "fresh",
    "fresh",
    "model",
    "data",
    "external",
    "other_output",
    "directory",
    "no_dir",
)


def _target(kind: str, fresh: str, data: str, other: str | None) -> str:
    return {
        "fresh": d(fresh),
        "model": d("model.onnx"),
        "data": d(data),
        "external": d("model.data"),
        "other_output": d(other or fresh),
        "directory": d("adir"),
        "no_dir": d("missing/dir/" + fresh),
    }[kind]


@st.composite
def convert_options(draw, data: str) -> tuple[list[str], bool]:
    argv, valid = list(draw(calib_options(bits=False))), True
    width = draw(st.sampled_from(("bits", "split", "none", "bad")))
    if width == "bits":
        argv += ["--bits", str(draw(st.integers(2, 8)))]
    elif width == "split":
        argv += ["--wbits", str(draw(st.integers(2, 8))), "--abits", str(draw(st.integers(2, 8)))]
    elif width == "bad":
        argv += draw(st.sampled_from((["--bits", "9"], ["--bits", "0"], ["--bits", "4", "--wbits", "8"])))
        valid = False
    if draw(st.booleans()):
        argv += ["--wcalib", draw(st.sampled_from(("minmax", "laplace", "gauss")))]
    if draw(st.booleans()):
        argv += draw(st.sampled_from((["--bias-correction"], ["--bias-correction", "full"])))
    if draw(st.booleans()):
        argv += ["--bit-alloc", draw(st.sampled_from(("weights", "activations", "both")))]
    if draw(st.booleans()):
        argv += ["--bins", str(draw(st.sampled_from((7, 8, 64, 2048))))]
    if draw(st.booleans()):
        argv += ["--percentile", draw(st.sampled_from(("50", "99.9", "100", "nan", "101")))]
    if draw(st.booleans()):
        argv += ["--rules", draw(st.sampled_from(("default", "tensorrt", "nosuchpreset")))]
    return argv, valid


@st.composite
def option_cases(draw) -> Case:
    spec = draw(model_specs())
    data, steps = data_files(
        spec, draw(st.sampled_from(("ok", "ok_npy"))), draw(st.integers(2, 8)), spec.seed
    )
    command = draw(
        st.sampled_from(("convert", "convert", "calibrate", "table", "fold", "inspect", "report", "validate"))
    )
    prepare = [WriteModel(spec), MakeDir("adir")]
    if command not in ("fold", "inspect"):  # a file the command does not read is no input of it
        prepare += steps
    targets: list[str] = []

    def output(fresh: str, other: str | None = None) -> str:
        # `table` reads only its table: the model and data beside it are no inputs of it
        choices = [t for t in OUTPUT_TARGETS if command != "table" or t not in ("model", "data", "external")]
        targets.append(draw(st.sampled_from(choices)))
        return _target(targets[-1], fresh, data, other)

    valid = True
    if command == "convert":
        extra, ok = draw(convert_options(data))
        valid = valid and ok
        argv = ["convert", d("model.onnx"), "--calib-data", d(data), *extra]
        out = d("model.int8.onnx")  # the default beside the model
        if draw(st.integers(0, 4)):
            out = output("out.onnx", None)
            argv += ["-o", out]
        if draw(st.booleans()):
            argv += ["--table-out", output("t.json", out.rsplit("/", 1)[-1])]
        if draw(st.booleans()):
            argv += ["--save-stats", output("s.npz", "t.json")]
        if draw(st.integers(0, 3)) == 0:
            argv += ["--report", d("r.html"), "--suggest-rules", d("keep.yaml"), "--top-k", "1"]
    elif command == "calibrate":
        argv = [
            "calibrate",
            d("model.onnx"),
            "--calib-data",
            d(data),
            "-o",
            output("t.json", None),
        ]
        argv += draw(calib_options())
    elif command == "table":
        prepare.append(RunCli(("calibrate", d("model.onnx"), "--calib-data", d(data), "-o", d("t.json"))))
        fmt = draw(st.sampled_from(("json", "tensorrt", "ort")))
        argv = ["table", d("t.json"), "--format", fmt, "-o", output("out." + fmt, "t.json")]
    elif command == "fold":
        argv = ["fold", d("model.onnx"), "-o", output("f.onnx", None)]
        if draw(st.booleans()):
            argv += ["--rules", draw(st.sampled_from(("default", "tensorrt")))]
    elif command == "inspect":
        argv = ["inspect", d("model.onnx"), "--bits", str(draw(st.integers(2, 8)))]
        argv += ["--rules", draw(st.sampled_from(("default", "tensorrt")))]
        valid = True
    else:
        bits = str(draw(st.sampled_from((4, 8))))
        prepare.append(
            RunCli(("convert", d("model.onnx"), "--calib-data", d(data), "--bits", bits, "-o", d("q.onnx")))
        )
        if command == "report":
            argv = ["report", d("model.onnx"), d("q.onnx"), "--data", d(data)]
            argv += ["-o", output("r.html", None)]
            if draw(st.booleans()):
                argv += ["--json", output("r.json", "r.html")]
            if draw(st.booleans()):
                argv += ["--sensitivity-samples", str(draw(st.integers(1, 4)))]
            if draw(st.booleans()):
                argv += ["--fail-under-sqnr", str(draw(st.sampled_from((-100, 0, 200))))]
        else:
            argv = ["validate", d("q.onnx"), "--data", d(data)]
            argv += ["--requant", draw(st.sampled_from(("float", "fixed")))]
            if draw(st.booleans()):
                argv += ["--json", output("v.json", None)]
    names = _names(spec, data, "q.onnx", "t.json", "adir", "missing", "dir")
    valid = valid and all(t == "fresh" for t in targets)
    description = f"{command} with outputs {targets} on {spec.describe()}"
    kind = f"{command}:" + "+".join(sorted(set(targets) - {"fresh"}) or ["fresh"])
    return _finish(Case("options", kind, description, argv, prepare, names, valid=valid))


# ---------------------------------------------------------------------------------------------- bytes


@st.composite
def byte_cases(draw) -> Case:
    spec = draw(model_specs())
    data, steps = data_files(spec, draw(st.sampled_from(("ok", "ok_npy"))), 4, spec.seed)
    target = draw(st.sampled_from(("model", "model", "data", "table", "rules")))
    mutation = draw(byte_mutations)
    prepare = [WriteModel(spec), *steps]
    convert = ["convert", d("model.onnx"), "--calib-data", d(data), "-o", d("out.onnx")]
    if target == "model":
        victim = draw(st.sampled_from(("model.onnx", "model.data"))) if spec.external else "model.onnx"
        argv = draw(
            st.sampled_from(
                (convert, ["fold", d("model.onnx"), "-o", d("f.onnx")], ["inspect", d("model.onnx")])
            )
        )
    elif target == "data":
        victim, argv = data, convert
    elif target == "table":
        victim = "t.json"
        prepare.append(RunCli(("calibrate", d("model.onnx"), "--calib-data", d(data), "-o", d("t.json"))))
        argv = ["table", d("t.json"), "--format", "tensorrt", "-o", d("t.cache")]
    else:
        victim = "rules.yaml"
        prepare.append(
            WriteBytes("rules.yaml", yaml.safe_dump({"weights": {"bits": 4}, "placement": "ort"}).encode())
        )
        argv = ["fold", d("model.onnx"), "-o", d("f.onnx"), "--rules", d("rules.yaml")]
    prepare.append(Mutate(victim, mutation))
    kind = f"{target}:{type(mutation).__name__}"
    description = f"{victim} mutated by {mutation!r}; {spec.describe()}"
    return _finish(Case("bytes", kind, description, argv, prepare, _names(spec, data, victim, "t.json")))


# ------------------------------------------------------------------------------------ hangs and signals


@st.composite
def hang_cases(draw) -> Case:
    spec = draw(model_specs(kinds=("mlp",)))
    data, steps = data_files(spec, "ok", 4, spec.seed)
    which = draw(st.sampled_from(("model", "data", "rules", "table")))
    prepare = [WriteModel(spec), *steps]
    argv = ["convert", d("model.onnx"), "--calib-data", d(data), "-o", d("out.onnx")]
    if which == "model":
        prepare = [*steps, MakeFifo("model.onnx")]
    elif which == "data":
        prepare = [WriteModel(spec), MakeFifo("calib.npz")]
        argv[3] = d("calib.npz")
    elif which == "rules":
        prepare.append(MakeFifo("rules.yaml"))
        argv += ["--rules", d("rules.yaml")]
    else:
        prepare.append(MakeFifo("t.json"))
        argv = ["table", d("t.json"), "--format", "json", "-o", d("o.json")]
    case = Case(
        "hangs",
        f"fifo:{which}",
        f"a FIFO as the {which}",
        argv,
        prepare,
        _names(spec, data, "rules.yaml", "t.json"),
    )
    case.subprocess = True
    return _finish(case)


@st.composite
def signal_cases(draw) -> Case:
    spec = draw(model_specs(kinds=("cnn",)))
    data, steps = data_files(spec, "ok", 8, spec.seed)
    argv = [
        "convert",
        d("model.onnx"),
        "--calib-data",
        d(data),
        "-o",
        d("out.onnx"),
        "--table-out",
        d("t.json"),
    ]
    argv += ["--report", d("r.html"), "--save-stats", d("s.npz")]
    delay = draw(st.sampled_from((0.5, 1.5, 2.5, 3.0, 3.5, 4.0, 5.0)))
    case = Case(
        "signals", "sigint", f"SIGINT after {delay} s; {spec.describe()}", argv, [WriteModel(spec), *steps]
    )
    case.subprocess, case.signal_after, case.names = True, delay, _names(spec, data)
    return _finish(case)


FAMILIES = {
    "models": model_cases,
    "data": data_cases,
    "rules": rules_cases,
    "tables": table_cases,
    "options": option_cases,
    "bytes": byte_cases,
    "hangs": hang_cases,
    "signals": signal_cases,
}

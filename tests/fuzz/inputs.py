"""Files other than models, as drawn by the fuzz strategies: calibration data (right and wrong), rule files
(valid and corrupted YAML), table edits (JSON fields, TensorRT cache lines) and byte-level mutations.

Every step is a small frozen dataclass called with the case's folder, so a failing case prints its recipe.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import yaml
from hypothesis import strategies as st

from fuzz.harness import DIR, run_in_process
from fuzz.models import INPUT, ModelSpec, build_model, write_model
from onnxquant.passes import PASS_NAMES

# ---------------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class WriteModel:
    spec: ModelSpec
    name: str = "model.onnx"

    def __call__(self, folder: Path) -> None:
        write_model(build_model(self.spec), folder / self.name, self.spec.external)


@dataclass(frozen=True)
class WriteBytes:
    name: str
    data: bytes

    def __call__(self, folder: Path) -> None:
        path = folder / self.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.data)

    def __repr__(self) -> str:
        return f"WriteBytes({self.name!r}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class MakeFifo:
    name: str

    def __call__(self, folder: Path) -> None:
        os.mkfifo(folder / self.name)


@dataclass(frozen=True)
class MakeDir:
    name: str

    def __call__(self, folder: Path) -> None:
        (folder / self.name).mkdir(parents=True, exist_ok=True)


class SetupFailed(Exception):
    """A setup command of a case (making the quantized model or the table it needs) did not succeed."""


@dataclass(frozen=True)
class RunCli:
    argv: tuple[str, ...]

    def __call__(self, folder: Path) -> None:
        code, _, stderr = run_in_process([a.replace(DIR, str(folder)) for a in self.argv], 60)
        if code != 0:
            raise SetupFailed(f"setup {' '.join(self.argv)} exited {code}: {stderr.strip()[:200]}")


@dataclass(frozen=True)
class Mutate:
    """Apply a byte-level or structured mutation to a file written by an earlier step."""

    name: str
    mutation: object

    def __call__(self, folder: Path) -> None:
        path = folder / self.name
        if path.is_file():  # a model without weights has no external data file to mutate
            path.write_bytes(self.mutation.apply(path.read_bytes()))


# ------------------------------------------------------------------------------------- byte mutations


@dataclass(frozen=True)
class Truncate:
    keep: float

    def apply(self, data: bytes) -> bytes:
        return data[: int(len(data) * self.keep)]


@dataclass(frozen=True)
class FlipBits:
    positions: tuple[float, ...]
    bits: tuple[int, ...]

    def apply(self, data: bytes) -> bytes:
        out = bytearray(data)
        for where, bit in zip(self.positions, self.bits):
            if out:
                out[min(int(where * len(out)), len(out) - 1)] ^= 1 << bit
        return bytes(out)


@dataclass(frozen=True)
class Splice:
    where: float
    insert: bytes
    delete: int

    def apply(self, data: bytes) -> bytes:
        i = int(self.where * len(data))
        return data[:i] + self.insert + data[i + self.delete :]


byte_mutations = st.one_of(
    st.builds(Truncate, st.floats(0.0, 0.999)),
    st.builds(
        FlipBits,
        st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4).map(tuple),
        st.lists(st.integers(0, 7), min_size=4, max_size=4).map(tuple),
    ),
    st.builds(Splice, st.floats(0.0, 1.0), st.binary(max_size=8), st.integers(0, 16)),
)

# ----------------------------------------------------------------------------------- calibration data

DATA_KINDS = (
    "ok",
    "ok_npy",
    "ok_dir",
    "big_endian",
    "float64",
    "wrong_key",
    "extra_key",
    "wrong_rank",
    "wrong_shape",
    "int32",
    "float16",
    "bool",
    "complex",
    "object",
    "nan",
    "inf",
    "huge",
    "zeros",
    "empty",
    "scalar",
    "no_arrays",
    "not_zip",
)
VALID_DATA = ("ok", "ok_npy", "ok_dir", "big_endian", "float64", "extra_key", "zeros", "huge")


def sample_array(spec: ModelSpec, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(spec.input_shape(samples)).astype(np.float32)


def _npz(arrays: dict[str, np.ndarray], allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=allow_pickle, **arrays)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def data_files(spec: ModelSpec, kind: str, samples: int, seed: int, name: str = "calib") -> tuple[str, list]:
    """The path (relative to the folder) to give as --calib-data/--data, and the steps that write it."""
    x = sample_array(spec, samples, seed)
    if kind == "ok_npy":
        return f"{name}.npy", [WriteBytes(f"{name}.npy", _npy(x))]
    if kind == "ok_dir":
        half = max(1, samples // 2)
        return name, [
            WriteBytes(f"{name}/a.npz", _npz({INPUT: x[:half]})),
            WriteBytes(f"{name}/b.npz", _npz({INPUT: x[half:] if samples > 1 else x})),
        ]
    if kind in ("scalar", "object"):
        arr = np.float32(1.0) if kind == "scalar" else np.array([{"a": 1}] * samples, dtype=object)
        return f"{name}.npy", [WriteBytes(f"{name}.npy", _npy(arr))]
    if kind == "not_zip":
        return f"{name}.npz", [WriteBytes(f"{name}.npz", b"PK\x03\x04 not really a zip file")]
    arrays = {INPUT: _variant(x, kind)}
    if kind == "wrong_key":
        arrays = {"input": x}
    elif kind == "extra_key":
        arrays["labels"] = np.arange(samples, dtype=np.int64)
    elif kind == "no_arrays":
        arrays = {}
    return f"{name}.npz", [WriteBytes(f"{name}.npz", _npz(arrays))]


def _variant(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "big_endian":
        return x.astype(">f4")
    if kind == "float64":
        return x.astype(np.float64)
    if kind == "wrong_rank":
        return x[:, 0]
    if kind == "wrong_shape":
        return np.concatenate([x, x], axis=-1)
    if kind in ("int32", "float16", "bool", "complex"):
        return x.astype(
            {"int32": np.int32, "float16": np.float16, "bool": bool, "complex": np.complex64}[kind]
        )
    if kind in ("nan", "inf"):
        y = x.copy()
        y.flat[len(y.flat) // 2] = np.nan if kind == "nan" else -np.inf
        return y
    if kind == "huge":
        return x * np.float32(1e30)
    if kind == "zeros":
        return np.zeros_like(x)
    if kind == "empty":
        return x[:0]
    return x


# -------------------------------------------------------------------------------------------- rule files

OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool"]
PASSES = list(PASS_NAMES)
METHODS = ["minmax", "percentile", "mse", "laplace", "gauss", "kl"]


@st.composite
def quant_specs(draw, weights: bool) -> dict:
    spec = {}
    if draw(st.booleans()):
        spec["bits"] = draw(st.integers(2, 8))
    if draw(st.booleans()):
        spec["symmetric"] = draw(st.booleans())
    if weights and draw(st.booleans()):
        spec["granularity"] = draw(st.sampled_from(["per_channel", "per_tensor"]))
    if draw(st.booleans()):
        spec["method"] = draw(st.sampled_from(METHODS[:1] + ["laplace", "gauss"] if weights else METHODS))
    return spec


@st.composite
def valid_rules(draw) -> dict:
    doc = {}
    if draw(st.booleans()):
        doc["placement"] = draw(st.sampled_from(["ort", "tensorrt"]))
    if draw(st.booleans()):
        doc["passes"] = draw(st.lists(st.sampled_from(PASSES), unique=True))
    if draw(st.booleans()):
        doc["quantize_ops"] = draw(st.lists(st.sampled_from(OPS), unique=True))
    for key, weights in (("weights", True), ("activations", False)):
        if draw(st.booleans()):
            doc[key] = draw(quant_specs(weights))
    if draw(st.booleans()):
        doc["overrides"] = draw(st.lists(_override(), max_size=3))
    return doc


@st.composite
def _override(draw) -> dict:
    match = draw(
        st.sampled_from(
            [
                {"position": "first"},
                {"position": "last"},
                {"name": "conv*"},
                {"op_type": "Gemm"},
                {"name": "*"},
            ]
        )
    )
    rule = {"match": match}
    if draw(st.booleans()):
        rule["skip"] = True
    else:
        rule["weights"] = {"bits": draw(st.integers(2, 8))}
        rule["activations"] = {"bits": draw(st.integers(2, 8))}
    return rule


RULE_CORRUPTIONS = (
    "unknown_key",
    "wrong_type",
    "bits_range",
    "bad_choice",
    "syntax",
    "not_mapping",
    "deep",
    "aliases",
    "bad_override",
)


def corrupt_rules(doc: dict, how: str, pick: int) -> str:
    """YAML text of `doc` broken in the way `how` names (`pick` chooses among the variants)."""
    doc = json.loads(json.dumps(doc))
    if how == "unknown_key":
        doc[["weight", "activation", "placment", "extra"][pick % 4]] = {"bits": 4}
    elif how == "wrong_type":
        key, value = [
            ("weights", {"bits": [4]}),
            ("passes", "fold_conv_bn"),
            ("activations", 8),
            ("overrides", {}),
        ][pick % 4]
        doc[key] = value
    elif how == "bits_range":
        doc["weights"] = {"bits": [0, 1, 9, 16, -1, 4.5, "8", None][pick % 8]}
    elif how == "bad_choice":
        key, value = [
            ("placement", "tflite"),
            ("passes", ["fold_everything"]),
            ("quantize_ops", ["Softmax2"]),
            ("activations", {"method": "entropy"}),
        ][pick % 4]
        doc[key] = value
    elif how == "syntax":
        return yaml.safe_dump(doc)[: max(0, pick % 20)] + ["{[", ": : :", "\t- x", "key: [1, 2"][pick % 4]
    elif how == "not_mapping":
        return ["- 1\n- 2\n", "42\n", "", "null\n", "'text'\n"][pick % 5]
    elif how == "deep":
        depth = 200 + (pick % 4) * 5000
        return "weights: " + "[" * depth + "]" * depth + "\n"
    elif how == "aliases":
        return _alias_bomb(["quantize_ops", "passes", "bits", "placement", "match"][pick % 5], levels=7)
    elif how == "bad_override":
        doc["overrides"] = [
            [{"match": {}}, {"skip": True}, {"match": {"position": "middle"}}, {"match": {"name": 3}}][
                pick % 4
            ]
        ]
    return yaml.safe_dump(doc, sort_keys=True)


def _alias_bomb(key: str, levels: int) -> str:
    """A "billion laughs" document whose alias expansion is 8**levels strings, placed at `key`."""
    lines = ["a0: &a0 [Conv, Conv, Conv, Conv, Conv, Conv, Conv, Conv]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 8)
        lines.append(f"a{i}: &a{i} [{refs}]")
    target = f"*a{levels - 1}"
    body = {
        "quantize_ops": f"quantize_ops: {target}",
        "passes": f"passes: {target}",
        "bits": f"weights: {{bits: {target}}}",
        "placement": f"placement: {target}",
        "match": f"overrides: [{{match: {{name: {target}}}, skip: true}}]",
    }[key]
    return "\n".join(lines) + "\n" + body + "\n"


# ---------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class JsonEdit:
    """Set (or delete) one field of a JSON table: at the top level, or in the `which`-th tensor entry."""

    where: str  # "top" or "tensor"
    key: str
    value: object
    which: int = 0
    delete: bool = False

    def apply(self, data: bytes) -> bytes:
        doc = json.loads(data)
        target = doc
        if self.where == "tensor":
            names = sorted(doc["tensors"])
            if not names:  # a model with nothing to quantize has an empty table: no tensor entry to edit
                return data  # (the setup step died of a modulo by zero here, a harness false positive)
            target = doc["tensors"][names[self.which % len(names)]]
        if self.delete:
            target.pop(self.key, None)
        elif self.key == "__length__":  # a per-channel list one element short
            for k in ("scale", "zero_point", "bits"):
                if isinstance(target.get(k), list) and target[k]:
                    target[k] = target[k][:-1]
        else:
            target[self.key] = self.value
        return json.dumps(doc, allow_nan=True).encode()


BAD_TABLE_VALUES = {
    "bits": [0, 1, 9, 16, -3, "8", 4.5, None, True],
    "scale": [0.0, -1.0, float("nan"), float("inf"), 1e-45, 1e39, "0.1", [], None],
    "zero_point": [-1, 300, 2**40, 0.5, "0", -129, None],
    "signed": ["yes", 1, None],
    "axis": [5, -9, "0", 1.5],
    "min": [float("nan"), float("inf"), "a", 1e39],
    "max": [float("-inf"), -1e39, [1, 2]],
    "amax": [-1.0, float("nan"), 0.0],
    "method": ["entropy", 3, ""],
    "kind": ["bias", 0],
    "unknown_field": [1],
}
TOP_EDITS = [
    ("format", "onnx-calibration"),
    ("format", None),
    ("version", 2),
    ("version", "1"),
    ("bits", 99),
    ("tensors", []),
    ("tensors", {"ghost": {"min": 0, "max": 1}}),
    ("tensors", None),
    ("method", None),
]


@st.composite
def json_edits(draw) -> JsonEdit:
    if draw(st.integers(0, 4)) == 0:
        key, value = draw(st.sampled_from(TOP_EDITS))
        return JsonEdit("top", key, value)
    which = draw(st.integers(0, 50))
    if draw(st.integers(0, 5)) == 0:
        return JsonEdit(
            "tensor",
            draw(st.sampled_from(["scale", "zero_point", "bits", "min", "method"])),
            None,
            which,
            True,
        )
    if draw(st.integers(0, 6)) == 0:
        return JsonEdit("tensor", "__length__", None, which)
    key = draw(st.sampled_from(sorted(BAD_TABLE_VALUES)))
    return JsonEdit("tensor", key, draw(st.sampled_from(BAD_TABLE_VALUES[key])), which)


@dataclass(frozen=True)
class CacheEdit:
    """Replace one line of a TensorRT calibration cache (line 0 is the header)."""

    line: int
    text: str

    def apply(self, data: bytes) -> bytes:
        lines = data.decode().splitlines()
        i = self.line % max(1, len(lines))
        name = lines[i].split(":")[0] if i and ":" in lines[i] else "t"
        lines[i] = self.text.replace("{name}", name)
        return ("\n".join(lines) + "\n").encode()


CACHE_LINES = [
    "{name}: 3c01",
    "{name}: 00000000",
    "{name}: 7fc00000",
    "{name}: 7f800000",
    "{name}: bf800000",
    "{name}: 00000001",
    "{name} 3c010a14",
    "{name}: zzzzzzzz",
    "{name}: 3c010a14ff",
    "ghost_tensor: 3c010a14",
    "",
    "TRT-0-NotACalibrator",
]

cache_edits = st.builds(CacheEdit, st.integers(0, 40), st.sampled_from(CACHE_LINES))


def onnx_bytes(spec: ModelSpec) -> bytes:
    return build_model(spec).SerializeToString(deterministic=True)


def model_with(spec: ModelSpec, edit: str) -> onnx.ModelProto:
    """A generated model with one defect the loader must refuse or handle: NaN weights, negative BN
    variance, a zero-size weight, a bad external-data record, an unknown op, a dangling input."""
    model = build_model(spec)
    inits = list(model.graph.initializer)
    if edit == "nan_weight" and inits:
        t = inits[0]
        arr = onnx.numpy_helper.to_array(t).copy()
        arr.flat[0] = np.nan
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    elif edit == "negative_var":
        for t in inits:
            if t.name.startswith("var"):
                t.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(t), t.name))
    elif edit == "unknown_op":
        model.graph.node[0].op_type = "NoSuchOp"
    elif edit == "dangling":
        next(n for n in model.graph.node if n.input).input[0] = "nowhere"
    elif edit == "external_bad" and inits:
        t = inits[0]
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "w.data"), ("offset", "-5"), ("length", "99999999")):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    elif edit == "ir3":
        model.ir_version = 3
    return model


MODEL_EDITS = ("nan_weight", "negative_var", "unknown_op", "dangling", "external_bad", "ir3")

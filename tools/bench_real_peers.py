"""Peers of the real-model benchmark (tools/bench_real.py), each run in its own virtual environment.

- ONNX Runtime ``quantize_static``: QDQ, per-channel weights, uint8 activations, MinMax calibration, after
  ``quant_pre_process`` (the documented recipe); venv ``DIR/venv-ort`` (onnxruntime onnx numpy sympy).
  W8A8: int8 weights (QInt8), after an opset upgrade to 13 where lower (per-channel DequantizeLinear needs
  its axis); if per-channel fails (ORT's bias-scale adjustment on some graphs) it retries per tensor.
  W4A8: int4 weights (QInt4), which DequantizeLinear accepts from opset 21 on, so the model is upgraded to
  21 with onnx.version_converter; no per-tensor retry (a per-tensor 4-bit grid is not the same method, so a
  failure is recorded as the cell's error instead).
- NNCF ``nncf.quantize`` on the ONNX model, default preset (performance: symmetric int8); venv
  ``DIR/venv-nncf`` (nncf onnx onnxruntime). W8A8 only: ``nncf.quantize`` quantizes to 8-bit integers (its
  ``mode`` only switches to FP8), and NNCF's 4-bit path, ``nncf.compress_weights``, is weight-only
  compression (activations stay float) that keeps convolutions at 8 bits, so NNCF has no W4A8 for CNNs.

Each peer script is written to ``DIR/peers/`` and run as
``VENV/bin/python SCRIPT MODEL CALIB.npz OUT BATCH [WBITS]`` (WBITS: weight width, default 8; ``PEERS[p]
["labels"]`` lists the widths a peer supports). The weight-only ceiling (``weight_only_int8``) runs in the
benchmark's own environment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ORT_SCRIPT = """
import sys
import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

model, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
wbits = int(sys.argv[5]) if len(sys.argv) > 5 else 8
if wbits not in (8, 4):
    raise SystemExit(f"weight width {wbits} is not supported; accepted: 8 (QInt8) or 4 (QInt4)")
weight_type = QuantType.QInt8 if wbits == 8 else QuantType.QInt4
min_opset = 13 if wbits == 8 else 21  # per-channel DequantizeLinear needs 13; int4 tensors need 21
arrays = dict(np.load(data, allow_pickle=False))
n = len(next(iter(arrays.values())))


class Reader(CalibrationDataReader):
    def __init__(self):
        self.starts = iter(range(0, n, batch))

    def get_next(self):
        i = next(self.starts, None)
        return None if i is None else {k: v[i:i + batch] for k, v in arrays.items()}


proto = onnx.load(model)
opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
if opset < min_opset:
    print(f"upgrading opset {opset} -> {min_opset} (onnx.version_converter)", file=sys.stderr)
    model = out + f".op{min_opset}.onnx"
    onnx.save(onnx.version_converter.convert_version(proto, min_opset), model)
pre = out + ".pre.onnx"
try:
    quant_pre_process(model, pre, skip_symbolic_shape=False)
except Exception as exc:  # symbolic shape inference fails on some graphs: retry without it
    print(f"quant_pre_process with symbolic shapes failed ({exc!r}); retrying without", file=sys.stderr)
    quant_pre_process(model, pre, skip_symbolic_shape=True)
try:
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=weight_type)
except Exception as exc:  # ORT's per-channel bias-scale adjustment fails on some graphs: retry per tensor
    if wbits != 8:
        raise
    print(f"per-channel quantize_static failed ({exc!r}); retrying with per_channel=False", file=sys.stderr)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=weight_type)
"""

NNCF_SCRIPT = """
import sys
import numpy as np
import onnx
import nncf

model, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
arrays = dict(np.load(data, allow_pickle=False))
n = len(next(iter(arrays.values())))
items = [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]
quantized = nncf.quantize(onnx.load(model), nncf.Dataset(items), subset_size=n)
onnx.save(quantized, out)
"""

PEERS = {
    "ort": {
        "labels": {8: "ORT quantize_static W8A8", 4: "ORT quantize_static W4A8"},
        "packages": ["onnxruntime", "onnx", "numpy", "sympy"],
        "check": "import onnxruntime.quantization, sympy",
        "script": ORT_SCRIPT,
    },
    "nncf": {
        "labels": {8: "NNCF quantize W8A8"},  # nncf.quantize has no 4-bit weights (module docstring)
        "packages": ["nncf", "onnx", "onnxruntime"],
        "check": "import nncf, onnxruntime",
        "script": NNCF_SCRIPT,
    },
}


def peer_widths(peer: str, bits: list[int]) -> list[int]:
    """The weight widths to run a peer at: 8 always (today's behaviour), and each other requested width it
    supports."""
    labels = PEERS[peer]["labels"]
    return [8] + [b for b in bits if b != 8 and b in labels]


def venv_python(cache: Path, peer: str) -> Path:
    return cache / f"venv-{peer}" / "bin" / "python"


def ensure_peer(cache: Path, peer: str, log) -> tuple[Path, Path]:
    """Create the peer's venv if it cannot import its packages; write its script. Returns (python, script)."""
    spec = PEERS[peer]
    python = venv_python(cache, peer)
    ok = (
        python.exists()
        and subprocess.run([str(python), "-c", spec["check"]], check=False, capture_output=True).returncode
        == 0
    )
    if not ok:
        log(f"creating {python.parent.parent} ({' '.join(spec['packages'])})")
        subprocess.run(["python3", "-m", "venv", str(python.parent.parent)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *spec["packages"]], check=True)
    script = cache / "peers" / f"{peer}_quantize.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(spec["script"].lstrip())
    return python, script


def peer_versions(cache: Path, peer: str) -> str:
    python = venv_python(cache, peer)
    code = {
        "ort": "import onnxruntime as m; print('onnxruntime', m.__version__)",
        "nncf": "import nncf as m; print('nncf', m.__version__)",
    }[peer]
    res = subprocess.run([str(python), "-c", code], check=False, capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


# ------------------------------------------------------------------------------ weight-only int8 ceiling
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": -1}


def weight_axis(node: onnx.NodeProto, ndim: int) -> int | None:
    """The output-channel axis of the weight (input 1) of a Conv/ConvTranspose/Gemm/MatMul node."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return ndim - 1 if ndim >= 2 else None
    return WEIGHT_AXIS.get(node.op_type)


def fake_quant_per_channel(w: np.ndarray, axis: int, bits: int = 8) -> np.ndarray:
    """Symmetric per-channel fake quantization: s = max|w| / (2^(b-1) - 1), round half to even."""
    qmax = 2 ** (bits - 1) - 1
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return (np.clip(np.round(w / scale), -qmax - 1, qmax) * scale).astype(w.dtype)


def weight_only_int8(model_path: Path, out_path: Path) -> int:
    """Fake-quantize each Conv/ConvTranspose/Gemm/MatMul float weight per output channel.

    Weights are initializers or outputs of Constant nodes (Paddle exports, e.g. the PP-OCR classifier).
    """
    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits.setdefault(node.output[0], node.attribute[0].t)
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits or name in done:
            continue
        w = numpy_helper.to_array(inits[name])
        axis = weight_axis(node, w.ndim)
        if axis is None or w.dtype.kind != "f" or w.ndim < 2:
            continue
        inits[name].CopyFrom(numpy_helper.from_array(fake_quant_per_channel(w, axis), inits[name].name))
        done.add(name)
    onnx.save(model, str(out_path))
    return len(done)


if __name__ == "__main__":  # python tools/bench_real_peers.py weight-only MODEL OUT
    if len(sys.argv) != 4 or sys.argv[1] != "weight-only":
        raise SystemExit("usage: bench_real_peers.py weight-only MODEL OUT")
    count = weight_only_int8(Path(sys.argv[2]), Path(sys.argv[3]))
    print(f"{count} weights fake-quantized per channel to int8")

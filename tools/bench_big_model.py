"""Peak memory of `onnxquant convert` on a model over 2 GB (external data), beside ONNX Runtime's
`quantize_static` on the same model.

The model: a chain of `layers` MatMul(x, W_k) -> Relu with float32 weights of `size` x `size` (default four
11776 x 11776, 2.22 GB), written with external data as `onnx.save(..., save_as_external_data=True)` writes
it, but one tensor at a time so the generator never holds all weights. Each conversion is a fresh process;
peak RSS is the child's ru_maxrss (wait4). The quantized output is run in ONNX Runtime and compared with
the float model (SQNR of the output).

    python tools/bench_big_model.py [--size 11776] [--layers 4] [--samples 16] [--dir DIR] [--no-peer]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
ALIGN = 4096  # onnx.save aligns external tensors to the page size too, so runtimes can map them

ORT_PEER = """
import sys, numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
model, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.load(data)["input"]
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(range(0, len(x), 8))
    def get_next(self):
        i = next(self.it, None)
        return None if i is None else {"input": x[i:i + 8]}
quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=True)
"""


def build_chain(path: Path, size: int, layers: int, seed: int = 0) -> int:
    """Write the MatMul/Relu chain to `path` with its weights in `path.name + '.data'`; returns the bytes of
    weights. Weights are N(0, 1/size), so activations keep their scale through the chain."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits, offset = [], [], 0
    with open(path.with_name(data_name), "wb") as f:
        for k in range(layers):
            w = rng.standard_normal((size, size), dtype=np.float32)
            w *= np.float32(1 / np.sqrt(size))
            offset = _pad_to(f, offset)
            f.write(w.tobytes())
            inits.append(_external_tensor(f"w{k}", w.shape, data_name, offset, w.nbytes))
            offset += w.nbytes
            del w
            x = "input" if k == 0 else f"relu{k - 1}"
            nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"mm{k}"], name=f"matmul{k}"))
            out = "output" if k == layers - 1 else f"relu{k}"
            nodes.append(helper.make_node("Relu", [f"mm{k}"], [out], name=f"relu{k}"))
    graph = helper.make_graph(
        nodes,
        "big_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return offset


def _pad_to(f, offset: int) -> int:
    pad = -offset % ALIGN
    f.write(b"\0" * pad)
    return offset + pad


def _external_tensor(name: str, shape: tuple[int, ...], location: str, offset: int, length: int):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


def write_calib(path: Path, size: int, samples: int, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((samples, size), dtype=np.float32)
    np.savez(path, input=x)
    return x


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stderr of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    err = child.stderr.read().decode(errors="replace")
    if status != 0:
        return (
            wall,
            usage.ru_maxrss / 1024,
            err.strip().splitlines()[-1] if err.strip() else f"status {status}",
        )
    return wall, usage.ru_maxrss / 1024, ""


def output_sqnr(float_path: Path, quant_path: Path, x: np.ndarray) -> float:
    """SQNR (dB) of the quantized model's output against the float model's, both run in ONNX Runtime (one
    session at a time, so this check stays within memory too)."""

    def infer(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]

    ref = infer(float_path)
    got = infer(quant_path)
    return float(
        10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2))
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=11776)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None, help="work folder [default: a temp dir, removed]")
    parser.add_argument("--no-peer", action="store_true", help="skip ONNX Runtime's quantize_static")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-big-", dir=args.dir))
    try:
        model, calib = tmp / "big.onnx", tmp / "calib.npz"
        weights = build_chain(model, args.size, args.layers)
        x = write_calib(calib, args.size, args.samples)
        print(
            f"model: {args.layers} x MatMul {args.size}x{args.size} float32, weights {weights / 1e9:.2f} GB"
        )
        out = tmp / "out.onnx"
        cmd = [sys.executable, "-m", "onnxquant.cli", "convert", str(model), "--bits", "8"]
        cmd += ["--calib-data", str(calib), "-o", str(out)]
        wall, rss, err = run(cmd)
        ratio = rss * 2**20 / weights
        line = (
            f"onnxquant convert --bits 8: {wall:.1f} s, peak RSS {rss / 1024:.2f} GiB ({ratio:.2f}x weights)"
        )
        print(
            line + (f", FAILED: {err}" if err else f", output SQNR {output_sqnr(model, out, x[:4]):.1f} dB")
        )
        if not args.no_peer:
            peer_out = tmp / "peer.onnx"
            wall, rss, err = run([sys.executable, "-c", ORT_PEER, str(model), str(calib), str(peer_out)])
            ratio = rss * 2**20 / weights
            line = f"ORT quantize_static (QDQ, per-channel): {wall:.1f} s, peak RSS {rss / 1024:.2f} GiB"
            line += f" ({ratio:.2f}x)"
            print(line + (f", FAILED: {err}" if err else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Train the bundled demo CNN on scikit-learn's digits and write calib_data/digits/.

Tool-only dependencies (not in setup.cfg): ``pip install torch scikit-learn``.
The network is trained with PyTorch on CPU, then its ONNX graph (opset 13) is written with
``onnx.helper`` from the trained weights, so BatchNormalization nodes stay unfolded with their
real running statistics. Output: ``model.onnx``, ``calib.npz`` (``input``: training samples) and
``eval.npz`` (``input``, ``labels``: held-out samples). Seeded and single-threaded, so reruns give
the same files.

    python tools/make_demo_model.py [-o calib_data/digits]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
CALIB_SAMPLES = 512
EPOCHS = 40
BN_EPS = 1e-5


class DigitsNet(nn.Module):
    """conv-bn-relu x2, maxpool, depthwise conv-bn-relu, pointwise conv-bn-relu, GAP, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(32, eps=BN_EPS)
        self.conv2 = nn.Conv2d(32, 128, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(128, eps=BN_EPS)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False)
        self.bn3 = nn.BatchNorm2d(128, eps=BN_EPS)
        self.conv4 = nn.Conv2d(128, 256, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(256, eps=BN_EPS)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean(dim=(2, 3)))


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 [N,1,8,8] in [0,1] and int64 labels, split 75/25 stratified."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_tr, x_te, y_tr, y_te


def train(x: np.ndarray, y: np.ndarray) -> DigitsNet:
    """Train with Adam and a cosine schedule; BN runs in train mode so running stats are real."""
    torch.manual_seed(SEED)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def to_onnx(model: DigitsNet) -> onnx.ModelProto:
    """Write the trained network as an opset-13 ONNX graph with unfolded BatchNormalization."""
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, t: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))
        return name

    def block(i: int, x: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> str:
        ins = [x, init(f"conv{i}.weight", conv.weight)]
        if conv.bias is not None:
            ins.append(init(f"conv{i}.bias", conv.bias))
        k = conv.kernel_size[0]
        p = conv.padding[0]
        nodes.append(
            helper.make_node(
                "Conv",
                ins,
                [f"conv{i}_out"],
                name=f"conv{i}",
                kernel_shape=[k, k],
                pads=[p] * 4,
                strides=[1, 1],
                group=conv.groups,
            )
        )
        bn_ins = [f"conv{i}_out"] + [
            init(f"bn{i}.{n}", getattr(bn, n)) for n in ("weight", "bias", "running_mean", "running_var")
        ]
        nodes.append(
            helper.make_node(
                "BatchNormalization", bn_ins, [f"bn{i}_out"], name=f"bn{i}", epsilon=bn.eps, momentum=0.9
            )
        )
        nodes.append(helper.make_node("Relu", [f"bn{i}_out"], [f"relu{i}_out"], name=f"relu{i}"))
        return f"relu{i}_out"

    x = block(1, "input", model.conv1, model.bn1)
    x = block(2, x, model.conv2, model.bn2)
    nodes.append(
        helper.make_node("MaxPool", [x], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    )
    x = block(3, "pool_out", model.conv3, model.bn3)
    x = block(4, x, model.conv4, model.bn4)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1))
    nodes.append(
        helper.make_node(
            "Gemm",
            ["flat_out", init("fc.weight", model.fc.weight), init("fc.bias", model.fc.bias)],
            ["logits"],
            name="fc",
            transB=1,
        )
    )
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxquant-tools")
    m.ir_version = 7
    onnx.checker.check_model(m, full_check=True)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "-o", "--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "calib_data/digits"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_data()
    t0 = time.perf_counter()
    model = train(x_tr, y_tr)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(torch.from_numpy(x_te)).numpy()
    acc = float((logits.argmax(1) == y_te).mean())
    proto = to_onnx(model)

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(None, {"input": x_te})[0]
    np.testing.assert_allclose(ort_logits, logits, rtol=1e-4, atol=1e-4)
    ort_acc = float((ort_logits.argmax(1) == y_te).mean())

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, args.out_dir / "model.onnx")
    calib_idx = np.random.default_rng(SEED).choice(len(x_tr), CALIB_SAMPLES, replace=False)
    calib_idx.sort()
    np.savez_compressed(args.out_dir / "calib.npz", input=x_tr[calib_idx])
    np.savez_compressed(args.out_dir / "eval.npz", input=x_te, labels=y_te)
    print(
        f"trained {EPOCHS} epochs in {elapsed:.1f} s; held-out top-1: torch {acc:.4f}, "
        f"onnxruntime {ort_acc:.4f} "
        f"({len(y_te)} samples); wrote {args.out_dir}"
    )


if __name__ == "__main__":
    main()

"""Build a ResNet-18-shaped ONNX model with random weights (onnx + numpy only) for benchmarks.

Same topology and tensor shapes as torchvision's resnet18 (input ``input`` [batch,3,224,224], output
``logits`` [batch,1000], BatchNormalization unfolded, opset 13), but the weights are seeded random:
He-initialised convolutions and BN running statistics measured by running the graph in numpy on
two image-like samples, so activations keep a stable scale through all 18 layers. Not a trained model.

    python tools/make_resnet18.py -o resnet18.onnx [--calib calib.npz --samples 32] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

BN_EPS = 1e-5
STATS_SAMPLES = 2


def _conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)


def _maxpool3x3s2(x: np.ndarray) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))


class _Builder:
    """Accumulates nodes and initializers while running the graph in numpy on a few samples.

    BN running statistics are the measured per-channel mean/variance of each convolution output
    (slightly perturbed), as a trained network's would be, so activations keep a stable scale.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def conv_bn(
        self,
        prefix: str,
        x: str,
        xv: np.ndarray,
        cout: int,
        k: int,
        stride: int,
        gamma: float = 1.0,
        conv_name: str = "conv",
        bn_name: str = "bn",
    ) -> tuple[str, np.ndarray]:
        """Conv (He init, no bias) then BatchNormalization; returns the BN output name and value."""
        cin = xv.shape[1]
        w = (self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        conv_out = f"{prefix}{conv_name}_out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.init(f"{prefix}{conv_name}.weight", w)],
                [conv_out],
                name=f"{prefix}{conv_name}",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        yv = _conv(xv, w, stride, k // 2)
        mean = yv.mean(axis=(0, 2, 3))
        std = yv.std(axis=(0, 2, 3)) + 1e-3
        mean = mean + self.rng.normal(0.0, 0.05, cout) * std
        var = std**2 * self.rng.uniform(0.9, 1.1, cout)
        scale = gamma * self.rng.uniform(0.8, 1.2, cout)
        bias = self.rng.normal(0.0, 0.1, cout)
        bn = f"{prefix}{bn_name}"
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [
                    conv_out,
                    self.init(f"{bn}.weight", scale),
                    self.init(f"{bn}.bias", bias),
                    self.init(f"{bn}.running_mean", mean),
                    self.init(f"{bn}.running_var", var),
                ],
                [f"{bn}_out"],
                name=bn,
                epsilon=BN_EPS,
                momentum=0.9,
            )
        )
        a = (scale / np.sqrt(var + BN_EPS)).astype(np.float32)[:, None, None]
        return f"{bn}_out", a * (yv - mean.astype(np.float32)[:, None, None]) + bias.astype(np.float32)[
            :, None, None
        ]

    def relu(self, name: str, x: str, xv: np.ndarray) -> tuple[str, np.ndarray]:
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out", np.maximum(xv, 0)

    def basic_block(
        self, prefix: str, x: str, xv: np.ndarray, cout: int, stride: int
    ) -> tuple[str, np.ndarray]:
        """BasicBlock: conv-bn-relu-conv-bn, plus identity or 1x1 conv-bn shortcut, then Relu."""
        y, yv = self.conv_bn(prefix, x, xv, cout, 3, stride, conv_name="conv1", bn_name="bn1")
        y, yv = self.relu(f"{prefix}relu1", y, yv)
        y, yv = self.conv_bn(prefix, y, yv, cout, 3, 1, gamma=0.7, conv_name="conv2", bn_name="bn2")
        if stride != 1 or xv.shape[1] != cout:
            x, xv = self.conv_bn(
                prefix, x, xv, cout, 1, stride, conv_name="downsample.0", bn_name="downsample.1"
            )
        self.nodes.append(helper.make_node("Add", [y, x], [f"{prefix}add_out"], name=f"{prefix}add"))
        return self.relu(f"{prefix}relu2", f"{prefix}add_out", yv + xv)


def build_resnet18(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """ResNet-18 topology with seeded random weights; input ``input`` [batch,3,224,224], output ``logits``."""
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    x, xv = b.conv_bn(
        "", "input", make_calib(STATS_SAMPLES, seed), 64, 7, 2, conv_name="conv1", bn_name="bn1"
    )
    x, xv = b.relu("relu", x, xv)
    b.nodes.append(
        helper.make_node(
            "MaxPool",
            [x],
            ["maxpool_out"],
            name="maxpool",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        )
    )
    x, xv = "maxpool_out", _maxpool3x3s2(xv)
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for blk in range(2):
            x, xv = b.basic_block(f"layer{stage}.{blk}.", x, xv, cout, 2 if stage > 1 and blk == 0 else 1)
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool_out"], name="avgpool"))
    b.nodes.append(helper.make_node("Flatten", ["avgpool_out"], ["flatten_out"], name="flatten", axis=1))
    feat = xv.mean(axis=(2, 3))
    w = rng.standard_normal((1000, 512)) / np.sqrt(512 * np.mean(feat**2))
    b.nodes.append(
        helper.make_node(
            "Gemm",
            ["flatten_out", b.init("fc.weight", w), b.init("fc.bias", rng.normal(0.0, 0.01, 1000))],
            ["logits"],
            name="fc",
            transB=1,
        )
    )
    graph = helper.make_graph(
        b.nodes,
        "resnet18_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        b.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxquant-tools"
    )
    model.ir_version = 7 if opset <= 13 else 8
    return model


def make_calib(samples: int, seed: int = 0) -> np.ndarray:
    """Image-like float32 [samples,3,224,224]: smooth upsampled noise plus fine noise, ~N(0,1) per channel."""
    rng = np.random.default_rng(seed + 1)
    coarse = rng.standard_normal((samples, 3, 28, 28)).repeat(8, axis=2).repeat(8, axis=3)
    x = 0.9 * coarse + 0.45 * rng.standard_normal((samples, 3, 224, 224))
    return np.clip(x, -2.5, 2.7).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True, help="output .onnx path")
    ap.add_argument("--calib", type=Path, help="also write random calibration data (.npz, key 'input')")
    ap.add_argument("--samples", type=int, default=32, help="number of calibration samples (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=13)
    args = ap.parse_args()
    model = build_resnet18(args.seed, args.opset)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, args.output)
    if args.calib is not None:
        np.savez(args.calib, input=make_calib(args.samples, args.seed))


if __name__ == "__main__":
    main()

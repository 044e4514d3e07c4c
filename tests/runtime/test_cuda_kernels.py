"""CUDA kernels: compiled to PTX for sm_80 and sm_90 wherever nvcc exists (no GPU needed); built to cubins,
executed and compared bit for bit with the NumPy backend only on a GPU host with PyCUDA (marker `cuda`)."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rt_nets import conv_net, int4_conv_net, matmul_net, quantize

from onnxquant.errors import OnnxQuantError
from onnxquant.runtime import BACKENDS, REQUANT_MODES, get_backend, lower
from onnxquant.runtime.cuda_backend import KERNEL_FILES, CudaBackend, RawGemm, device, kernel_dir
from onnxquant.runtime.numpy_backend import NumpyBackend

NVCC = shutil.which("nvcc")


def test_kernel_sources_ship_in_the_package() -> None:
    shipped = {p.name for p in kernel_dir().iterdir()}
    assert set(KERNEL_FILES) | {"common.cuh"} <= shipped
    assert {p.name for p in (Path(__file__).resolve().parents[2] / "cuda").glob("*.cu")} == set(KERNEL_FILES)


def _nvcc(source: str, out: Path, *arch: str) -> None:
    cmd = [NVCC, "-std=c++17", "-I", str(kernel_dir()), str(kernel_dir() / source), "-o", str(out), *arch]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-3000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_kernels_compile_to_ptx_for_sm80_and_sm90(source: str, arch: str, tmp_path: Path) -> None:
    """Front end only (no ptxas): a syntax or type error is caught in seconds, without a GPU."""
    _nvcc(source, tmp_path / "k.ptx", "-ptx", f"-arch={arch}")
    assert f".target sm_{arch[-2:]}" in (tmp_path / "k.ptx").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_kernels_build_cubins_for_sm80_and_sm90(source: str, tmp_path: Path) -> None:
    _cuda_backend()  # the full build (ptxas for two architectures) runs on GPU hosts only
    _nvcc(
        source,
        tmp_path / "k.o",
        "-c",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
    )
    assert (tmp_path / "k.o").stat().st_size > 0


def test_runtime_modules_import_without_pycuda() -> None:
    for mod in (
        "requant",
        "plan",
        "lower",
        "lower.base",
        "lower.gemm",
        "lower.add",
        "lower.pool",
        "lower.move",
        "numpy_backend",
        "float_ops",
        "validate",
        "cuda_backend",
        "backends",
    ):
        importlib.import_module(f"onnxquant.runtime.{mod}")
    if importlib.util.find_spec("pycuda") is None:
        assert "pycuda" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is not None, reason="PyCUDA is installed")
def test_cuda_backend_without_pycuda_is_one_line_error() -> None:
    with pytest.raises(OnnxQuantError, match="needs PyCUDA") as info:
        get_backend("cuda")
    assert "\n" not in str(info.value)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(OnnxQuantError, match="accepted: numpy, cuda"):
        get_backend("tpu")


def test_backend_and_requant_registries_name_the_cli_choices() -> None:
    assert list(BACKENDS) == ["numpy", "cuda"] and BACKENDS["cuda"] is CudaBackend
    assert isinstance(get_backend("numpy"), NumpyBackend)
    assert sorted(REQUANT_MODES) == ["fixed", "float"] and all(REQUANT_MODES.values())


def _cuda_backend():
    if importlib.util.find_spec("pycuda") is None:
        pytest.skip("PyCUDA not installed")
    try:
        return get_backend("cuda")
    except OnnxQuantError as exc:
        pytest.skip(str(exc))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["float", "fixed"])
def test_cuda_backend_bit_identical_to_numpy(mode: str) -> None:
    cuda = _cuda_backend()
    rng = np.random.default_rng(0)
    for model, shape in ((conv_net(channels=16, size=16), (3, 16, 16)), (matmul_net(), (5, 16))):
        calib = rng.random((8, *shape)).astype(np.float32)
        q = quantize(model, calib)
        plan = lower(q)
        feeds = {"x": rng.random((5, *shape)).astype(np.float32)}
        ref = NumpyBackend().run(plan, feeds, mode)
        got = cuda.run(plan, feeds, mode)
        for step in plan.integer_steps():
            assert np.array_equal(got[step.outputs[0]], ref[step.outputs[0]]), step.name
    plan = lower(int4_conv_net())  # packed int4 kernel
    feeds = {"x": rng.random((3, 3, 10, 10)).astype(np.float32)}
    ref, got = NumpyBackend().run(plan, feeds, mode), cuda.run(plan, feeds, mode)
    for step in plan.integer_steps():
        assert np.array_equal(got[step.outputs[0]], ref[step.outputs[0]]), step.name


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "dp4a"])
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (130, 70, 100), (256, 384, 576), (33, 1000, 512)])
def test_raw_int8_gemm_exact(kernel: str, m: int, n: int, k: int) -> None:
    _cuda_backend()
    if kernel == "mma" and tuple(device().cc) < (8, 0):
        pytest.skip("tensor-core kernel needs sm_80")
    rng = np.random.default_rng(m + n + k)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    b = rng.integers(-128, 128, (n, k)).astype(np.int8)
    g = RawGemm(a, b, kernel)
    g.launch()
    assert np.array_equal(g.result(), a.astype(np.int64) @ b.astype(np.int64).T)

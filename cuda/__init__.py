"""CUDA C sources of the integer kernels, shipped as package data (onnxquant.kernels)."""

"""The integer backends by name, as `validate` and the CLI's ``--backend`` accept them (iterating `BACKENDS`
gives the names). Creating the cuda backend imports PyCUDA; importing this module does not."""

from __future__ import annotations

from onnxquant.errors import BadOptionError
from onnxquant.runtime.cuda_backend import CudaBackend
from onnxquant.runtime.numpy_backend import NumpyBackend

BACKENDS: dict[str, type[NumpyBackend]] = {"numpy": NumpyBackend, "cuda": CudaBackend}


def get_backend(name: str) -> NumpyBackend:
    """A new backend object for `name`; a one-line OnnxQuantError when it is unknown or unusable here."""
    if name not in BACKENDS:
        raise BadOptionError(f"backend {name!r} is unknown; accepted: {', '.join(BACKENDS)}")
    return BACKENDS[name]()

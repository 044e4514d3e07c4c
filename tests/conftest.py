"""Suite-wide setup. The suite runs as `pytest -n 2` on 2 cores: two worker processes, each with a BLAS thread
pool as wide as the machine, would oversubscribe the cores with busy-waiting BLAS threads (the integer
runtime's tests took 3× longer), so each worker uses one BLAS thread unless the caller says otherwise. This
must happen before numpy loads OpenBLAS, hence at import of this first conftest."""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

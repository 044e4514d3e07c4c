"""Min/max calibration: the clipping range is the observed range [min, max] (per tensor or per channel)."""

from __future__ import annotations

from onnxquant.calib.stats import TensorStats


def minmax(st: TensorStats, bits, symmetric: bool, *, per_channel: bool = False):
    """The observed range; `bits` and `symmetric` do not change it (the scale does)."""
    if per_channel:
        return st.ch_min, st.ch_max
    return st.min, st.max

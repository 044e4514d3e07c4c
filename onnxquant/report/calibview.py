"""Calibration view: each activation's histogram with the range every calibration method would choose.

From saved statistics (`calib.stats.TensorStats` with a histogram: `hist`, 2·k signed counts over
[−A, A]), every method of `calib.methods.METHODS` is applied through `calib.engine.compute_table` at the
tensor's width and signedness; the method the calibration table used is the chosen one. For display the
histogram is re-binned to at most `PLOT_BINS` bars by summing neighbouring bins; a non-negative tensor shows
[0, A] only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxquant.calib.engine import compute_table
from onnxquant.calib.methods import METHODS
from onnxquant.errors import OnnxQuantError
from onnxquant.tables import CalibrationTable

log = logging.getLogger(__name__)

PLOT_BINS = 128


@dataclass
class CalibView:
    """What one activation's calibration looked like."""

    tensor: str
    lo: float  # histogram extent
    hi: float
    counts: np.ndarray  # re-binned counts over [lo, hi]
    ranges: dict[str, tuple[float, float]]  # method -> clipping range it would choose
    chosen: str | None  # method of the table entry
    chosen_range: tuple[float, float] | None
    bits: int
    symmetric: bool

    def to_json(self) -> dict:
        return {
            "tensor": self.tensor,
            "hist_range": [self.lo, self.hi],
            "counts": self.counts.tolist(),
            "ranges": {m: list(r) for m, r in self.ranges.items()},
            "chosen": self.chosen,
            "chosen_range": list(self.chosen_range) if self.chosen_range else None,
            "bits": self.bits,
            "symmetric": self.symmetric,
        }


def rebin(counts: np.ndarray, target: int = PLOT_BINS) -> np.ndarray:
    """Sum neighbouring bins so that at most `target` remain (the last group may be shorter)."""
    counts = np.asarray(counts, np.int64)
    group = max(1, -(-counts.size // target))
    pad = (-counts.size) % group
    if pad:
        counts = np.concatenate([counts, np.zeros(pad, np.int64)])
    return counts.reshape(-1, group).sum(axis=1)


def calibration_view(
    stats: Mapping[str, object], specs: Mapping[str, tuple[int, bool]], table: CalibrationTable | None = None
) -> tuple[dict[str, CalibView], list[str]]:
    """Views for the tensors of `specs` (tensor -> (bits, symmetric)) that have histograms in `stats`."""
    notes: list[str] = []
    usable = {t: spec for t, spec in specs.items() if t in stats and getattr(stats[t], "has_hist", False)}
    if len(usable) < len(specs):
        notes.append(
            f"calibration view: {len(specs) - len(usable)} of {len(specs)} activations have no saved "
            "histogram"
        )
    ranges: dict[str, dict[str, tuple[float, float]]] = {t: {} for t in usable}
    for method in METHODS:
        try:
            tab = compute_table(stats, usable, method)
            entries = tab.tensors
        except OnnxQuantError:
            entries = {}
            for t, spec in usable.items():
                try:
                    entries.update(compute_table(stats, {t: spec}, method).tensors)
                except OnnxQuantError as exc:
                    log.info("calibration view: %s on %s: %s", method, t, exc)
        for t, e in entries.items():
            if e.axis is None:
                ranges[t][method] = (float(e.min), float(e.max))
    views = {}
    for t, (bits, symmetric) in usable.items():
        st = stats[t]
        hist = np.asarray(st.hist)
        half = hist.size // 2
        amax = float(st.hist_range)
        if st.one_sided:
            counts, lo, hi = hist[half:], 0.0, amax
        else:
            counts, lo, hi = hist, -amax, amax
        entry = table.tensors.get(t) if table is not None else None
        chosen, chosen_range = None, None
        if entry is not None and entry.axis is None:
            chosen, chosen_range = entry.method, (float(entry.min), float(entry.max))
        views[t] = CalibView(
            tensor=t,
            lo=lo,
            hi=hi,
            counts=rebin(counts),
            ranges=ranges[t],
            chosen=chosen,
            chosen_range=chosen_range,
            bits=int(bits),
            symmetric=bool(symmetric),
        )
    return views, notes

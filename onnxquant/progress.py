"""Progress bars on stderr (tqdm), shared by every stage that loops over data or layers.

A bar counts samples when it iterates batches of a source whose size is known (file and image sources know it
before the first batch; a reader function only after one pass), layers when it iterates a list, and shows the
rate and the time left whenever the total is known. Bars are drawn only when asked (the CLI asks when stderr
is a terminal). `close_bars` ends any bar still open, so a message printed after an interrupt starts on a line
of its own instead of after the bar's text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_open_bars: list[tqdm] = []


def _batch_rows(item) -> int:
    """Samples in one `{input_name: array}` batch (axis 0), 1 for anything else."""
    if isinstance(item, Mapping) and item:
        first = next(iter(item.values()))
        return len(first) if getattr(first, "ndim", 0) else 1
    return 1


def known_total(data) -> tuple[int | None, str]:
    """(total, unit) of `data` without reading it: a data source's sample count when it already knows it,
    else the length of a sized collection of layers or batches."""
    samples = getattr(data, "known_samples", None)
    if isinstance(samples, int):
        return samples, "sample"
    if hasattr(data, "__len__") and not hasattr(data, "num_samples"):
        return len(data), "it"
    return None, "sample" if hasattr(data, "num_samples") else "it"


def progress_iter(data: Iterable[T], enabled: bool, label: str, unit: str | None = None) -> Iterator[T]:
    """Iterate `data`, with a progress bar on stderr when `enabled` (counts, rate, ETA when the total is
    known)."""
    if not enabled:
        yield from data
        return
    total, counted = known_total(data)
    by_samples = counted == "sample"
    bar = tqdm(
        total=total,
        desc=label,
        unit=unit or counted,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        mininterval=0.2,
    )
    _open_bars.append(bar)
    try:
        for item in data:
            yield item
            bar.update(_batch_rows(item) if by_samples else 1)
    finally:
        _close(bar)


def note(text: str, enabled: bool) -> None:
    """A one-line notice among the bars (what the next stage costs); shown when progress is."""
    if enabled:
        tqdm.write(text, file=sys.stderr)


def _close(bar: tqdm) -> None:
    if bar in _open_bars:
        _open_bars.remove(bar)
    bar.close()


def close_bars() -> None:
    """Close every bar still drawn (after an interrupt), leaving the cursor at the start of a clean line."""
    while _open_bars:
        _close(_open_bars[-1])

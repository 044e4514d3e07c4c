"""Progress bars on stderr, shared by every stage that loops over data or layers."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import click

T = TypeVar("T")


def progress_iter(data: Iterable[T], enabled: bool, label: str) -> Iterator[T]:
    """Iterate `data`, with a click progress bar on stderr when `enabled`."""
    if not enabled:
        yield from data
        return
    length = len(data) if hasattr(data, "__len__") else None
    with click.progressbar(data, length=length, label=label, file=sys.stderr) as bar:
        yield from bar

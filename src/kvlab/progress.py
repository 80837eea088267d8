"""Progress bars on stderr (rich), shared by tokenization and evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], label: str, enabled: bool = True) -> Iterable[T]:
    """``items`` with a transient progress bar on stderr, or as they are when disabled."""
    if not enabled:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=label, console=Console(stderr=True), transient=True)

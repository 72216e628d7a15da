"""Format-independent image tools: convert, measure, rebase, commit.

Placeholder signatures; the implementation lands with the image engine issue.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from virtkit.errors import UnsupportedFeatureError

__all__ = ["commit", "convert", "measure", "rebase"]


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    format: str = "qcow2",  # noqa: A002 - qemu-img's own word
    compress: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> None:
    """Copy image ``src`` into a new image ``dst`` of ``format``."""
    raise UnsupportedFeatureError("convert is not implemented yet", feature="convert")


def measure(src: str | os.PathLike[str], format: str = "qcow2", **options: Any) -> Any:  # noqa: A002
    """How big converting ``src`` to ``format`` would be."""
    raise UnsupportedFeatureError("measure is not implemented yet", feature="measure")


def rebase(image: str | os.PathLike[str], backing: str | None, **options: Any) -> None:
    """Change an image's backing file."""
    raise UnsupportedFeatureError("rebase is not implemented yet", feature="rebase")


def commit(image: str | os.PathLike[str], **options: Any) -> None:
    """Write an overlay's data into its backing file."""
    raise UnsupportedFeatureError("commit is not implemented yet", feature="commit")

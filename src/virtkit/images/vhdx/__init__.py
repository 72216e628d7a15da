"""The native VHDX (Hyper-V) engine: fixed, dynamic and differencing disks.

Module map (the shape of :mod:`virtkit.images.qcow2`):

- :mod:`.layout`: the on-disk structures, described once, used for reading and writing;
- :mod:`.crc`: CRC-32C, the checksum of headers, region tables and log entries;
- :mod:`.metadata`: headers, region table and metadata region, validated;
- :mod:`.log`: detects a log that must be replayed (refused, not replayed);
- :mod:`.mapping`: the BAT and sector bitmaps: where a guest offset lives;
- :mod:`.image`: :class:`VhdxImage`, the access layer;
- :mod:`.create`: new dynamic, fixed and differencing files.

Reference: Microsoft's MS-VHDX specification v1.00 and QEMU's ``block/vhdx*.c``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from virtkit.errors import UnsupportedFeatureError
from virtkit.images.vhdx.create import create as _create
from virtkit.images.vhdx.image import VhdxImage, open_image

__all__ = ["VhdxImage", "create", "open"]


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> VhdxImage:
    """Create a VHDX image (see :func:`virtkit.images.vhdx.create.create` for options)."""
    return _create(path, size, **options)


def open(  # noqa: A001 - the driver protocol's name
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    allow_backing: Iterable[str | os.PathLike[str]] = (),
    force_share: bool = False,
) -> VhdxImage:
    """Open an existing VHDX image (read-only: virtkit writes only VHDX files it creates).

    Raises:
        ImageError: the file (or its parent) cannot be opened or is not allowed.
        CorruptImageError: the metadata is damaged.
        UnsupportedFeatureError: writable open, a pending log, or an unknown required item.
    """
    if writable:
        raise UnsupportedFeatureError(
            "virtkit does not modify existing VHDX files (that needs the VHDX log); open it "
            "read-only, or convert it to qcow2 to write",
            feature="vhdx write",
            path=os.fspath(path),
        )
    return open_image(path, allow_backing=tuple(allow_backing), force_share=force_share)

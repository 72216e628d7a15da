"""The native VDI (VirtualBox) reader: static and dynamic disks.

Module map (the shape of :mod:`virtkit.images.qcow2`):

- :mod:`.layout`: the header, described once;
- :mod:`.mapping`: the block map, read in bounded pages;
- :mod:`.image`: :class:`VdiImage`, the read-only access layer.

virtkit reads VDI (convert it to qcow2, raw or VHDX to write); creating a
VDI file is not supported. Reference: QEMU's ``block/vdi.c``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from virtkit.errors import UnsupportedFeatureError
from virtkit.images.vdi.image import VdiImage, open_image

__all__ = ["VdiImage", "create", "open"]


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> VdiImage:
    """Creating VDI images is not supported.

    Raises:
        UnsupportedFeatureError: always; create qcow2 or convert with qemu-img.
    """
    raise UnsupportedFeatureError(
        "virtkit reads VDI images but does not create them; use qcow2, or "
        "'qemu-img convert -O vdi'",
        feature="vdi create",
        path=os.fspath(path),
    )


def open(  # noqa: A001 - the driver protocol's name
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    allow_backing: Iterable[str | os.PathLike[str]] = (),
    force_share: bool = False,
) -> VdiImage:
    """Open a VDI image read-only.

    Raises:
        UnsupportedFeatureError: ``writable=True``, or a VDI variant QEMU cannot read either.
        CorruptImageError: the header or block map is damaged.
        ImageError: the file cannot be opened.
    """
    if writable:
        raise UnsupportedFeatureError(
            "virtkit reads VDI images only; open read-only or convert to qcow2 to write",
            feature="vdi write",
            path=os.fspath(path),
        )
    return open_image(path, force_share=force_share)

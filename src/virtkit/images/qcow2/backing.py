"""The child files of a qcow2 image: its backing image and an external data file.

Both are opened with the permissions QEMU takes for such children, so an
overlay's base cannot be written underneath it; :func:`reopen` switches the
backing image between read-only and writable (what a commit into the base
needs) without closing the overlay.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from virtkit import images
from virtkit.errors import ImageError, UnsupportedFeatureError, VirtkitError
from virtkit.images.base import Image
from virtkit.images.qcow2 import chain
from virtkit.images.storage import FileStorage

if TYPE_CHECKING:  # the image module imports this one
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["open_backing", "open_children", "reopen"]


def open_children(img: Qcow2Image) -> None:
    """Open the external data file and the backing image the metadata names (read-only)."""
    meta = img.meta
    if meta.data_file is not None:
        if img._writable:
            raise UnsupportedFeatureError(
                "writing images with an external data file is not supported; open read-only",
                feature="external data file (write)",
                path=img.path,
            )
        real = chain.resolve(img.path, meta.data_file, img._allow, what="data file")
        # QEMU's data-file child of a read-only node: consistent read, write unshared
        img._data_st_own = FileStorage(real, writable=False, force_share=img._force_share)
        img.data_st = img._data_st_own
        img._mapper.external = True
    if meta.backing_file is not None:
        img.backing = open_backing(img, writable=False)


def open_backing(img: Qcow2Image, *, writable: bool) -> Image:
    """Open the recorded backing file with the locks QEMU takes for a backing child.

    QEMU (``bdrv_default_perms_for_cow`` in ``block.c``) asks a backing
    file for consistent read only and shares neither write nor resize, so
    read-only, without ``force_share``: nobody may write the base under an
    overlay, while any number of overlays (ours or a running QEMU's) read
    it. ``force_share`` on the overlay (``qemu-img -U``) is inherited, as
    QEMU's ``force-share`` option is.
    """
    meta = img.meta
    if meta.backing_file is None:
        raise ImageError("the image has no backing file", path=img.path)
    real = chain.resolve(img.path, meta.backing_file, img._allow, what="backing file")
    fmt = chain.backing_format(meta.backing_format, real, img.path)
    chain.STACK.push(img.path)
    try:
        opened: Image = images.open(
            real,
            writable=writable,
            format=fmt,  # type: ignore[arg-type]
            allow_backing=img._allow,
            force_share=img._force_share and not writable,
        )
    finally:
        chain.STACK.pop()
    return opened


def reopen(img: Qcow2Image, *, writable: bool) -> Image:
    """Reopen the backing file writable or read-only (see :meth:`.Qcow2Image.reopen_backing`)."""
    img._live()
    if writable:
        img._require_writable("reopen the backing file read-write")
    if img.backing is None:
        raise ImageError("the image has no backing file to reopen", path=img.path)
    if img.backing.writable == writable:
        return img.backing
    old, img.backing = img.backing, None
    old.close()
    try:
        img.backing = open_backing(img, writable=writable)
    except BaseException:
        restored = False
        with contextlib.suppress(VirtkitError):
            img.backing = open_backing(img, writable=False)
            restored = True
        if not restored:
            # Reads would show zeroes where the base has data: give up the image.
            img.close()
        raise
    return img.backing

"""The persistent dirty bitmap methods of qcow2 images, as ``qemu-img bitmap`` offers them.

:class:`BitmapsMixin` gives :class:`~.image.Qcow2Image` ``bitmaps()``,
``add_bitmap``, ``remove_bitmap``, ``clear_bitmap``, ``enable_bitmap``,
``disable_bitmap``, ``merge_bitmap`` and ``bitmap_extents``; each checks its
arguments and the image's state, then works through the image's
:class:`~.bitmaps.Tracker` (which keeps the bitmaps up to date and stores
them crash-safely).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from virtkit.errors import ConfigError, CorruptImageError, ImageError, UnsupportedFeatureError
from virtkit.images.args import check_bool, check_name
from virtkit.images.base import BitmapInfo, Image
from virtkit.images.qcow2.bitmap_format import (
    ENTRY_OFFSET_MASK,
    FLAG_AUTO,
    MAX_BITMAPS,
    MAX_GRANULARITY_BITS,
    MAX_NAME,
    MAX_PHYS_SIZE,
    DirEntry,
    read_table,
)
from virtkit.images.qcow2.bitmaps import LiveBitmap, Tracker, tracker

if TYPE_CHECKING:  # the image module imports this one
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["BitmapsMixin"]


def _granularity(value: int | str | None, img: Qcow2Image) -> int:
    if value is None:
        return max(4096, img.cs)  # qemu-img bitmap's default: the cluster size, at least 4 KiB
    from virtkit.images.sizes import parse_size  # noqa: PLC0415 - tiny helper module

    g = parse_size(value, field="granularity")
    if g < 512 or g > 1 << MAX_GRANULARITY_BITS or g & (g - 1):
        raise ConfigError(
            f"'granularity' must be a power of two from 512 B to 2 GiB (got {g})",
            field="granularity",
        )
    return g


def _img(obj: object) -> Qcow2Image:
    return cast("Qcow2Image", obj)


class BitmapsMixin:
    """The persistent dirty bitmap methods of :class:`~.image.Qcow2Image` (``qemu-img bitmap``)."""

    _bitmap_tracker: Tracker | None = None

    def _bitmaps_for(self, action: str, *, write: bool) -> Tracker:
        img = _img(self)
        if write:
            img._require_writable(action)
        else:
            img._live()
        if not img.v3:
            raise UnsupportedFeatureError(
                "qcow2 v2 (compat 0.10) images cannot hold persistent bitmaps; convert to "
                "compat 1.1",
                feature="bitmaps in v2",
                path=img.path,
            )
        t = tracker(img)
        assert t is not None  # v3
        return t

    def bitmaps(self) -> tuple[BitmapInfo, ...]:
        """The persistent dirty bitmaps, in directory order.

        Raises:
            CorruptImageError: the bitmap directory or a bitmap's data is damaged.
        """
        img = _img(self)
        img._live()
        if not img.v3:
            return ()
        t = tracker(img)
        return tuple(t.info(bm) for bm in t.items) if t is not None else ()

    def add_bitmap(
        self, name: str, *, granularity: int | str | None = None, disabled: bool = False
    ) -> BitmapInfo:
        """Add an empty persistent bitmap (``qemu-img bitmap --add``).

        Args:
            name: 1..1023 bytes of UTF-8, unique in the image.
            granularity: bytes per bit, a power of two from 512 B to 2 GiB;
                by default the cluster size (at least 4 KiB), as qemu-img.
            disabled: start not recording writes (``--disable``).

        Raises:
            ConfigError: bad name or granularity, or the bitmap would exceed
                QEMU's 512 MiB limit (use a larger granularity).
            ImageError: the name exists, or the image is read-only.
            UnsupportedFeatureError: a v2 image.
        """
        check_name(name)
        check_bool(disabled, "disabled")
        t = self._bitmaps_for("add a bitmap", write=True)
        img = _img(self)
        if len(name.encode()) > MAX_NAME:
            raise ConfigError("'name' must be at most 1023 bytes", field="name", value=name)
        gran = _granularity(granularity, img)
        gbits = gran.bit_length() - 1
        granules = -(-img.virtual_size // gran)
        nbytes = -(-granules // 8)
        if nbytes > MAX_PHYS_SIZE:
            raise ConfigError(
                f"a bitmap of granularity {gran} on this disk would take {nbytes} bytes, over "
                "QEMU's 512 MiB limit; use a larger granularity",
                field="granularity",
            )
        if any(bm.name == name for bm in t.items):
            raise ImageError(f"a bitmap named {name!r} already exists", path=img.path)
        if len(t.items) >= MAX_BITMAPS:
            raise ImageError("the image already holds 65535 bitmaps", path=img.path)
        bm = LiveBitmap(
            DirEntry(name, gbits, 0 if disabled else FLAG_AUTO, 0, 0),
            enabled=not disabled,
            inconsistent=False,
            chunks={},
            changed=True,
        )

        def add() -> None:
            img._prepare_write()
            t.items.append(bm)
            try:
                t.store(structural=True)
            except BaseException:
                t.items.remove(bm)
                raise

        img._run_write(add)
        return t.info(bm)

    def remove_bitmap(self, name: str) -> None:
        """Remove a bitmap, inconsistent ones too, and free its clusters (``--remove``).

        Raises:
            ImageError: no such bitmap, or the image is read-only.
        """
        check_name(name)
        t = self._bitmaps_for("remove a bitmap", write=True)
        img = _img(self)
        bm = t.find(name)

        def remove() -> None:
            img._prepare_write()
            k = t.items.index(bm)
            del t.items[k]
            try:
                t.store(structural=True)
            except BaseException:
                t.items.insert(k, bm)
                raise
            cs = img.cs
            try:
                table = read_table(img.st, bm.entry, cs)
            except CorruptImageError:
                table = array("Q")  # an unreadable table leaks its clusters, as in QEMU
            for e in table:
                off = e & ENTRY_OFFSET_MASK
                if off and img.refs.get(off >> img.cb) > 0:
                    img.refs.free(off, 1)
            if img.refs.get(bm.entry.table_offset >> img.cb) > 0:
                img.refs.free(bm.entry.table_offset, -(-bm.entry.table_size * 8 // cs))

        img._run_write(remove)

    def clear_bitmap(self, name: str) -> None:
        """Clear every bit of a bitmap (``--clear``).

        Raises:
            ImageError: no such bitmap, it is inconsistent, or the image is read-only.
        """
        self._change(name, "clear", _clear)

    def enable_bitmap(self, name: str) -> None:
        """Make a bitmap record writes (``--enable``; the ``auto`` flag).

        Raises:
            ImageError: no such bitmap, it is inconsistent, or the image is read-only.
        """
        self._change(name, "enable", _enable)

    def disable_bitmap(self, name: str) -> None:
        """Stop a bitmap recording writes (``--disable``).

        Raises:
            ImageError: no such bitmap, it is inconsistent, or the image is read-only.
        """
        self._change(name, "disable", _disable)

    def merge_bitmap(
        self,
        source: str,
        target: str,
        *,
        source_image: Image | str | os.PathLike[str] | None = None,
    ) -> None:
        """Set in ``target`` every bit set in ``source`` (``--merge``; granularities may differ).

        Args:
            source: the bitmap to read.
            target: the bitmap to change (in this image).
            source_image: where ``source`` lives when not in this image: an
                open qcow2 image, or the path of one (opened read-only).

        Raises:
            ImageError: a bitmap is missing or inconsistent, the disks differ
                in size, or this image is read-only.
        """
        check_name(source, "source")
        check_name(target, "target")
        img = _img(self)
        if source_image is None:
            src = self._bitmaps_for("merge into", write=True).usable(source, "merge from")
            extents = _tracker_of(img).extents(src)
            size = img.virtual_size
        elif isinstance(source_image, Image):
            extents, size = _extents_of(source_image, source)
        else:
            from virtkit import images  # noqa: PLC0415 - the public package imports this driver

            with images.open(source_image, format="qcow2", force_share=True) as other:
                extents, size = _extents_of(other, source)
        if size != img.virtual_size:
            raise ImageError(
                f"cannot merge: the source disk is {size} bytes and this one "
                f"{img.virtual_size}; bitmaps of different sizes do not merge",
                path=img.path,
            )

        def merge(t: Tracker, bm: LiveBitmap) -> None:
            gb = bm.entry.granularity_bits
            for off, length in extents:
                t.set_granules(bm, off >> gb, -(-(off + length) >> gb))

        self._change(target, "merge into", merge)

    def bitmap_extents(self, name: str) -> list[tuple[int, int]]:
        """The dirty ranges of a bitmap as ``(offset, length)`` in guest bytes, merged.

        Ranges cover whole granules (the last one ends at the disk's end).

        Raises:
            ImageError: no such bitmap, or it is inconsistent.
            CorruptImageError: its table or data is damaged.
        """
        check_name(name)
        t = self._bitmaps_for("read", write=False)
        return t.extents(t.usable(name, "read"))

    def _change(
        self, name: str, action: str, change: Callable[[Tracker, LiveBitmap], None]
    ) -> None:
        check_name(name)
        t = self._bitmaps_for(f"{action} a bitmap", write=True)
        img = _img(self)
        bm = t.usable(name, action)

        def run() -> None:
            img._prepare_write()
            t.begin()
            t.load(bm)
            change(t, bm)
            bm.changed = True
            t.store()

        img._run_write(run)


def _clear(t: Tracker, bm: LiveBitmap) -> None:
    t.load(bm).clear()


def _enable(t: Tracker, bm: LiveBitmap) -> None:
    bm.enabled = True


def _disable(t: Tracker, bm: LiveBitmap) -> None:
    bm.enabled = False


def _tracker_of(img: Qcow2Image) -> Tracker:
    t = tracker(img)
    assert t is not None
    return t


def _extents_of(other: Image, name: str) -> tuple[list[tuple[int, int]], int]:
    extents = getattr(other, "bitmap_extents", None)
    if not callable(extents) or other.format != "qcow2":
        raise UnsupportedFeatureError(
            f"{other.format} images have no persistent bitmaps",
            feature="bitmaps",
            path=other.path,
        )
    return list(extents(name)), other.virtual_size

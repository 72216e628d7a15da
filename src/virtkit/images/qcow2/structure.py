"""Structural operations on qcow2 images: resize, emptying, the backing name, header flags.

These change the image's layout rather than guest data through a request:
they run write-through (the image writes its metadata cache back first, see
:meth:`~.image.Qcow2Image._run_write`), each step made durable before the
next one depends on it, so a crash at any point leaks clusters at worst.
"""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING

import attrs

from virtkit.errors import ImageError
from virtkit.images.qcow2 import bitmaps as bitmapsmod
from virtkit.images.qcow2 import check as checkmod
from virtkit.images.qcow2 import layout, snapshots
from virtkit.images.qcow2.requests import coalesce
from virtkit.images.qcow2.writes import grow_l1, zero_partial, zero_range

if TYPE_CHECKING:  # the image module imports this one
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = [
    "drop_autoclear",
    "make_empty",
    "repair_dirty",
    "resize",
    "set_backing_file",
    "set_size",
    "trim_free_tail",
]


def make_empty(img: Qcow2Image) -> None:
    """Drop every mapping of the active disk (see :meth:`.Qcow2Image.make_empty`)."""
    img._prepare_write()
    cb = img.cb
    # bounded memory: this many L1 entries' worth of references at a time
    batch = max(1, (1 << 18) // img.l2_entries)
    l1_off = img.hdr.l1_table_offset
    punch = getattr(img.st, "punch_hole", None)
    for lo in range(0, len(img._l1), batch):
        hi = min(lo + batch, len(img._l1))
        part = array("Q", img._l1[lo:hi])
        if not any(e & layout.L1E_OFFSET_MASK for e in part):
            continue
        changes = snapshots.tree_refs(img, part, l1_off + lo * 8, -1)
        drops: dict[int, int] = {}
        for c, d in changes:
            drops[c] = drops.get(c, 0) - d
        for c, n in drops.items():
            if img.refs.get(c) < n:
                img._mark_corrupt(
                    f"host cluster {c} is referenced from the active L1/L2 tables but its "
                    f"refcount is {img.refs.get(c)}",
                    c << cb,
                )
        img.st.pwrite(l1_off + lo * 8, bytes((hi - lo) * 8))
        img.st.flush()
        img._l1[lo:hi] = array("Q", bytes((hi - lo) * 8))
        img._meta_changed()
        img.refs.update(changes)
        for e in part:
            off = e & layout.L1E_OFFSET_MASK
            if off and not img.refs.get(off >> cb):
                img._mapper.forget_l2(off)
        if callable(punch):  # nothing references these any more: give the space back
            freed = sorted(c for c in drops if not img.refs.get(c))
            for first, stop, _ in coalesce([(c, c << cb) for c in freed], img.cs):
                if not punch(first << cb, (stop - first) << cb):
                    punch = None
                    break
    img._cluster_cache = None
    img._cfree = 0
    img.st.flush()
    trim_free_tail(img)


def trim_free_tail(img: Qcow2Image) -> None:
    """Cut the file after its last referenced cluster (free clusters only are dropped).

    Only when the active disk is all there is (no snapshots, no bitmaps),
    as QEMU's ``make_completely_empty``: then every cluster in use is one
    whose refcount was just checked or a fixed table, and a wrong refcount
    elsewhere cannot make us cut off data.
    """
    if img.snaps or img.meta.bitmaps is not None:
        return
    refs = img.refs
    end = (max(img.metadata_clusters()) + 1) << img.cb
    for t in range(len(refs.table) - 1, -1, -1):
        blk = refs.block(t)
        if blk is None:
            continue
        last = next((i for i in range(len(blk) - 1, -1, -1) if blk[i]), -1)
        if last >= 0:
            end = max(end, (t * refs.per_block + last + 1) << img.cb)
            break
    if end < img.st.size():
        img.st.truncate(end)
        img.st.flush()


def resize(img: Qcow2Image, old: int, new: int, shrink: bool) -> None:
    """Change the virtual size from ``old`` to ``new`` (arguments checked)."""
    img._prepare_write()
    if new < old:
        if img.snaps:
            raise ImageError("cannot shrink an image with internal snapshots", path=img.path)
        stored = [
            e for e in img.block_status(new, old - new, include_backing=False) if e.kind == "data"
        ]
        if stored and not shrink:
            raise ImageError(
                f"shrinking to {new} bytes would drop data stored at guest offset "
                f"{stored[0].start}; pass shrink=True to drop it",
                path=img.path,
            )
        zero_range(img, new, old - new, discard=True, full=True)
        set_size(img, new)
        return
    grow_l1(img, img.meta.l1_entries_for(new))
    set_size(img, new)
    tail_end = min(new, -(-old // img.cs) * img.cs)
    if tail_end > old:
        zero_partial(img, old, tail_end - old)
    if img.backing is not None and img.backing.virtual_size > old:
        zero_range(img, old, min(new, img.backing.virtual_size) - old, discard=False)


def set_size(img: Qcow2Image, size: int) -> None:
    """Write the new virtual size into the header, durably."""
    img.st.pwrite(layout.OFF_SIZE, struct.pack(">Q", size))
    img.st.flush()
    img.hdr.size = size


def set_backing_file(img: Qcow2Image, name: str | None, backing_format: str | None) -> None:
    """Rewrite the header with a new backing file name and format (arguments checked)."""
    img._prepare_write()
    exts = [
        e for e in img.meta.extensions if e.type not in (layout.EXT_BACKING_FORMAT, layout.EXT_END)
    ]
    if name is not None and backing_format is not None:
        exts.insert(0, layout.Extension(layout.EXT_BACKING_FORMAT, backing_format.encode()))
    hdr = img.hdr
    head = bytearray(layout.encode_header(hdr))
    head += layout.encode_extensions(exts)
    raw_name = name.encode() if name is not None else b""
    if len(raw_name) > layout.MAX_BACKING_NAME:
        raise ImageError("backing file name longer than 1023 bytes", path=img.path)
    if len(head) + len(raw_name) > img.cs:
        raise ImageError(
            "header, extensions and backing name do not fit in one cluster", path=img.path
        )
    new_hdr = layout.Header(**{f.name: getattr(hdr, f.name) for f in attrs.fields(layout.Header)})
    new_hdr.backing_file_offset = len(head) if raw_name else 0
    new_hdr.backing_file_size = len(raw_name)
    head[: len(layout.encode_header(new_hdr))] = layout.encode_header(new_hdr)
    head += raw_name
    img.st.pwrite(0, bytes(head))
    img.st.flush()
    img.hdr = new_hdr
    img.meta.header = new_hdr
    img.meta.extensions = exts
    img.meta.backing_file = name
    img.meta.backing_format = backing_format if name is not None else None


def repair_dirty(img: Qcow2Image) -> None:
    """Rebuild the refcounts of an image left dirty (lazy refcounts), then clear the flag."""
    checkmod.check(img, repair=True)
    img.hdr.incompatible_features &= ~layout.INCOMPAT_DIRTY
    img._write_u64(layout.OFF_INCOMPAT, img.hdr.incompatible_features)
    img.st.flush()


def drop_autoclear(img: Qcow2Image) -> None:
    """Before the first write: clear the autoclear features not kept in sync.

    As the specification asks of programs that do not maintain them. The
    bitmaps bit stays when every persistent bitmap could be flagged in-use
    (stale), as QEMU does while writing; a bitmap directory that cannot be
    parsed loses it.
    """
    if img.v3 and img.hdr.autoclear_features:
        keep = 0
        if img.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS and bitmapsmod.begin_write(img):
            keep = layout.AUTOCLEAR_BITMAPS
        if img.hdr.autoclear_features != keep:
            img.hdr.autoclear_features = keep
            img._write_u64(layout.OFF_AUTOCLEAR, keep)
            img.st.flush()

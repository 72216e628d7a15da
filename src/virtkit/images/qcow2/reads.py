"""Guest reads, allocation status and ``info()`` of an open qcow2 image.

The read side of :class:`~.image.Qcow2Image`: runs from the
:class:`~.mapping.Mapper` are gathered into large positional reads, data
clusters are checked to lie inside the file and outside the metadata before
they are read, compressed clusters are decompressed (the last one is kept),
and unallocated ranges fall through to the backing file.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from virtkit.errors import CorruptImageError
from virtkit.images.base import Extent, ImageInfo
from virtkit.images.qcow2 import bitmaps as bitmapsmod
from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.compress import decompress
from virtkit.images.qcow2.mapping import COMPRESSED, DATA, UNALLOCATED, ZERO, Mapper, Run

if TYPE_CHECKING:  # the image module imports this one
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["current", "info", "merge", "read", "read_into", "status"]


def read(img: Qcow2Image, offset: int, length: int) -> bytes:
    """``length`` guest bytes from ``offset`` (range already checked)."""
    runs = img._mapper.runs(offset, length)
    first = next(runs, None)
    if first is not None and first.kind == DATA and first.length == length:
        check_data_host(img, first.host, length)  # one contiguous run: no extra copy
        chunk = img.data_st.pread(first.host, length)
        return chunk if len(chunk) == length else chunk + bytes(length - len(chunk))
    out = bytearray(length)
    if first is not None:
        fill(img, out, offset, itertools.chain((first,), runs))
    return bytes(out)


def read_into(img: Qcow2Image, out: bytearray, offset: int, mapper: Mapper | None = None) -> None:
    """Fill ``out`` with guest bytes from ``offset`` (no range check; internal).

    ``mapper`` reads through another L1 table (a snapshot's) instead.
    """
    if out:
        fill(img, out, offset, (mapper or img._mapper).runs(offset, len(out)))


def fill(img: Qcow2Image, out: bytearray, offset: int, runs: Iterable[Run]) -> None:
    """Copy the guest bytes of ``runs`` into ``out`` (which starts at guest ``offset``)."""
    cs = img.cs
    for run in runs:
        pos = run.guest - offset
        if run.kind == DATA:
            check_data_host(img, run.host, run.length)
            chunk = img.data_st.pread(run.host, run.length)
            out[pos : pos + len(chunk)] = chunk
        elif run.kind == COMPRESSED:
            data = cluster_data(img, run.host)
            in_off = run.guest & (cs - 1)
            out[pos : pos + run.length] = data[in_off : in_off + run.length]
        elif run.kind == UNALLOCATED and img.backing is not None:
            bsize = img.backing.virtual_size
            if run.guest < bsize:
                n = min(run.length, bsize - run.guest)
                out[pos : pos + n] = img.backing.read(run.guest, n)


def check_data_host(img: Qcow2Image, host: int, length: int) -> None:
    """Refuse data clusters past the end of the file or inside metadata."""
    first = host >> img.cb
    last = (host + length - 1) >> img.cb
    if (first << img.cb) >= img.data_st.size():
        raise CorruptImageError(
            f"guest data mapped to host offset {host:#x}, past the end of the file",
            path=img.data_st.path,
            offset=host,
        )
    if img.data_st is img.st and not img.metadata_clusters().isdisjoint(range(first, last + 1)):
        raise CorruptImageError(
            f"guest data mapped to host offset {host:#x}, inside image metadata",
            path=img.path,
            offset=host,
        )


def cluster_data(img: Qcow2Image, entry: int) -> bytes:
    """The decompressed cluster a compressed L2 ``entry`` names (the last one is kept)."""
    cached = img._cluster_cache
    if cached is not None and cached[0] == entry:
        return cached[1]
    host, nbytes = img._mapper.compressed_range(entry)
    if host < img.cs or host + nbytes > -(-img.st.size() // 512) * 512:
        raise CorruptImageError(
            f"compressed cluster at {host:#x} ({nbytes} bytes) runs outside the file",
            path=img.path,
            offset=host,
        )
    raw = img.st.pread(host, nbytes)
    data = decompress(img.hdr.compression_type, raw, img.cs, path=img.path, offset=host)
    img._cluster_cache = (entry, data)
    return data


def current(img: Qcow2Image, offset: int, length: int) -> bytearray:
    """A fresh buffer with the guest bytes ``[offset, offset+length)`` (no range check)."""
    buf = bytearray(length)
    img.read_into(buf, offset)
    return buf


def status(img: Qcow2Image, offset: int, length: int, include_backing: bool) -> Iterator[Extent]:
    """Allocation extents of a range, not yet merged (:meth:`.Qcow2Image.block_status`)."""
    for run in img._mapper.runs(offset, length):
        if run.kind in (DATA, COMPRESSED):
            yield Extent(run.guest, run.length, "data")
        elif run.kind == ZERO:
            yield Extent(run.guest, run.length, "zero")
        elif not include_backing:
            yield Extent(run.guest, run.length, "unallocated")
        elif img.backing is None:
            yield Extent(run.guest, run.length, "zero")
        else:
            bsize = img.backing.virtual_size
            end = run.guest + run.length
            if run.guest < bsize:
                n = min(end, bsize) - run.guest
                for ext in img.backing.block_status(run.guest, n, include_backing=True):
                    if ext.kind == "data":
                        yield Extent(ext.start, ext.length, "data", from_backing=True)
                    else:
                        yield Extent(ext.start, ext.length, "zero")
            if end > bsize:
                start = max(run.guest, bsize)
                yield Extent(start, end - start, "zero")


def merge(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join neighbouring extents of the same kind (and source) into one."""
    pend: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if (
            pend is not None
            and pend.kind == ext.kind
            and pend.from_backing == ext.from_backing
            and pend.start + pend.length == ext.start
        ):
            pend = Extent(pend.start, pend.length + ext.length, pend.kind, pend.from_backing)
            continue
        if pend is not None:
            yield pend
        pend = ext
    if pend is not None:
        yield pend


def info(img: Qcow2Image) -> ImageInfo:
    """What ``qemu-img info --output=json`` reports (see :meth:`.Qcow2Image.info`)."""
    alloc = getattr(img.st, "allocated_bytes", None)
    actual = int(alloc()) if callable(alloc) else os.stat(img.path).st_blocks * 512
    # keys in the order qemu-img prints them
    spec: dict[str, Any] = {"compat": "1.1" if img.v3 else "0.10"}
    spec["compression-type"] = img.compression_type
    if img.v3:
        spec["lazy-refcounts"] = bool(img.hdr.compatible_features & layout.COMPAT_LAZY_REFCOUNTS)
    bitmaps = bitmapsmod.read_directory(img.st, img.meta) if img.v3 else []
    if bitmaps:
        spec["bitmaps"] = [
            {"flags": b.flag_names(), "name": b.name, "granularity": 1 << b.granularity_bits}
            for b in bitmaps
        ]
    spec["refcount-bits"] = 1 << img.hdr.refcount_order
    if img.meta.data_file is not None:
        spec["data-file"] = img.meta.data_file
        spec["data-file-raw"] = bool(img.hdr.autoclear_features & layout.AUTOCLEAR_DATA_FILE_RAW)
    if img.v3:
        spec["corrupt"] = img._corrupt
        spec["extended-l2"] = img.extended
    return ImageInfo(
        filename=img.path,
        format="qcow2",
        virtual_size=img.hdr.size,
        actual_size=actual,
        cluster_size=img.cs,
        backing_filename=img.meta.backing_file,
        backing_format=img.meta.backing_format,
        dirty_flag=bool(img.hdr.incompatible_features & layout.INCOMPAT_DIRTY),
        snapshots=img.snapshots,
        format_specific=spec,
    )

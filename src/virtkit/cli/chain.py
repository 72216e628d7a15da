"""Backing chains seen from the command line: open one, map it, compare two images.

Built on the public :mod:`virtkit.images` surface only: each layer is opened
read-only and asked for its own allocation (``block_status(...,
include_backing=False)``), which is what ``qemu-img map`` and ``qemu-img
compare`` report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

import attrs

from virtkit import images
from virtkit.errors import ConfigError, ImageError

__all__ = ["Layer", "MapEntry", "Verdict", "compare_images", "map_chain", "open_chain"]

#: a backing chain deeper than this is refused (qemu-img stops far earlier in practice)
MAX_DEPTH = 64
_CHUNK = 1 << 20
_SECTOR = 512


@attrs.frozen
class Layer:
    """One image of a backing chain: the path it was opened from and the open image."""

    path: str
    image: images.Image


@attrs.frozen
class MapEntry:
    """One row of ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    #: host offset in the image file (None for compressed clusters, zero clusters without
    #: a cluster, external data files and formats other than raw and qcow2: omitted from
    #: the JSON)
    offset: int | None = None
    #: data the human table cannot place (compressed, or in an external data file)
    unplaceable: bool = False


@attrs.frozen
class Verdict:
    """What ``compare`` found: whether the images are the same, and the lines to print."""

    same: bool
    messages: tuple[str, ...]


@contextlib.contextmanager
def open_chain(
    filename: str, *, fmt: str | None, force_share: bool, whole: bool
) -> Iterator[list[Layer]]:
    """Open ``filename`` and (with ``whole``) each backing file below it, read-only.

    Backing files are opened with the format the overlay records; names are
    resolved relative to the folder of the image that names them.

    Raises:
        ImageError: a layer cannot be opened, or the chain is deeper than 64.
    """
    with contextlib.ExitStack() as stack:
        top = stack.enter_context(
            images.open(filename, format=cast(Any, fmt), force_share=force_share)
        )
        layers = [Layer(filename, top)]
        allowed = (os.path.dirname(os.path.abspath(filename)),)
        current = top
        while whole and current.backing_file:
            if len(layers) >= MAX_DEPTH:
                raise ImageError(
                    f"the backing chain is deeper than {MAX_DEPTH} images", path=filename
                )
            name = current.backing_file
            parent = os.path.dirname(layers[-1].path)
            path = name if os.path.isabs(name) else os.path.join(parent, name)
            backing_fmt = current.info().backing_format
            current = stack.enter_context(
                images.open(
                    path, format=cast(Any, backing_fmt), force_share=True, allow_backing=allowed
                )
            )
            layers.append(Layer(path, current))
        yield layers


#: formats that cannot have a backing file: qemu-img map shows their unallocated ranges as
#: present zeroes
_NO_BACKING = ("vpc", "vdi", "vhdx")


def _merge(entries: list[MapEntry]) -> list[MapEntry]:
    out: list[MapEntry] = []
    for entry in entries:
        if out:
            last = out[-1]
            same = (last.depth, last.present, last.zero, last.data, last.unplaceable) == (
                entry.depth,
                entry.present,
                entry.zero,
                entry.data,
                entry.unplaceable,
            )
            offsets_follow = (last.offset is None and entry.offset is None) or (
                last.offset is not None
                and entry.offset is not None
                and last.offset + last.length == entry.offset
            )
            if same and offsets_follow and last.start + last.length == entry.start:
                out[-1] = attrs.evolve(last, length=last.length + entry.length)
                continue
        out.append(entry)
    return out


def _qcow2_host_offsets(img: images.Image, entry: MapEntry) -> list[MapEntry]:
    """``entry`` cut where its clusters' host offsets stop being contiguous, each piece with
    its offset in the image file, as qemu-img map reports them: data and allocated zero
    clusters have one; compressed clusters, zero clusters without a cluster and images
    whose data lives elsewhere (an external data file, extended L2 entries) have none."""
    from virtkit.images.qcow2 import layout  # noqa: PLC0415 - only qcow2 layers need it
    from virtkit.images.qcow2.image import Qcow2Image  # noqa: PLC0415

    if not isinstance(img, Qcow2Image):
        return [entry]
    if img.extended or img.data_st is not img.st:
        return [attrs.evolve(entry, unplaceable=entry.data)]
    cs, per_table = img.cluster_size, img.l2_entries
    pieces: list[MapEntry] = []
    pos, end = entry.start, entry.start + entry.length
    while pos < end:
        cluster, within = divmod(pos, cs)
        stop = min(end, (cluster + 1) * cs)
        table_index, index = divmod(cluster, per_table)
        _, table = img.mapper.l2_for(table_index)
        raw_entry = table[index] if table is not None else 0
        host = 0 if raw_entry & layout.OFLAG_COMPRESSED else raw_entry & layout.L2E_OFFSET_MASK
        offset = host + within if host else None
        compressed = bool(raw_entry & layout.OFLAG_COMPRESSED)
        pieces.append(
            attrs.evolve(entry, start=pos, length=stop - pos, offset=offset, unplaceable=compressed)
        )
        pos = stop
    return _merge(pieces)


def map_chain(layers: list[Layer], start: int = 0, limit: int | None = None) -> list[MapEntry]:
    """Where each range of ``[start, start+limit)`` of the top image lives, as qemu-img map.

    Raises:
        ConfigError: ``start`` is past the end of the image.
    """
    size = layers[0].image.virtual_size
    if start > size:
        raise ConfigError(
            f"--start-offset {start} is past the end of the image ({size} bytes)",
            field="--start-offset",
        )
    end = size if limit is None else min(size, start + limit)
    last = len(layers) - 1
    entries: list[MapEntry] = []

    def walk(depth: int, lo: int, hi: int) -> None:
        img = layers[depth].image
        raw = img.format == "raw"
        stop = min(hi, img.virtual_size)
        if lo < stop:
            for ext in img.block_status(lo, stop - lo, include_backing=False):
                offset = ext.start if raw else None
                if ext.kind in ("data", "zero"):
                    data = ext.kind == "data"
                    entry = MapEntry(ext.start, ext.length, depth, True, not data, data, offset)
                    entries.extend(_qcow2_host_offsets(img, entry) if not raw else [entry])
                elif depth < last:
                    walk(depth + 1, ext.start, ext.start + ext.length)
                else:  # formats without backing files read it as zeroes they hold, as qemu
                    held = img.format in _NO_BACKING
                    entries.append(MapEntry(ext.start, ext.length, depth, held, True, False))
        if max(lo, stop) < hi:  # past a shorter backing file's end: reads as zeroes
            begin = max(lo, stop)
            entries.append(MapEntry(begin, hi - begin, last, False, True, False))

    if start < end:
        walk(0, start, end)
    return _merge(entries)


def _data_ranges(img: images.Image, end: int) -> list[tuple[int, int]]:
    if end == 0:
        return []
    return [
        (e.start, e.start + e.length)
        for e in img.block_status(0, end, include_backing=True)
        if e.kind == "data"
    ]


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _first_mismatch(x: bytes, y: bytes) -> int:
    for index, (p, q) in enumerate(zip(x, y, strict=True)):
        if p != q:
            return index
    return -1


def _first_nonzero(img: images.Image, lo: int, hi: int) -> int | None:
    for ext in img.block_status(lo, hi - lo, include_backing=True):
        if ext.kind != "data":
            continue
        pos = ext.start
        while pos < ext.start + ext.length:
            n = min(_CHUNK, ext.start + ext.length - pos)
            data = img.read(pos, n)
            stripped = data.lstrip(b"\0")
            if stripped:
                return pos + (n - len(stripped))
            pos += n
    return None


def compare_images(
    file1: str,
    file2: str,
    *,
    fmt1: str | None,
    fmt2: str | None,
    strict: bool,
    force_share: bool,
    progress: Callable[[int, int], None],
) -> Verdict:
    """Compare what two images show the guest, as ``qemu-img compare`` does.

    Only ranges that hold data in either chain are read. The first mismatch is
    reported at 512-byte sector granularity, as qemu-img does. In strict mode
    a size difference, or a range that is data in one image and zero in the
    other, is a difference too.

    Raises:
        ImageError: an image cannot be opened or read.
    """
    with (
        images.open(file1, format=cast(Any, fmt1), force_share=force_share) as a,
        images.open(file2, format=cast(Any, fmt2), force_share=force_share) as b,
    ):
        messages: list[str] = []
        size_a, size_b = a.virtual_size, b.virtual_size
        if size_a != size_b:
            if strict:
                return Verdict(False, ("Strict mode: Image size mismatch!",))
            messages.append("Warning: Image size mismatch!")
        common = min(size_a, size_b)
        ranges_a = _data_ranges(a, common)
        ranges_b = _data_ranges(b, common)
        if strict and ranges_a != ranges_b:
            first = min(
                {r[0] for r in ranges_a} ^ {r[0] for r in ranges_b}
                | {r[1] for r in ranges_a} ^ {r[1] for r in ranges_b}
            )
            return Verdict(
                False, (*messages, f"Strict mode: Offset {first} block status mismatch!")
            )
        union = _union(ranges_a, ranges_b)
        total = sum(hi - lo for lo, hi in union) or 1
        done = 0
        for lo, hi in union:
            pos = lo
            while pos < hi:
                n = min(_CHUNK, hi - pos)
                x, y = a.read(pos, n), b.read(pos, n)
                if x != y:
                    where = pos + _first_mismatch(x, y)
                    where -= where % _SECTOR
                    return Verdict(False, (*messages, f"Content mismatch at offset {where}!"))
                pos += n
                done += n
                progress(done, total)
        if size_a != size_b:
            bigger = a if size_a > size_b else b
            extra = _first_nonzero(bigger, common, max(size_a, size_b))
            if extra is not None:
                extra -= extra % _SECTOR
                return Verdict(False, (*messages, f"Content mismatch at offset {extra}!"))
        progress(total, total)
        return Verdict(True, (*messages, "Images are identical."))

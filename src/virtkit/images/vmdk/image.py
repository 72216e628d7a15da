"""The VMDK access layer: :class:`VmdkImage`, a read-only :class:`~virtkit.images.Image`.

A VMDK disk is a list of extents laid end to end (see :mod:`.mapping`),
described by a descriptor (embedded in a monolithic sparse file, or a small
text file naming extent files), optionally with a parent disk
(``parentFileNameHint``) that unallocated grains read through to. Reads,
``block_status`` and ``info()`` answer as QEMU 7.2's ``block/vmdk.c`` does, so
``convert`` from a VMDK gives the bytes ``qemu-img convert -O raw`` gives.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from virtkit.errors import CorruptImageError, ImageError, UnsupportedFeatureError
from virtkit.images.args import check_bool, check_int
from virtkit.images.base import CheckProblem, CheckResult, Extent, Image, ImageInfo
from virtkit.images.plain import PlainImage
from virtkit.images.storage import Storage
from virtkit.images.vmdk.descriptor import Descriptor
from virtkit.images.vmdk.mapping import FlatExtent, GrainRun, SparseExtent

__all__ = ["VmdkImage"]

AnyExtent = FlatExtent | SparseExtent
#: A read touching at least this many compressed grains inflates them on a thread pool.
_PARALLEL_GRAINS = 4


class VmdkImage(PlainImage):
    """An open VMDK disk (read-only). Build it with :func:`virtkit.images.vmdk.open`.

    Args:
        path: the file the caller opened (descriptor or monolithic file).
        storages: every file held open (closed with the image).
        extents: the extents in disk order.
        descriptor: the parsed descriptor.
        create_type: qemu-img's ``create-type``.
        backing: the opened parent disk, or None.
    """

    format_label = "VMDK"

    format = "vmdk"

    def __init__(
        self,
        path: str,
        storages: list[Storage],
        *,
        extents: list[AnyExtent],
        descriptor: Descriptor,
        create_type: str,
        backing: Image | None = None,
    ) -> None:
        self.path = path
        self._storages: list[Storage] | None = storages
        self.extents = extents
        self.descriptor = descriptor
        self.create_type = create_type
        self.backing = backing
        self._starts: list[int] = []
        pos = 0
        for ext in extents:
            self._starts.append(pos)
            pos += ext.size
        self._size = pos
        self._cid_checked = False
        self._pool: ThreadPoolExecutor | None = None

    # -- properties -----------------------------------------------------
    @property
    def cluster_size(self) -> int:
        """The first sparse extent's grain size, or 512 for flat disks."""
        first = self.extents[0].cluster_size if self.extents else None
        return first or 512

    @property
    def backing_file(self) -> str | None:
        """``parentFileNameHint`` as stored, or None."""
        return self.descriptor.parent_hint

    @property
    def writable(self) -> bool:
        """Always False: virtkit reads VMDK; it writes them only through ``convert``."""
        return False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has been called."""
        return self._storages is None

    # -- guards ---------------------------------------------------------
    def _live(self) -> None:
        if self._storages is None:
            raise ImageError("image is closed", path=self.path)

    def _read_only(self, action: str) -> ImageError:
        return UnsupportedFeatureError(
            f"cannot {action}: virtkit opens VMDK images read-only; convert to qcow2 to "
            "modify the disk, or convert into a new streamOptimized VMDK",
            feature="vmdk (write)",
            path=self.path,
        )

    # -- mapping --------------------------------------------------------
    def _pieces(self, offset: int, length: int) -> Iterator[tuple[AnyExtent, int, GrainRun]]:
        """``(extent, guest start of extent, run)`` over the range, runs merged where possible."""
        end = offset + length
        for ext, base in zip(self.extents, self._starts, strict=True):
            if base >= end:
                break
            if base + ext.size <= offset:
                continue
            a = max(offset, base) - base
            b = min(end, base + ext.size) - base
            pend: GrainRun | None = None
            for run in ext.runs(a, b - a):
                if (
                    pend is not None
                    and pend.kind == run.kind
                    and run.kind != "compressed"
                    and (run.kind != "data" or pend.host + pend.length == run.host)
                ):
                    pend.length += run.length
                    continue
                if pend is not None:
                    yield ext, base, pend
                pend = run
            if pend is not None:
                yield ext, base, pend

    def _check_parent_cid(self) -> None:
        """QEMU reads a parent only while its CID is the child's ``parentCID``."""
        if self._cid_checked or self.backing is None:
            return
        parent = getattr(self.backing, "descriptor", None)
        if parent is None or parent.cid != self.descriptor.parent_cid:
            raise CorruptImageError(
                f"the parent {self.descriptor.parent_hint!r} has changed since this disk was "
                f"made (parentCID {self.descriptor.parent_cid:08x} != parent's CID "
                f"{'none' if parent is None else format(parent.cid, '08x')})",
                path=self.path,
            )
        self._cid_checked = True

    def _from_backing(self, offset: int, length: int) -> bytes:
        assert self.backing is not None
        self._check_parent_cid()
        bsize = self.backing.virtual_size
        if offset >= bsize:
            return bytes(length)
        n = min(length, bsize - offset)
        data = self.backing.read(offset, n)
        return data if n == length else data + bytes(length - n)

    # -- data path ------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes at ``offset``.

        Raises:
            ImageError: the range runs past the end, or the image is closed.
            CorruptImageError: a grain table or compressed grain is damaged.
        """
        self._live()
        self._check_range(offset, length, "read")
        pieces = list(self._pieces(offset, length))
        inflated: dict[int, Future[bytes]] = {}
        if sum(run.kind == "compressed" for _, _, run in pieces) >= _PARALLEL_GRAINS:
            # zlib releases the GIL: the compressed grains of a long read inflate on every core
            pool = self._inflate_pool()
            inflated = {
                i: pool.submit(ext.read_run, run, run.start, run.length)
                for i, (ext, _, run) in enumerate(pieces)
                if run.kind == "compressed"
            }
        out: list[bytes] = []
        for i, (ext, base, run) in enumerate(pieces):
            if i in inflated:
                out.append(inflated[i].result())
            elif run.kind in ("data", "compressed"):  # a compressed run is within one grain
                out.append(ext.read_run(run, run.start, run.length))
            elif run.kind == "unallocated" and self.backing is not None:
                out.append(self._from_backing(base + run.start, run.length))
            else:
                out.append(bytes(run.length))
        return out[0] if len(out) == 1 else b"".join(out)

    def _inflate_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        return self._pool

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Not supported: VMDK images open read-only.

        Raises:
            UnsupportedFeatureError: always.
        """
        raise self._read_only("write")

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Not supported: VMDK images open read-only.

        Raises:
            UnsupportedFeatureError: always.
        """
        raise self._read_only("write zeroes")

    def discard(self, offset: int, length: int) -> None:
        """Not supported: VMDK images open read-only.

        Raises:
            UnsupportedFeatureError: always.
        """
        raise self._read_only("discard")

    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Yield extents: allocated grains and flat data are ``"data"``, zeroed grains
        ``"zero"``, the rest ``"unallocated"`` (or, with ``include_backing``, the
        parent's status or ``"zero"``), as ``qemu-img map`` reports."""
        self._live()
        if length is None:
            length = max(0, self._size - check_int(offset, "offset"))
        self._check_range(offset, length, "block_status")
        return _merge(self._status(offset, length, include_backing))

    def _status(self, offset: int, length: int, include_backing: bool) -> Iterator[Extent]:
        for ext, base, run in self._pieces(offset, length):
            start = base + run.start
            if isinstance(ext, FlatExtent):
                for pos, n, is_data in ext.holes(run.start, run.length):
                    yield Extent(base + pos, n, "data" if is_data else "zero")
            elif run.kind in ("data", "compressed"):
                yield Extent(start, run.length, "data")
            elif run.kind == "zero":
                yield Extent(start, run.length, "zero")
            elif not include_backing:
                yield Extent(start, run.length, "unallocated")
            elif self.backing is None:
                yield Extent(start, run.length, "zero")
            else:
                end = start + run.length
                bsize = self.backing.virtual_size
                if start < bsize:
                    n = min(end, bsize) - start
                    for e in self.backing.block_status(start, n, include_backing=True):
                        kind: Any = "data" if e.kind == "data" else "zero"
                        yield Extent(e.start, e.length, kind, from_backing=kind == "data")
                if end > bsize:
                    s = max(start, bsize)
                    yield Extent(s, end - s, "zero")

    def flush(self) -> None:
        """Nothing to flush on a read-only image."""
        self._live()

    def resize(self, size: int | str, *, shrink: bool = False) -> None:
        """Not supported: VMDK images open read-only.

        Raises:
            UnsupportedFeatureError: always.
        """
        raise self._read_only("resize")

    # -- metadata -------------------------------------------------------
    def info(self) -> ImageInfo:
        """What ``qemu-img info --output=json`` reports (format-specific keys in its order)."""
        self._live()
        seen: set[str] = set()
        actual = 0
        for st in self._storages or []:
            real = os.path.realpath(st.path)
            if real in seen:
                continue
            seen.add(real)
            alloc = getattr(st, "allocated_bytes", None)
            actual += int(alloc()) if alloc is not None else st.size()
        extents: list[dict[str, Any]] = []
        for ext in self.extents:
            item: dict[str, Any] = {}
            if ext.compressed:
                item["compressed"] = True
            item["virtual-size"] = ext.size
            item["filename"] = ext.filename
            if ext.cluster_size is not None:
                item["cluster-size"] = ext.cluster_size
            item["format"] = ext.type
            extents.append(item)
        spec: dict[str, Any] = {
            "cid": self.descriptor.cid,
            "parent-cid": self.descriptor.parent_cid,
            "create-type": self.create_type,
            "extents": extents,
        }
        return ImageInfo(
            filename=self.path,
            format="vmdk",
            virtual_size=self._size,
            actual_size=actual,
            cluster_size=self.extents[0].cluster_size if self.extents else None,
            backing_filename=self.descriptor.parent_hint,
            backing_format="vmdk" if self.descriptor.parent_hint is not None else None,
            format_specific=spec,
        )

    def check(self, repair: bool = False) -> CheckResult:
        """Report grain tables and grains that point past the end of their file.

        Raises:
            UnsupportedFeatureError: ``repair=True`` (virtkit does not repair VMDK).
        """
        self._live()
        if check_bool(repair, "repair"):
            raise UnsupportedFeatureError(
                "virtkit cannot repair VMDK images", feature="vmdk repair", path=self.path
            )
        problems = [
            CheckProblem("corruption", message, offset)
            for ext in self.extents
            for offset, message in ext.bad_grains()
        ]
        return CheckResult(corruptions=len(problems), problems=tuple(problems))

    def close(self) -> None:
        """Release every file (and the parent). Idempotent."""
        storages, self._storages = self._storages, None
        if storages is None:
            return
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        try:
            if self.backing is not None:
                self.backing.close()
        finally:
            for st in storages:
                st.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "ro"
        return f"<VmdkImage {self.path!r} {self.create_type} {self._size} bytes {state}>"


def _merge(extents: Iterator[Extent]) -> Iterator[Extent]:
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

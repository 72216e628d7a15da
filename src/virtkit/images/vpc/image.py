"""The VHD access layer: :class:`VpcImage` (fixed: read/write; dynamic: read).

Reads follow QEMU 7.2's ``block/vpc.c``: a fixed disk is its data area (the
file before the footer); a dynamic disk maps each ``block_size`` block
through the BAT, and an allocated block is read directly (QEMU does not
consult the per-block sector bitmap when reading, so neither do we). The
virtual size follows QEMU's geometry-versus-``current_size`` rule
(:func:`~virtkit.images.vpc.layout.virtual_sectors`).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from virtkit.errors import UnsupportedFeatureError
from virtkit.images.args import check_bool, check_bytes, check_int
from virtkit.images.base import CheckProblem, CheckResult, Extent, ImageInfo
from virtkit.images.plain import SingleFileImage
from virtkit.images.storage import Storage
from virtkit.images.vpc import layout

__all__ = ["VpcImage"]


class VpcImage(SingleFileImage):
    """An open VHD. Build it with :func:`virtkit.images.vpc.open`.

    Args:
        storage: the file.
        footer: the decoded footer.
        size: the virtual size in bytes (QEMU's rule).
        writable: open for writing (fixed disks only).
        bat: the block allocation table (dynamic disks), else None.
        block_size: bytes per block (dynamic disks).
    """

    format_label = "VHD"

    format = "vpc"

    def __init__(
        self,
        storage: Storage,
        footer: layout.Footer,
        size: int,
        *,
        writable: bool,
        bat: array[int] | None = None,
        block_size: int = 0,
    ) -> None:
        self._st: Storage | None = storage
        self.path = storage.path
        self.footer = footer
        self._size = size
        self._writable = writable
        self.bat = bat
        self.block_size = block_size
        self._bitmap = -(-(block_size // (8 * 512)) // 512) * 512 if block_size else 0
        self.fixed = bat is None

    # -- properties -----------------------------------------------------
    @property
    def cluster_size(self) -> int:
        """The block size of a dynamic disk; 512 for a fixed one."""
        return self.block_size or layout.SECTOR

    @property
    def backing_file(self) -> str | None:
        """Always None (differencing VHDs are not opened)."""
        return None

    # -- guards ---------------------------------------------------------
    # -- mapping --------------------------------------------------------
    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int | None]]:
        """``(guest, length, host or None)`` runs; None for an unallocated block."""
        if self.bat is None:
            yield offset, length, offset
            return
        end = offset + length
        pos = offset
        while pos < end:
            idx = pos // self.block_size
            n = min(end, (idx + 1) * self.block_size) - pos
            entry = self.bat[idx] if idx < len(self.bat) else layout.UNALLOCATED
            if entry == layout.UNALLOCATED:
                yield pos, n, None
            else:
                yield pos, n, entry * layout.SECTOR + self._bitmap + pos % self.block_size
            pos += n

    # -- data path ------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes at ``offset``.

        Raises:
            ImageError: the range runs past the end, or the image is closed.
        """
        st = self._live()
        self._check_range(offset, length, "read")
        out = bytearray()
        for _, n, host in self._runs(offset, length):
            if host is None:
                out += bytes(n)
                continue
            data = st.pread(host, n)
            out += data
            if len(data) < n:  # past the end of the file: zeroes, as QEMU's file driver
                out += bytes(n - len(data))
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (fixed disks).

        Raises:
            ImageError: read-only, closed, or the range runs past the end.
            UnsupportedFeatureError: a dynamic disk.
        """
        st = self._writable_storage("write")
        view = check_bytes(data)
        self._check_range(offset, len(view), "write")
        if len(view):
            st.pwrite(offset, view)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeroes (a hole in the file where possible)."""
        st = self._writable_storage("write zeroes")
        self._check_range(offset, length, "write_zeroes")
        punch = getattr(st, "punch_hole", None)
        if length and (punch is None or not punch(offset, length)):
            for pos in range(offset, offset + length, 1 << 20):
                st.pwrite(pos, bytes(min(1 << 20, offset + length - pos)))

    def discard(self, offset: int, length: int) -> None:
        """Release a range of a fixed disk (reads then give zeroes)."""
        self.write_zeroes(offset, length)

    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Allocated blocks (fixed: the file's data) are ``"data"``; unallocated
        blocks ``"unallocated"`` (``"zero"`` with ``include_backing``); holes of a
        fixed disk's file ``"zero"``, as ``qemu-img map`` shows."""
        st = self._live()
        if length is None:
            length = max(0, self._size - check_int(offset, "offset"))
        self._check_range(offset, length, "block_status")
        return _merge(self._status(st, offset, length, include_backing))

    def _status(
        self, st: Storage, offset: int, length: int, include_backing: bool
    ) -> Iterator[Extent]:
        holes = getattr(st, "data_extents", None)
        for pos, n, host in self._runs(offset, length):
            if host is None:
                yield Extent(pos, n, "zero" if include_backing else "unallocated")
            elif self.bat is None and holes is not None:
                for start, run, is_data in holes(pos, n):
                    yield Extent(start, run, "data" if is_data else "zero")
            else:
                yield Extent(pos, n, "data")

    def flush(self) -> None:
        """fdatasync the file."""
        st = self._live()
        if self._writable:
            st.flush()

    def resize(self, size: int | str, *, shrink: bool = False) -> None:
        """Not supported for VHD.

        Raises:
            UnsupportedFeatureError: always (QEMU cannot resize VHD either).
        """
        raise UnsupportedFeatureError(
            "VHD images cannot be resized", feature="vpc resize", path=self.path
        )

    # -- metadata -------------------------------------------------------
    def info(self) -> ImageInfo:
        """What ``qemu-img info --output=json -f vpc`` reports."""
        st = self._live()
        alloc = getattr(st, "allocated_bytes", None)
        actual = int(alloc()) if alloc is not None else st.size()
        return ImageInfo(
            filename=self.path,
            format="vpc",
            virtual_size=self._size,
            actual_size=actual,
            cluster_size=self.block_size or None,
        )

    def check(self, repair: bool = False) -> CheckResult:
        """Report allocated blocks that lie past the end of the file.

        Raises:
            UnsupportedFeatureError: ``repair=True``.
        """
        st = self._live()
        if check_bool(repair, "repair"):
            raise UnsupportedFeatureError(
                "virtkit cannot repair VHD images", feature="vpc repair", path=self.path
            )
        problems: list[CheckProblem] = []
        if self.bat is not None:
            size = st.size()
            for i, entry in enumerate(self.bat):
                if entry == layout.UNALLOCATED:
                    continue
                end = entry * layout.SECTOR + self._bitmap + self.block_size
                if end > size:
                    problems.append(
                        CheckProblem(
                            "corruption",
                            f"block {i} at sector {entry} runs past the end of the file",
                            entry * layout.SECTOR,
                        )
                    )
        return CheckResult(corruptions=len(problems), problems=tuple(problems))

    def close(self) -> None:
        """Flush (if writable) and release the file. Idempotent."""
        st, self._st = self._st, None
        if st is None:
            return
        try:
            if self._writable:
                st.flush()
        finally:
            st.close()

    def __repr__(self) -> str:
        kind = "fixed" if self.fixed else "dynamic"
        state = "closed" if self.closed else ("rw" if self._writable else "ro")
        return f"<VpcImage {self.path!r} {kind} {self._size} bytes {state}>"


def _merge(extents: Iterator[Extent]) -> Iterator[Extent]:
    pend: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if pend is not None and pend.kind == ext.kind and pend.start + pend.length == ext.start:
            pend = Extent(pend.start, pend.length + ext.length, pend.kind)
            continue
        if pend is not None:
            yield pend
        pend = ext
    if pend is not None:
        yield pend

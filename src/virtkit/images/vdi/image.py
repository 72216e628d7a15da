"""The VDI access layer: a read-only view of VirtualBox static and dynamic disks.

Validation follows QEMU's ``vdi_open``: version 1.1, 512-byte sectors, 1 MiB
blocks, sector-aligned block map and data offsets, a disk size the block map
covers, no link or parent UUID (differencing VDIs are not supported, as in
QEMU). A disk size that is not a multiple of 512 is rounded up, as QEMU does
for images from ``VBoxManage convertfromraw``. Data of a block entry that
points past the end of the file reads as zeroes (as QEMU reads it);
``check()`` reports such entries, duplicates and a wrong allocated count as
``qemu-img check`` does.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from virtkit.errors import CorruptImageError, ImageError, UnsupportedFeatureError, VirtkitError
from virtkit.images.args import check_bool, check_bytes, check_int
from virtkit.images.base import CheckProblem, CheckResult, Extent, ImageInfo
from virtkit.images.plain import SingleFileImage
from virtkit.images.storage import FileStorage, Storage
from virtkit.images.vdi import layout as L
from virtkit.images.vdi.mapping import BlockMap

__all__ = ["VdiImage", "open_image"]

_MAX_READ = 1 << 30


def _validate(path: str, h: L.VdiHeader, file_size: int) -> int:
    """Check the header as QEMU does; return the virtual size."""

    def unsupported(msg: str, feature: str) -> UnsupportedFeatureError:
        return UnsupportedFeatureError(f"VDI: {msg}", feature=feature, path=path)

    if h.signature != L.SIGNATURE:
        raise CorruptImageError(f"VDI: bad signature {h.signature:#010x}", path=path, offset=64)
    if h.version != L.VERSION_1_1:
        raise unsupported(f"version {h.version >> 16}.{h.version & 0xFFFF} (only 1.1)",
                          "vdi version")  # fmt: skip
    if h.image_type not in (L.TYPE_DYNAMIC, L.TYPE_STATIC):
        raise unsupported(f"image type {h.image_type} (only dynamic and static disks)",
                          "vdi image type")  # fmt: skip
    if h.offset_bmap % L.SECTOR or h.offset_data % L.SECTOR:
        raise unsupported("block map or data offset not 512-byte aligned", "vdi alignment")
    if h.sector_size != L.SECTOR:
        raise unsupported(f"sector size {h.sector_size} is not 512", "vdi sector size")
    if h.block_size != L.BLOCK_SIZE:
        raise unsupported(f"block size {h.block_size} is not 1 MiB", "vdi block size")
    if h.block_extra:
        raise unsupported(f"{h.block_extra} extra bytes per block", "vdi block extra")
    if h.blocks_in_image > L.MAX_BLOCKS:
        raise unsupported(f"too many blocks ({h.blocks_in_image})", "vdi size")
    size = -(-h.disk_size // L.SECTOR) * L.SECTOR
    if size > h.blocks_in_image * L.BLOCK_SIZE:
        raise unsupported(f"disk size {h.disk_size} but the block map covers only "
                          f"{h.blocks_in_image} MiB", "vdi size")  # fmt: skip
    if h.uuid_link != bytes(16) or h.uuid_parent != bytes(16):
        raise unsupported("a differencing image (link or parent UUID set)", "vdi differencing")
    if h.offset_bmap < L.HEADER.size or h.offset_bmap + 4 * h.blocks_in_image > file_size:
        raise CorruptImageError(
            f"VDI: the block map ({h.blocks_in_image} entries at {h.offset_bmap:#x}) lies "
            f"outside the {file_size}-byte file",
            path=path,
            offset=0x154,
        )
    return size


class VdiImage(SingleFileImage):
    """A VDI image opened read-only.

    Args:
        storage: the file.
        header: its header.
    """

    format_label = "VDI"

    format = "vdi"

    def __init__(self, storage: Storage, header: L.VdiHeader) -> None:
        self._st: Storage | None = storage
        self.path = storage.path
        self.header = header
        self._size = _validate(self.path, header, storage.size())
        self._map = BlockMap(storage, header.offset_bmap, header.blocks_in_image,
                             header.offset_data)  # fmt: skip

    @property
    def cluster_size(self) -> int:
        """The 1 MiB block size (qemu-img reports it as the cluster size)."""
        return L.BLOCK_SIZE

    @property
    def backing_file(self) -> str | None:
        """Always None: differencing VDIs are not supported."""
        return None

    @property
    def writable(self) -> bool:
        """Always False: virtkit reads VDI only."""
        return False

    def _read_only(self, action: str) -> UnsupportedFeatureError:
        self._live()
        return UnsupportedFeatureError(
            f"cannot {action}: virtkit reads VDI images only; convert to qcow2 to write",
            feature="vdi write",
            path=self.path,
        )

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes at ``offset``.

        Raises:
            ImageError: out of range, closed, or larger than 1 GiB.
        """
        st = self._live()
        self._check_range(offset, length, "read")
        if length > _MAX_READ:
            raise ImageError(f"read of {length} bytes is too big for one call", path=self.path)
        out = bytearray(length)
        for start, n, kind, host in self._map.runs(offset, length):
            if kind == "data":
                assert host is not None
                data = st.pread(host, n)
                out[start - offset : start - offset + len(data)] = data
        return bytes(out)

    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Yield data and unallocated (``"zero"`` with ``include_backing``) extents."""
        self._live()
        if length is None:
            check_int(offset, "offset")
            length = max(self._size - offset, 0)
        self._check_range(offset, length, "block_status")
        pending: Extent | None = None
        for start, n, kind, _host in self._map.runs(offset, length):
            k = "zero" if kind == "unallocated" and include_backing else kind
            if pending is not None and pending.kind == k:
                pending = Extent(pending.start, pending.length + n, pending.kind)
                continue
            if pending is not None:
                yield pending
            pending = Extent(start, n, k)
        if pending is not None:
            yield pending

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Not supported.

        Raises:
            UnsupportedFeatureError: always.
        """
        check_bytes(data)
        raise self._read_only("write")

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Not supported.

        Raises:
            UnsupportedFeatureError: always.
        """
        raise self._read_only("write zeroes")

    def discard(self, offset: int, length: int) -> None:
        """Not supported.

        Raises:
            UnsupportedFeatureError: always.
        """
        raise self._read_only("discard")

    def flush(self) -> None:
        """Nothing to flush (read-only)."""
        self._live()

    def resize(self, size: int | str, *, shrink: bool = False) -> None:
        """Not supported.

        Raises:
            UnsupportedFeatureError: always.
        """
        check_bool(shrink, "shrink")
        raise self._read_only("resize")

    def info(self) -> ImageInfo:
        """What ``qemu-img info`` reports (1 MiB cluster size)."""
        st = self._live()
        allocated = getattr(st, "allocated_bytes", None)
        return ImageInfo(
            filename=self.path,
            format="vdi",
            virtual_size=self._size,
            actual_size=allocated() if allocated is not None else st.size(),
            cluster_size=L.BLOCK_SIZE,
        )

    def check(self, repair: bool = False) -> CheckResult:
        """The checks of ``qemu-img check``: block indexes in range, unique, counted right.

        Raises:
            UnsupportedFeatureError: ``repair=True`` (qemu-img cannot repair VDI either).
        """
        self._live()
        check_bool(repair, "repair")
        if repair:
            raise UnsupportedFeatureError(
                "VDI images cannot be repaired", feature="vdi repair", path=self.path
            )
        total = self.header.blocks_in_image
        problems: list[CheckProblem] = []
        seen: dict[int, int] = {}
        allocated = 0
        for block, e in self._map.allocated():
            where = self.header.offset_bmap + 4 * block
            if e >= total:
                problems.append(CheckProblem(
                    "corruption", f"block {block} has index {e}, past {total}", where
                ))  # fmt: skip
                continue
            allocated += 1
            if e in seen:
                problems.append(CheckProblem(
                    "corruption", f"block index {e} used by blocks {seen[e]} and {block}", where
                ))  # fmt: skip
            seen[e] = block
        if allocated != self.header.blocks_allocated:
            problems.append(CheckProblem(
                "corruption", f"allocated blocks mismatch: {allocated} counted, header says "
                f"{self.header.blocks_allocated}", 0x184
            ))  # fmt: skip
        return CheckResult(
            corruptions=len(problems),
            problems=tuple(problems),
            allocated_clusters=allocated,
            total_clusters=total,
        )

    def close(self) -> None:
        """Release the file. Idempotent."""
        st, self._st = self._st, None
        if st is not None:
            st.close()

    def __repr__(self) -> str:
        return f"<VdiImage {self.path!r} {self._size} bytes {'closed' if self.closed else 'ro'}>"


def open_image(path: str | os.PathLike[str], *, force_share: bool = False) -> VdiImage:
    """Open a VDI file read-only.

    Raises:
        ImageError: the file cannot be opened.
        CorruptImageError: the header or block map is damaged.
        UnsupportedFeatureError: a VDI variant virtkit (and QEMU) cannot read.
    """
    st = FileStorage(path, writable=False, force_share=force_share)
    try:
        raw = st.pread(0, L.HEADER.size)
        if len(raw) < L.HEADER.size:
            raise CorruptImageError("VDI: file shorter than its 512-byte header", path=st.path)
        return VdiImage(st, L.VdiHeader.unpack(raw))
    except VirtkitError:
        st.close()
        raise
    except (struct.error, IndexError, OverflowError, ValueError, MemoryError) as exc:
        st.close()
        raise CorruptImageError(
            f"malformed VDI header ({type(exc).__name__}: {exc})", path=os.fspath(path)
        ) from exc
    except BaseException:
        st.close()
        raise

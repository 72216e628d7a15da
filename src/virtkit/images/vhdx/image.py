"""The VHDX access layer: reads, block status, info, check, and writes to new files.

Reads follow the BAT (:mod:`.mapping`); ranges a differencing disk does not
hold fall through to its parent, found through the parent locator
(``relative_path``, then ``absolute_win32_path`` when it is a plain path)
under the same allow-list policy as qcow2 backing files, and checked against
the ``parent_linkage`` GUID so that a parent changed since the child was made
is refused.

Writes: virtkit writes VHDX only into a file it has just created
(:func:`virtkit.images.create` / ``convert(format="vhdx")``): a new block is
appended (1 MiB aligned) and filled before its BAT entry points to it, so a
crash leaves at worst an unused block, never a BAT entry pointing at garbage.
Updating an existing VHDX file in place would need the VHDX log, which
virtkit does not write, so a writable open of an existing file is refused.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator

from virtkit.errors import CorruptImageError, ImageError, UnsupportedFeatureError, VirtkitError
from virtkit.images.args import check_bool, check_bytes, check_int
from virtkit.images.base import CheckProblem, CheckResult, Extent, ImageInfo
from virtkit.images.plain import SingleFileImage
from virtkit.images.qcow2 import chain
from virtkit.images.storage import FileStorage, Storage
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx import log, metadata
from virtkit.images.vhdx.mapping import Mapper
from virtkit.images.vhdx.metadata import VhdxMeta

__all__ = ["VhdxImage", "open_image"]

#: Largest single read, so a caller's typo cannot ask for terabytes of memory.
_MAX_READ = 1 << 30


def _parent_candidates(locator: dict[str, str]) -> list[str]:
    """Plain paths to try for the parent, most specific first (Windows separators mapped)."""
    out = []
    for key in ("relative_path", "absolute_win32_path"):
        value = locator.get(key)
        if not value:
            continue
        if len(value) > 1 and value[1] == ":":  # a drive letter: meaningless here
            continue
        if value.startswith("\\\\"):  # a UNC or \\?\ path
            continue
        posix = value.replace("\\", "/")
        while posix.startswith("./"):
            posix = posix[2:]
        out.append(posix)
    return out


def _linkage(value: str | None) -> bytes | None:
    if not value:
        return None
    try:
        return uuid.UUID(value.strip("{}")).bytes_le
    except ValueError:
        return None


class VhdxImage(SingleFileImage):
    """A VHDX image (fixed, dynamic or differencing).

    Args:
        storage: the file.
        meta: its validated metadata.
        writable: whether writes are allowed (only for a file just created).
        allow_backing: where a differencing disk's parent may come from.
        force_share: passed on to the parent's open.
    """

    format_label = "VHDX"

    format = "vhdx"

    def __init__(
        self,
        storage: Storage,
        meta: VhdxMeta,
        *,
        writable: bool = False,
        allow_backing: tuple[str | os.PathLike[str], ...] = (),
        force_share: bool = False,
    ) -> None:
        self._st: Storage | None = storage
        self.path = storage.path
        self.meta = meta
        self._map = Mapper(storage, meta)
        self._writable = writable
        self._allow = allow_backing
        self._force_share = force_share
        self.parent: VhdxImage | None = None
        self._backing_name: str | None = None
        if meta.has_parent:
            self._backing_name = meta.parent_locator.get("relative_path") or (
                meta.parent_locator.get("absolute_win32_path")
            )
            self.parent = self._open_parent()

    def _open_parent(self) -> VhdxImage:
        locator = self.meta.parent_locator
        tried = _parent_candidates(locator)
        if not tried:
            raise ImageError(
                f"VHDX: the parent locator gives no usable path ({locator!r})", path=self.path
            )
        last: ImageError | None = None
        real = None
        for name in tried:
            try:
                real = chain.resolve(self.path, name, self._allow, what="parent disk")
                break
            except ImageError as exc:
                last = exc
        if real is None:
            assert last is not None
            raise last
        chain.STACK.push(self.path)
        try:
            parent = open_image(real, allow_backing=self._allow, force_share=self._force_share)
        finally:
            chain.STACK.pop()
        wanted = {_linkage(locator.get("parent_linkage")), _linkage(locator.get("parent_linkage2"))}
        wanted.discard(None)
        have = parent.meta.header.data_write_guid
        if wanted and have not in wanted:
            parent.close()
            raise ImageError(
                f"VHDX: the parent {real} was modified after this differencing disk was made "
                "(its data write GUID does not match the parent_linkage)",
                path=self.path,
            )
        return parent

    # -- properties ---------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        """Size of the virtual disk in bytes."""
        return self.meta.virtual_size

    @property
    def cluster_size(self) -> int:
        """The payload block size (qemu-img reports it as the cluster size)."""
        return self.meta.block_size

    @property
    def backing_file(self) -> str | None:
        """A differencing disk's parent path as the locator stores it, else None."""
        return self._backing_name

    # -- guards -------------------------------------------------------------------
    # -- reads --------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes at ``offset`` (parent data where this disk has none).

        Raises:
            ImageError: out of range, closed, or larger than 1 GiB.
            CorruptImageError: the BAT or a sector bitmap is damaged.
        """
        st = self._live()
        self._check_range(offset, length, "read")
        if length > _MAX_READ:
            raise ImageError(
                f"read of {length} bytes is too big for one call; read at most {_MAX_READ}",
                path=self.path,
            )
        out = bytearray(length)
        for start, n, kind, host in self._map.runs(offset, length):
            at = start - offset
            if kind == "data":
                assert host is not None
                data = st.pread(host, n)
                out[at : at + len(data)] = data
            elif kind == "unallocated" and self.parent is not None:
                limit = self.parent.virtual_size
                if start < limit:
                    m = min(n, limit - start)
                    out[at : at + m] = self.parent.read(start, m)
        return bytes(out)

    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Yield data / zero / unallocated extents (parent ranges resolved on request)."""
        self._live()
        if length is None:
            check_int(offset, "offset")
            length = max(self.meta.virtual_size - offset, 0)
        self._check_range(offset, length, "block_status")
        pending: Extent | None = None
        for ext in self._extents(offset, length, include_backing):
            if pending is not None and (pending.kind, pending.from_backing) == (
                ext.kind,
                ext.from_backing,
            ):
                pending = Extent(pending.start, pending.length + ext.length, ext.kind,
                                 ext.from_backing)  # fmt: skip
                continue
            if pending is not None:
                yield pending
            pending = ext
        if pending is not None:
            yield pending

    def _extents(self, offset: int, length: int, include_backing: bool) -> Iterator[Extent]:
        for start, n, kind, _host in self._map.runs(offset, length):
            if kind != "unallocated" or not include_backing:
                yield Extent(start, n, kind)
                continue
            if self.parent is None:
                yield Extent(start, n, "zero")
                continue
            limit = self.parent.virtual_size
            upto = min(start + n, max(limit, start))
            if upto > start:
                for ext in self.parent.block_status(start, upto - start, include_backing=True):
                    backed = ext.kind == "data"
                    yield Extent(ext.start, ext.length, ext.kind, backed)
            if upto < start + n:
                yield Extent(upto, start + n - upto, "zero")

    # -- writes (new files only) ----------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at guest ``offset``, allocating whole blocks as needed.

        Raises:
            ImageError: read-only, closed, or out of range.
        """
        st = self._writable_storage("write")
        view = check_bytes(data)
        self._check_range(offset, len(view), "write")
        bs = self.meta.block_size
        pos = 0
        while pos < len(view):
            block, within = divmod(offset + pos, bs)
            n = min(bs - within, len(view) - pos)
            state, host = self._map.block(block)
            if state != L.PAYLOAD_FULLY_PRESENT:
                host = self._allocate(block, state)
            assert host is not None
            st.pwrite(host + within, view[pos : pos + n])
            pos += n

    def _allocate(self, block: int, state: int) -> int:
        """Append a block, fill it with what the guest sees there now, point the BAT at it."""
        st = self._live()
        bs = self.meta.block_size
        host = -(-max(self._map.file_size, L.HEADER_SECTION) // L.MiB) * L.MiB
        st.truncate(host + bs)
        self._map.file_size = host + bs
        if self.parent is not None and state not in (L.PAYLOAD_ZERO, L.PAYLOAD_UNMAPPED):
            start = block * bs
            n = min(bs, self.meta.virtual_size - start)
            current = self.read(start, n)
            if any(current):
                st.pwrite(host, current)
        self._map.set_entry(
            self._map.payload_index(block), L.bat_entry(L.PAYLOAD_FULLY_PRESENT, host)
        )
        return host

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeroes (written only where blocks are allocated)."""
        self._writable_storage("write zeroes")
        self._check_range(offset, length, "write_zeroes")
        for start, n, kind, _host in list(self._map.runs(offset, length)):
            if kind == "data" or (kind == "unallocated" and self.parent is not None):
                for pos in range(start, start + n, 1 << 20):
                    self.write(pos, bytes(min(1 << 20, start + n - pos)))

    def discard(self, offset: int, length: int) -> None:
        """Accepted and ignored: VHDX blocks are never freed by virtkit."""
        self._writable_storage("discard")
        self._check_range(offset, length, "discard")

    def flush(self) -> None:
        """fdatasync the file."""
        self._live().flush()

    def resize(self, size: int | str, *, shrink: bool = False) -> None:
        """Not supported for VHDX.

        Raises:
            UnsupportedFeatureError: always; convert to qcow2 to resize.
        """
        check_bool(shrink, "shrink")
        raise UnsupportedFeatureError(
            "virtkit cannot resize VHDX images; convert to qcow2 first",
            feature="vhdx resize",
            path=self.path,
        )

    # -- metadata -------------------------------------------------------------------
    def info(self) -> ImageInfo:
        """What ``qemu-img info`` reports: block size as the cluster size."""
        st = self._live()
        allocated = getattr(st, "allocated_bytes", None)
        return ImageInfo(
            filename=self.path,
            format="vhdx",
            virtual_size=self.meta.virtual_size,
            actual_size=allocated() if allocated is not None else st.size(),
            cluster_size=self.meta.block_size,
            backing_filename=self._backing_name,
            backing_format="vhdx" if self._backing_name is not None else None,
        )

    def check(self, repair: bool = False) -> CheckResult:
        """Check every BAT entry: known states, blocks inside the file, none shared.

        Raises:
            UnsupportedFeatureError: ``repair=True`` (nothing virtkit can repair).
        """
        self._live()
        check_bool(repair, "repair")
        if repair:
            raise UnsupportedFeatureError(
                "virtkit cannot repair VHDX images", feature="vhdx repair", path=self.path
            )
        problems: list[CheckProblem] = []
        used: dict[int, int] = {}
        ratio = self.meta.chunk_ratio
        allocated = 0
        benign = (L.PAYLOAD_UNDEFINED, L.PAYLOAD_ZERO, L.PAYLOAD_UNMAPPED, L.PAYLOAD_UNMAPPED_V095)
        for index, entry in self._map.nonzero_entries():
            bitmap = index % (ratio + 1) == ratio
            if not bitmap and entry in benign:  # a zero or absent block: nothing in the file
                continue
            where = self.meta.bat_offset + index * 8
            state = entry & L.STATE_MASK
            try:
                if bitmap:
                    if state == L.SB_NOT_PRESENT:
                        continue
                    if state != L.SB_PRESENT:
                        raise ImageError(f"sector bitmap entry {index} has state {state}")
                    host = self._map._offset(entry, index, L.MiB, "sector bitmap")
                else:
                    block = index - index // (ratio + 1)
                    state, maybe = self._map.block(block)
                    if maybe is None:
                        continue
                    host = maybe
                    allocated += 1
            except ImageError as exc:
                problems.append(CheckProblem("corruption", exc.message, where))
                continue
            other = used.get(host)
            if other is not None:
                problems.append(CheckProblem(
                    "corruption", f"BAT entries {other} and {index} share {host:#x}", where
                ))  # fmt: skip
            used[host] = index
        blocks = -(-self.meta.virtual_size // self.meta.block_size)
        return CheckResult(
            corruptions=len(problems),
            problems=tuple(problems),
            image_end_offset=self._map.file_size,
            allocated_clusters=allocated,
            total_clusters=blocks,
        )

    def close(self) -> None:
        """Flush (if writable) and release the file and its parent. Idempotent."""
        st, self._st = self._st, None
        if st is None:
            return
        try:
            if self._writable:
                st.flush()
        finally:
            st.close()
            if self.parent is not None:
                self.parent.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self._writable else "ro")
        return f"<VhdxImage {self.path!r} {self.meta.virtual_size} bytes {state}>"


def open_image(
    path: str | os.PathLike[str],
    *,
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    force_share: bool = False,
) -> VhdxImage:
    """Open an existing VHDX file read-only, replaying a dirty log in memory.

    Raises:
        ImageError: the file (or its parent) cannot be opened or is not allowed.
        CorruptImageError: the metadata is damaged.
        UnsupportedFeatureError: a pending log or an unknown required item.
    """
    st = FileStorage(path, writable=False, force_share=force_share)
    try:
        header, _index = metadata.active_header(st)
        view = log.replayed_view(st, header)
        return VhdxImage(
            view, metadata.load(view), allow_backing=allow_backing, force_share=force_share
        )
    except VirtkitError:
        st.close()
        raise
    except (struct.error, IndexError, OverflowError, ValueError, MemoryError) as exc:
        st.close()
        raise CorruptImageError(
            f"malformed VHDX metadata ({type(exc).__name__}: {exc})", path=os.fspath(path)
        ) from exc
    except BaseException:
        st.close()
        raise

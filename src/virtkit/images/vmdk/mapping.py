"""Where a guest byte of a VMDK extent lives: the extent readers.

An extent covers a run of the virtual disk. :class:`FlatExtent` maps it
straight onto a file at an offset; :class:`SparseExtent` (a hosted sparse
``KDMV`` file: monolithicSparse, twoGbMaxExtentSparse pieces, streamOptimized)
maps each grain through its grain directory and grain tables, as QEMU's
``get_cluster_offset`` does, and inflates compressed grains.

Every number read from a file is bounded before use: the grain directory
must lie inside the file (so its size is bounded by the file's), grain tables
are read one at a time into a small cache, and a compressed grain is read as
at most two grains' worth of bytes and inflated to at most one grain.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import Literal

from virtkit.errors import CorruptImageError, UnsupportedFeatureError
from virtkit.images.storage import Storage
from virtkit.images.vmdk import layout

__all__ = ["FlatExtent", "GrainRun", "SparseExtent"]

#: Grain tables kept in memory per extent (2 KiB each by default).
_GT_CACHE = 64
#: Grains up to this size are inflated whole and the last one kept for the next read.
_CACHE_GRAIN = 1 << 20
_STEP = 1 << 20
#: QEMU's bounds (vmdk_add_extent / vmdk_open_vmdk4).
MAX_GRANULARITY = 0x200000  # sectors (1 GiB)
MAX_GTES = 512
MAX_L1 = 32 * 1024 * 1024

RunKind = Literal["data", "compressed", "zero", "unallocated"]


class GrainRun:
    """A run of extent-relative bytes with one status (and a host offset for data)."""

    __slots__ = ("host", "kind", "length", "start")

    def __init__(self, start: int, length: int, kind: RunKind, host: int = 0) -> None:
        self.start = start
        self.length = length
        self.kind = kind
        self.host = host


def _read_padded(st: Storage, offset: int, length: int) -> bytes:
    """Read ``length`` bytes; past the end of the file reads zeroes (as QEMU's file driver)."""
    data = st.pread(offset, length)
    return data if len(data) == length else data + bytes(length - len(data))


class FlatExtent:
    """A flat extent: ``sectors`` of the disk stored in ``storage`` from ``offset`` on."""

    flat = True
    compressed = False
    cluster_size: int | None = None

    def __init__(self, storage: Storage, sectors: int, offset: int, filename: str, kind: str):
        self.st = storage
        self.size = sectors * layout.SECTOR
        self.offset = offset * layout.SECTOR
        self.filename = filename
        self.type = kind

    def runs(self, start: int, length: int) -> Iterator[GrainRun]:
        """The whole range is data at ``offset + start`` (file holes read as zeroes)."""
        yield GrainRun(start, length, "data", self.offset + start)

    def read_run(self, run: GrainRun, start: int, length: int) -> bytes:
        """Read ``length`` bytes at extent offset ``start`` inside data ``run``."""
        return _read_padded(self.st, self.offset + start, length)

    def holes(self, start: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, length, is_data)`` of the backing file over the range (holes are zero)."""
        extents = getattr(self.st, "data_extents", None)
        size = self.st.size()
        host = self.offset + start
        end = host + length
        if extents is None or host >= size:
            yield start, length, extents is None
            return
        for pos, n, is_data in extents(host, min(end, size) - host):
            yield pos - self.offset, n, is_data
        if end > size:
            yield size - self.offset, end - size, False

    def bad_grains(self) -> Iterator[tuple[int, str]]:
        """Nothing to check in a flat extent."""
        return iter(())


class SparseExtent:
    """A hosted sparse extent (``KDMV``), read through its grain directory and tables.

    Raises:
        CorruptImageError: a header field out of QEMU's bounds, a grain
            directory outside the file, a damaged footer.
        UnsupportedFeatureError: version > 3, or a compression other than deflate.
    """

    flat = False

    def __init__(self, storage: Storage, filename: str, kind: str, path: str) -> None:
        self.st = storage
        self.filename = filename
        self.type = kind
        self.path = path
        file_size = storage.size()
        head = storage.pread(0, layout.SECTOR)
        if len(head) < layout.HEADER.size or head[:4] != layout.MAGIC:
            if head[:4] == layout.VMDK3_MAGIC:
                raise UnsupportedFeatureError(
                    "VMDK version 3 (COWD) sparse extents are not supported",
                    feature="vmdk COWD extent",
                    path=path,
                )
            raise CorruptImageError("not a VMDK sparse extent (no KDMV magic)", path=path)
        hdr = layout.SparseHeader.unpack(head)
        if hdr.gd_offset == layout.GD_AT_END:
            hdr = self._footer(file_size)
        self.header = hdr
        if hdr.version > 3:
            raise UnsupportedFeatureError(
                f"unsupported VMDK sparse extent version {hdr.version}",
                feature=f"vmdk version {hdr.version}",
                path=path,
            )
        if hdr.compress_algorithm not in (0, layout.COMPRESSION_DEFLATE):
            raise UnsupportedFeatureError(
                f"unknown grain compression {hdr.compress_algorithm}",
                feature="vmdk compression",
                path=path,
            )
        if hdr.num_gtes_per_gt > MAX_GTES:
            raise CorruptImageError(
                f"grain table size {hdr.num_gtes_per_gt} is larger than {MAX_GTES}", path=path
            )
        if hdr.granularity > MAX_GRANULARITY:
            raise CorruptImageError(f"invalid granularity {hdr.granularity} sectors", path=path)
        gt_span = hdr.num_gtes_per_gt * hdr.granularity  # sectors per grain table
        if gt_span == 0:
            raise CorruptImageError("grain table or grain size is zero", path=path)
        if hdr.capacity * layout.SECTOR > (1 << 63) - 1:
            raise CorruptImageError(f"capacity {hdr.capacity} sectors is absurd", path=path)
        self.gd_entries = -(-hdr.capacity // gt_span)
        if self.gd_entries > MAX_L1:
            raise CorruptImageError(f"grain directory of {self.gd_entries} entries", path=path)
        gd_at = hdr.gd_offset * layout.SECTOR
        if gd_at + self.gd_entries * 4 > file_size:
            raise CorruptImageError(
                f"grain directory ({self.gd_entries} entries at sector {hdr.gd_offset}) "
                f"runs past the end of the {file_size}-byte file",
                path=path,
            )
        self.gd = array("I", storage.pread(gd_at, self.gd_entries * 4))
        if array("I", [1]).tobytes() != b"\x01\0\0\0":  # pragma: no cover - big-endian hosts
            self.gd.byteswap()
        self.size = hdr.capacity * layout.SECTOR
        self.grain = hdr.granularity * layout.SECTOR
        self.gtes = hdr.num_gtes_per_gt
        self.compressed = hdr.compressed
        self.cluster_size: int | None = self.grain
        self._file_size = file_size
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        self._last: tuple[int, bytes] | None = None

    def _footer(self, file_size: int) -> layout.SparseHeader:
        """streamOptimized with the GD at the end: the footer (at -1536) holds the header."""
        if file_size < 1536:
            raise CorruptImageError(
                "stream-optimized extent too short for a footer", path=self.path
            )
        tail = self.st.pread(file_size - 1536, 1536)
        fm = layout.MARKER.unpack_from(tail, 0)
        eos = layout.MARKER.unpack_from(tail, 1024)
        if (
            tail[512:516] != layout.MAGIC
            or fm[1] != 0
            or fm[2] != layout.MARKER_FOOTER
            or eos != (0, 0, layout.MARKER_EOS)
        ):
            raise CorruptImageError(
                "stream-optimized extent has no valid footer (truncated stream?)",
                path=self.path,
                offset=file_size - 1536,
            )
        return layout.SparseHeader.unpack(tail, 512)

    def _table(self, index: int) -> array[int] | None:
        """Grain table ``index`` (None when the GD entry is 0: nothing allocated)."""
        sector = self.gd[index]
        if sector == 0:
            return None
        table = self._cache.get(sector)
        if table is not None:
            self._cache.move_to_end(sector)
            return table
        at = sector * layout.SECTOR
        if at + self.gtes * 4 > self._file_size:
            raise CorruptImageError(
                f"grain table {index} at sector {sector} runs past the end of the file",
                path=self.path,
                offset=at,
            )
        table = array("I", self.st.pread(at, self.gtes * 4))
        if array("I", [1]).tobytes() != b"\x01\0\0\0":  # pragma: no cover - big-endian hosts
            table.byteswap()
        self._cache[sector] = table
        if len(self._cache) > _GT_CACHE:
            self._cache.popitem(last=False)
        return table

    def runs(self, start: int, length: int) -> Iterator[GrainRun]:
        """Split ``[start, start+length)`` by grain status; data runs with host offsets."""
        end = start + length
        pos = start
        span = self.grain * self.gtes
        while pos < end:
            gi = pos // span
            table = self._table(gi)
            if table is None:
                n = min(end, (gi + 1) * span) - pos
                yield GrainRun(pos, n, "unallocated")
                pos += n
                continue
            stop = min(end, (gi + 1) * span)
            while pos < stop:
                grain_no = pos // self.grain
                in_grain = pos - grain_no * self.grain
                n = min(stop - pos, self.grain - in_grain)
                entry = table[grain_no % self.gtes]
                if entry == 0:
                    yield GrainRun(pos, n, "unallocated")
                elif entry == layout.GTE_ZEROED and self.header.zero_grain:
                    yield GrainRun(pos, n, "zero")
                elif self.compressed:
                    yield GrainRun(pos, n, "compressed", entry * layout.SECTOR)
                else:
                    yield GrainRun(pos, n, "data", entry * layout.SECTOR + in_grain)
                pos += n

    def read_run(self, run: GrainRun, start: int, length: int) -> bytes:
        """Read ``length`` bytes at extent offset ``start`` inside ``run``."""
        if run.kind == "data":
            return _read_padded(self.st, run.host + (start - run.start), length)
        in_grain = start % self.grain
        last = self._last  # one read: other threads may inflate grains of this extent too
        if last is not None and last[0] == run.host:
            grain = last[1]
        else:
            keep = (0, self.grain) if self.grain <= _CACHE_GRAIN else (in_grain, in_grain + length)
            grain = self._inflate(run.host, *keep)
            if self.grain <= _CACHE_GRAIN:
                self._last = (run.host, grain)
            else:
                in_grain = 0
        if in_grain + length > len(grain):
            raise CorruptImageError(
                f"compressed grain at {run.host} holds fewer bytes than the "
                f"{start % self.grain + length} read",
                path=self.path,
                offset=run.host,
            )
        if in_grain == 0 and length == len(grain):
            return grain
        return grain[in_grain : in_grain + length]

    def _inflate(self, host: int, keep_from: int, keep_to: int) -> bytes:
        """Inflate the grain stored compressed at ``host``; return its bytes ``[keep_from,
        keep_to)`` (QEMU's ``vmdk_read_extent``: a zlib stream of at most two grains'
        worth of bytes, inflating to at most one grain, checked to its end).

        Input and output are streamed in 1 MiB pieces, so memory stays bounded
        by what the caller keeps, however large the header says a grain is.
        """
        size = self.grain  # without markers QEMU inflates one grain's worth of bytes
        pos = host
        if self.header.markers:
            marker = _read_padded(self.st, host, layout.GRAIN_MARKER.size)
            size = layout.GRAIN_MARKER.unpack(marker)[1]
            pos += layout.GRAIN_MARKER.size
            if size == 0 or size > 2 * self.grain:
                raise CorruptImageError(
                    f"compressed grain size {size} is out of range", path=self.path, offset=host
                )
        inflater = zlib.decompressobj()
        kept: list[bytes] = []
        produced = 0
        end = pos + size
        pending = b""
        try:
            while not inflater.eof:
                if not pending and pos < end:
                    pending = _read_padded(self.st, pos, min(_STEP, end - pos))
                    pos += len(pending)
                last = not pending
                if last:  # no input left: only what zlib still holds
                    out = inflater.flush()
                else:
                    out = inflater.decompress(pending, _STEP)
                    pending = inflater.unconsumed_tail
                if produced + len(out) > self.grain:
                    raise CorruptImageError(
                        "compressed grain inflates to more than one grain",
                        path=self.path,
                        offset=host,
                    )
                lo, hi = max(keep_from - produced, 0), min(keep_to - produced, len(out))
                if lo < hi:
                    kept.append(out if (lo, hi) == (0, len(out)) else out[lo:hi])
                produced += len(out)
                if last:
                    break
        except zlib.error as exc:
            raise CorruptImageError(
                f"compressed grain does not inflate: {exc}", path=self.path, offset=host
            ) from exc
        if not inflater.eof:
            raise CorruptImageError("compressed grain is truncated", path=self.path, offset=host)
        return kept[0] if len(kept) == 1 else b"".join(kept)

    def bad_grains(self) -> Iterator[tuple[int, str]]:
        """``(host offset, message)`` for grain-table entries pointing past the file's end."""
        for gi in range(self.gd_entries):
            try:
                table = self._table(gi)
            except CorruptImageError as exc:
                yield self.gd[gi] * layout.SECTOR, str(exc)
                continue
            if table is None:
                continue
            for entry in table:
                if entry > layout.GTE_ZEROED and entry * layout.SECTOR >= self._file_size:
                    yield (
                        entry * layout.SECTOR,
                        (f"grain at sector {entry} is past the end of {self.filename}"),
                    )


def unpack_u32(data: bytes) -> int:
    """Little-endian u32 (for callers that peek at single fields)."""
    value: int = struct.unpack("<I", data)[0]
    return value

"""Where does guest offset X live? The qcow2 mapping layer.

This module answers only that question: for a guest range it yields runs of
(kind, guest offset, length, host offset), where kind is data at a host
offset, zeroes, unallocated (fall through to the backing file) or a
compressed cluster. It reads L2 tables (through a bounded cache) and
validates every entry it hands out; it never reads or writes guest data.

Tables the write-back cache (:mod:`.cache`) holds changed in memory are
*pinned*: lookups see them first and the bounded LRU never evicts them, so a
read always sees the newest mapping whether or not it reached the file.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple, NewType

from virtkit.errors import CorruptImageError
from virtkit.images.qcow2 import layout
from virtkit.images.storage import Storage

__all__ = [
    "COMPRESSED",
    "DATA",
    "UNALLOCATED",
    "ZERO",
    "GuestOffset",
    "HostOffset",
    "Mapper",
    "Run",
]

DATA = 0
ZERO = 1
UNALLOCATED = 2
COMPRESSED = 3

#: A byte position on the virtual disk the guest sees.
GuestOffset = NewType("GuestOffset", int)
#: A byte position in the image (or data) file.
HostOffset = NewType("HostOffset", int)

#: L2 tables kept decoded in memory.
L2_CACHE_BYTES = 32 * 1024 * 1024


class Run(NamedTuple):
    """A run of guest bytes with one mapping."""

    kind: int
    guest: GuestOffset
    length: int
    #: Host offset for DATA; the raw L2 entry for COMPRESSED; 0 otherwise.
    host: HostOffset


class Mapper:
    """Translates guest offsets through the active L1/L2 tables.

    Args:
        storage: the image file (L2 tables live here).
        cluster_bits: log2 of the cluster size.
        extended_l2: whether L2 entries carry a subcluster bitmap.
        zero_flag: whether bit 0 of a standard entry means "reads as zero" (v3).
        file_size: returns the current image file length.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        cluster_bits: int,
        extended_l2: bool,
        zero_flag: bool,
        file_size: Callable[[], int],
    ) -> None:
        self.st = storage
        self.path = storage.path
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.extended = extended_l2
        self.step = 2 if extended_l2 else 1
        self.l2_entries = self.cs // (8 * self.step)
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.sc_size = self.cs // layout.SUBCLUSTERS if extended_l2 else self.cs
        self.zero_flag = zero_flag and not extended_l2
        self.file_size = file_size
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.l1: array[int] = array("Q")
        #: Data clusters live in an external data file (host offset 0 is valid there).
        self.external = False
        #: File offset of the active L1 table (for error locations).
        self.l1_offset = 0
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        self._cache_limit = max(4, L2_CACHE_BYTES // self.cs)
        #: L2 tables changed in memory and not yet written (offset -> table): never evicted.
        self.pinned: dict[int, array[int]] = {}

    # ---- tables --------------------------------------------------------------------
    def check_table_offset(self, offset: int, what: str, where: int) -> None:
        """Validate a cluster-sized table's file offset (aligned, past the header, in the file)."""
        if offset & (self.cs - 1) or offset < self.cs or offset + self.cs > self.file_size():
            raise CorruptImageError(
                f"{what} offset {offset:#x} is unaligned, inside the header or past the end "
                "of the file",
                path=self.path,
                offset=where,
            )

    def load_l2(self, offset: int, where: int) -> array[int]:
        """The L2 table at file ``offset`` (decoded, cached)."""
        table = self.pinned.get(offset)
        if table is not None:
            return table
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
            return table
        self.check_table_offset(offset, "L2 table", where)
        raw = self.st.pread(offset, self.cs)
        if len(raw) != self.cs:
            raise CorruptImageError("L2 table is truncated", path=self.path, offset=offset)
        table = layout.decode_u64_table(raw)
        self.put_l2(offset, table)
        return table

    def put_l2(self, offset: int, table: array[int]) -> None:
        """Install ``table`` as the cached content of the L2 table at ``offset``."""
        if offset in self.pinned:
            self.pinned[offset] = table
            return
        self._cache[offset] = table
        self._cache.move_to_end(offset)
        if len(self._cache) > self._cache_limit:
            self._cache.popitem(last=False)

    def pin(self, offset: int, table: array[int]) -> None:
        """Hold ``table`` (changed in memory, not yet written) until :meth:`unpin`."""
        self._cache.pop(offset, None)
        self.pinned[offset] = table

    def unpin(self) -> None:
        """Every pinned table was written: move them to the ordinary (evictable) cache."""
        pinned, self.pinned = self.pinned, {}
        for offset, table in pinned.items():
            self.put_l2(offset, table)

    def forget_l2(self, offset: int) -> None:
        """Drop a cached L2 table (it was freed or rewritten)."""
        self._cache.pop(offset, None)
        self.pinned.pop(offset, None)

    def drop_cache(self) -> None:
        """Forget every cached L2 table that the file holds too (pinned ones stay)."""
        self._cache.clear()

    def l2_for(self, l1_index: int) -> tuple[int, array[int] | None]:
        """``(l2 offset, table)`` for an L1 index; ``(0, None)`` when unallocated."""
        if l1_index >= len(self.l1):
            return 0, None
        entry = self.l1[l1_index]
        off = entry & layout.L1E_OFFSET_MASK
        if not off:
            return 0, None
        return off, self.load_l2(off, where=self.l1_offset + l1_index * 8)

    # ---- entries -----------------------------------------------------------------------
    def compressed_range(self, entry: int) -> tuple[int, int]:
        """``(host offset, byte count)`` of the sectors a compressed entry spans."""
        host = entry & self.coffset_mask
        nsec = ((entry >> self.csize_shift) & self.csize_mask) + 1
        start = host & ~(layout.COMPRESSED_SECTOR - 1)
        return host, start + nsec * layout.COMPRESSED_SECTOR - host

    def data_host(self, entry: int, where: int) -> int:
        """Host cluster offset of a standard entry, validated (0 if none)."""
        host = entry & layout.L2E_OFFSET_MASK
        if host & (self.cs - 1):
            raise CorruptImageError(
                f"L2 entry {entry:#x} points at unaligned host offset {host:#x}",
                path=self.path,
                offset=where,
            )
        if host and host < self.cs and not self.external:
            raise CorruptImageError(
                f"L2 entry {entry:#x} points into the image header",
                path=self.path,
                offset=where,
            )
        return host

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        """Yield coalesced mapping runs covering ``[offset, offset+length)``."""
        cb = self.cluster_bits
        end = offset + length
        pend: list[int] | None = None  # [kind, guest, length, host]
        pos = offset
        while pos < end:
            ci = pos >> cb
            l1i = ci >> self.l2_bits
            l2_off, l2 = self.l2_for(l1i)
            slice_end = min(end, (l1i + 1) << (cb + self.l2_bits))
            if l2 is None:
                items: Iterator[Run] = iter(
                    (Run(UNALLOCATED, GuestOffset(pos), slice_end - pos, HostOffset(0)),)
                )
            else:
                items = self._slice_runs(l2, l2_off, pos, slice_end)
            for run in items:
                if (
                    pend is not None
                    and run.kind == pend[0]
                    and run.kind != COMPRESSED
                    and (run.kind != DATA or pend[3] + pend[2] == run.host)
                ):
                    pend[2] += run.length
                    continue
                if pend is not None:
                    yield Run(pend[0], GuestOffset(pend[1]), pend[2], HostOffset(pend[3]))
                pend = [run.kind, run.guest, run.length, run.host]
            pos = slice_end
        if pend is not None:
            yield Run(pend[0], GuestOffset(pend[1]), pend[2], HostOffset(pend[3]))

    def _slice_runs(self, l2: array[int], l2_off: int, start: int, end: int) -> Iterator[Run]:
        cb = self.cluster_bits
        cs = self.cs
        mask = self.l2_entries - 1
        pos = start
        while pos < end:
            idx = (pos >> cb) & mask
            in_off = pos & (cs - 1)
            n = min(end - pos, cs - in_off)
            where = l2_off + idx * 8 * self.step
            entry = l2[idx * self.step]
            if entry & layout.OFLAG_COMPRESSED:
                yield Run(COMPRESSED, GuestOffset(pos), n, HostOffset(entry))
            elif not self.extended:
                if self.zero_flag and entry & layout.OFLAG_ZERO:
                    yield Run(ZERO, GuestOffset(pos), n, HostOffset(0))
                else:
                    host = self.data_host(entry, where)
                    if host or (self.external and entry & layout.OFLAG_COPIED):
                        yield Run(DATA, GuestOffset(pos), n, HostOffset(host + in_off))
                    else:
                        yield Run(UNALLOCATED, GuestOffset(pos), n, HostOffset(0))
            else:
                yield from self._sub_runs(
                    entry, l2[idx * 2 + 1], where=where, pos=pos, n=n, in_off=in_off
                )
            pos += n

    def _sub_runs(
        self, entry: int, bitmap: int, *, where: int, pos: int, n: int, in_off: int
    ) -> Iterator[Run]:
        alloc = bitmap & 0xFFFFFFFF
        zero = bitmap >> 32
        if alloc & zero:
            raise CorruptImageError(
                f"extended L2 entry bitmap {bitmap:#x} marks subclusters both allocated and zero",
                path=self.path,
                offset=where + 8,
            )
        host = self.data_host(entry, where)
        if alloc and not host and not self.external:
            raise CorruptImageError(
                "extended L2 entry has allocated subclusters but no host offset",
                path=self.path,
                offset=where,
            )
        if alloc == 0xFFFFFFFF:
            yield Run(DATA, GuestOffset(pos), n, HostOffset(host + in_off))
            return
        if alloc == 0 and zero == 0xFFFFFFFF:
            yield Run(ZERO, GuestOffset(pos), n, HostOffset(0))
            return
        if alloc == 0 and zero == 0:
            yield Run(UNALLOCATED, GuestOffset(pos), n, HostOffset(0))
            return
        sc = self.sc_size
        off = in_off
        stop = in_off + n
        while off < stop:
            k = off // sc
            m = min(stop, (k + 1) * sc) - off
            g = pos + off - in_off
            if alloc >> k & 1:
                yield Run(DATA, GuestOffset(g), m, HostOffset(host + off))
            elif zero >> k & 1:
                yield Run(ZERO, GuestOffset(g), m, HostOffset(0))
            else:
                yield Run(UNALLOCATED, GuestOffset(g), m, HostOffset(0))
            off += m

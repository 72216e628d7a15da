"""The qcow2 write-back metadata cache (QEMU's ``Qcow2Cache`` pair, in one object).

In the default ``cache="writeback"`` mode a write request changes L2 tables,
L1 entries and refcount blocks in memory only; the data itself goes to the
file at once. :meth:`MetadataCache.writeback` writes the metadata later, on
``flush()``, when the dirty set outgrows its bound, and on ``close()``, in
dependency order:

1. dirty refcount blocks (raised counts) and new L2 tables, which nothing on
   disk references yet, then a barrier (fdatasync): QEMU's dependency of the
   L2 cache on the refcount cache, and ``depends_on_flush`` for the data and
   the copy-on-write copies a new L2 entry points at;
2. the changed L2 entries of existing tables, then the L1 entries (L2 before
   L1: a new table is durable before the L1 entry that names it);
3. references a request removed (a discard, a cluster copied away from a
   snapshot, an L2 table replaced) lower their refcounts only now, after a
   second barrier has made their removal durable, so a lowered count never
   reaches the disk before the reference is gone. Until then the clusters
   keep their counts in memory too, so nothing reuses them.

Because of (3), the refcount blocks in memory are safe to write at any moment,
in any order (the worst a crash can leave is a leak): the refcount cache
writes a dirty block when it evicts it, and only L2 tables are pinned.

The contract is QEMU's: what a ``flush()`` returned for survives any crash or
power loss; writes not yet flushed may be lost (each byte reads as its old
or its new value, or, in a cluster first allocated by an unflushed write,
whatever the file held there), but the image is never corrupt: ``qemu-img
check`` finds at most leaked clusters (refcounts of clusters whose reference
was not yet written), which ``check(repair=True)`` reclaims.

Memory is bounded: at most :data:`DIRTY_BYTES` of pinned L2 tables and
:data:`MAX_FREES` deferred refcount drops before a write-back (without the
final fdatasync) runs on its own.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from virtkit.errors import CorruptImageError
from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.requests import Request, ref_drops

if TYPE_CHECKING:
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["CACHE_MODES", "DIRTY_BYTES", "MAX_FREES", "MetadataCache"]

#: The cache modes an image opens with, named after QEMU's ``cache=`` modes.
CACHE_MODES = ("writeback", "writethrough")

#: Pinned (dirty) L2 tables, in bytes, before a write-back runs by itself.
DIRTY_BYTES = 16 * 1024 * 1024

#: Deferred refcount drops before a write-back runs by itself.
MAX_FREES = 1 << 16


class MetadataCache:
    """Dirty qcow2 metadata of one open image and its write-back in dependency order.

    The L2 tables themselves stay in the image's :class:`~.mapping.Mapper`
    (pinned while dirty) and the refcount blocks in its
    :class:`~.allocator.Refcounts` (marked dirty); this object records what
    must be written and in which order.

    Attributes:
        new_tables: offsets of L2 tables allocated in memory and never written.
        ranges: offset of an existing L2 table -> (first, stop) changed array slots.
        l1: indices of L1 entries changed in memory.
        frees: refcount drops waiting for their references' removal to be durable.
        old_tables: replaced L2 tables among ``frees`` (dropped from the cache once free).
        writebacks: write-backs done (for tests and benchmarks).
    """

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.new_tables: set[int] = set()
        self.ranges: dict[int, tuple[int, int]] = {}
        self.l1: set[int] = set()
        self.frees: list[tuple[int, int]] = []
        self.old_tables: list[int] = []
        #: Cluster -> references ``frees`` will drop from it (checked against its count).
        self._dropping: dict[int, int] = {}
        self.writebacks = 0
        self._limit = max(8, DIRTY_BYTES // img.cs)

    @property
    def dirty(self) -> bool:
        """Whether memory holds metadata the file does not."""
        return bool(self.new_tables or self.ranges or self.l1 or self.frees or self.img.refs.dirty)

    def over_limit(self) -> bool:
        """Whether the dirty set has outgrown its memory bound."""
        return len(self.img._mapper.pinned) > self._limit or len(self.frees) > MAX_FREES

    def publish(self, req: Request) -> None:
        """Install ``req``'s working copies in memory and record what is dirty."""
        img = self.img
        mapper = img._mapper
        step = mapper.step
        drops = ref_drops(mapper, req.olds)
        drops.extend((old >> img.cb, -1) for old in req.new.values() if old)
        self._check_drops(drops)
        for l1i, (off, table) in req.tables.items():
            if l1i in req.new:
                old = req.new[l1i]
                mapper.pin(off, table)
                self.new_tables.add(off)
                img._l1[l1i] = off | layout.OFLAG_COPIED
                self.l1.add(l1i)
                img._meta_changed()
                if old:
                    self.old_tables.append(old)
                continue
            span = req.ranges.get(l1i)
            if span is None:
                continue
            mapper.pin(off, table)
            if off in self.new_tables:
                continue
            lo, hi = span[0] * step, span[1] * step
            cur = self.ranges.get(off)
            self.ranges[off] = (lo, hi) if cur is None else (min(cur[0], lo), max(cur[1], hi))
        self.frees.extend(drops)

    def note(self, off: int, table: array[int], idx: int) -> None:
        """Slot ``idx`` of the existing L2 table at ``off`` changed in memory, nothing dropped.

        What :meth:`publish` does for a request that changed one entry of a
        table it did not allocate and removed no reference: the table is
        pinned and the entry joins the range to write. The caller checks
        :meth:`over_limit` when this pinned a table.
        """
        mapper = self.img._mapper
        if off not in mapper.pinned:
            mapper.pin(off, table)
        if off not in self.new_tables:
            cur = self.ranges.get(off)
            self.ranges[off] = (
                (idx, idx + 1) if cur is None else (min(cur[0], idx), max(cur[1], idx + 1))
            )

    def _check_drops(self, drops: list[tuple[int, int]]) -> None:
        """Refuse references whose clusters do not have the counts to drop (corruption).

        The drops happen at the next write-back; checking now reports the
        damage on the request that found it, as a write-through update would.
        """
        refs = self.img.refs
        want: dict[int, int] = {}
        for cluster, delta in drops:
            want[cluster] = want.get(cluster, 0) - delta
        for cluster, n in want.items():
            have = refs.get(cluster) - self._dropping.get(cluster, 0)
            if have < n:
                raise CorruptImageError(
                    f"refcount of cluster {cluster} would drop below zero (it has {have} "
                    f"references left, {n} more are removed); run check(repair=True)",
                    path=self.img.path,
                    offset=cluster << self.img.cb,
                )
        for cluster, n in want.items():
            self._dropping[cluster] = self._dropping.get(cluster, 0) + n

    def writeback(self, *, sync: bool = True) -> None:
        """Write every dirty structure in dependency order (see the module docstring).

        With ``sync`` the file is fdatasynced at the end, so everything written
        before the call is durable (``flush()``). Without it (a write-back
        forced by the memory bound) only the barriers ordering the metadata
        are taken. A failed write leaves the rest dirty; calling again retries.
        """
        img = self.img
        st = img.st
        refs = img.refs
        mapper = img._mapper
        self.writebacks += 1
        if self.new_tables or self.ranges or self.l1:
            refs.write_dirty()
            for off in sorted(self.new_tables):
                st.pwrite(off, layout.encode_u64_table(mapper.pinned[off]))
            st.flush()  # counts, data, copies and new tables before any reference to them
            for off in sorted(self.ranges):
                lo, hi = self.ranges[off]
                st.pwrite(off + lo * 8, layout.encode_u64_table(mapper.pinned[off][lo:hi]))
                del self.ranges[off]
            self._write_l1()
            self.new_tables.clear()
            mapper.unpin()
        if self.frees:
            st.flush()  # the references are gone on disk before their counts drop
            frees, self.frees = self.frees, []
            self._dropping.clear()
            img._cfree = 0
            deferring, refs.defer = refs.defer, True  # one write per block, below
            try:
                refs.update(frees)
            finally:
                refs.defer = deferring
            for old in self.old_tables:
                if refs.get(old >> img.cb) == 0:
                    mapper.forget_l2(old)
            self.old_tables.clear()
        if sync:
            refs.write_dirty()
            st.flush()

    def _write_l1(self) -> None:
        """Write the changed L1 entries, runs of neighbours in one write each."""
        img = self.img
        base = img.hdr.l1_table_offset
        pending = sorted(self.l1)
        i = 0
        while i < len(pending):
            j = i
            while j + 1 < len(pending) and pending[j + 1] == pending[j] + 1:
                j += 1
            first, last = pending[i], pending[j]
            img.st.pwrite(base + first * 8, layout.encode_u64_table(img._l1[first : last + 1]))
            self.l1.difference_update(range(first, last + 1))
            i = j + 1

"""Ordering of qcow2 write requests: what a request changes, and how it is published.

A write request (one ``write``, ``write_zeroes``, ``discard`` or
``write_compressed`` call) first allocates clusters (raising their refcounts)
and writes its data; the L2 tables it changes are *working copies* held in a
:class:`Request`. Publishing the request is then one of two things:

- **write-back** (the default cache mode, :class:`~.cache.MetadataCache`): the
  working copies replace the cached tables in memory and are written later, on
  ``flush()``, eviction or ``close()``, in dependency order;
- **write-through** (:func:`commit_through`, also used by every structural
  operation such as snapshots and resize): the metadata is written now, in
  QEMU's order: new L2 tables, one barrier (fdatasync) making raised refcounts,
  data and the new tables durable, then the L2 and L1 entries that reference
  them; the references a request removed are flushed away before their
  refcounts drop. A request needs that constant number of barriers however
  many clusters it allocates, and none when it only overwrites clusters it
  already owns.

Memory never runs ahead of the file on the write-through path: the cached
tables and the L1 table change only after their writes succeed.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.mapping import Mapper

if TYPE_CHECKING:
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["Request", "coalesce", "commit_through", "ref_drops"]


class Request:
    """One request's metadata updates, not yet published.

    Attributes:
        tables: L1 index -> (L2 table offset, working copy of the table).
        new: L1 index -> offset of the L2 table the new one replaces (0: none),
            for tables allocated by this request.
        ranges: L1 index -> (first, stop) L2 entry indices changed.
        olds: former L2 entries whose references the request removes.
    """

    __slots__ = ("new", "olds", "ranges", "tables")

    def __init__(self) -> None:
        self.tables: dict[int, tuple[int, array[int]]] = {}
        self.new: dict[int, int] = {}
        self.ranges: dict[int, tuple[int, int]] = {}
        self.olds: list[int] = []

    def mark(self, l1i: int, lo: int, hi: int) -> None:
        """Record that entries ``[lo, hi)`` of the table for ``l1i`` changed."""
        r = self.ranges.get(l1i)
        self.ranges[l1i] = (lo, hi) if r is None else (min(r[0], lo), max(r[1], hi))


def coalesce(items: list[tuple[int, int]], cs: int) -> Iterator[tuple[int, int, int]]:
    """Group ``(index, host)`` pairs into ``(first, stop, host)`` contiguous runs."""
    start = prev = host0 = -1
    for j, host in items:
        if start >= 0 and j == prev + 1 and host == host0 + (j - start) * cs:
            prev = j
            continue
        if start >= 0:
            yield start, prev + 1, host0
        start = prev = j
        host0 = host
    if start >= 0:
        yield start, prev + 1, host0


def ref_drops(mapper: Mapper, entries: Iterable[int]) -> list[tuple[int, int]]:
    """Refcount changes dropping the references the given (former) L2 entries held."""
    cb = mapper.cluster_bits
    changes: list[tuple[int, int]] = []
    for entry in entries:
        if entry & layout.OFLAG_COMPRESSED:
            host, nbytes = mapper.compressed_range(entry)
            first = (host & ~(layout.COMPRESSED_SECTOR - 1)) >> cb
            last = (host + nbytes - 1) >> cb
            changes.extend((c, -1) for c in range(first, last + 1))
        else:
            host = entry & layout.L2E_OFFSET_MASK
            if host:
                changes.append((host >> cb, -1))
    return changes


def commit_through(img: Qcow2Image, req: Request) -> None:
    """Write ``req``'s metadata now, in dependency order, then update memory.

    New L2 tables are written first; one barrier makes them, the raised
    refcounts and the data durable; then the L2 entries and L1 entries that
    reference them are written (memory follows each successful write); then,
    after a second barrier, the references the request removed have their
    refcounts lowered. At most two barriers, however many clusters.
    """
    mapper = img._mapper
    st = img.st
    step = mapper.step
    for l1i in req.new:
        off, table = req.tables[l1i]
        st.pwrite(off, layout.encode_u64_table(table))
    if req.new or req.ranges:
        img._barrier()
    l1_off = img.hdr.l1_table_offset
    for l1i, (off, table) in req.tables.items():
        if l1i in req.new:
            img._set_l1_entry(l1i, off | layout.OFLAG_COPIED)
            mapper.put_l2(off, table)
            img._meta_changed()
            continue
        span = req.ranges.get(l1i)
        if span is None:
            continue
        lo, hi = span[0] * step, span[1] * step
        st.pwrite(off + lo * 8, layout.encode_u64_table(table[lo:hi]))
        cached = mapper.load_l2(off, where=l1_off + l1i * 8)
        cached[lo:hi] = table[lo:hi]
    changes = ref_drops(mapper, req.olds)
    old_tables = [old for old in req.new.values() if old]
    if changes or old_tables:
        # QEMU frees the same way: the reference is gone on disk before the count drops
        img._flush()
        changes.extend((old >> img.cb, -1) for old in old_tables)
        img._cfree = 0
        img.refs.update(changes)
        for old in old_tables:
            if img.refs.get(old >> img.cb) == 0:
                mapper.forget_l2(old)

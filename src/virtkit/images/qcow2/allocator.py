"""Refcounts and cluster allocation for qcow2.

The refcount table points at refcount blocks; each block holds one count per
host cluster, ``refcount_bits`` wide (1 to 64). A cluster is free when its
count is zero. Updates are written through to the file at once, so callers
can keep QEMU's ordering rule: raise a count before anything references the
cluster, lower it only after nothing does. A crash then leaks clusters but
never lets two owners share one.
Written through is not yet durable: after raising a count the owner flushes
before it writes a reference to the cluster (:attr:`Refcounts.raised` says a
flush is due), and a refcount table entry points at a new block only once the
block is flushed.

With :attr:`Refcounts.defer` set (the write-back cache, :mod:`.cache`),
updates stay in memory in *dirty* blocks, written by :meth:`Refcounts.write_dirty`
or when the block cache evicts one. The owner keeps a rule that makes that
safe at any moment: a count is lowered in memory only once the reference it
stood for is gone on disk (durably), so what the dirty blocks hold can reach
the file in any order and at any time, and at worst leaks.

New refcount blocks (and a bigger refcount table) are placed in a fresh area
at the end of the file that the new blocks themselves describe, the way
QEMU's ``qcow2_refcount_area`` does.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable

from virtkit.errors import CorruptImageError, ImageError
from virtkit.images.qcow2 import layout
from virtkit.images.storage import Storage

__all__ = ["Refcounts"]

#: Refcount blocks kept decoded in memory (each one cluster).
BLOCK_CACHE_BYTES = 32 * 1024 * 1024


class Refcounts:
    """The refcount structure of one image: lookups, updates, allocation.

    Args:
        storage: the image file.
        cluster_bits: log2 of the cluster size.
        refcount_order: log2 of the refcount width in bits.
        table_offset: file offset of the refcount table.
        table_clusters: its length in clusters.
        set_table: called with (offset, clusters) after the table moved, to
            rewrite the header fields.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        set_table: Callable[[int, int], None],
    ) -> None:
        self.st = storage
        self.path = storage.path
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max = (1 << self.bits) - 1
        self.per_block = self.cs * 8 // self.bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self._set_table = set_table
        self.table: array[int] = self._read_table()
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        #: A count was raised since the owner's last flush: a reference to the
        #: cluster must wait for a flush (the owner clears it after flushing).
        self.raised = False
        self._cache_limit = max(2, BLOCK_CACHE_BYTES // max(self.cs, self.per_block))
        self.free_hint = 0
        #: Bumped whenever a cluster becomes free (invalidates partial-cluster reuse).
        self.frees = 0
        #: Called after the set of refcount metadata clusters changed.
        self.on_metadata_change: Callable[[], None] = lambda: None
        #: Clusters no refcount block may occupy (header, L1 and other fixed tables).
        self.reserved: Callable[[], set[int]] = set
        #: Keep updates in memory (write-back) instead of writing them through.
        self.defer = False
        #: Block index -> (first, stop) entries changed in memory and not yet written.
        self.dirty: dict[int, tuple[int, int]] = {}

    def _read_table(self) -> array[int]:
        n = self.table_clusters * self.cs
        raw = self.st.pread(self.table_offset, n)
        if len(raw) < n:
            raw += bytes(n - len(raw))
        return layout.decode_u64_table(raw)

    def reload(self) -> None:
        """Re-read the refcount table and drop every cached block (after a failed write).

        Memory then holds exactly what the file does, so counts whose write
        failed are not trusted later.
        """
        self._cache.clear()
        self.dirty.clear()
        self.table = self._read_table()
        self.free_hint = 0
        self.frees += 1

    # ---- lookups -----------------------------------------------------------------
    def block_offset(self, index: int) -> int:
        """File offset of refcount block ``index`` (0 when not allocated).

        Raises:
            CorruptImageError: the table entry is unaligned or past the file end.
        """
        if index >= len(self.table):
            return 0
        entry = self.table[index]
        off = entry & layout.REFT_OFFSET_MASK
        if not entry:
            return 0
        if not off or off & (self.cs - 1) or entry & 0x1FF:
            raise CorruptImageError(
                f"refcount table entry {index} ({entry:#x}) is not cluster aligned",
                path=self.path,
                offset=self.table_offset + index * 8,
            )
        if off + self.cs > self.st.size():
            raise CorruptImageError(
                f"refcount block {index} at {off:#x} lies past the end of the file",
                path=self.path,
                offset=self.table_offset + index * 8,
            )
        if off >> self.cluster_bits in self.reserved():
            raise CorruptImageError(
                f"refcount block {index} at {off:#x} overlaps the header or a table",
                path=self.path,
                offset=self.table_offset + index * 8,
            )
        return off

    def block(self, index: int) -> array[int] | None:
        """The decoded refcount block ``index``, or None when not allocated."""
        blk = self._cache.get(index)
        if blk is not None:
            self._cache.move_to_end(index)
            return blk
        off = self.block_offset(index)
        if not off:
            return None
        raw = self.st.pread(off, self.cs)
        if len(raw) != self.cs:
            raise CorruptImageError(
                f"refcount block {index} is truncated", path=self.path, offset=off
            )
        blk = layout.decode_refblock(raw, self.bits)
        self._cache[index] = blk
        if len(self._cache) > self._cache_limit:
            self._evict()
        return blk

    def _evict(self) -> None:
        """Drop the least recently used block; a dirty one is written first (always safe)."""
        for t in self._cache:
            if t not in self.dirty:
                del self._cache[t]
                return
        t = next(iter(self._cache))
        self._write_dirty_block(t)
        del self._cache[t]

    def get(self, cluster: int) -> int:
        """Refcount of host cluster ``cluster`` (0 when no block covers it)."""
        t, i = divmod(cluster, self.per_block)
        blk = self.block(t)
        return 0 if blk is None else blk[i]

    def metadata_clusters(self) -> set[int]:
        """Cluster indices of the refcount table and every refcount block."""
        first = self.table_offset >> self.cluster_bits
        out = set(range(first, first + self.table_clusters))
        for t in range(len(self.table)):
            off = self.table[t] & layout.REFT_OFFSET_MASK
            if off:
                out.add(off >> self.cluster_bits)
        return out

    # ---- updates -----------------------------------------------------------------
    def _write_block_range(self, t: int, blk: array[int], lo: int, hi: int) -> None:
        """Write entries ``[lo, hi)`` of block ``t`` through to the file."""
        if self.bits < 8:
            per = 8 // self.bits
            lo -= lo % per
            hi += -hi % per
        off = self.block_offset(t)
        self.st.pwrite(off + lo * self.bits // 8, layout.encode_refblock(blk, self.bits, lo, hi))

    def _write_dirty_block(self, t: int) -> None:
        lo, hi = self.dirty[t]
        self._write_block_range(t, self._cache[t], lo, hi)
        del self.dirty[t]

    def write_dirty(self) -> int:
        """Write every block changed in memory (no flush); return how many were written.

        A block whose write fails stays dirty, so a later call writes it again.
        """
        n = 0
        for t in sorted(self.dirty):
            self._write_dirty_block(t)
            n += 1
        return n

    def update(self, changes: Iterable[tuple[int, int]], *, absolute: bool = False) -> None:
        """Add ``delta`` to (or with ``absolute`` set to it) each ``(cluster, delta)``.

        Blocks are created as needed. Every change is checked before anything
        is written, so an overflow or underflow changes nothing.

        Raises:
            CorruptImageError: a count would drop below zero.
            ImageError: a count would exceed the refcount width.
        """
        by_block: dict[int, dict[int, int]] = {}
        for cluster, delta in changes:
            t, i = divmod(cluster, self.per_block)
            slot = by_block.setdefault(t, {})
            slot[i] = delta if absolute else slot.get(i, 0) + delta
            if delta > 0 or absolute:
                self.raised = True
        needed = []
        for t, items in by_block.items():
            if self.block_offset(t) != 0:
                continue
            if any(v < 0 for v in items.values()):
                raise CorruptImageError(
                    f"refcount of cluster {t * self.per_block + min(items)} would drop below "
                    "zero (no refcount block covers it); run check(repair=True)",
                    path=self.path,
                    offset=(t * self.per_block + min(items)) << self.cluster_bits,
                )
            if any(items.values()):
                needed.append(t)
        if needed:
            self.ensure_blocks(needed)
        # validate everything first
        plans: list[tuple[int, array[int], dict[int, int]]] = []
        for t in sorted(by_block):
            items = by_block[t]
            blk = self.block(t)
            if blk is None:
                continue  # only zero/negative-free changes on a missing block
            for i, d in items.items():
                new = d if absolute else blk[i] + d
                if new < 0:
                    raise CorruptImageError(
                        f"refcount of cluster {t * self.per_block + i} would drop below zero; "
                        "run check(repair=True)",
                        path=self.path,
                        offset=(t * self.per_block + i) << self.cluster_bits,
                    )
                if new > self.max:
                    raise ImageError(
                        f"refcount of cluster {t * self.per_block + i} would overflow "
                        f"{self.bits}-bit refcounts (too many snapshots share it)",
                        path=self.path,
                    )
            plans.append((t, blk, items))
        for t, blk, items in plans:
            lo, hi = min(items), max(items) + 1
            for i, d in items.items():
                new = d if absolute else blk[i] + d
                blk[i] = new
                if new == 0:
                    self.free_hint = min(self.free_hint, t * self.per_block + i)
                    self.frees += 1
            self._store(t, blk, lo, hi)

    def _store(self, t: int, blk: array[int], lo: int, hi: int) -> None:
        """Entries ``[lo, hi)`` of block ``t`` changed: mark them dirty or write them through."""
        if self.defer or t in self.dirty:
            span = self.dirty.get(t)
            self.dirty[t] = (lo, hi) if span is None else (min(span[0], lo), max(span[1], hi))
            if t not in self._cache:  # pinned while dirty: the cache must hold it
                self._cache[t] = blk
            if not self.defer:
                self._write_dirty_block(t)
            return
        try:
            self._write_block_range(t, blk, lo, hi)
        except ImageError:
            self._cache.pop(t, None)  # the file has the old counts: re-read them
            raise

    def add_range(self, cluster: int, count: int, delta: int) -> None:
        """Add ``delta`` to ``count`` consecutive clusters from ``cluster``."""
        self.update((c, delta) for c in range(cluster, cluster + count))

    # ---- allocation ----------------------------------------------------------------
    def _find_free(self, n: int) -> int:
        per = self.per_block
        c = max(self.free_hint, 1)
        run_start = c
        run_len = 0
        while run_len < n:
            t, i = divmod(c, per)
            blk = self.block(t)
            if blk is None:
                if run_len == 0:
                    run_start = c
                take = min(n - run_len, per - i)
                run_len += take
                c += take
                continue
            if run_len == 0:
                try:
                    i = blk.index(0, i)
                except ValueError:
                    c = (t + 1) * per
                    continue
                c = t * per + i
                run_start = c
            take = min(n - run_len, per - i)
            window = blk[i : i + take]
            if window.count(0) == take:
                run_len += take
                c += take
            else:
                run_len = 0
                c = t * per + i + 1
        return run_start

    def allocate(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); return the file offset."""
        if n == 1:
            # Fast path: the hint is where the search starts, so when it names a free
            # cluster in a block already in memory, that cluster is the search's answer.
            c = self.free_hint or 1
            t, i = divmod(c, self.per_block)
            blk = self._cache.get(t)
            if blk is not None and not blk[i]:
                blk[i] = 1
                self.raised = True
                self._store(t, blk, i, i + 1)
                self.free_hint = c + 1
                return c << self.cluster_bits
        if n <= 0:
            raise ImageError(f"cannot allocate {n} clusters", path=self.path)
        for _ in range(64):
            start = self._find_free(n)
            ranges = range(start // self.per_block, (start + n - 1) // self.per_block + 1)
            missing = [t for t in ranges if self.block_offset(t) == 0]
            if missing:
                self.ensure_blocks(missing)
                continue
            if not self._take_run(start, n):
                self.add_range(start, n, 1)
            self.free_hint = start + n
            return start << self.cluster_bits
        raise CorruptImageError(  # pragma: no cover - each round creates the blocks it needs
            "cannot allocate clusters: the refcount structure does not take new blocks",
            path=self.path,
            offset=self.table_offset,
        )

    def _take_run(self, start: int, n: int) -> bool:
        """Fast path of :meth:`allocate`: free clusters inside one existing block get count 1.

        Returns False (changing nothing) when the run is not that simple; the
        caller then goes through :meth:`update`.
        """
        t, i0 = divmod(start, self.per_block)
        if i0 + n > self.per_block or self.block_offset(t) == 0:
            return False
        blk = self.block(t)
        if blk is None or blk[i0 : i0 + n].count(0) != n:
            return False
        blk[i0 : i0 + n] = array(blk.typecode, [1]) * n
        self.raised = True
        self._store(t, blk, i0, i0 + n)
        return True

    def try_allocate_at(self, cluster: int, n: int) -> bool:
        """Allocate exactly clusters ``[cluster, cluster+n)`` if all are free; else False."""
        ranges = range(cluster // self.per_block, (cluster + n - 1) // self.per_block + 1)
        if any(self.block_offset(t) == 0 for t in ranges):
            return False  # keep it simple: only inside existing refcount blocks
        if any(self.get(c) for c in range(cluster, cluster + n)):
            return False
        self.add_range(cluster, n, 1)
        return True

    def free(self, offset: int, n: int = 1) -> None:
        """Drop one reference from ``n`` clusters starting at file ``offset``."""
        self.add_range(offset >> self.cluster_bits, n, -1)

    # ---- refcount structure growth ----------------------------------------------------
    def ensure_blocks(self, wanted: Iterable[int]) -> None:
        """Create refcount blocks for the ranges ``wanted`` (and any they need).

        New blocks, and a new refcount table when the old one is too short,
        go to a fresh area at the end of the file. The header switches to a
        new table only after the table and its blocks are on disk.
        """
        wanted = sorted(set(wanted))
        per = self.per_block
        cs = self.cs
        s = -(-self.st.size() // cs)
        while True:
            old_n = len(self.table)
            nb = 0
            tc = 0
            missing: list[int] = []
            for _ in range(64):
                area_end = s + nb + tc
                cover = range(s // per, max(area_end - 1, s) // per + 1)
                missing = sorted({t for t in (*wanted, *cover) if self.block_offset(t) == 0})
                need_n = max(old_n, missing[-1] + 1 if missing else 0)
                new_tc = 0
                if need_n > old_n:
                    need_n = max(need_n, old_n + old_n // 2)
                    new_tc = -(-need_n * 8 // cs)
                    if new_tc * cs > layout.MAX_REFTABLE_BYTES:
                        raise ImageError(
                            "the refcount table would exceed QEMU's 8 MiB limit (cluster "
                            f"{missing[-1] * per} is too far into the file)",
                            path=self.path,
                        )
                if len(missing) == nb and new_tc == tc:
                    break
                nb, tc = len(missing), new_tc
            else:  # pragma: no cover - the loop converges in a few rounds
                raise ImageError("cannot lay out refcount blocks", path=self.path)
            area = range(s, s + nb + tc)
            busy = [c for c in area if self._get_existing(c)]
            if busy:
                s = busy[-1] + 1
                continue
            break
        if tc and tc * cs > layout.MAX_REFTABLE_BYTES:
            raise ImageError(
                "the refcount table would exceed QEMU's 8 MiB limit; the image is too large",
                path=self.path,
            )
        new_blocks: dict[int, array[int]] = {}
        for k, t in enumerate(missing):
            new_blocks[t] = layout.new_refblock(per, self.bits)
            del k
        block_at = {t: (s + k) << self.cluster_bits for k, t in enumerate(missing)}
        # refcounts of the area itself: in new blocks (in memory) or existing ones
        existing_changes: list[tuple[int, int]] = []
        for c in area:
            t, i = divmod(c, per)
            if t in new_blocks:
                new_blocks[t][i] = 1
            else:
                existing_changes.append((c, 1))
        if existing_changes:
            self.update(existing_changes)
        for t, blk in new_blocks.items():
            self.st.pwrite(block_at[t], layout.encode_refblock(blk, self.bits))
        self.raised = True
        if tc:
            new_table = array("Q", self.table)
            new_table.extend([0] * (tc * cs // 8 - len(new_table)))
            for t, off in block_at.items():
                new_table[t] = off
            table_off = (s + nb) << self.cluster_bits
            self.st.pwrite(table_off, layout.encode_u64_table(new_table))
            self.write_dirty()  # the area's own counts, in existing blocks, before the switch
            self.st.flush()
            old_off, old_clusters = self.table_offset, self.table_clusters
            self._set_table(table_off, tc)
            self.table = new_table
            self.table_offset, self.table_clusters = table_off, tc
            for t, blk in new_blocks.items():
                self._cache[t] = blk
            self.add_range(old_off >> self.cluster_bits, old_clusters, -1)
        else:
            if block_at:  # a table entry may point only at a block already on disk
                self.write_dirty()  # and only at an area whose own counts are there too
                self.st.flush()
            for t, off in block_at.items():
                self.st.pwrite(self.table_offset + t * 8, layout.encode_u64_table([off]))
                self.table[t] = off
                self._cache[t] = new_blocks[t]
        self.on_metadata_change()

    def _get_existing(self, cluster: int) -> int:
        t, _i = divmod(cluster, self.per_block)
        if self.block_offset(t) == 0:
            return 0
        return self.get(cluster)

    def drop_cache(self) -> None:
        """Forget decoded blocks (after the file changed underneath); dirty ones are kept."""
        for t in [t for t in self._cache if t not in self.dirty]:
            del self._cache[t]

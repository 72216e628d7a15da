"""``qemu-img check`` for qcow2: rebuild refcounts from the metadata and compare.

Every cluster the metadata references (header, L1 tables, L2 tables, data
and compressed clusters, refcount table and blocks, snapshot table, bitmap
directory and tables) is counted in memory; the counts are compared with the
stored refcounts. As in QEMU, a stored count above the references is a leak,
one below is a corruption; COPIED flags that disagree with the refcount are
corruptions too. Every problem is collected, none stops the scan.
``repair=True`` writes the rebuilt counts and flags back and checks again.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from virtkit.errors import CorruptImageError
from virtkit.images.base import CheckProblem, CheckResult
from virtkit.images.qcow2 import bitmap_format as bitmaps
from virtkit.images.qcow2 import layout, snapshots

if TYPE_CHECKING:  # the image module imports this one lazily
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["check"]


_Inc = Callable[[int, int, str], bool]

#: QEMU reads nothing past this file offset (``BDRV_MAX_LENGTH``): an I/O error there.
_MAX_READ = (1 << 63) - (1 << 30)


@attrs.define
class _Scan:
    expected: array[int]
    problems: list[CheckProblem] = attrs.field(factory=list)
    leaks: int = 0
    corruptions: int = 0
    allocated: int = 0
    mismatched: dict[int, int] = attrs.field(factory=dict)
    bad_reftable: list[int] = attrs.field(factory=list)
    copied_errors: int = 0
    #: Clusters whose stored refcount could not be read (QEMU's check errors).
    errors: int = 0
    #: Refcount blocks read as QEMU reads them despite a bad table entry:
    #: block index -> offset of the block (reserved bits masked), or 0 (past the
    #: file end: QEMU reads zeroes).
    views: dict[int, int] = attrs.field(factory=dict)
    #: Decoded stored blocks (None: unallocated; False: unreadable).
    blocks: dict[int, array[int] | bool | None] = attrs.field(factory=dict)

    def corrupt(self, message: str, offset: int | None) -> None:
        self.corruptions += 1
        self.problems.append(CheckProblem("corruption", message, offset))


def _scan(img: Qcow2Image) -> _Scan:
    cs, cb = img.cs, img.cb
    nclusters = -(-img.st.size() // cs)
    scan = _Scan(expected=array("L", bytes(nclusters * array("L").itemsize)))
    exp = scan.expected

    rmax = img.refs.max

    file_size = img.st.size()

    def inc(off: int, nbytes: int, what: str) -> bool:
        if nbytes <= 0:
            return True
        # as QEMU's qcow2_inc_refcounts_imrt: a region ending a cluster or more past
        # the end of the file is a corruption and not counted; one ending less far
        # past it is counted (its clusters then have no stored refcount)
        if off + nbytes - file_size >= cs:
            scan.corrupt(
                f"ERROR {what} at {off:#x} ({nbytes} bytes) lies past the end of the file "
                "by one cluster or more",
                off,
            )
            return False
        first, last = off >> cb, (off + nbytes - 1) >> cb
        if last >= len(exp):
            exp.extend(array("L", bytes((last + 1 - len(exp)) * exp.itemsize)))
        for c in range(first, last + 1):
            if exp[c] >= rmax:  # more references than a refcount can hold, as QEMU reports
                scan.corrupt(f"ERROR: overflow cluster offset={c << cb:#x}", c << cb)
                continue
            exp[c] += 1
        return True

    inc(0, cs, "header")
    hdr = img.hdr
    inc(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, "refcount table")
    refblocks: list[tuple[int, int]] = []
    for t in range(len(img.refs.table)):
        entry = img.refs.table[t]
        off = entry & layout.REFT_OFFSET_MASK
        where = hdr.refcount_table_offset + t * 8
        if not entry:
            continue
        # as QEMU's check_refblocks: each bad entry is one corruption, the block not counted
        if entry & 0x1FF:
            scan.corrupt(f"ERROR refcount table entry {t} has reserved bits set", where)
            scan.bad_reftable.append(t)
            if not off & (cs - 1) and off + cs <= _MAX_READ:  # QEMU reads it, bits masked
                scan.views[t] = off if off >> cb < nclusters else 0  # (past the end: zeroes)
            continue
        if not off:
            continue
        if off & (cs - 1):
            scan.corrupt(
                f"ERROR refcount block {t} is not cluster aligned; refcount table entry corrupted",
                where,
            )
            scan.bad_reftable.append(t)
            continue
        if off >> cb >= nclusters:
            scan.corrupt(f"ERROR refcount block {t} is outside image", where)
            scan.bad_reftable.append(t)
            if off + cs <= _MAX_READ:
                scan.views[t] = 0  # read past the end of the file: zeroes (else unreadable)
            continue
        inc(off, cs, f"refcount block {t}")
        refblocks.append((t, off >> cb))
    if hdr.nb_snapshots:
        inc(hdr.snapshots_offset, img.snap_table_bytes, "snapshot table")
    if img.v3:  # v3 entries must carry vm_state_size_large and disk_size (16 bytes of extra)
        for k, sn in enumerate(img.snaps):
            if sn.disk_size is None:
                scan.corrupt(f"ERROR snapshot table entry {k} is incomplete", hdr.snapshots_offset)
    _walk_l1(img, scan, inc, img.l1, hdr.l1_table_offset, active=True)
    for sn in img.snaps:
        if not sn.l1_size:
            continue
        if not inc(sn.l1_table_offset, sn.l1_size * 8, f"snapshot {sn.id} L1 table"):
            continue
        try:
            l1 = snapshots.load_l1(img, sn)
        except CorruptImageError as exc:
            scan.corrupt(f"ERROR {exc.message}", exc.offset)
            continue
        _walk_l1(img, scan, inc, l1, sn.l1_table_offset, active=False)
    if img.meta.bitmaps is not None and hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS:
        _walk_bitmaps(img, scan, inc)
    for t, c in refblocks:  # QEMU checks this once everything is counted
        if exp[c] != 1:
            scan.corrupt(f"ERROR refcount block {t} refcount={exp[c]}", c << cb)
    _compare(img, scan)
    return scan


def _walk_l1(
    img: Qcow2Image, scan: _Scan, inc: _Inc, l1: array[int], l1_off: int, *, active: bool
) -> None:
    """Count an L1 table and what it reaches, with the checks of QEMU's ``check_refcounts_l1``.

    Per entry: reserved bits (1..8, 56..62), an unaligned L2 table, the
    COPIED flag, then the L2 table's entries. Like QEMU, a table at an
    unaligned offset (or at offset 0, when only reserved bits are set) is
    counted and walked where the entry points.
    """
    cs, cb = img.cs, img.cb
    if active:
        inc(l1_off, len(l1) * 8, "L1 table")
    for i, e in enumerate(l1):
        if not e:
            continue
        where = l1_off + i * 8
        if e & layout.L1E_RESERVED:
            scan.corrupt(f"ERROR found L1 entry with reserved bits set: {e:x}", where)
        off = e & layout.L1E_OFFSET_MASK
        if off & (cs - 1):
            scan.corrupt(
                f"ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted",
                where,
            )
        # QEMU counts the table wherever the entry points, offset 0 (the header) too
        counted = inc(off, cs, f"L2 table (L1 index {i})")
        if active and off:  # QEMU's check_oflag_copied: also for a table past the file end
            rc = _stored(img, scan, off >> cb)
            if rc is not None and (rc == 1) != bool(e & layout.OFLAG_COPIED):
                scan.copied_errors += 1
                scan.corrupt(
                    f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}",
                    where,
                )
        if not counted:
            continue
        if not off or off & (cs - 1):
            # and walks what lies there (an unaligned table, or the header as one)
            raw = img.st.pread(off, cs)
            _walk_l2(img, scan, inc, layout.decode_u64_table(raw), off, active=active and off > 0)
            continue
        try:
            l2 = img.mapper.load_l2(off, where=where)
        except CorruptImageError as exc:
            scan.corrupt(f"ERROR {exc.message}", exc.offset)
            continue
        _walk_l2(img, scan, inc, l2, off, active=active)


def _walk_l2(
    img: Qcow2Image, scan: _Scan, inc: _Inc, l2: array[int], off: int, *, active: bool
) -> None:
    """Count one L2 table's clusters, with the checks of QEMU's ``check_refcounts_l2``.

    Standard descriptors: reserved bits (1..8, 56..61); with extended L2
    entries, a subcluster both allocated and zero, an unallocated cluster
    with allocation bits, a compressed one with any bitmap bit. Compressed
    descriptors: the COPIED flag. Data clusters: alignment and COPIED.
    """
    cs, cb = img.cs, img.cb
    step = img.mapper.step
    extended = step == 2
    for idx in range(0, len(l2), step):
        x = l2[idx]
        bitmap = l2[idx + 1] if extended else 0
        if not x and not bitmap:
            continue
        ewhere = off + idx * 8
        if x & layout.OFLAG_COMPRESSED:
            if x & layout.OFLAG_COPIED:
                scan.corrupt(
                    f"ERROR compressed cluster entry {x:x} has the COPIED flag set", ewhere
                )
                if active:
                    scan.copied_errors += 1
            if img.mapper.external:
                scan.corrupt(f"ERROR compressed cluster entry {x:x} with a data file", ewhere)
                continue
            if bitmap:
                scan.corrupt(
                    f"ERROR compressed cluster entry {x:x} with non-zero subcluster "
                    f"allocation bitmap, entry={bitmap:#x}",
                    ewhere + 8,
                )
                continue  # not counted, as in QEMU
            host, nbytes = img.mapper.compressed_range(x)
            if inc(host & ~511, (host & 511) + nbytes, "compressed cluster") and active:
                scan.allocated += 1
            continue
        if x & layout.L2E_STD_RESERVED:
            scan.corrupt(f"ERROR found l2 entry with reserved bits set: {x:x}", ewhere)
        host = x & layout.L2E_OFFSET_MASK
        if not host and not (img.mapper.external and x & layout.OFLAG_COPIED):
            if extended and bitmap & layout.BITMAP_ALLOC_ALL:
                scan.corrupt(
                    "ERROR: Unallocated cluster has non-zero subcluster allocation map "
                    f"({bitmap:#x})",
                    ewhere + 8,
                )
            continue
        if extended and (bitmap >> 32) & bitmap:
            scan.corrupt(
                f"ERROR offset={host:x}: Allocated cluster has corrupted subcluster "
                "allocation bitmap",
                ewhere + 8,
            )
        if img.mapper.external:
            if active and x & layout.OFLAG_COPIED:
                scan.allocated += 1
            continue  # clusters in an external data file are not refcounted
        if host & (cs - 1):  # reported, then counted and checked all the same, as QEMU
            scan.corrupt(
                f"ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted",
                ewhere,
            )
        counted = inc(host, cs, "data cluster")
        if active:
            scan.allocated += counted
            rc = _stored(img, scan, host >> cb)  # past the file: 0, and QEMU's COPIED check says so
            if rc is not None and (rc == 1) != bool(x & layout.OFLAG_COPIED):
                scan.copied_errors += 1
                scan.corrupt(
                    f"ERROR OFLAG_COPIED data cluster: l2_entry={x:x} refcount={rc}", ewhere
                )


def _block(img: Qcow2Image, scan: _Scan, t: int) -> array[int] | bool | None:
    """Stored refcount block ``t`` as QEMU reads it: None if unallocated, False if unreadable."""
    if t in scan.blocks:
        return scan.blocks[t]
    refs = img.refs
    blk: array[int] | bool | None
    if t >= len(refs.table):
        blk = None
    elif t in scan.views:
        off = scan.views[t]
        raw = img.st.pread(off, img.cs) if off else b""
        raw += bytes(img.cs - len(raw))
        blk = layout.decode_refblock(raw, refs.bits)
    elif t in scan.bad_reftable:
        blk = False
    else:
        try:
            blk = refs.block(t)
        except CorruptImageError:
            # the allocator refuses a block on top of other metadata; QEMU reads it
            off = refs.table[t] & layout.REFT_OFFSET_MASK
            raw = img.st.pread(off, img.cs)
            raw += bytes(img.cs - len(raw))
            blk = layout.decode_refblock(raw, refs.bits)
    scan.blocks[t] = blk
    return blk


def _stored(img: Qcow2Image, scan: _Scan, cluster: int) -> int | None:
    """The stored refcount, or None when its block is unreadable (reported elsewhere)."""
    t, i = divmod(cluster, img.refs.per_block)
    blk = _block(img, scan, t)
    if blk is False:
        return None
    if blk is None or blk is True:
        return 0
    return blk[i]


def _walk_bitmaps(img: Qcow2Image, scan: _Scan, inc: _Inc) -> None:
    """Count the bitmap directory, tables and data as QEMU's ``qcow2_check_bitmaps_refcounts``.

    A directory that breaks QEMU's constraints is one corruption (nothing
    under it is counted); a table with an invalid entry is one corruption and
    ends the walk, as in QEMU (later bitmaps' clusters then show as leaks).
    """
    if img.meta.bitmaps is None:
        return
    _nb, dsize, doff = img.meta.bitmaps
    inc(doff, dsize, "bitmap directory")
    try:
        entries = bitmaps.read_directory(img.st, img.meta)
    except CorruptImageError as exc:
        scan.corrupt(f"ERROR {exc.message}", exc.offset)
        return
    for entry in entries:
        if not inc(entry.table_offset, entry.table_size * 8, f"bitmap {entry.name!r} table"):
            return
        try:
            table = bitmaps.read_table(img.st, entry, img.cs)
        except CorruptImageError as exc:
            scan.corrupt(f"ERROR {exc.message}", exc.offset)
            return
        for e in table:
            off = e & bitmaps.ENTRY_OFFSET_MASK
            if off:
                inc(off, img.cs, f"bitmap {entry.name!r} data")


def _compare(img: Qcow2Image, scan: _Scan) -> None:
    refs = img.refs
    exp = scan.expected
    per = refs.per_block
    n = len(exp)
    nblocks = max(len(refs.table), -(-n // per))
    for t in range(nblocks):
        lo = t * per
        hi = min(n, lo + per)
        got = _block(img, scan, t)
        if got is False:
            # unreadable block (an unaligned table entry): QEMU cannot read these
            # counts either, a check error per cluster ("Can't get refcount")
            for c in range(lo, hi):
                if exp[c]:
                    scan.mismatched[c] = exp[c]  # what a repair writes
            if hi > lo:
                scan.errors += hi - lo
                scan.problems.append(
                    CheckProblem(
                        "error",
                        f"Can't get refcount for clusters {lo}..{hi - 1}: their refcount "
                        "block is unreadable",
                        lo * img.cs,
                    )
                )
            continue
        blk = got if isinstance(got, array) else None
        if blk is None:
            for c in range(lo, hi):
                if exp[c]:
                    _mismatch(scan, c, 0, exp[c], img.cs)
            continue
        if hi > lo:
            stored = blk[: hi - lo]
            try:
                same = stored == array(stored.typecode, exp[lo:hi])
            except OverflowError:
                same = False
            if not same:
                for c in range(lo, hi):
                    if blk[c - lo] != exp[c]:
                        _mismatch(scan, c, blk[c - lo], exp[c], img.cs)
        tail = blk[max(0, hi - lo) :]
        if hi - lo < per and tail.count(0) != len(tail):
            for i in range(max(0, hi - lo), per):
                if blk[i]:
                    _mismatch(scan, lo + i, blk[i], 0, img.cs)


def _mismatch(scan: _Scan, cluster: int, stored: int, refs: int, cs: int) -> None:
    scan.mismatched[cluster] = refs
    if stored < refs:
        scan.corrupt(f"ERROR cluster {cluster} refcount={stored} reference={refs}", cluster * cs)
    else:
        scan.leaks += 1
        scan.problems.append(
            CheckProblem(
                "leak",
                f"Leaked cluster {cluster} refcount={stored} reference={refs}",
                cluster * cs,
            )
        )


def _result(img: Qcow2Image, scan: _Scan, first: _Scan | None = None) -> CheckResult:
    exp = scan.expected
    highest = len(exp) - 1
    while highest >= 0 and not exp[highest]:
        highest -= 1
    base = first or scan
    return CheckResult(
        leaks=base.leaks,
        corruptions=base.corruptions,
        errors=scan.errors,
        leaks_fixed=max(0, base.leaks - scan.leaks) if first else 0,
        corruptions_fixed=max(0, base.corruptions - scan.corruptions) if first else 0,
        problems=tuple(base.problems),
        image_end_offset=(highest + 1) * img.cs,
        allocated_clusters=scan.allocated,
        total_clusters=-(-img.hdr.size // img.cs),
    )


def check(img: Qcow2Image, *, repair: bool) -> CheckResult:
    """Check ``img``; with ``repair`` fix leaks, refcount errors and COPIED flags."""
    first = _scan(img)
    if not repair or (not first.leaks and not first.corruptions):
        if repair:
            _clear_flags(img)
        return _result(img, first)
    scan = first
    for _ in range(4):
        for t in scan.bad_reftable:
            img.refs.table[t] = 0
            img.st.pwrite(img.hdr.refcount_table_offset + t * 8, bytes(8))
        img.refs.drop_cache()
        if scan.mismatched:
            img.refs.update(sorted(scan.mismatched.items()), absolute=True)
        img.mapper.drop_cache()
        snapshots.fix_copied(img)
        img.st.flush()
        scan = _scan(img)
        if not scan.leaks and not scan.corruptions:
            break
    if not scan.leaks and not scan.corruptions:
        _clear_flags(img)
    return _result(img, scan, first)


def _clear_flags(img: Qcow2Image) -> None:
    if img.v3 and img.hdr.incompatible_features & (layout.INCOMPAT_CORRUPT | layout.INCOMPAT_DIRTY):
        img.hdr.incompatible_features &= ~(layout.INCOMPAT_CORRUPT | layout.INCOMPAT_DIRTY)
        img.st.pwrite(layout.OFF_INCOMPAT, img.hdr.incompatible_features.to_bytes(8, "big"))
        img.st.flush()
    img._corrupt = False

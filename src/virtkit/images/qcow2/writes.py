"""The request write paths of qcow2 images: write, write_zeroes/discard, compressed writes.

Each guest write request (one ``write``, ``write_zeroes``, ``discard`` or
compressed write call on :class:`~.image.Qcow2Image`) allocates the clusters
it needs, writes its data, and changes working copies of the L2 tables it
touches in a :class:`~.requests.Request`; :func:`commit` then publishes the
request into the write-back cache or writes it through (see
:mod:`.requests` and :mod:`.cache` for the ordering). Data always reaches the
file before any entry that points at it.
"""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING

from virtkit.errors import ImageError
from virtkit.images.qcow2 import bitmaps as bitmapsmod
from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.compress import compress
from virtkit.images.qcow2.mapping import UNALLOCATED, ZERO
from virtkit.images.qcow2.reads import current
from virtkit.images.qcow2.requests import Request, coalesce, commit_through

if TYPE_CHECKING:  # the image module imports this one
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = [
    "alloc_bytes",
    "check_compressed_range",
    "commit",
    "grow_l1",
    "new_request",
    "req_l2",
    "write_compressed",
    "write_full",
    "write_guest",
    "write_fresh",
    "write_partial",
    "write_small",
    "zero_clusters",
    "zero_partial",
    "zero_range",
]

#: Largest buffer a single internal zero-fill or copy step uses.
CHUNK = 4 * 1024 * 1024


def grow_l1(img: Qcow2Image, needed: int) -> None:
    """Make the active L1 table hold at least ``needed`` entries."""
    old_n = len(img._l1)
    if needed <= old_n:
        return
    cap = layout.MAX_L1_BYTES // 8
    if needed > cap:
        raise ImageError(
            f"the L1 table would need {needed} entries, over QEMU's limit of {cap}; use a "
            "larger cluster size",
            path=img.path,
        )
    if img._wb.dirty:  # the new table copies the L1 the file has: make it complete
        img._wb.writeback(sync=False)
    new_n = min(cap, max(needed, old_n + old_n // 2))
    clusters = -(-new_n * 8 // img.cs)
    new_off = img.refs.allocate(clusters)
    table = array("Q", img._l1)
    table.extend([0] * (new_n - old_n))
    img.st.pwrite(new_off, layout.encode_u64_table(table) + bytes(clusters * img.cs - new_n * 8))
    img.refs.write_dirty()  # its refcounts before the header names it
    img.st.flush()
    old_off = img.hdr.l1_table_offset
    img.st.pwrite(layout.OFF_L1, struct.pack(">IQ", new_n, new_off))
    img.st.flush()
    img.hdr.l1_size, img.hdr.l1_table_offset = new_n, new_off
    img._l1 = table
    img._mapper.l1 = table
    img._mapper.l1_offset = new_off
    if old_n:
        img.refs.free(old_off, -(-old_n * 8 // img.cs))
    img._meta_changed()


def req_l2(img: Qcow2Image, req: Request, l1i: int) -> tuple[int, array[int]]:
    """``req``'s working copy of the L2 table for L1 index ``l1i`` (ours alone).

    An L2 table shared with a snapshot (or missing) gets a new cluster here;
    the L1 entry pointing at it is written by :func:`commit`, after the barrier.
    """
    got = req.tables.get(l1i)
    if got is not None:
        return got
    if l1i >= len(img._l1):
        grow_l1(img, l1i + 1)
    where = img.hdr.l1_table_offset + l1i * 8
    entry = img._l1[l1i]
    off = entry & layout.L1E_OFFSET_MASK
    if off and entry & layout.OFLAG_COPIED:
        if off >> img.cb in img.table_clusters() or off >> img.cb in img._refblocks():
            img._mark_corrupt(
                f"L2 table at {off:#x} (L1 index {l1i}) overlaps other image metadata", where
            )
        table = img._mapper.load_l2(off, where=where)
        if not img._defer:  # write-through: memory changes only after the writes
            table = array("Q", table)
        req.tables[l1i] = (off, table)
        return off, table
    src = img._mapper.load_l2(off, where=where) if off else bytes(img.cs)
    table = array("Q", src)
    new = img.refs.allocate(1)
    img._check_overlap(new, 1)
    req.tables[l1i] = (new, table)
    req.new[l1i] = off
    return new, table


def new_request(img: Qcow2Image) -> Request:
    """Begin a request; it stays open (published on failure) until :func:`commit`."""
    req = Request()
    img._open.append(req)
    return req


def commit(img: Qcow2Image, req: Request) -> None:
    """Publish ``req``: into the write-back cache, or written through now."""
    if img._open and img._open[-1] is req:
        img._open.pop()
    if img._defer:
        img._wb.publish(req)
    else:
        commit_through(img, req)


def write_guest(img: Qcow2Image, offset: int, mv: memoryview) -> None:
    """Write without the range check (internal; VM state lives past the disk end).

    One request: every cluster is allocated and its data written first,
    then :func:`commit` publishes all the L2/L1 updates behind one barrier.
    """
    img._prepare_write()
    cs = img.cs
    pos = 0
    n = len(mv)
    req = new_request(img)
    while pos < n:
        g = offset + pos
        if not g & (cs - 1) and n - pos >= cs:
            ci = g >> img.cb
            k = min((n - pos) // cs, img.l2_entries - (ci & (img.l2_entries - 1)))
            write_full(img, req, ci, k, mv[pos : pos + k * cs])
            pos += k * cs
        else:
            m = min(cs - (g & (cs - 1)), n - pos)
            write_partial(img, req, g, mv[pos : pos + m])
            pos += m
    commit(img, req)


def write_small(img: Qcow2Image, offset: int, mv: memoryview) -> bool:
    """The fast path of a write-back request inside one cluster; False: take the general one.

    Handles the two common cases without a :class:`~.requests.Request`: a
    cluster the active disk owns is overwritten in place, or an unallocated
    (or zero-flagged, v3) cluster without a backing file gets a new cluster,
    its data, and then its entry in the cached L2 table (which the
    write-back cache pins and writes later, as :meth:`.MetadataCache.publish`
    would). Only for an existing L2 table the active disk owns, on images
    without extended L2 entries. Anything else, including every entry that
    looks damaged, returns False having changed nothing, and the general
    path (:func:`write_guest`) handles it and reports what is wrong.
    """
    cs = img.cs
    in_off = offset & (cs - 1)
    if in_off + len(mv) > cs or img.cache_mode != "writeback" or img.extended:
        return False
    cb = img.cb
    ci = offset >> cb
    l1i = ci >> img.l2_bits
    l1 = img._l1
    if l1i >= len(l1):
        return False
    entry = l1[l1i]
    off = entry & layout.L1E_OFFSET_MASK
    if not off or not entry & layout.OFLAG_COPIED:
        return False
    if img._corrupt or not img._autoclear_done or img._bitmap_tracker is not None:
        img._prepare_write()
    mapper = img._mapper
    table = mapper.pinned.get(off)
    if table is None:  # checked as req_l2 does, once per write-back
        if off >> cb in img.table_clusters() or off >> cb in img._refblocks():
            return False
        table = mapper.load_l2(off, where=img.hdr.l1_table_offset + l1i * 8)
        pinned = False
    else:
        pinned = True
    idx = ci & (img.l2_entries - 1)
    e = table[idx]
    st = img.st
    if e & layout.OFLAG_COPIED and not e & (layout.OFLAG_COMPRESSED | layout.OFLAG_ZERO):
        host = e & layout.L2E_OFFSET_MASK
        if host < cs or host & (cs - 1) or host >> cb in img.metadata_clusters():
            return False
        if host >= st.size():
            return False
        try:
            st.pwrite(host + in_off, mv)
        except ImageError as exc:
            img._write_failed(exc, defer=True)
            raise
        return True
    if not ((e == 0 and img.backing is None) or (e == layout.OFLAG_ZERO and img.v3)):
        return False
    refs = img.refs
    img._defer = refs.defer = True
    try:
        new = refs.allocate(1)
        img._check_overlap(new, 1)
        write_fresh(img, new, in_off, mv)
    except ImageError as exc:
        img._write_failed(exc, defer=True)
        raise
    finally:
        img._defer = refs.defer = False
    table[idx] = new | layout.OFLAG_COPIED
    img._wb.note(off, table, idx)
    if not pinned and img._wb.over_limit():
        img._wb.writeback(sync=False)  # bounded memory
    return True


def write_fresh(img: Qcow2Image, host: int, in_off: int, mv: memoryview) -> None:
    """Fill a newly allocated cluster whose other bytes must read as zeroes.

    A cluster past the end of the file needs only the new bytes, in one
    write: the file then has a hole before them or ends inside the cluster,
    and both read as zeroes (QEMU leaves its last cluster short too, and
    reads past the end of the file as zeroes). A reused cluster is written
    whole.
    """
    cs = img.cs
    if host >= img.st.size():
        img.st.pwrite(host + in_off, mv)
        return
    buf = bytearray(cs)
    buf[in_off : in_off + len(mv)] = mv
    img.st.pwrite(host, buf)


def write_full(img: Qcow2Image, req: Request, ci: int, k: int, mv: memoryview) -> None:
    """Write ``k`` whole clusters from cluster index ``ci`` (all in one L2 table)."""
    cs = img.cs
    step = img._mapper.step
    l1i = ci >> img.l2_bits
    l2off, l2 = req_l2(img, req, l1i)
    base = ci & (img.l2_entries - 1)
    inplace: list[tuple[int, int]] = []
    need: list[int] = []
    for j in range(k):
        idx = base + j
        e = l2[idx * step]
        if e & layout.OFLAG_COPIED and not e & layout.OFLAG_COMPRESSED:
            host = img._mapper.data_host(e, l2off + idx * 8 * step)
            if host:
                inplace.append((j, host))
                continue
        need.append(j)
    for j0, j1, host in coalesce(inplace, cs):
        img._check_overlap(host, j1 - j0)
        img._check_in_file(host)
        img.st.pwrite(host, mv[j0 * cs : j1 * cs])
    changed = False
    if need:
        new_base = img.refs.allocate(len(need))
        img._check_overlap(new_base, len(need))
        planned = [(j, new_base + t * cs) for t, j in enumerate(need)]
        for j0, j1, host in coalesce(planned, cs):
            img.st.pwrite(host, mv[j0 * cs : j1 * cs])
        for j, host in planned:
            idx = base + j
            req.olds.append(l2[idx * step])
            l2[idx * step] = host | layout.OFLAG_COPIED
            if step == 2:
                l2[idx * 2 + 1] = layout.BITMAP_ALLOC_ALL
        changed = True
    for j, host in inplace:
        idx = base + j
        if step == 2:
            if l2[idx * 2 + 1] != layout.BITMAP_ALLOC_ALL:
                l2[idx * 2 + 1] = layout.BITMAP_ALLOC_ALL
                changed = img._deps = True
        elif l2[idx] != host | layout.OFLAG_COPIED:
            l2[idx] = host | layout.OFLAG_COPIED
            changed = img._deps = True
    if changed:
        req.mark(l1i, base, base + k)


def write_partial(img: Qcow2Image, req: Request, g: int, mv: memoryview) -> None:
    """Write ``mv`` at guest ``g``, inside one cluster (copy-on-write as needed)."""
    cs = img.cs
    ci = g >> img.cb
    in_off = g & (cs - 1)
    n = len(mv)
    l1i = ci >> img.l2_bits
    l2off, l2 = req_l2(img, req, l1i)
    idx = ci & (img.l2_entries - 1)
    step = img._mapper.step
    e = l2[idx * step]
    compressed = bool(e & layout.OFLAG_COMPRESSED)
    host = 0 if compressed else img._mapper.data_host(e, l2off + idx * 8 * step)
    copied = bool(e & layout.OFLAG_COPIED) and host and not compressed
    cluster_start = ci << img.cb
    if step == 1:
        if copied:
            img._check_overlap(host, 1)
            img._check_in_file(host)
            if not (img.v3 and e & layout.OFLAG_ZERO):
                img.st.pwrite(host + in_off, mv)
                return
            buf = bytearray(cs)
            buf[in_off : in_off + n] = mv
            img.st.pwrite(host, buf)
            img._deps = True  # the zeroes must be there before the zero flag goes
            l2[idx] = host | layout.OFLAG_COPIED
            req.mark(l1i, idx, idx + 1)
            return
        new = img.refs.allocate(1)
        img._check_overlap(new, 1)
        if (e == 0 and img.backing is None) or (e == layout.OFLAG_ZERO and img.v3):
            write_fresh(img, new, in_off, mv)  # the rest of the cluster reads as zeroes
        else:
            buf = current(img, cluster_start, cs)
            buf[in_off : in_off + n] = mv
            img.st.pwrite(new, buf)
        l2[idx] = new | layout.OFLAG_COPIED
        req.mark(l1i, idx, idx + 1)
        req.olds.append(e)
        return
    sc = img._mapper.sc_size
    a = in_off - in_off % sc
    b = min(cs, -(-(in_off + n) // sc) * sc)
    k0, k1 = a // sc, b // sc
    units = ((1 << (k1 - k0)) - 1) << k0
    bitmap = l2[idx * 2 + 1]
    if copied:
        img._check_overlap(host, 1)
        img._check_in_file(host)
        if bitmap & units == units:
            img.st.pwrite(host + in_off, mv)
            return
        buf = current(img, cluster_start + a, b - a)
        buf[in_off - a : in_off - a + n] = mv
        img.st.pwrite(host + a, buf)
        img._deps = True  # the subclusters' data before their allocation bits
        l2[idx * 2 + 1] = (bitmap | units) & ~(units << 32)
        req.mark(l1i, idx, idx + 1)
        return
    if host or compressed:
        buf = current(img, cluster_start, cs)
        buf[in_off : in_off + n] = mv
        new = img.refs.allocate(1)
        img._check_overlap(new, 1)
        img.st.pwrite(new, buf)
        l2[idx * 2] = new | layout.OFLAG_COPIED
        l2[idx * 2 + 1] = layout.BITMAP_ALLOC_ALL
        req.mark(l1i, idx, idx + 1)
        req.olds.append(e)
        return
    buf = current(img, cluster_start + a, b - a)
    buf[in_off - a : in_off - a + n] = mv
    new = img.refs.allocate(1)
    img._check_overlap(new, 1)
    img.st.pwrite(new + a, buf)
    l2[idx * 2] = new | layout.OFLAG_COPIED
    l2[idx * 2 + 1] = (bitmap & ~(units << 32) & ~0xFFFFFFFF) | units
    req.mark(l1i, idx, idx + 1)


def check_compressed_range(img: Qcow2Image, offset: int, length: int) -> None:
    """Refuse a compressed write that is not one whole aligned cluster."""
    img._check_range(offset, length, "write")
    cs = img.cs
    if offset & (cs - 1) or not (length == cs or (offset + length == img.hdr.size and length < cs)):
        raise ImageError(
            f"compressed writes take one whole aligned cluster ({cs} bytes) "
            f"(got {length} bytes at {offset})",
            path=img.path,
        )


def write_compressed(img: Qcow2Image, offset: int, data: bytes, comp: bytes | None = None) -> None:
    """Store one cluster compressed (uncompressed when it does not shrink)."""
    bitmapsmod.mark(img, offset, len(data))  # persistent dirty bitmaps
    img._prepare_write()
    cs = img.cs
    if comp is None:
        comp = compress(img.hdr.compression_type, data + bytes(cs - len(data)))
    if len(comp) >= cs and len(data) < cs:
        write_guest(img, offset, memoryview(data))
        return
    ci = offset >> img.cb
    l1i = ci >> img.l2_bits
    req = new_request(img)
    if len(comp) >= cs:  # does not shrink: stored uncompressed, as QEMU does
        write_full(img, req, ci, 1, memoryview(data))
        commit(img, req)
        return
    _l2off, l2 = req_l2(img, req, l1i)
    idx = ci & (img.l2_entries - 1)
    step = img._mapper.step
    host = alloc_bytes(img, len(comp))
    img._cluster_cache = None  # the same entry value may now mean new data
    img.st.pwrite(host, comp)
    nsec = ((host + len(comp) - 1) >> 9) - (host >> 9)
    req.olds.append(l2[idx * step])
    l2[idx * step] = layout.OFLAG_COMPRESSED | (nsec << img._mapper.csize_shift) | host
    if step == 2:
        l2[idx * 2 + 1] = 0
    req.mark(l1i, idx, idx + 1)
    commit(img, req)


def alloc_bytes(img: Qcow2Image, n: int) -> int:
    """Host bytes for a compressed cluster, packed after the previous one when possible."""
    cs, cb = img.cs, img.cb
    # a cluster freed since the last compressed write may belong to someone else now
    cur = img._cfree if img._cfree_epoch == img.refs.frees else 0
    if cur:
        first = cur >> cb
        partial = bool(cur & (cs - 1))
        new_from = first + 1 if partial else first
        new_to = (((cur + n - 1) | 511) + 1 - 1) >> cb  # last cluster the sectors touch
        ok = not partial or 0 < img.refs.get(first) < img.refs.max
        if ok and new_to >= new_from:  # continue into the next clusters if free
            ok = img.refs.try_allocate_at(new_from, new_to - new_from + 1)
            if ok:
                img._check_overlap(new_from << cb, new_to - new_from + 1)
        if ok:
            if partial:
                img.refs.update([(first, 1)])
            img._cfree = cur + n
            img._cfree_epoch = img.refs.frees
            return cur
    k = -(-n // cs)
    host = img.refs.allocate(k)
    img._check_overlap(host, k)
    img._cfree = host + n
    img._cfree_epoch = img.refs.frees
    return host


def zero_range(
    img: Qcow2Image, offset: int, length: int, *, discard: bool, full: bool = False
) -> None:
    """Make ``[offset, offset+length)`` read as zeroes (or discard it), as one request."""
    img._prepare_write()
    cs = img.cs
    end = offset + length
    first = -(-offset // cs) * cs
    last = end - end % cs if end < img.hdr.size else -(-end // cs) * cs
    if first >= last:
        first = last = end
    pieces = [(offset, min(first, end)), (max(last, first), end)]
    if not discard:
        for a, b in pieces:
            if a < b:
                zero_partial(img, a, b - a)
    pos = first
    req = new_request(img)  # one request: a constant number of barriers for any length
    while pos < last:
        ci = pos >> img.cb
        k = min((last - pos) >> img.cb, img.l2_entries - (ci & (img.l2_entries - 1)))
        if k == 0:  # last partial cluster at the end of the disk
            k = 1
        zero_clusters(img, req, ci, k, discard=discard, full=full)
        pos += k * cs
    commit(img, req)


def zero_partial(img: Qcow2Image, offset: int, length: int) -> None:
    """Write explicit zeroes over a range within partial clusters where it is not zero."""
    for run in list(img._mapper.runs(offset, length)):  # the writes below change the map
        if run.kind == ZERO or (run.kind == UNALLOCATED and img.backing is None):
            continue
        write_guest(img, run.guest, memoryview(bytes(run.length)))


def zero_clusters(
    img: Qcow2Image, req: Request, ci: int, k: int, *, discard: bool, full: bool
) -> None:
    """Zero or discard ``k`` whole clusters from cluster index ``ci`` (one L2 table)."""
    step = img._mapper.step
    l1i = ci >> img.l2_bits
    backing = img.backing is not None and not full
    if not img.v3 and backing and not discard:
        for c in range(ci, ci + k, CHUNK // img.cs or 1):
            n = min(CHUNK // img.cs or 1, ci + k - c)
            write_guest(img, c << img.cb, memoryview(bytes(n * img.cs)))
        return
    _l2_off, l2 = img._mapper.l2_for(l1i)
    if l2 is None and not backing:
        return
    if l2 is not None and not backing:
        base = ci & (img.l2_entries - 1)
        if not any(l2[(base + j) * step] for j in range(k)) and (
            step == 1 or not any(l2[(base + j) * 2 + 1] for j in range(k))
        ):
            return
    _l2off, l2 = req_l2(img, req, l1i)
    base = ci & (img.l2_entries - 1)
    if backing and img.v3:
        target = (0, layout.BITMAP_ZERO_ALL) if step == 2 else (layout.OFLAG_ZERO, 0)
    else:
        target = (0, 0)
    changed = False
    for j in range(k):
        idx = base + j
        e = l2[idx * step]
        if step == 2:
            if (e, l2[idx * 2 + 1]) == target:
                continue
            l2[idx * 2 + 1] = target[1]
        elif e == target[0]:
            continue
        req.olds.append(e)
        l2[idx * step] = target[0]
        changed = True
    if changed:
        req.mark(l1i, base, base + k)

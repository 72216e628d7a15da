"""Internal qcow2 snapshots: create, revert, delete, read.

A snapshot is a copy of the active L1 table plus one more reference on every
L2 table and data cluster it reaches. Writes then copy-on-write whatever is
shared. The COPIED flag (bit 63 of L1/L2 entries) says "refcount is exactly
one, write in place"; after every refcount change here the active tree's
flags are recomputed, as QEMU's ``qcow2_update_snapshot_refcount`` does.

The VM state blob of a snapshot is stored like guest data, at the first L1
entry past the virtual disk, and dropped from the active layer afterwards.
"""

from __future__ import annotations

import datetime as _dt
import time
from array import array
from typing import TYPE_CHECKING

from virtkit.errors import CorruptImageError, ImageError, UnsupportedFeatureError
from virtkit.images.base import SnapshotInfo
from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.layout import SnapshotEntry
from virtkit.images.qcow2.mapping import Mapper

if TYPE_CHECKING:  # the image module imports this one lazily
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = [
    "create",
    "delete",
    "fix_copied",
    "read",
    "read_vm_state",
    "revert",
    "snapinfo",
    "tree_refs",
]


def find(img: Qcow2Image, name: str) -> int:
    """Index of the snapshot whose id, else name, is ``name``."""
    for i, s in enumerate(img.snaps):
        if s.id == name:
            return i
    for i, s in enumerate(img.snaps):
        if s.name == name:
            return i
    raise ImageError(f"no snapshot named or numbered {name!r}", path=img.path)


def load_l1(img: Qcow2Image, sn: SnapshotEntry) -> array[int]:
    """The snapshot's L1 table (validated to lie inside the file when the table was read)."""
    raw = img.st.pread(sn.l1_table_offset, sn.l1_size * 8) if sn.l1_size else b""
    if len(raw) != sn.l1_size * 8:
        raise CorruptImageError(
            f"snapshot {sn.id!r} L1 table is truncated", path=img.path, offset=sn.l1_table_offset
        )
    return layout.decode_u64_table(raw)


def tree_refs(img: Qcow2Image, l1: array[int], l1_offset: int, delta: int) -> list[tuple[int, int]]:
    """``(cluster, delta)`` for every L2 table and data cluster reachable from ``l1``."""
    cb = img.cb
    step = img.mapper.step
    out: list[tuple[int, int]] = []
    for i, e in enumerate(l1):
        off = e & layout.L1E_OFFSET_MASK
        if not off:
            continue
        l2 = img.mapper.load_l2(off, where=l1_offset + i * 8)
        out.append((off >> cb, delta))
        for idx in range(0, len(l2), step):
            x = l2[idx]
            if not x:
                continue
            if x & layout.OFLAG_COMPRESSED:
                host, nbytes = img.mapper.compressed_range(x)
                first = (host & ~511) >> cb
                last = (host + nbytes - 1) >> cb
                out.extend((c, delta) for c in range(first, last + 1))
            else:
                host = img.mapper.data_host(x, off + idx * 8)
                if host:
                    out.append((host >> cb, delta))
    return out


def fix_copied(img: Qcow2Image) -> int:
    """Recompute COPIED flags in the active L1 and its L2 tables; return how many changed."""
    cb = img.cb
    step = img.mapper.step
    changed_total = 0
    for i in range(len(img.l1)):
        e = img.l1[i]
        off = e & layout.L1E_OFFSET_MASK
        if not off:
            continue
        want = off | (layout.OFLAG_COPIED if img.refs.get(off >> cb) == 1 else 0)
        if want != e:
            img._set_l1_entry(i, want)
            changed_total += 1
        l2 = img.mapper.load_l2(off, where=img.hdr.l1_table_offset + i * 8)
        changed = False
        for idx in range(0, len(l2), step):
            x = l2[idx]
            if not x:
                continue
            if x & layout.OFLAG_COMPRESSED:
                nx = x & ~layout.OFLAG_COPIED
            else:
                host = x & layout.L2E_OFFSET_MASK
                if not host:
                    continue
                if img.refs.get(host >> cb) == 1:
                    nx = x | layout.OFLAG_COPIED
                else:
                    nx = x & ~layout.OFLAG_COPIED
            if nx != x:
                l2[idx] = nx
                changed = True
                changed_total += 1
        if changed:
            img.st.pwrite(off, layout.encode_u64_table(l2))
    return changed_total


def write_table(img: Qcow2Image, entries: list[SnapshotEntry]) -> None:
    """Write a new snapshot table, switch the header to it, free the old one."""
    blob = b"".join(e.encode(version=img.hdr.version) for e in entries)
    old_off, old_bytes, old_n = img.hdr.snapshots_offset, img.snap_table_bytes, img.hdr.nb_snapshots
    new_off = 0
    if entries:
        clusters = -(-len(blob) // img.cs)
        new_off = img.refs.allocate(clusters)
        img.st.pwrite(new_off, blob)
        img.st.flush()
    img.st.pwrite(
        layout.OFF_SNAPSHOTS, len(entries).to_bytes(4, "big") + new_off.to_bytes(8, "big")
    )
    img.st.flush()
    img.hdr.nb_snapshots, img.hdr.snapshots_offset = len(entries), new_off
    img.snaps = list(entries)
    img.snap_table_bytes = len(blob)
    img._meta_changed()
    if old_n and old_bytes:
        img.refs.free(old_off, -(-old_bytes // img.cs))


def vm_state_offset(img: Qcow2Image, disk_size: int) -> int:
    """Guest offset where the VM state of a disk of ``disk_size`` bytes starts."""
    return img.meta.l1_entries_for(disk_size) << (img.cb + img.l2_bits)


def create(img: Qcow2Image, name: str, vm_state: bytes | None) -> SnapshotInfo:
    """Take an internal snapshot of ``img`` (see the module docstring)."""
    if img.meta.data_file is not None:
        raise UnsupportedFeatureError(
            "internal snapshots are not possible with an external data file",
            feature="snapshots with data file",
            path=img.path,
        )
    if not name or len(name.encode()) > 0xFFFF:
        raise ImageError("a snapshot name must be 1..65535 bytes", path=img.path)
    if any(s.name == name for s in img.snaps):
        raise ImageError(f"a snapshot named {name!r} already exists", path=img.path)
    if len(img.snaps) >= layout.MAX_SNAPSHOTS:
        raise ImageError("the image already has 65536 snapshots", path=img.path)
    if img.refs.max < 2:
        raise ImageError("snapshots need refcount_bits of at least 2", path=img.path)
    img._prepare_write()
    numeric = [int(s.id) for s in img.snaps if s.id.isdigit()]
    ident = str(max(numeric, default=0) + 1)
    state = bytes(vm_state or b"")
    vm_off = vm_state_offset(img, img.hdr.size)
    if state:
        span = img.cs * img.l2_entries
        img.grow_l1((vm_off + len(state) + span - 1) // span)
        img.write_guest(vm_off, memoryview(state))
    img.st.flush()
    l1 = array("Q", img.l1)
    clusters = max(1, -(-len(l1) * 8 // img.cs))
    l1_off = img.refs.allocate(clusters)
    img.st.pwrite(l1_off, layout.encode_u64_table(l1) + bytes(clusters * img.cs - len(l1) * 8))
    try:
        img.refs.update(tree_refs(img, l1, l1_off, 1))
    except ImageError:
        img.refs.free(l1_off, clusters)  # e.g. refcount overflow: nothing else changed
        raise
    fix_copied(img)
    img.st.flush()
    now = time.time_ns()
    entry = SnapshotEntry(
        l1_table_offset=l1_off,
        l1_size=len(l1),
        id=ident,
        name=name,
        date_sec=now // 1_000_000_000,
        date_nsec=now % 1_000_000_000,
        vm_clock_nsec=0,
        vm_state_size=len(state),
        disk_size=img.hdr.size,
        icount=None,
    )
    write_table(img, [*img.snaps, entry])
    if state:
        img._zero_range(vm_off, len(state), discard=True, full=True)
    img.st.flush()
    return snapinfo(entry)


def revert(img: Qcow2Image, name: str) -> None:
    """Make the active disk what snapshot ``name`` holds (size included)."""
    img._prepare_write()
    sn = img.snaps[find(img, name)]
    sn_l1 = load_l1(img, sn)
    if sn.disk_size is not None and sn.disk_size != img.hdr.size:
        img.grow_l1(img.meta.l1_entries_for(sn.disk_size))
    img.grow_l1(len(sn_l1))
    img.refs.update(tree_refs(img, sn_l1, sn.l1_table_offset, 1))
    old = array("Q", img.l1)
    # COPIED stripped: until fix_copied runs, a crash must not leave a shared L2 table
    # marked writable in place
    new = array("Q", (e & ~layout.OFLAG_COPIED for e in sn_l1))
    new.extend([0] * (len(old) - len(new)))
    img.st.flush()  # the raised counts are durable before the L1 table references them
    img.st.pwrite(img.hdr.l1_table_offset, layout.encode_u64_table(new))
    img.st.flush()
    img.l1[:] = new
    img._meta_changed()
    img.refs.update(tree_refs(img, old, img.hdr.l1_table_offset, -1))
    fix_copied(img)
    if sn.disk_size is not None and sn.disk_size != img.hdr.size:
        img._set_size(sn.disk_size)
    img._cluster_cache = None
    img.st.flush()


def delete(img: Qcow2Image, name: str) -> None:
    """Delete snapshot ``name`` and drop the references only it held."""
    img._prepare_write()
    i = find(img, name)
    sn = img.snaps[i]
    sn_l1 = load_l1(img, sn)
    changes = tree_refs(img, sn_l1, sn.l1_table_offset, -1)
    write_table(img, img.snaps[:i] + img.snaps[i + 1 :])
    img.refs.update(changes)
    if sn.l1_size:
        img.refs.free(sn.l1_table_offset, -(-sn.l1_size * 8 // img.cs))
    fix_copied(img)
    img.st.flush()


def _view(img: Qcow2Image, sn: SnapshotEntry) -> Mapper:
    mapper = Mapper(
        img.st,
        cluster_bits=img.cb,
        extended_l2=img.extended,
        zero_flag=img.v3,
        file_size=img.st.size,
    )
    mapper.l1 = load_l1(img, sn)
    mapper.l1_offset = sn.l1_table_offset
    return mapper


def read(img: Qcow2Image, name: str, offset: int, length: int) -> bytes:
    """Guest bytes of snapshot ``name`` without reverting to it."""
    sn = img.snaps[find(img, name)]
    size = img.hdr.size if sn.disk_size is None else sn.disk_size
    if offset < 0 or length < 0 or offset + length > size:
        raise ImageError(
            f"cannot read {length} bytes at {offset}: outside snapshot {sn.name!r} (0..{size})",
            path=img.path,
        )
    out = bytearray(length)
    img.read_into(out, offset, _view(img, sn))
    return bytes(out)


def read_vm_state(img: Qcow2Image, name: str) -> bytes:
    """The VM state blob stored with snapshot ``name``."""
    sn = img.snaps[find(img, name)]
    if not sn.vm_state_size:
        return b""
    size = img.hdr.size if sn.disk_size is None else sn.disk_size
    off = vm_state_offset(img, size)
    span = img.cs * img.l2_entries
    if off + sn.vm_state_size > sn.l1_size * span or sn.vm_state_size > img.st.size():
        raise CorruptImageError(
            f"snapshot {sn.id!r} VM state runs past its L1 table", path=img.path
        )
    out = bytearray(sn.vm_state_size)
    img.read_into(out, off, _view(img, sn))
    return bytes(out)


def snapinfo(s: SnapshotEntry) -> SnapshotInfo:
    """The public record of a snapshot table entry."""
    date = _dt.datetime.fromtimestamp(s.date_sec, tz=_dt.UTC) + _dt.timedelta(
        microseconds=s.date_nsec // 1000
    )
    return SnapshotInfo(
        id=s.id,
        name=s.name,
        date=date,
        vm_state_size=s.vm_state_size,
        disk_size=s.disk_size,
        vm_clock_ns=s.vm_clock_nsec,
        icount=s.icount,
    )

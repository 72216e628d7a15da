"""The on-disk structures of qcow2 persistent dirty bitmaps, read and checked.

QEMU ``docs/interop/qcow2.txt``, "Bitmaps extension": the header extension
points at the bitmap directory (one entry per bitmap: table offset and size,
flags, type, granularity, name); each bitmap's table maps clusters of bitmap
data (bit ``k`` of the data is granule ``k``, least significant bit first).
Every constraint QEMU's ``block/qcow2-bitmap.c`` enforces on reading is
checked here, so an image QEMU refuses is refused with the reason.
:mod:`.bitmaps` keeps the bitmaps up to date on top of this.
"""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from virtkit.errors import CorruptImageError
from virtkit.images.qcow2 import layout
from virtkit.images.storage import Storage

if TYPE_CHECKING:
    from virtkit.images.qcow2.metadata import Metadata

__all__ = [
    "DirEntry",
    "clear_bits",
    "corrupt",
    "entry_problem",
    "read_directory",
    "read_table",
    "runs",
    "set_bits",
    "table_size_for",
]

# --- the structures (qcow2.txt "Bitmaps extension"; limits of block/qcow2-bitmap.c) ----------
DIR_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gbits, name, extra
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_RESERVED = 0xFF000000000001FE
ENTRY_ALL_ONES = 1
MAX_TABLE_SIZE = 0x8000000  # BME_MAX_TABLE_SIZE (entries)
MAX_PHYS_SIZE = 0x20000000  # BME_MAX_PHYS_SIZE: bitmap data bytes
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME = 1023
MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_DIRECTORY = 1024 * MAX_BITMAPS  # QCOW2_MAX_BITMAP_DIRECTORY_SIZE
_FLAG_NAMES = {0: "in-use", 1: "auto"}


def corrupt(msg: str, path: str, offset: int | None) -> CorruptImageError:
    return CorruptImageError(
        msg + "; the image's bitmap metadata is damaged", path=path, offset=offset
    )


@attrs.define
class DirEntry:
    """One bitmap directory entry as stored."""

    name: str
    granularity_bits: int
    flags: int
    table_offset: int
    table_size: int
    #: File offset of the entry (its flags are at ``at + 12``).
    at: int = 0

    @property
    def flags_at(self) -> int:
        """File offset of this entry's flags field."""
        return self.at + 12

    def flag_names(self) -> list[str]:
        """The flags as ``qemu-img info`` names them."""
        return [n for bit, n in _FLAG_NAMES.items() if self.flags >> bit & 1]

    def encode(self) -> bytes:
        """The entry, its name and padding to 8 bytes."""
        name = self.name.encode()
        raw = DIR_ENTRY.pack(
            self.table_offset,
            self.table_size,
            self.flags,
            TYPE_DIRTY_TRACKING,
            self.granularity_bits,
            len(name),
            0,
        )
        raw += name
        return raw + bytes(-len(raw) % 8)


def table_size_for(size: int, granularity_bits: int, cluster_size: int) -> int:
    """Bitmap table entries a ``size``-byte disk needs (QEMU's ``size_to_clusters``)."""
    granules = -(-size >> granularity_bits)
    return -(-granules // (cluster_size * 8))


def read_directory(st: Storage, meta: Metadata) -> list[DirEntry]:
    """Parse and check the bitmap directory (empty without a live bitmaps extension).

    Every constraint QEMU's ``bitmap_list_load``/``check_dir_entry`` enforce
    is checked: entry count, reserved flags, type, granularity (9..31 bits),
    name length, extra data, table placement and size.

    Raises:
        CorruptImageError: the extension or directory breaks a constraint.
    """
    path = st.path
    if meta.bitmaps is None or not meta.header.autoclear_features & layout.AUTOCLEAR_BITMAPS:
        return []
    nb, dsize, doff = meta.bitmaps
    cs = meta.cluster_size
    size = meta.header.size
    if nb == 0:
        raise corrupt("the bitmaps extension lists zero bitmaps", path, layout.OFF_AUTOCLEAR)
    if nb > MAX_BITMAPS:
        raise corrupt(f"the bitmaps extension lists {nb} bitmaps (at most 65535)", path, None)
    if dsize == 0 or dsize > MAX_DIRECTORY:
        raise corrupt(f"bitmap directory size {dsize} is out of range", path, doff)
    if doff & (cs - 1) or doff < cs:
        raise corrupt(f"bitmap directory offset {doff:#x} is misplaced", path, doff)
    if doff + dsize > st.size():
        raise corrupt(
            f"bitmap directory at {doff:#x} ({dsize} bytes) runs past the end of the file",
            path,
            doff,
        )
    raw = st.pread(doff, dsize)
    if len(raw) != dsize:
        raise corrupt("the bitmap directory is truncated", path, doff)
    out: list[DirEntry] = []
    pos = 0
    while pos < dsize:
        where = doff + pos
        if pos + DIR_ENTRY.size > dsize:
            raise corrupt("broken bitmap directory (entry runs past its end)", path, where)
        if len(out) >= nb:
            raise corrupt("more bitmaps found than the header extension lists", path, where)
        fields = DIR_ENTRY.unpack_from(raw, pos)
        t_off, t_size, flags, _btype, gbits, name_size, extra = fields
        end = pos + DIR_ENTRY.size + extra + name_size
        end += -end % 8
        if end > dsize:
            raise corrupt("broken bitmap directory (entry runs past its end)", path, where)
        if extra:
            raise corrupt("bitmap extra data is not supported", path, where)
        name_at = pos + DIR_ENTRY.size
        name = raw[name_at : name_at + name_size].decode(errors="replace")
        problem = _entry_problem(fields, cs=cs, size=size)
        if problem:
            raise corrupt(f"bitmap {name!r} {problem}", path, where)
        out.append(DirEntry(name, gbits, flags, t_off, t_size, where))
        pos = end
    if len(out) != nb:
        raise corrupt("fewer bitmaps found than the header extension lists", path, doff)
    return out


def _entry_problem(fields: tuple[int, ...], *, cs: int, size: int) -> str | None:
    """What makes a directory entry (its unpacked fields) invalid for QEMU, or None."""
    t_off, t_size, flags, btype, gbits, name_size, _extra = fields
    if btype != TYPE_DIRTY_TRACKING:
        return f"has type {btype} (only 1, dirty tracking, exists)"
    if flags & RESERVED_FLAGS:
        return f"has reserved flags set ({flags:#x})"
    if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
        return f"has granularity bits {gbits} (9..31 allowed)"
    if name_size > MAX_NAME:
        return f"has a name of {name_size} bytes (at most 1023)"
    if t_size == 0 or t_off == 0 or t_off & (cs - 1) or t_size > MAX_TABLE_SIZE:
        return f"has a misplaced or empty table ({t_size} entries at {t_off:#x})"
    if t_size * cs > MAX_PHYS_SIZE:
        return f"has a table of {t_size} entries, over QEMU's 512 MiB of bitmap data"
    if not flags & FLAG_IN_USE and t_size != table_size_for(size, gbits, cs):
        return (
            f"has a table of {t_size} entries where the disk size needs "
            f"{table_size_for(size, gbits, cs)}"
        )
    return None


def entry_problem(entry: int, cs: int) -> str | None:
    """What makes one bitmap table entry invalid (QEMU's ``check_table_entry``), or None."""
    if entry & ENTRY_RESERVED:
        return f"bitmap table entry {entry:#x} has reserved bits set"
    off = entry & ENTRY_OFFSET_MASK
    if off and entry & ENTRY_ALL_ONES:
        return f"bitmap table entry {entry:#x} has a data cluster and the all-ones bit"
    if off & (cs - 1):
        return f"bitmap table entry {entry:#x} points at an unaligned cluster"
    return None


def read_table(st: Storage, entry: DirEntry, cs: int) -> array[int]:
    """A bitmap's table, every entry checked.

    Raises:
        CorruptImageError: the table lies outside the file or an entry is invalid.
    """
    nbytes = entry.table_size * 8
    if entry.table_offset + nbytes > st.size():
        raise corrupt(
            f"bitmap {entry.name!r} table at {entry.table_offset:#x} runs past the end of the file",
            st.path,
            entry.table_offset,
        )
    raw = st.pread(entry.table_offset, nbytes)
    if len(raw) != nbytes:
        raise corrupt(f"bitmap {entry.name!r} table is truncated", st.path, entry.table_offset)
    table = layout.decode_u64_table(raw)
    for i, e in enumerate(table):
        problem = entry_problem(e, cs)
        if problem:
            raise corrupt(f"bitmap {entry.name!r}: {problem}", st.path, entry.table_offset + i * 8)
    return table


# --- bit ranges inside one data cluster -------------------------------------------------------
def set_bits(buf: bytearray, lo: int, hi: int) -> None:
    """Set bits ``[lo, hi)`` of ``buf`` (bit ``k`` is bit ``k % 8`` of byte ``k // 8``)."""
    if lo >= hi:
        return
    b0, b1 = lo >> 3, hi >> 3
    if b0 == b1:
        buf[b0] |= ((1 << (hi - lo)) - 1) << (lo & 7)
        return
    if lo & 7:
        buf[b0] |= (0xFF << (lo & 7)) & 0xFF
        b0 += 1
    buf[b0:b1] = b"\xff" * (b1 - b0)
    if hi & 7:
        buf[b1] |= (1 << (hi & 7)) - 1


def clear_bits(buf: bytearray, lo: int, hi: int) -> None:
    """Clear bits ``[lo, hi)`` of ``buf``."""
    if lo >= hi:
        return
    b0, b1 = lo >> 3, hi >> 3
    if b0 == b1:
        buf[b0] &= ~(((1 << (hi - lo)) - 1) << (lo & 7)) & 0xFF
        return
    if lo & 7:
        buf[b0] &= (1 << (lo & 7)) - 1
        b0 += 1
    buf[b0:b1] = bytes(b1 - b0)
    if hi & 7:
        buf[b1] &= ~((1 << (hi & 7)) - 1) & 0xFF


_NONZERO = re.compile(rb"[^\x00]+")
_ONES = re.compile(r"1+")


def runs(buf: bytes | bytearray) -> Iterable[tuple[int, int]]:
    """``(first bit, count)`` of each run of set bits in ``buf``."""
    for m in _NONZERO.finditer(buf):
        span = m.group()
        bits = format(int.from_bytes(span, "little"), f"0{len(span) * 8}b")[::-1]
        base = m.start() * 8
        for r in _ONES.finditer(bits):
            yield base + r.start(), r.end() - r.start()

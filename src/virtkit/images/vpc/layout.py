"""VHD (Virtual PC) on-disk structures and QEMU's size rules, described once.

Reference: Microsoft's "Virtual Hard Disk Image Format Specification" and
QEMU 7.2's ``block/vpc.c``. All integers are big-endian. Every VHD ends with
a 512-byte footer (``conectix``); a dynamic VHD also keeps a copy at offset 0,
a 1024-byte dynamic header (``cxsparse``) and a block allocation table (BAT)
of 32-bit sector numbers, ``0xffffffff`` for an unallocated block. Each
allocated block is a sector bitmap followed by ``block_size`` data bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

__all__ = [
    "DYN_HEADER",
    "FOOTER",
    "DynamicHeader",
    "Footer",
    "checksum",
    "geometry",
    "virtual_sectors",
]

SECTOR = 512
COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFFERENCING = 4
UNALLOCATED = 0xFFFFFFFF
#: 65535 cylinders x 16 heads x 255 sectors: "the size is in current_size".
MAX_GEOMETRY = 65535 * 16 * 255
#: QEMU refuses disks above 2040 GiB.
MAX_SECTORS = 0xFF000000
#: Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00 UTC).
EPOCH = 946684800
#: Creator applications whose footer ``current_size`` QEMU trusts over the geometry.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

_FOOTER_FIELDS: tuple[tuple[str, str], ...] = (
    ("cookie", "8s"),
    ("features", "I"),
    ("version", "I"),
    ("data_offset", "Q"),
    ("timestamp", "I"),
    ("creator_app", "4s"),
    ("creator_major", "H"),
    ("creator_minor", "H"),
    ("creator_os", "4s"),
    ("orig_size", "Q"),
    ("current_size", "Q"),
    ("cyls", "H"),
    ("heads", "B"),
    ("secs_per_cyl", "B"),
    ("type", "I"),
    ("checksum", "I"),
    ("uuid", "16s"),
    ("in_saved_state", "B"),
)
FOOTER = struct.Struct(">" + "".join(code for _, code in _FOOTER_FIELDS))
_DYN_FIELDS: tuple[tuple[str, str], ...] = (
    ("cookie", "8s"),
    ("data_offset", "Q"),
    ("table_offset", "Q"),
    ("version", "I"),
    ("max_table_entries", "I"),
    ("block_size", "I"),
    ("checksum", "I"),
    ("parent_uuid", "16s"),
    ("parent_timestamp", "I"),
    ("reserved", "I"),
    ("parent_name", "512s"),
)
DYN_HEADER = struct.Struct(">" + "".join(code for _, code in _DYN_FIELDS))
_CHECKSUM_AT = FOOTER.size - 16 - 1 - 4  # the footer's checksum field


@attrs.define
class Footer:
    """The decoded 512-byte footer (raw record)."""

    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_major: int
    creator_minor: int
    creator_os: bytes
    orig_size: int
    current_size: int
    cyls: int
    heads: int
    secs_per_cyl: int
    type: int
    checksum: int
    uuid: bytes
    in_saved_state: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> Footer:
        """Decode a footer (raises struct.error when short)."""
        values: tuple[Any, ...] = FOOTER.unpack_from(data, 0)
        return cls(*values)

    def pack(self) -> bytes:
        """Encode into 512 bytes with a fresh checksum."""
        self.checksum = 0
        raw = FOOTER.pack(*(getattr(self, n) for n, _ in _FOOTER_FIELDS)).ljust(SECTOR, b"\0")
        self.checksum = checksum(raw)
        return raw[:_CHECKSUM_AT] + struct.pack(">I", self.checksum) + raw[_CHECKSUM_AT + 4 :]


@attrs.define
class DynamicHeader:
    """The decoded dynamic disk header (raw record; the parent locators are not used)."""

    cookie: bytes
    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_uuid: bytes
    parent_timestamp: int
    reserved: int
    parent_name: bytes

    @classmethod
    def unpack(cls, data: bytes) -> DynamicHeader:
        """Decode a dynamic header (raises struct.error when short)."""
        values: tuple[Any, ...] = DYN_HEADER.unpack_from(data, 0)
        return cls(*values)


def checksum(data: bytes) -> int:
    """One's complement of the byte sum (the checksum field must read as zero)."""
    return ~sum(data) & 0xFFFFFFFF


def footer_checksum_ok(raw: bytes) -> bool:
    """Whether a raw footer's stored checksum matches its contents."""
    stored = struct.unpack_from(">I", raw, _CHECKSUM_AT)[0]
    zeroed = raw[:_CHECKSUM_AT] + bytes(4) + raw[_CHECKSUM_AT + 4 : SECTOR]
    return bool(checksum(zeroed) == stored)


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """CHS for a sector count, as the VHD specification (and QEMU) computes it."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cyls_heads = total_sectors // secs
    else:
        secs = 17
        cyls_heads = total_sectors // secs
        heads = max(-(-cyls_heads // 1024), 4)
        if cyls_heads >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cyls_heads = total_sectors // secs
        if cyls_heads >= heads * 1024:
            secs, heads = 63, 16
            cyls_heads = total_sectors // secs
    return cyls_heads // heads, heads, secs


def virtual_sectors(footer: Footer) -> int:
    """The disk size in sectors by QEMU 7.2's rule (``vpc_open``).

    Virtual PC and QEMU's own ``qemu`` creator size a disk by its CHS geometry;
    Hyper-V (``win ``), Disk2vhd (``d2v ``), XenServer (``tap``), XenConverter
    (``CTXS``) and QEMU with ``force_size`` (``qem2``) by ``current_size``; so
    does any disk whose geometry is the maximum 65535x16x255.
    """
    chs = footer.cyls * footer.heads * footer.secs_per_cyl
    if footer.creator_app in CURRENT_SIZE_CREATORS or chs == MAX_GEOMETRY:
        return footer.current_size // SECTOR
    return chs

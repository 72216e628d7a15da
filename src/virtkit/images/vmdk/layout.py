"""VMDK on-disk structures (hosted sparse extent, version 1-3), described once.

Reference: VMware's "Virtual Disk Format 5.0" and QEMU's ``block/vmdk.c``.
All integers are little-endian; the magic is the four bytes ``KDMV``. A sparse
extent starts with a 512-byte header; grains (``granularity`` sectors) are
found through a grain directory (GD, one entry per grain table) and grain
tables (GT, ``num_gtes_per_gt`` 32-bit sector numbers each). A
streamOptimized extent stores compressed grains, each behind a grain marker,
and may keep its GD at the end of the file with a footer copy of the header.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

__all__ = [
    "COMPRESSION_DEFLATE",
    "FLAG_COMPRESSED",
    "FLAG_MARKERS",
    "FLAG_NL_DETECT",
    "FLAG_RGD",
    "FLAG_ZERO_GRAIN",
    "GD_AT_END",
    "GTE_ZEROED",
    "HEADER",
    "MAGIC",
    "MARKER",
    "MARKER_EOS",
    "MARKER_FOOTER",
    "MARKER_GD",
    "MARKER_GT",
    "SECTOR",
    "SparseHeader",
]

SECTOR = 512
MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17

COMPRESSION_DEFLATE = 1
#: ``gd_offset`` value meaning "the grain directory is at the end; read the footer".
GD_AT_END = 0xFFFFFFFFFFFFFFFF
#: A grain-table entry meaning "this grain reads as zeroes" (with FLAG_ZERO_GRAIN).
GTE_ZEROED = 1

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

#: (field, struct code) of the sparse extent header, in file order.
_HEADER_FIELDS: tuple[tuple[str, str], ...] = (
    ("magic", "4s"),
    ("version", "I"),
    ("flags", "I"),
    ("capacity", "Q"),
    ("granularity", "Q"),
    ("desc_offset", "Q"),
    ("desc_size", "Q"),
    ("num_gtes_per_gt", "I"),
    ("rgd_offset", "Q"),
    ("gd_offset", "Q"),
    ("grain_offset", "Q"),
    ("filler", "B"),
    ("check_bytes", "4s"),
    ("compress_algorithm", "H"),
)
HEADER = struct.Struct("<" + "".join(code for _, code in _HEADER_FIELDS))
#: A marker sector's head: value (sector count or LBA), size, type.
MARKER = struct.Struct("<QII")
#: A grain marker: the grain's LBA (sector) and compressed byte count, then data.
GRAIN_MARKER = struct.Struct("<QI")
CHECK_BYTES = b"\n \r\n"


@attrs.define
class SparseHeader:
    """The decoded 512-byte sparse extent header (raw record, not yet validated)."""

    magic: bytes
    version: int
    flags: int
    capacity: int
    granularity: int
    desc_offset: int
    desc_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    filler: int = 0
    check_bytes: bytes = CHECK_BYTES
    compress_algorithm: int = 0

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> SparseHeader:
        """Decode a header from ``data`` at ``offset`` (raises struct.error if short)."""
        values: tuple[Any, ...] = HEADER.unpack_from(data, offset)
        return cls(*values)

    def pack(self) -> bytes:
        """Encode the header into one 512-byte sector."""
        values = [getattr(self, name) for name, _ in _HEADER_FIELDS]
        return HEADER.pack(*values).ljust(SECTOR, b"\0")

    @property
    def compressed(self) -> bool:
        """Grains are deflate-compressed (streamOptimized)."""
        return self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def markers(self) -> bool:
        """Grains (and tables) are preceded by markers."""
        return bool(self.flags & FLAG_MARKERS)

    @property
    def zero_grain(self) -> bool:
        """Grain-table entry 1 means a zeroed grain."""
        return bool(self.flags & FLAG_ZERO_GRAIN)


def marker_sector(value: int, kind: int) -> bytes:
    """One metadata marker sector (GT, GD, footer or end of stream)."""
    return MARKER.pack(value, 0, kind).ljust(SECTOR, b"\0")

"""VHDX on-disk structures, described once and used for reading and writing.

Reference: Microsoft's "VHDX Format Specification" (MS-VHDX) v1.00 and QEMU's
``block/vhdx.h``. Every multi-byte field is little-endian; GUIDs are stored in
Microsoft's mixed-endian layout, which is Python's ``uuid.UUID.bytes_le``.

File layout (the first MiB is the header section)::

    0       file type identifier ("vhdxfile", creator in UTF-16)
    64 KiB  header 1 (4 KiB, CRC-32C)        128 KiB  header 2
    192 KiB region table 1 (64 KiB, CRC-32C) 256 KiB  region table 2
    1 MiB+  log, BAT and metadata regions (1 MiB aligned), then payload blocks
"""

from __future__ import annotations

import struct
import uuid

import attrs

from virtkit.images.vhdx.crc import crc32c

__all__ = [
    "BAT_GUID",
    "FILE_PARAMS_GUID",
    "HEADER",
    "LOG_HEADER",
    "LOGICAL_SECTOR_GUID",
    "METADATA_GUID",
    "META_ENTRY",
    "META_HEADER",
    "PAGE83_GUID",
    "PARENT_LOCATOR_GUID",
    "PARENT_VHDX_GUID",
    "PHYSICAL_SECTOR_GUID",
    "REGION_ENTRY",
    "REGION_HEADER",
    "VIRTUAL_SIZE_GUID",
    "Header",
    "RegionEntry",
    "MetaEntry",
]

MiB = 1 << 20
FILE_ID_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_SIGNATURE = b"loge"

HEADER1_OFFSET = 64 << 10
HEADER2_OFFSET = 128 << 10
REGION1_OFFSET = 192 << 10
REGION2_OFFSET = 256 << 10
HEADER_SIZE = 4096  # the CRC covers 4 KiB
REGION_TABLE_SIZE = 64 << 10  # the CRC covers 64 KiB
HEADER_SECTION = MiB
METADATA_TABLE_SIZE = 64 << 10  # header + at most 2047 entries of 32 bytes
MAX_ENTRIES = 2047

#: header: signature, checksum, sequence, file write / data write / log GUIDs,
#: log version, version, log length, log offset
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
#: region table header: signature, checksum, entry count, reserved
REGION_HEADER = struct.Struct("<4sIII")
#: region table entry: GUID, file offset, length, flags (bit 0: required)
REGION_ENTRY = struct.Struct("<16sQII")
#: metadata table header: signature, reserved, entry count, reserved
META_HEADER = struct.Struct("<8sHH20s")
#: metadata table entry: item GUID, offset (in the region), length, flags, reserved
META_ENTRY = struct.Struct("<16sIIII")
#: log entry header: signature, checksum, entry length, tail, sequence, descriptor
#: count, reserved, log GUID, flushed file offset, last file offset
LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")
#: parent locator header: locator type GUID, reserved, key/value count
LOCATOR_HEADER = struct.Struct("<16sHH")
#: parent locator entry: key offset, value offset, key length, value length
LOCATOR_ENTRY = struct.Struct("<IIHH")

REGION_REQUIRED = 0x1
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4
PARAMS_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAMS_HAS_PARENT = 0x2


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
PARENT_VHDX_GUID = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
NULL_GUID = bytes(16)

# BAT entries: state in bits 0-2, file offset in MiB in bits 20-63.
STATE_MASK = 0x7
OFFSET_MASK = ~((1 << 20) - 1) & ((1 << 64) - 1)
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5  # written by pre-1.0 Hyper-V; QEMU reads it as unmapped
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6
#: Sectors one sector bitmap block (1 MiB of bits) describes.
SECTORS_PER_BITMAP = 1 << 23

BLOCK_SIZE_MIN = MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_VIRTUAL_SIZE = 64 << 40  # 64 TiB, the spec's limit


@attrs.frozen
class Header:
    """One of the two VHDX headers, as stored."""

    signature: bytes
    checksum: int
    sequence: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Decode the first bytes of a 4 KiB header block."""
        return cls(*HEADER.unpack_from(data, 0))

    def pack(self) -> bytes:
        """Encode into a 4 KiB block with the CRC-32C filled in."""
        raw = bytearray(HEADER_SIZE)
        HEADER.pack_into(raw, 0, *attrs.astuple(attrs.evolve(self, checksum=0)))
        struct.pack_into("<I", raw, 4, crc32c(raw))
        return bytes(raw)


@attrs.frozen
class RegionEntry:
    """A region table entry: which object lives where."""

    guid: bytes
    file_offset: int
    length: int
    flags: int

    @property
    def required(self) -> bool:
        """Whether a reader must understand this region to open the file."""
        return bool(self.flags & REGION_REQUIRED)


@attrs.frozen
class MetaEntry:
    """A metadata table entry: one metadata item inside the metadata region."""

    item: bytes
    offset: int
    length: int
    flags: int

    @property
    def required(self) -> bool:
        """Whether a reader must understand this item to open the file."""
        return bool(self.flags & META_IS_REQUIRED)


def pack_region_table(entries: list[RegionEntry]) -> bytes:
    """Encode a 64 KiB region table with its CRC-32C."""
    raw = bytearray(REGION_TABLE_SIZE)
    REGION_HEADER.pack_into(raw, 0, REGION_SIGNATURE, 0, len(entries), 0)
    for i, e in enumerate(entries):
        REGION_ENTRY.pack_into(
            raw,
            REGION_HEADER.size + i * REGION_ENTRY.size,
            e.guid,
            e.file_offset,
            e.length,
            e.flags,
        )
    struct.pack_into("<I", raw, 4, crc32c(raw))
    return bytes(raw)


def bat_entry(state: int, file_offset: int) -> int:
    """A BAT entry for a block in ``state`` at ``file_offset`` (a MiB multiple)."""
    return (file_offset & OFFSET_MASK) | state


def chunk_ratio(block_size: int, logical_sector: int) -> int:
    """Payload blocks described by one sector bitmap block."""
    return SECTORS_PER_BITMAP * logical_sector // block_size


def bat_entries(virtual_size: int, block_size: int, logical_sector: int, *, parent: bool) -> int:
    """Number of BAT entries (payload and interleaved sector bitmap), as QEMU counts them."""
    ratio = chunk_ratio(block_size, logical_sector)
    blocks = -(-virtual_size // block_size)
    if parent:
        return -(-blocks // ratio) * (ratio + 1)
    return blocks + max(blocks - 1, 0) // ratio


def utf16(text: str) -> bytes:
    """UTF-16LE, the encoding of parent locator keys and values."""
    return text.encode("utf-16-le")

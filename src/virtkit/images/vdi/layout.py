"""VDI (VirtualBox) on-disk structures, described once.

Reference: QEMU's ``block/vdi.c`` (the VirtualBox header version 1.1). All
fields are little-endian. The 512-byte header at offset 0 is followed by the
block map (one 32-bit entry per 1 MiB block: the index of the block in the
data area, or ``0xFFFFFFFF`` unallocated, ``0xFFFFFFFE`` discarded, both
reading as zeroes) and the data area.
"""

from __future__ import annotations

import struct

import attrs

__all__ = ["HEADER", "SIGNATURE", "VdiHeader"]

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
SECTOR = 512
BLOCK_SIZE = 1 << 20  # the only block size QEMU (and virtkit) reads
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
#: QEMU's limit on blocks_in_image (the block map must fit a 32-bit byte count).
MAX_BLOCKS = 0x3FFFFFFF

#: text[64], signature, version, header size, image type, image flags,
#: description[256], block map offset, data offset, cylinders, heads, sectors,
#: sector size, unused, disk size, block size, block extra, blocks in image,
#: blocks allocated, image / last snapshot / link / parent UUIDs, 7 unused u64
HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")


@attrs.frozen
class VdiHeader:
    """The VDI header as stored (no validation: see :mod:`virtkit.images.vdi.image`)."""

    text: bytes
    signature: int
    version: int
    header_size: int
    image_type: int
    image_flags: int
    description: bytes
    offset_bmap: int
    offset_data: int
    cylinders: int
    heads: int
    sectors: int
    sector_size: int
    unused1: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks_in_image: int
    blocks_allocated: int
    uuid_image: bytes
    uuid_last_snap: bytes
    uuid_link: bytes
    uuid_parent: bytes
    unused2: bytes

    @classmethod
    def unpack(cls, data: bytes) -> VdiHeader:
        """Decode the 512-byte header."""
        return cls(*HEADER.unpack_from(data, 0))

    def pack(self) -> bytes:
        """Encode the 512-byte header."""
        return HEADER.pack(*attrs.astuple(self))

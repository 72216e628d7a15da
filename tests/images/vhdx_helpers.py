"""Helpers for the VHDX and VDI tests: patching headers with fresh checksums, crafting logs."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import attrs

from virtkit.images.storage import FileStorage
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx.crc import crc32c
from virtkit.images.vhdx.metadata import load

MiB = 1 << 20


def headers(path: Path) -> list[L.Header]:
    """Both VHDX headers as stored."""
    data = path.read_bytes()
    return [L.Header.unpack(data[off : off + L.HEADER_SIZE])
            for off in (L.HEADER1_OFFSET, L.HEADER2_OFFSET)]  # fmt: skip


def set_headers(path: Path, **changes: object) -> None:
    """Rewrite both headers with ``changes`` applied and valid checksums."""
    with path.open("r+b") as fh:
        for hdr, off in zip(headers(path), (L.HEADER1_OFFSET, L.HEADER2_OFFSET), strict=True):
            fh.seek(off)
            fh.write(attrs.evolve(hdr, **changes).pack())  # type: ignore[arg-type]


def meta_of(path: Path) -> object:
    """The validated metadata (bat offset, block size...) of a VHDX file."""
    st = FileStorage(path, writable=False, lock=False)
    try:
        return load(st)
    finally:
        st.close()


def log_entry(log_guid: bytes, sequence: int = 1, length: int = 4096) -> bytes:
    """A valid log entry with no descriptors (header + checksum), ``length`` bytes long."""
    entry = bytearray(length)
    L.LOG_HEADER.pack_into(entry, 0, L.LOG_SIGNATURE, 0, length, 0, sequence, 0, 0, log_guid,
                           0, 0)  # fmt: skip
    struct.pack_into("<I", entry, 4, crc32c(entry))
    return bytes(entry)


def dirty_log(path: Path, *, entries: bool = True) -> bytes:
    """Give ``path`` a non-null log GUID and (with ``entries``) a pending log entry."""
    guid = uuid.uuid4().bytes_le
    hdr = headers(path)[0]
    set_headers(path, log_guid=guid, log_version=0)
    if entries:
        with path.open("r+b") as fh:
            fh.seek(hdr.log_offset)
            fh.write(log_entry(guid))
    return guid


def vdi_patch(path: Path, offset: int, code: str, value: int | bytes) -> None:
    """Overwrite one VDI header field."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(code, value))


def qemu_style_entry(
    log_guid: bytes,
    sequence: int,
    writes: list[tuple[int, bytes]],
    zeros: list[tuple[int, int]],
    file_size: int,
) -> bytes:
    """A log entry laid out as QEMU's vhdx_log_write does: header, descriptors, data sectors.

    ``writes`` are ``(file offset, 4096 bytes)``, ``zeros`` ``(file offset, length)``.
    """
    count = len(writes) + len(zeros)
    desc_sectors = -(-(count + 2) // 128)
    length = (desc_sectors + len(writes)) * 4096
    entry = bytearray(length)
    L.LOG_HEADER.pack_into(entry, 0, L.LOG_SIGNATURE, 0, length, 0, sequence, count, 0,
                           log_guid, file_size, file_size)  # fmt: skip
    pos = L.LOG_HEADER.size
    for offset, length_zero in zeros:
        struct.pack_into("<4sIQQQ", entry, pos, b"zero", 0, length_zero, offset, sequence)
        pos += 32
    for i, (offset, data) in enumerate(writes):
        assert len(data) == 4096
        lead, trail = struct.unpack_from("<Q", data, 0)[0], struct.unpack_from("<I", data, 4092)[0]
        struct.pack_into("<4sIQQQ", entry, pos, b"desc", trail, lead, offset, sequence)
        pos += 32
        sector = (desc_sectors + i) * 4096
        entry[sector : sector + 4] = b"data"
        struct.pack_into("<I", entry, sector + 4, sequence >> 32)
        entry[sector + 8 : sector + 4092] = data[8:4092]
        struct.pack_into("<I", entry, sector + 4092, sequence & 0xFFFFFFFF)
    struct.pack_into("<I", entry, 4, crc32c(entry))
    return bytes(entry)

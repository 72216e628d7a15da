"""Read and validate a VHDX file's headers, region table and metadata region.

Everything here is untrusted input: each checksum is verified, each offset,
length and count is bounded (by the spec's limits and by the file) before it
is used, regions may not overlap, and an unknown item marked *required* is an
:class:`~virtkit.errors.UnsupportedFeatureError`, as the spec demands.
"""

from __future__ import annotations

import struct

import attrs

from virtkit.errors import CorruptImageError, UnsupportedFeatureError
from virtkit.images.storage import Storage
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx.crc import crc32c
from virtkit.images.vhdx.log import find_sequence

__all__ = ["VhdxMeta", "active_header", "load"]

_KNOWN_ITEMS = {
    L.FILE_PARAMS_GUID: ("file parameters", 8),
    L.VIRTUAL_SIZE_GUID: ("virtual disk size", 8),
    L.PAGE83_GUID: ("page 83 data", 16),
    L.LOGICAL_SECTOR_GUID: ("logical sector size", 4),
    L.PHYSICAL_SECTOR_GUID: ("physical sector size", 4),
    L.PARENT_LOCATOR_GUID: ("parent locator", L.LOCATOR_HEADER.size),
}
_MAX_ITEM = L.MiB  # the spec's limit on one metadata item


@attrs.frozen
class VhdxMeta:
    """The validated metadata of a VHDX file."""

    header: L.Header
    header_index: int
    bat_offset: int
    bat_length: int
    metadata_offset: int
    metadata_length: int
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector: int
    physical_sector: int
    page83: bytes
    parent_locator: dict[str, str] = attrs.field(hash=False)
    #: ``(start, end)`` of every structure outside the payload (header section, log, BAT,
    #: metadata), for overlap checks of BAT entries.
    regions: tuple[tuple[int, int], ...]
    bat_count: int
    chunk_ratio: int


def _corrupt(path: str, msg: str, offset: int | None = None) -> CorruptImageError:
    return CorruptImageError(f"VHDX: {msg}", path=path, offset=offset)


def _read(st: Storage, offset: int, length: int) -> bytes:
    data = st.pread(offset, length)
    if len(data) < length:
        raise _corrupt(st.path, f"file too short: {length} bytes expected", offset)
    return data


def _valid_crc(block: bytes) -> bool:
    stored: int = struct.unpack_from("<I", block, 4)[0]
    return crc32c(block[:4] + b"\0\0\0\0" + block[8:]) == stored


def active_header(st: Storage) -> tuple[L.Header, int]:
    """The current header (the valid one with the highest sequence number) and its index.

    Raises:
        CorruptImageError: not a VHDX file, or no valid header.
    """
    if _read(st, 0, 8) != L.FILE_ID_SIGNATURE:
        raise _corrupt(st.path, "no 'vhdxfile' signature", 0)
    found: list[tuple[L.Header, int, bytes]] = []
    for index, offset in enumerate((L.HEADER1_OFFSET, L.HEADER2_OFFSET)):
        block = _read(st, offset, L.HEADER_SIZE)
        hdr = L.Header.unpack(block)
        if hdr.signature == L.HEADER_SIGNATURE and hdr.version == 1 and _valid_crc(block):
            found.append((hdr, index, block[: L.HEADER.size]))
    if not found:
        raise _corrupt(st.path, "no valid header (both copies have a bad signature, "
                       "version or checksum)", L.HEADER1_OFFSET)  # fmt: skip
    if len(found) == 2 and found[0][0].sequence == found[1][0].sequence:
        if found[0][2][8:] != found[1][2][8:]:
            raise _corrupt(st.path, "the two headers differ but have the same sequence number",
                           L.HEADER1_OFFSET)  # fmt: skip
        return found[0][0], 0
    hdr, index, _ = max(found, key=lambda f: f[0].sequence)
    return hdr, index


def _region_table(st: Storage) -> list[L.RegionEntry]:
    bad = ""
    for offset in (L.REGION1_OFFSET, L.REGION2_OFFSET):
        block = _read(st, offset, L.REGION_TABLE_SIZE)
        sig, _crc, count, _ = L.REGION_HEADER.unpack_from(block, 0)
        if sig != L.REGION_SIGNATURE or not _valid_crc(block):
            bad = "bad signature or checksum"
            continue
        if count > L.MAX_ENTRIES:
            raise _corrupt(st.path, f"region table has {count} entries (at most 2047)", offset)
        return [
            L.RegionEntry(*L.REGION_ENTRY.unpack_from(block, L.REGION_HEADER.size + i * 32))
            for i in range(count)
        ]
    raise _corrupt(st.path, f"no valid region table ({bad})", L.REGION1_OFFSET)


def _add_region(
    path: str, regions: list[tuple[int, int]], start: int, length: int, what: str
) -> None:
    end = start + length
    for a, b in regions:
        if start < b and a < end:
            raise _corrupt(path, f"{what} [{start:#x}, {end:#x}) overlaps another structure", start)
    regions.append((start, end))


def _item(st: Storage, base: int, entry: L.MetaEntry, size: int) -> bytes:
    return _read(st, base + entry.offset, size)


def _locator(path: str, data: bytes, base: int) -> dict[str, str]:
    ltype, _res, count = L.LOCATOR_HEADER.unpack_from(data, 0)
    if ltype != L.PARENT_VHDX_GUID:
        raise UnsupportedFeatureError(
            "VHDX: the parent locator is not of the VHDX type; only VHDX parents are supported",
            feature="vhdx parent locator type",
            path=path,
            offset=base,
        )
    if L.LOCATOR_HEADER.size + count * L.LOCATOR_ENTRY.size > len(data):
        raise _corrupt(path, f"parent locator claims {count} entries, more than it holds", base)
    out: dict[str, str] = {}
    for i in range(count):
        pos = L.LOCATOR_HEADER.size + i * L.LOCATOR_ENTRY.size
        koff, voff, klen, vlen = L.LOCATOR_ENTRY.unpack_from(data, pos)
        if not klen or not vlen or koff + klen > len(data) or voff + vlen > len(data):
            raise _corrupt(path, f"parent locator entry {i} points outside the locator", base + pos)
        try:
            key = data[koff : koff + klen].decode("utf-16-le")
            value = data[voff : voff + vlen].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise _corrupt(path, f"parent locator entry {i} is not UTF-16", base + pos) from exc
        if key in out:
            raise _corrupt(path, f"parent locator has key {key!r} twice", base + pos)
        out[key] = value
    return out


def load(st: Storage) -> VhdxMeta:
    """Read, check and return the metadata of the VHDX file on ``st``.

    Raises:
        CorruptImageError: a structure is damaged, out of bounds or overlapping.
        UnsupportedFeatureError: a required item virtkit does not know, or a
            log that must be replayed.
    """
    path = st.path
    file_size = st.size()
    header, header_index = active_header(st)
    regions: list[tuple[int, int]] = [(0, L.HEADER_SECTION)]
    if header.log_length:
        if header.log_offset % L.MiB or header.log_length % L.MiB:
            raise _corrupt(path, "log region is not aligned to 1 MiB", header.log_offset)
        _add_region(path, regions, header.log_offset, header.log_length, "log")
    if not getattr(st, "replayed", False) and find_sequence(st, header):
        raise UnsupportedFeatureError(
            "VHDX: the log holds entries that must be replayed (the file was not closed "
            "cleanly); open it through virtkit.images.open, which replays them in memory, or "
            "replay them into the file with 'qemu-img check -r all'",
            feature="vhdx log replay",
            path=path,
            offset=header.log_offset,
        )
    bat: L.RegionEntry | None = None
    meta: L.RegionEntry | None = None
    for entry in _region_table(st):
        what = {L.BAT_GUID: "BAT", L.METADATA_GUID: "metadata region"}.get(entry.guid)
        if what is None:
            if entry.required:
                raise UnsupportedFeatureError(
                    "VHDX: a required region of unknown type", feature="vhdx region", path=path
                )
            continue
        if (what == "BAT" and bat) or (what != "BAT" and meta):
            raise _corrupt(path, f"the region table lists the {what} twice", L.REGION1_OFFSET)
        if entry.file_offset % L.MiB or entry.file_offset < L.MiB or not entry.length:
            raise _corrupt(path, f"{what} at {entry.file_offset:#x} is not 1 MiB aligned "
                           "past the header section, or empty", L.REGION1_OFFSET)  # fmt: skip
        if entry.file_offset + entry.length > file_size:
            raise _corrupt(
                path,
                f"the {what} ({entry.length} bytes at {entry.file_offset:#x}) runs past the "
                f"end of the {file_size}-byte file",
                L.REGION1_OFFSET,
            )
        _add_region(path, regions, entry.file_offset, entry.length, what)
        if what == "BAT":
            bat = entry
        else:
            meta = entry
    if bat is None or meta is None:
        raise _corrupt(path, "the region table lacks the BAT or the metadata region",
                       L.REGION1_OFFSET)  # fmt: skip
    if meta.length < L.METADATA_TABLE_SIZE:
        raise _corrupt(path, "metadata region smaller than its 64 KiB table", meta.file_offset)
    table = _read(st, meta.file_offset, L.METADATA_TABLE_SIZE)
    sig, _res, count, _ = L.META_HEADER.unpack_from(table, 0)
    if sig != L.METADATA_SIGNATURE:
        raise _corrupt(path, "bad metadata table signature", meta.file_offset)
    if count > L.MAX_ENTRIES:
        raise _corrupt(path, f"metadata table has {count} entries (at most 2047)", meta.file_offset)
    items: dict[bytes, L.MetaEntry] = {}
    for i in range(count):
        pos = L.META_HEADER.size + i * L.META_ENTRY.size
        guid, off, length, flags, _r = L.META_ENTRY.unpack_from(table, pos)
        item = L.MetaEntry(guid, off, length, flags)
        known = _KNOWN_ITEMS.get(guid)
        if known is None:
            if item.required:
                raise UnsupportedFeatureError(
                    "VHDX: a required metadata item of unknown type",
                    feature="vhdx metadata item",
                    path=path,
                    offset=meta.file_offset + pos,
                )
            continue
        name, minimum = known
        if guid in items:
            raise _corrupt(path, f"metadata item {name!r} appears twice", meta.file_offset + pos)
        if (
            length < minimum
            or length > _MAX_ITEM
            or off + length > meta.length
            or off < L.METADATA_TABLE_SIZE
        ):
            raise _corrupt(path, f"metadata item {name!r} ({length} bytes at {off:#x}) lies "
                           "outside the metadata region", meta.file_offset + pos)  # fmt: skip
        items[guid] = item
    for guid, (name, _m) in _KNOWN_ITEMS.items():
        if guid not in items and guid != L.PARENT_LOCATOR_GUID:
            raise _corrupt(path, f"required metadata item {name!r} is missing", meta.file_offset)
    base = meta.file_offset
    block_size, pflags = struct.unpack("<II", _item(st, base, items[L.FILE_PARAMS_GUID], 8))
    (virtual_size,) = struct.unpack("<Q", _item(st, base, items[L.VIRTUAL_SIZE_GUID], 8))
    (logical,) = struct.unpack("<I", _item(st, base, items[L.LOGICAL_SECTOR_GUID], 4))
    (physical,) = struct.unpack("<I", _item(st, base, items[L.PHYSICAL_SECTOR_GUID], 4))
    page83 = _item(st, base, items[L.PAGE83_GUID], 16)
    if (
        block_size < L.BLOCK_SIZE_MIN
        or block_size > L.BLOCK_SIZE_MAX
        or block_size & (block_size - 1)
    ):
        raise _corrupt(path, f"block size {block_size} is not a power of two from 1 MiB to "
                       "256 MiB", base)  # fmt: skip
    if logical not in (512, 4096) or physical not in (512, 4096):
        raise _corrupt(path, f"sector sizes {logical}/{physical} are not 512 or 4096", base)
    if virtual_size % logical or virtual_size > L.MAX_VIRTUAL_SIZE:
        raise _corrupt(path, f"virtual size {virtual_size} is not a multiple of the {logical}-byte "
                       "sector or exceeds 64 TiB", base)  # fmt: skip
    has_parent = bool(pflags & L.PARAMS_HAS_PARENT)
    locator: dict[str, str] = {}
    if has_parent:
        loc = items.get(L.PARENT_LOCATOR_GUID)
        if loc is None:
            raise _corrupt(path, "a differencing disk without a parent locator", base)
        locator = _locator(path, _item(st, base, loc, loc.length), base + loc.offset)
    ratio = L.chunk_ratio(block_size, logical)
    count_bat = L.bat_entries(virtual_size, block_size, logical, parent=has_parent)
    if count_bat * 8 > bat.length:
        raise _corrupt(path, f"the BAT region ({bat.length} bytes) cannot hold its {count_bat} "
                       "entries", bat.file_offset)  # fmt: skip
    return VhdxMeta(
        header=header,
        header_index=header_index,
        bat_offset=bat.file_offset,
        bat_length=bat.length,
        metadata_offset=meta.file_offset,
        metadata_length=meta.length,
        block_size=block_size,
        leave_blocks_allocated=bool(pflags & L.PARAMS_LEAVE_BLOCKS_ALLOCATED),
        has_parent=has_parent,
        virtual_size=virtual_size,
        logical_sector=logical,
        physical_sector=physical,
        page83=page83,
        parent_locator=locator,
        regions=tuple(regions),
        bat_count=count_bat,
        chunk_ratio=ratio,
    )

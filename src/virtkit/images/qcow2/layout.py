"""qcow2 on-disk structures, described once and used both ways.

Each fixed-size structure is a table of ``(field, struct code)`` compiled into
one :class:`struct.Struct`; :func:`decode` and :func:`encode` share it, so
reading and writing cannot drift apart. The bit layouts of L1, L2 and refcount
entries live here too. Nothing in this module validates: it turns bytes into
plain records (and back). :mod:`.metadata` decides whether a record is sane.

Reference: QEMU ``docs/interop/qcow2.txt``.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import Any

import attrs

from virtkit.errors import CorruptImageError

__all__ = [
    "HEADER_V2",
    "HEADER_V3",
    "SNAPSHOT_ENTRY",
    "Header",
    "SnapshotEntry",
    "decode",
    "encode",
    "struct_read",
]

MAGIC = b"QFI\xfb"

# --- limits QEMU itself enforces (block/qcow2.h) ------------------------------
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_TABLE_BYTES = 64 * 1024 * 1024  # generous; QEMU bounds it the same way
MAX_SNAPSHOT_EXTRA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BACKING_NAME = 1023
MAX_VIRTUAL_SIZE = 1 << 61  # QCOW_MAX_SIZE-ish: 2 EiB, the L1 limit with 2 MiB clusters

# --- feature bits ---------------------------------------------------------------
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

# --- header extension types -----------------------------------------------------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# --- entry bit layouts ------------------------------------------------------------
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE
BITMAP_ALLOC_ALL = 0xFFFFFFFF
BITMAP_ZERO_ALL = 0xFFFFFFFF << 32
SUBCLUSTERS = 32
COMPRESSED_SECTOR = 512

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}


def struct_read(
    fmt: struct.Struct, data: bytes | bytearray | memoryview, offset: int, *, path: str, where: int
) -> tuple[Any, ...]:
    """The one chokepoint: unpack ``fmt`` from ``data`` or raise CorruptImageError.

    Args:
        fmt: the compiled structure.
        data: the buffer.
        offset: where in ``data`` the structure starts.
        path: the image file (for the error).
        where: file offset of ``data[offset]`` (for the error).
    """
    if offset < 0 or offset + fmt.size > len(data):
        raise CorruptImageError(
            f"structure of {fmt.size} bytes runs past the end of the data read "
            f"({len(data) - offset} bytes available)",
            path=path,
            offset=where,
        )
    try:
        return fmt.unpack_from(data, offset)
    except struct.error as exc:  # pragma: no cover - guarded above, kept as the chokepoint
        raise CorruptImageError(f"malformed structure: {exc}", path=path, offset=where) from exc


def _compile(fields: Sequence[tuple[str, str]]) -> tuple[struct.Struct, tuple[str, ...]]:
    code = ">" + "".join(c for _, c in fields)
    return struct.Struct(code), tuple(n for n, c in fields if not c.endswith("x"))


# --- the header -----------------------------------------------------------------
_HEADER_V2_FIELDS = (
    ("magic", "4s"),
    ("version", "I"),
    ("backing_file_offset", "Q"),
    ("backing_file_size", "I"),
    ("cluster_bits", "I"),
    ("size", "Q"),
    ("crypt_method", "I"),
    ("l1_size", "I"),
    ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"),
    ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"),
    ("snapshots_offset", "Q"),
)
_HEADER_V3_FIELDS = (
    *_HEADER_V2_FIELDS,
    ("incompatible_features", "Q"),
    ("compatible_features", "Q"),
    ("autoclear_features", "Q"),
    ("refcount_order", "I"),
    ("header_length", "I"),
)
HEADER_V2, HEADER_V2_NAMES = _compile(_HEADER_V2_FIELDS)
HEADER_V3, HEADER_V3_NAMES = _compile(_HEADER_V3_FIELDS)
assert HEADER_V2.size == 72
assert HEADER_V3.size == 104
COMPRESSION_TYPE_OFFSET = 104
#: The header length QEMU writes for v3 (compression_type byte + padding).
HEADER_V3_LENGTH = 112

# Byte offsets of fields that are rewritten in place.
OFF_SIZE = 24
OFF_L1 = 36  # l1_size (I) + l1_table_offset (Q)
OFF_REFTABLE = 48  # refcount_table_offset (Q) + refcount_table_clusters (I)
OFF_SNAPSHOTS = 60  # nb_snapshots (I) + snapshots_offset (Q)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88


@attrs.define
class Header:
    """The raw header record: every field as stored, nothing validated."""

    magic: bytes = MAGIC
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V3_LENGTH
    compression_type: int = 0
    #: Header bytes past the fields we know (v3 ``header_length`` > 112), kept verbatim.
    tail: bytes = b""


def decode_header(data: bytes, *, path: str) -> Header:
    """Decode the header at the start of ``data`` (at least 72 bytes for v2)."""
    v2 = struct_read(HEADER_V2, data, 0, path=path, where=0)
    fields = dict(zip(HEADER_V2_NAMES, v2, strict=True))
    hdr = Header(**fields)
    if hdr.version >= 3:
        v3 = struct_read(HEADER_V3, data, 0, path=path, where=0)
        hdr = Header(**dict(zip(HEADER_V3_NAMES, v3, strict=True)))
        if hdr.header_length > COMPRESSION_TYPE_OFFSET and len(data) > COMPRESSION_TYPE_OFFSET:
            hdr.compression_type = data[COMPRESSION_TYPE_OFFSET]
        if hdr.header_length > HEADER_V3_LENGTH:
            hdr.tail = bytes(data[HEADER_V3_LENGTH : hdr.header_length])
    else:
        hdr.refcount_order = 4
        hdr.header_length = HEADER_V2.size
    return hdr


def encode_header(hdr: Header) -> bytes:
    """Encode ``hdr`` (v2: 72 bytes; v3: ``header_length`` bytes)."""
    if hdr.version < 3:
        return HEADER_V2.pack(*(getattr(hdr, n) for n in HEADER_V2_NAMES))
    base = HEADER_V3.pack(*(getattr(hdr, n) for n in HEADER_V3_NAMES))
    extra = bytearray(max(0, hdr.header_length - HEADER_V3.size))
    if extra:
        extra[0] = hdr.compression_type
        if hdr.tail:
            extra[HEADER_V3_LENGTH - HEADER_V3.size :] = hdr.tail
    return base + bytes(extra)


# --- header extensions -------------------------------------------------------------
EXT_HEADER = struct.Struct(">II")
FEATURE_ENTRY = struct.Struct(">BB46s")
BITMAPS_EXT = struct.Struct(">IIQQ")
DATA_FILE_EXT_MAX = 4096


@attrs.define
class Extension:
    """One header extension: its type and raw payload (unknown ones are kept)."""

    type: int
    data: bytes


def encode_extensions(exts: Sequence[Extension]) -> bytes:
    """Encode extensions followed by the end marker, each padded to 8 bytes."""
    out = bytearray()
    for ext in exts:
        out += EXT_HEADER.pack(ext.type, len(ext.data)) + ext.data
        out += bytes(-len(out) % 8)
    out += EXT_HEADER.pack(EXT_END, 0)
    return bytes(out)


def default_feature_table() -> bytes:
    """The feature name table QEMU writes into every v3 image."""
    names = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ]
    return b"".join(FEATURE_ENTRY.pack(t, b, n.encode()) for t, b, n in names)


# --- snapshot table entries ----------------------------------------------------------
_SNAPSHOT_FIELDS = (
    ("l1_table_offset", "Q"),
    ("l1_size", "I"),
    ("id_str_size", "H"),
    ("name_size", "H"),
    ("date_sec", "I"),
    ("date_nsec", "I"),
    ("vm_clock_nsec", "Q"),
    ("vm_state_size", "I"),
    ("extra_data_size", "I"),
)
SNAPSHOT_ENTRY, SNAPSHOT_NAMES = _compile(_SNAPSHOT_FIELDS)
SNAPSHOT_EXTRA = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount


@attrs.define
class SnapshotEntry:
    """One snapshot table entry, decoded."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None = None
    #: Extra data past the fields we know, kept verbatim.
    extra_tail: bytes = b""

    def encode(self, *, version: int) -> bytes:
        """Encode this entry (with extra data, padded to 8 bytes)."""
        ident = self.id.encode()
        name = self.name.encode()
        icount = 0xFFFFFFFFFFFFFFFF if self.icount is None else self.icount
        extra = SNAPSHOT_EXTRA.pack(self.vm_state_size, self.disk_size or 0, icount) + bytes(
            self.extra_tail
        )
        fixed = SNAPSHOT_ENTRY.pack(
            self.l1_table_offset,
            self.l1_size,
            len(ident),
            len(name),
            self.date_sec,
            self.date_nsec,
            self.vm_clock_nsec,
            min(self.vm_state_size, 0xFFFFFFFF) if version < 3 else 0,
            len(extra),
        )
        out = fixed + extra + ident + name
        return out + bytes(-len(out) % 8)


# --- refcount blocks -------------------------------------------------------------------
_ARRAY_CODE = {16: "H", 32: "I", 64: "Q"}
for _bits, _code in _ARRAY_CODE.items():
    assert array(_code).itemsize * 8 == _bits
#: True when native byte order is not big-endian (arrays need a byteswap).
_SWAP = struct.pack("=H", 1) != struct.pack(">H", 1)


def _sub_byte_tables(bits: int) -> list[bytes]:
    per = 8 // bits
    mask = (1 << bits) - 1
    return [bytes((b >> (i * bits)) & mask for i in range(per)) for b in range(256)]


_SUB_TABLES: dict[int, list[bytes]] = {b: _sub_byte_tables(b) for b in (1, 2, 4)}


def decode_refblock(raw: bytes, bits: int) -> array[int]:
    """Decode a refcount block into an array of counts (any width 1..64)."""
    if bits == 8:
        return array("B", raw)
    if bits < 8:
        table = _SUB_TABLES[bits]
        return array("B", b"".join(map(table.__getitem__, raw)))
    out = array(_ARRAY_CODE[bits], raw)
    if _SWAP:
        out.byteswap()
    return out


def encode_refblock(
    values: array[int], bits: int, start: int = 0, stop: int | None = None
) -> bytes:
    """Encode ``values[start:stop]`` (sub-byte widths: ``start``/``stop`` byte aligned)."""
    part = values[start:stop]
    if bits == 8:
        return part.tobytes()
    if bits < 8:
        per = 8 // bits
        out = bytearray(len(part) // per)
        for shift in range(per):
            lane = part[shift::per]
            s = shift * bits
            for i, v in enumerate(lane):
                if v:
                    out[i] |= v << s
        return bytes(out)
    enc = array(part.typecode, part)
    if _SWAP:
        enc.byteswap()
    return enc.tobytes()


def new_refblock(entries: int, bits: int) -> array[int]:
    """An all-zero refcount block of ``entries`` counts."""
    code = "B" if bits <= 8 else _ARRAY_CODE[bits]
    return array(code, bytes(entries * array(code).itemsize))


# --- 64-bit big-endian tables (L1, L2, refcount table) ------------------------------------
def decode_u64_table(raw: bytes) -> array[int]:
    """Decode big-endian u64 entries into a native array."""
    out = array("Q", raw[: len(raw) - len(raw) % 8])
    if _SWAP:
        out.byteswap()
    return out


def encode_u64_table(values: array[int] | Sequence[int]) -> bytes:
    """Encode native u64 values as big-endian bytes."""
    out = array("Q", values)
    if _SWAP:
        out.byteswap()
    return out.tobytes()


def decode(fmt: struct.Struct, names: Sequence[str], data: bytes, *, path: str) -> dict[str, Any]:
    """Decode a fixed structure at the start of ``data`` into a field dict."""
    return dict(zip(names, struct_read(fmt, data, 0, path=path, where=0), strict=True))


def encode(fmt: struct.Struct, names: Sequence[str], values: dict[str, Any]) -> bytes:
    """Encode a field dict with the same table :func:`decode` used."""
    return fmt.pack(*(values[n] for n in names))

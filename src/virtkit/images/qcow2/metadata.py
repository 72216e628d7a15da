"""Validated qcow2 metadata: raw records from :mod:`.layout`, checked here.

:func:`load` reads the first cluster, decodes the header record, then checks
every field against the format's rules and QEMU's own limits before anything
uses it: alignment, placement inside the file and outside the header, table
sizes, feature bits (unknown incompatible ones are refused by name). Header
extensions are decoded with bounds checks; unknown ones are kept verbatim so
a rewritten header preserves them. Snapshot tables are parsed the same way.
"""

from __future__ import annotations

import attrs

from virtkit.errors import CorruptImageError, UnsupportedFeatureError
from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.layout import Extension, Header, SnapshotEntry
from virtkit.images.storage import Storage

__all__ = ["Metadata", "load", "read_snapshot_table"]


@attrs.define
class Metadata:
    """The checked header and extensions of one image."""

    header: Header
    extensions: list[Extension]
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    feature_names: dict[tuple[int, int], str]
    bitmaps: tuple[int, int, int] | None  # (count, directory size, directory offset)

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.header.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """Whether L2 entries carry subcluster bitmaps."""
        return bool(self.header.incompatible_features & layout.INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    def l1_entries_for(self, size: int) -> int:
        """L1 entries needed to map ``size`` guest bytes."""
        span = self.cluster_size * self.l2_entries
        return -(-size // span)


def _corrupt(msg: str, path: str, offset: int | None) -> CorruptImageError:
    return CorruptImageError(
        msg + "; the image is damaged or not a qcow2 file", path=path, offset=offset
    )


def check_table(
    path: str, what: str, offset: int, length: int, *, cs: int, file_size: int, where: int
) -> None:
    """Check that a table at ``offset`` of ``length`` bytes is aligned and inside the file."""
    if offset & (cs - 1):
        raise _corrupt(f"{what} offset {offset:#x} is not cluster aligned", path, where)
    if offset < cs:
        raise _corrupt(f"{what} at {offset:#x} overlaps the image header", path, where)
    if offset + length > file_size:
        raise _corrupt(
            f"{what} at {offset:#x} ({length} bytes) runs past the end of the file "
            f"({file_size} bytes)",
            path,
            where,
        )


def load(st: Storage) -> Metadata:
    """Read and validate the header and extensions of the image in ``st``.

    Raises:
        CorruptImageError: a field is out of range or inconsistent.
        UnsupportedFeatureError: a valid feature virtkit does not implement.
    """
    path = st.path
    file_size = st.size()
    head = st.pread(0, 4096)
    if len(head) < 4 or head[:4] != layout.MAGIC:
        raise CorruptImageError("not a qcow2 image (bad magic)", path=path, offset=0)
    if len(head) < layout.HEADER_V2.size:
        raise _corrupt("the file is shorter than a qcow2 header", path, 0)
    hdr = layout.decode_header(head, path=path)
    if hdr.version not in (2, 3):
        raise UnsupportedFeatureError(
            f"qcow2 version {hdr.version} is not supported (only 2 and 3)",
            feature=f"version {hdr.version}",
            path=path,
            offset=4,
        )
    if not layout.MIN_CLUSTER_BITS <= hdr.cluster_bits <= layout.MAX_CLUSTER_BITS:
        raise _corrupt(
            f"cluster_bits {hdr.cluster_bits} out of range (9..21: 512 B..2 MiB)", path, 20
        )
    cs = 1 << hdr.cluster_bits
    if cs > len(head):
        more = st.pread(len(head), cs - len(head))
        head += more
    if hdr.version == 3:
        if hdr.header_length < layout.HEADER_V3.size or hdr.header_length % 8:
            raise _corrupt(
                f"header_length {hdr.header_length} must be at least 104 and a multiple of 8",
                path,
                100,
            )
        if hdr.header_length > cs:
            raise _corrupt(f"header_length {hdr.header_length} exceeds the cluster", path, 100)
        if len(head) < hdr.header_length:
            raise _corrupt("the file is shorter than its header", path, 0)
        hdr = layout.decode_header(head, path=path)
    if hdr.refcount_order > 6:
        raise _corrupt(f"refcount_order {hdr.refcount_order} exceeds 6 (64 bits)", path, 96)
    feature_names: dict[tuple[int, int], str] = {}
    exts, backing_fmt, data_file, bitmaps = _read_extensions(head, hdr, path, feature_names)
    unknown = hdr.incompatible_features & ~layout.INCOMPAT_KNOWN
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        name = feature_names.get((0, bit), "unknown")
        raise UnsupportedFeatureError(
            f"incompatible feature bit {bit} ({name}) is set; virtkit cannot use this image",
            feature=f"incompatible bit {bit}" + (f" ({name})" if name != "unknown" else ""),
            path=path,
            offset=72,
        )
    if hdr.crypt_method:
        raise UnsupportedFeatureError(
            f"encrypted qcow2 images (crypt_method {hdr.crypt_method}) are not supported",
            feature="encryption",
            path=path,
            offset=32,
        )
    ext_l2 = bool(hdr.incompatible_features & layout.INCOMPAT_EXTL2)
    if ext_l2 and hdr.cluster_bits < 14:
        raise _corrupt("extended L2 entries need clusters of at least 16 KiB", path, 20)
    if hdr.incompatible_features & layout.INCOMPAT_COMPRESSION:
        if hdr.compression_type == 0:
            raise _corrupt("compression type bit set but compression_type is zlib", path, 104)
    elif hdr.compression_type != 0:
        raise _corrupt(
            f"compression_type {hdr.compression_type} without the compression type bit", path, 104
        )
    if hdr.compression_type not in layout.COMPRESSION_NAMES:
        raise UnsupportedFeatureError(
            f"compression type {hdr.compression_type} is not supported (zlib=0, zstd=1)",
            feature=f"compression type {hdr.compression_type}",
            path=path,
            offset=104,
        )
    if hdr.incompatible_features & layout.INCOMPAT_DATA_FILE and data_file is None:
        raise UnsupportedFeatureError(
            "the image uses an external data file but does not name it",
            feature="external data file",
            path=path,
            offset=72,
        )
    if hdr.size > layout.MAX_VIRTUAL_SIZE:
        raise _corrupt(f"virtual size {hdr.size} exceeds the format limit", path, 24)
    l2_entries = cs // (16 if ext_l2 else 8)
    need_l1 = -(-hdr.size // (cs * l2_entries))
    if hdr.l1_size * 8 > layout.MAX_L1_BYTES:
        raise _corrupt(f"l1_size {hdr.l1_size} exceeds QEMU's 32 MiB L1 limit", path, 36)
    if hdr.l1_size < need_l1:
        raise _corrupt(
            f"L1 table ({hdr.l1_size} entries) is too small for the virtual size "
            f"({need_l1} needed)",
            path,
            36,
        )
    if hdr.l1_size:
        check_table(
            path,
            "L1 table",
            hdr.l1_table_offset,
            hdr.l1_size * 8,
            cs=cs,
            file_size=file_size,
            where=40,
        )
    if hdr.refcount_table_clusters == 0:
        raise _corrupt("the refcount table is empty", path, 56)
    if hdr.refcount_table_clusters * cs > layout.MAX_REFTABLE_BYTES:
        raise _corrupt(
            f"refcount table ({hdr.refcount_table_clusters} clusters) exceeds QEMU's 8 MiB limit",
            path,
            56,
        )
    check_table(
        path,
        "refcount table",
        hdr.refcount_table_offset,
        hdr.refcount_table_clusters * cs,
        cs=cs,
        file_size=file_size,
        where=48,
    )
    if hdr.l1_size:
        l1_end = hdr.l1_table_offset + hdr.l1_size * 8
        rt_end = hdr.refcount_table_offset + hdr.refcount_table_clusters * cs
        if hdr.l1_table_offset < rt_end and hdr.refcount_table_offset < l1_end:
            raise _corrupt("the L1 table overlaps the refcount table", path, 40)
    if hdr.nb_snapshots > layout.MAX_SNAPSHOTS:
        raise _corrupt(f"{hdr.nb_snapshots} snapshots exceed QEMU's limit of 65536", path, 60)
    if hdr.nb_snapshots:
        check_table(
            path, "snapshot table", hdr.snapshots_offset, 40, cs=cs, file_size=file_size, where=64
        )
    backing = None
    if hdr.backing_file_offset:
        if hdr.backing_file_size > layout.MAX_BACKING_NAME or hdr.backing_file_size == 0:
            raise _corrupt(
                f"backing file name length {hdr.backing_file_size} is not 1..1023", path, 16
            )
        end = hdr.backing_file_offset + hdr.backing_file_size
        if hdr.backing_file_offset < hdr.header_length or end > cs or end > len(head):
            raise _corrupt("backing file name lies outside the first cluster", path, 8)
        raw = head[hdr.backing_file_offset : end]
        try:
            backing = raw.decode()
        except UnicodeDecodeError as exc:
            raise _corrupt("backing file name is not UTF-8", path, hdr.backing_file_offset) from exc
        if "\0" in backing:
            raise _corrupt("backing file name contains a NUL byte", path, hdr.backing_file_offset)
    if (
        data_file is not None
        and backing is not None
        and (hdr.autoclear_features & layout.AUTOCLEAR_DATA_FILE_RAW)
    ):
        raise _corrupt("a raw external data file cannot have a backing file", path, 88)
    return Metadata(
        header=hdr,
        extensions=exts,
        backing_file=backing,
        backing_format=backing_fmt,
        data_file=data_file,
        feature_names=feature_names,
        bitmaps=bitmaps,
    )


def _read_extensions(
    head: bytes, hdr: Header, path: str, names: dict[tuple[int, int], str]
) -> tuple[list[Extension], str | None, str | None, tuple[int, int, int] | None]:
    cs = 1 << hdr.cluster_bits
    pos = hdr.header_length
    end = hdr.backing_file_offset if hdr.backing_file_offset else cs
    end = min(end, cs, len(head))
    exts: list[Extension] = []
    backing_fmt = data_file = None
    bitmaps = None
    seen: set[int] = set()
    while pos + 8 <= end:
        etype, elen = layout.struct_read(layout.EXT_HEADER, head, pos, path=path, where=pos)
        if etype == layout.EXT_END:
            break
        data_start = pos + 8
        if elen > end - data_start:
            raise _corrupt(
                f"header extension {etype:#x} of {elen} bytes runs past the header area",
                path,
                pos,
            )
        data = bytes(head[data_start : data_start + elen])
        if etype in seen and etype != 0:
            raise _corrupt(f"header extension {etype:#x} appears twice", path, pos)
        seen.add(etype)
        if etype == layout.EXT_BACKING_FORMAT:
            backing_fmt = _ext_string(data, path, pos, "backing format")
        elif etype == layout.EXT_DATA_FILE:
            data_file = _ext_string(data, path, pos, "data file name")
        elif etype == layout.EXT_FEATURE_TABLE:
            for i in range(len(data) // layout.FEATURE_ENTRY.size):
                t, b, nm = layout.FEATURE_ENTRY.unpack_from(data, i * layout.FEATURE_ENTRY.size)
                names[(t, b)] = nm.rstrip(b"\0").decode(errors="replace")
        elif etype == layout.EXT_BITMAPS:
            if elen < layout.BITMAPS_EXT.size:
                raise _corrupt("bitmaps extension is too short", path, pos)
            nb, _res, dsize, doff = layout.BITMAPS_EXT.unpack_from(data, 0)
            bitmaps = (nb, dsize, doff)
        elif etype == layout.EXT_CRYPTO:
            raise UnsupportedFeatureError(
                "encrypted qcow2 images are not supported",
                feature="encryption",
                path=path,
                offset=pos,
            )
        exts.append(Extension(etype, data))
        pos = data_start + elen + (-elen % 8)
    return exts, backing_fmt, data_file, bitmaps


def _ext_string(data: bytes, path: str, pos: int, what: str) -> str:
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise _corrupt(f"{what} is not UTF-8", path, pos) from exc
    if "\0" in text:
        text = text.split("\0", 1)[0]
    return text


def read_snapshot_table(st: Storage, hdr: Header) -> tuple[list[SnapshotEntry], int]:
    """Parse the snapshot table; return the entries and the table's length in bytes.

    Raises:
        CorruptImageError: an entry is truncated, oversized or points outside the file.
    """
    path = st.path
    cs = 1 << hdr.cluster_bits
    file_size = st.size()
    if not hdr.nb_snapshots:
        return [], 0
    limit = min(layout.MAX_SNAPSHOTS_TABLE_BYTES, file_size - hdr.snapshots_offset)
    buf = b""
    pos = 0
    out: list[SnapshotEntry] = []

    def need(n: int) -> None:
        nonlocal buf
        if pos + n > limit:
            raise _corrupt(
                "snapshot table runs past the end of the file", path, hdr.snapshots_offset + pos
            )
        if pos + n > len(buf):
            want = max(pos + n - len(buf), 65536)
            want = min(want, limit - len(buf))
            buf += st.pread(hdr.snapshots_offset + len(buf), want)

    for _ in range(hdr.nb_snapshots):
        where = hdr.snapshots_offset + pos
        need(layout.SNAPSHOT_ENTRY.size)
        fields = dict(
            zip(
                layout.SNAPSHOT_NAMES,
                layout.struct_read(layout.SNAPSHOT_ENTRY, buf, pos, path=path, where=where),
                strict=True,
            )
        )
        pos += layout.SNAPSHOT_ENTRY.size
        extra_size = fields["extra_data_size"]
        if extra_size > layout.MAX_SNAPSHOT_EXTRA:
            raise _corrupt(f"snapshot extra data of {extra_size} bytes is too large", path, where)
        need(extra_size + fields["id_str_size"] + fields["name_size"])
        extra = buf[pos : pos + extra_size]
        pos += extra_size
        ident = buf[pos : pos + fields["id_str_size"]].decode(errors="replace")
        pos += fields["id_str_size"]
        name = buf[pos : pos + fields["name_size"]].decode(errors="replace")
        pos += fields["name_size"]
        pos += -pos % 8
        vm_state = fields["vm_state_size"]
        disk_size: int | None = None
        icount: int | None = None
        if len(extra) >= 8:
            vm_state = int.from_bytes(extra[0:8], "big")
        if len(extra) >= 16:
            disk_size = int.from_bytes(extra[8:16], "big")
        if len(extra) >= 24:
            ic = int.from_bytes(extra[16:24], "big")
            icount = None if ic == 0xFFFFFFFFFFFFFFFF else ic
        l1_size = fields["l1_size"]
        if l1_size * 8 > layout.MAX_L1_BYTES:
            raise _corrupt(f"snapshot {ident!r} L1 table is too large", path, where)
        if l1_size:
            check_table(
                path,
                f"snapshot {ident!r} L1 table",
                fields["l1_table_offset"],
                l1_size * 8,
                cs=cs,
                file_size=file_size,
                where=where,
            )
        if disk_size is not None and disk_size > layout.MAX_VIRTUAL_SIZE:
            raise _corrupt(f"snapshot {ident!r} disk size is out of range", path, where)
        out.append(
            SnapshotEntry(
                l1_table_offset=fields["l1_table_offset"],
                l1_size=l1_size,
                id=ident,
                name=name,
                date_sec=fields["date_sec"],
                date_nsec=fields["date_nsec"],
                vm_clock_nsec=fields["vm_clock_nsec"],
                vm_state_size=vm_state,
                disk_size=disk_size,
                icount=icount,
                extra_tail=bytes(extra[24:]),
            )
        )
    return out, pos

"""Create a new VHDX file (dynamic, fixed or differencing), as a Hyper-V host would read it.

The layout is the one QEMU's ``vhdx_create`` writes: the 1 MiB header
section (file identifier, two headers, two region tables), a 1 MiB log (empty,
log GUID null), the BAT, a 1 MiB metadata region, then payload blocks. The
skeleton is written to a temporary name and linked into place only when
complete, so a killed create leaves no half-made image under ``path``.
"""

from __future__ import annotations

import os
import secrets
import struct
import uuid
from typing import Any

from virtkit.errors import ConfigError, ImageError
from virtkit.images.qcow2 import chain
from virtkit.images.storage import FileStorage
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx import metadata
from virtkit.images.vhdx.image import VhdxImage, open_image

__all__ = ["create", "default_block_size"]

_SUBFORMATS = ("dynamic", "fixed")
_ITEMS_AT = 64 << 10  # metadata items start after the 64 KiB table


def default_block_size(size: int) -> int:
    """QEMU's choice of block size for a disk of ``size`` bytes."""
    if size > 32 << 40:
        return 64 * L.MiB
    if size > 100 << 30:
        return 32 * L.MiB
    if size > 1 << 30:
        return 16 * L.MiB
    return 8 * L.MiB


def _metadata_region(
    size: int, block_size: int, flags: int, locator: dict[str, str] | None
) -> bytes:
    items: list[tuple[bytes, bytes, int]] = [
        (L.FILE_PARAMS_GUID, struct.pack("<II", block_size, flags), L.META_IS_REQUIRED),
        (L.VIRTUAL_SIZE_GUID, struct.pack("<Q", size), 0x6),
        (L.PAGE83_GUID, uuid.uuid4().bytes_le, 0x6),
        (L.LOGICAL_SECTOR_GUID, struct.pack("<I", 512), 0x6),
        (L.PHYSICAL_SECTOR_GUID, struct.pack("<I", 4096), 0x6),
    ]
    if locator is not None:
        keys = bytearray()
        entries = []
        base = L.LOCATOR_HEADER.size + L.LOCATOR_ENTRY.size * len(locator)
        for key, value in locator.items():
            k, v = L.utf16(key), L.utf16(value)
            entries.append((base + len(keys), base + len(keys) + len(k), len(k), len(v)))
            keys += k + v
        blob = L.LOCATOR_HEADER.pack(L.PARENT_VHDX_GUID, 0, len(locator))
        blob += b"".join(L.LOCATOR_ENTRY.pack(*e) for e in entries) + bytes(keys)
        items.append((L.PARENT_LOCATOR_GUID, blob, L.META_IS_REQUIRED))
    region = bytearray(L.MiB)
    L.META_HEADER.pack_into(region, 0, L.METADATA_SIGNATURE, 0, len(items), bytes(20))
    at = _ITEMS_AT
    for i, (guid, data, iflags) in enumerate(items):
        L.META_ENTRY.pack_into(region, L.META_HEADER.size + 32 * i, guid, at, len(data), iflags, 0)
        region[at : at + len(data)] = data
        at += -(-len(data) // 8) * 8
    return bytes(region)


def _parent(path: str, backing: str, allow: tuple[str | os.PathLike[str], ...]) -> VhdxImage:
    real = chain.resolve(path, backing, allow, what="parent disk")
    return open_image(real, allow_backing=allow)


def create(
    path: str | os.PathLike[str],
    size: int | None,
    *,
    subformat: str | None = None,
    block_size: int | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    **unknown: Any,
) -> VhdxImage:
    """Create a VHDX image and return it open for writing.

    Args:
        path: the file to create; it must not exist.
        size: virtual size in bytes (a multiple of 512); with ``backing``, the
            parent's size when omitted.
        subformat: ``"dynamic"`` (default: blocks allocated as written) or
            ``"fixed"`` (every block allocated up front).
        block_size: payload block size, a power of two from 1 MiB to 256 MiB
            (default as QEMU: 8 MiB up to 1 GiB, then 16, 32, 64 MiB; a
            differencing disk takes its parent's).
        backing: a parent VHDX, making a differencing disk; stored in the
            parent locator as a relative Windows path.
        backing_format: must be ``"vhdx"`` (or None) with ``backing``.

    Raises:
        ConfigError: a bad option value.
        ImageError: the file exists or cannot be written.
    """
    path = os.fspath(path)
    for name, value in unknown.items():
        if value is not None:
            raise ConfigError(f"vhdx images have no option {name!r}", field=name)
    subformat = subformat or "dynamic"
    if subformat not in _SUBFORMATS:
        raise ConfigError(
            f"'subformat' must be dynamic or fixed for vhdx (got {subformat!r})", field="subformat"
        )
    parent: VhdxImage | None = None
    locator: dict[str, str] | None = None
    if backing is not None:
        if backing_format not in (None, "vhdx"):
            raise ConfigError(
                f"a VHDX differencing disk needs a vhdx parent (got {backing_format!r})",
                field="backing_format",
            )
        if subformat == "fixed":
            raise ConfigError("a fixed VHDX cannot have a parent", field="subformat")
        parent = _parent(path, backing, allow_backing)
        guid = "{" + str(uuid.UUID(bytes_le=parent.meta.header.data_write_guid)).upper() + "}"
        rel = backing.replace("/", "\\")
        locator = {"parent_linkage": guid, "relative_path": rel if os.path.isabs(backing)
                   else ".\\" + rel}  # fmt: skip
        if size is None:
            size = parent.virtual_size
        if block_size is None:
            block_size = parent.meta.block_size
        parent.close()
    if size is None:
        raise ConfigError("a vhdx image needs a size", field="size")
    if size < 0 or size % 512 or size > L.MAX_VIRTUAL_SIZE:
        raise ConfigError(
            f"'size' must be a multiple of 512 bytes up to 64 TiB for vhdx (got {size})",
            field="size",
            value=size,
        )
    bs = default_block_size(size) if block_size is None else block_size
    if not isinstance(bs, int) or bs < L.BLOCK_SIZE_MIN or bs > L.BLOCK_SIZE_MAX or bs & (bs - 1):
        raise ConfigError(
            f"'block_size' must be a power of two from 1 MiB to 256 MiB (got {bs!r})",
            field="block_size",
            value=bs,
        )
    if os.path.lexists(path):
        raise ImageError("file already exists", path=path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.virtkit-{secrets.token_hex(4)}.tmp")
    st = FileStorage(tmp, writable=True, create=True)
    try:
        _write_skeleton(st, size, bs, subformat, locator)
        st.flush()
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise ImageError("file already exists", path=path) from exc
        except OSError as exc:
            raise ImageError(f"cannot create: {exc.strerror}", path=path) from exc
        os.unlink(tmp)
        st.path = path
        return VhdxImage(st, metadata.load(st), writable=True, allow_backing=allow_backing)
    except BaseException:
        st.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_skeleton(
    st: FileStorage, size: int, bs: int, subformat: str, locator: dict[str, str] | None
) -> None:
    count = L.bat_entries(size, bs, 512, parent=locator is not None)
    bat_len = max(-(-count * 8 // L.MiB), 1) * L.MiB
    log_off, bat_off = L.MiB, 2 * L.MiB
    meta_off = bat_off + bat_len
    data_off = meta_off + L.MiB
    file_id = bytearray(64 << 10)
    file_id[:8] = L.FILE_ID_SIGNATURE
    creator = L.utf16("virtkit")
    file_id[8 : 8 + len(creator)] = creator
    st.pwrite(0, file_id)
    file_guid, data_guid = uuid.uuid4().bytes_le, uuid.uuid4().bytes_le
    for seq, offset in ((0, L.HEADER1_OFFSET), (1, L.HEADER2_OFFSET)):
        hdr = L.Header(L.HEADER_SIGNATURE, 0, seq, file_guid, data_guid, L.NULL_GUID, 0, 1,
                       L.MiB, log_off)  # fmt: skip
        st.pwrite(offset, hdr.pack())
    table = L.pack_region_table([
        L.RegionEntry(L.BAT_GUID, bat_off, bat_len, L.REGION_REQUIRED),
        L.RegionEntry(L.METADATA_GUID, meta_off, L.MiB, L.REGION_REQUIRED),
    ])  # fmt: skip
    st.pwrite(L.REGION1_OFFSET, table)
    st.pwrite(L.REGION2_OFFSET, table)
    flags = L.PARAMS_HAS_PARENT if locator is not None else 0
    if subformat == "fixed":
        flags |= L.PARAMS_LEAVE_BLOCKS_ALLOCATED
    st.pwrite(meta_off, _metadata_region(size, bs, flags, locator))
    blocks = -(-size // bs)
    end = data_off
    if subformat == "fixed":
        ratio = L.chunk_ratio(bs, 512)
        batch = bytearray()
        for block in range(blocks):
            if block and block % ratio == 0:
                batch += bytes(8)  # the interleaved sector bitmap entry
            batch += struct.pack("<Q", L.bat_entry(L.PAYLOAD_FULLY_PRESENT, data_off + block * bs))
            if len(batch) >= L.MiB:
                st.pwrite(bat_off + (block + 1 + block // ratio) * 8 - len(batch), batch)
                batch = bytearray()
        if batch:
            st.pwrite(bat_off + count * 8 - len(batch), batch)
        end = data_off + blocks * bs
    st.truncate(end)

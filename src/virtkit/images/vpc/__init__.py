"""VHD / VPC (Virtual PC, Hyper-V, Azure) images: fixed and dynamic read, fixed write.

Module map (the shape of :mod:`virtkit.images.qcow2`):

- :mod:`.layout`: the footer and dynamic header, described once; QEMU's size rules;
- :mod:`.image`: :class:`VpcImage`, the access layer.

``open`` reads fixed and dynamic disks as QEMU 7.2 does (differencing disks
are refused: QEMU would read them without their parent). ``create`` writes a
fixed disk (``subformat="fixed"``), sized by CHS geometry as ``qemu-img
create -f vpc`` does, or exactly (``force_size=True``: the footer's
``current_size``, creator ``qem2``), which is what Azure wants for a disk
whose size is a whole number of MiB.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from array import array
from collections.abc import Iterable
from typing import Any

from virtkit.errors import ConfigError, CorruptImageError, UnsupportedFeatureError, VirtkitError
from virtkit.images.storage import FileStorage
from virtkit.images.vpc import layout
from virtkit.images.vpc.image import VpcImage

__all__ = ["VpcImage", "create", "open"]


def _load(st: FileStorage, path: str, writable: bool) -> VpcImage:
    file_size = st.size()
    raw = st.pread(0, layout.SECTOR)
    dynamic = raw[:8] == layout.COOKIE
    if not dynamic:
        if file_size < layout.SECTOR:
            raise CorruptImageError("file too small for a VHD footer", path=path)
        raw = st.pread(file_size - layout.SECTOR, layout.SECTOR)
        if raw[:8] != layout.COOKIE:
            raise CorruptImageError("invalid VPC image (no conectix footer)", path=path)
    footer = layout.Footer.unpack(raw)
    # QEMU only warns about a bad footer checksum; so do we (by reading on).
    sectors = layout.virtual_sectors(footer)
    if sectors > layout.MAX_SECTORS:
        raise CorruptImageError(
            f"disk of {sectors} sectors is larger than VHD's 2040 GiB", path=path
        )
    size = sectors * layout.SECTOR
    if not dynamic:
        if writable and size > file_size - layout.SECTOR:
            raise UnsupportedFeatureError(
                f"the footer says {size} bytes but the data area holds "
                f"{file_size - layout.SECTOR}; open read-only",
                feature="vpc (write)",
                path=path,
            )
        return VpcImage(st, footer, size, writable=writable)
    if footer.type == layout.TYPE_DIFFERENCING:
        raise UnsupportedFeatureError(
            "differencing VHDs are not supported (QEMU reads them without their parent)",
            feature="vpc differencing",
            path=path,
        )
    if writable:
        raise UnsupportedFeatureError(
            "virtkit writes only fixed VHDs; convert a dynamic VHD to qcow2 to modify it",
            feature="vpc dynamic (write)",
            path=path,
        )
    if footer.data_offset > file_size - layout.DYN_HEADER.size:
        raise CorruptImageError(
            f"dynamic header offset {footer.data_offset} is past the end of the file", path=path
        )
    dyn = layout.DynamicHeader.unpack(st.pread(footer.data_offset, layout.DYN_HEADER.size))
    if dyn.cookie != layout.DYN_COOKIE:
        raise CorruptImageError(
            "invalid dynamic VHD image (no cxsparse header)", path=path, offset=footer.data_offset
        )
    bs = dyn.block_size
    if bs < layout.SECTOR or bs & (bs - 1) or bs > 1 << 30:
        raise CorruptImageError(f"invalid block size {bs}", path=path)
    if size // bs > 0xFFFFFFFF:
        raise CorruptImageError("too many blocks", path=path)
    entries = dyn.max_table_entries
    if entries * bs < size:
        raise CorruptImageError(
            f"block table too small ({entries} entries of {bs} bytes for {size} bytes)", path=path
        )
    if dyn.table_offset + entries * 4 > file_size:
        raise CorruptImageError(
            f"block table ({entries} entries at {dyn.table_offset}) runs past the end of the file",
            path=path,
            offset=dyn.table_offset,
        )
    bat = array("I", st.pread(dyn.table_offset, entries * 4))
    if array("I", [1]).tobytes() == b"\x01\0\0\0":
        bat.byteswap()
    return VpcImage(st, footer, size, writable=False, bat=bat, block_size=bs)


def open(  # noqa: A001 - the driver protocol's name
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    allow_backing: Iterable[str | os.PathLike[str]] = (),
    force_share: bool = False,
) -> VpcImage:
    """Open a VHD (fixed: read/write; dynamic: read-only).

    Raises:
        ImageError: the file cannot be opened.
        CorruptImageError: the footer, header or block table is damaged.
        UnsupportedFeatureError: a differencing disk, or writing a dynamic one.
    """
    path = os.fspath(path)
    st = FileStorage(path, writable=writable, force_share=force_share)
    try:
        return _load(st, path, writable)
    except VirtkitError:
        st.close()
        raise
    except (struct.error, IndexError, OverflowError, ValueError, MemoryError) as exc:
        st.close()
        raise CorruptImageError(
            f"malformed VHD metadata ({type(exc).__name__}: {exc})", path=path
        ) from exc
    except BaseException:
        st.close()
        raise


def fixed_size(size: int, force_size: bool) -> tuple[int, tuple[int, int, int], bytes]:
    """Data bytes, (cyls, heads, secs) and creator app of a new fixed disk, as qemu-img."""
    if force_size:
        total = size
        chs = (65535, 16, 255)
        creator = b"qem2"
    else:
        want = min(layout.MAX_GEOMETRY, size // layout.SECTOR)
        chs = (0, 0, 0)
        i = 0
        while want > chs[0] * chs[1] * chs[2]:
            chs = layout.geometry(want + i)
            i += 1
        cyls, heads, secs = chs
        total = size if cyls * heads * secs == layout.MAX_GEOMETRY else cyls * heads * secs * 512
        creator = b"qemu"
    if total // layout.SECTOR > layout.MAX_SECTORS:
        raise ConfigError("a VHD can be at most 2040 GiB", field="size", value=size)
    return total, chs, creator


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> VpcImage:
    """Create a fixed VHD and return it open for writing.

    Args:
        path: the file to create; it must not exist.
        size: virtual size in bytes. Without ``force_size`` it is rounded up to
            the next CHS geometry, as ``qemu-img create -f vpc`` does.
        options: ``subformat`` (``"fixed"``; ``"dynamic"`` is not written),
            ``force_size`` (True: keep ``size`` exactly, as Azure needs, with
            the maximum geometry and creator ``qem2``).

    Raises:
        ConfigError: missing size, a size not a multiple of 512, or a bad option.
        UnsupportedFeatureError: ``subformat="dynamic"``.
        ImageError: the file exists or cannot be written.
    """
    if size is None:
        raise ConfigError("a VHD needs a size", field="size")
    sub = options.pop("subformat", None) or "fixed"
    force = options.pop("force_size", None) or False
    for name, value in options.items():
        if value is not None:
            raise ConfigError(f"vpc images have no option {name!r}", field=name)
    if sub not in ("fixed", "dynamic"):
        raise ConfigError(
            f"'subformat' must be 'fixed' or 'dynamic' (got {sub!r})", field="subformat"
        )
    if sub == "dynamic":
        raise UnsupportedFeatureError(
            "virtkit writes only fixed VHDs (subformat='fixed')", feature="vpc dynamic (write)"
        )
    if not isinstance(force, bool):
        raise ConfigError(f"'force_size' must be True or False (got {force!r})", field="force_size")
    if size == 0:  # the lone footer would sit at offset 0, where readers expect a dynamic disk
        raise ConfigError("cannot create an empty (0-byte) fixed VHD", field="size", value=0)
    if size % layout.SECTOR:
        raise ConfigError(
            f"a VHD's size must be a multiple of 512 bytes (got {size})", field="size", value=size
        )
    total, (cyls, heads, secs), creator = fixed_size(size, force)
    footer = layout.Footer(
        cookie=layout.COOKIE,
        features=2,
        version=0x00010000,
        data_offset=0xFFFFFFFFFFFFFFFF,
        timestamp=max(0, int(time.time()) - layout.EPOCH) & 0xFFFFFFFF,
        creator_app=creator,
        creator_major=5,
        creator_minor=3,
        creator_os=b"Wi2k",
        orig_size=total,
        current_size=total,
        cyls=cyls,
        heads=heads,
        secs_per_cyl=secs,
        type=layout.TYPE_FIXED,
        checksum=0,
        uuid=secrets.token_bytes(16),
    )
    st = FileStorage(path, writable=True, create=True)
    try:
        st.truncate(total)
        st.pwrite(total, footer.pack())
        return VpcImage(st, footer, total, writable=True)
    except BaseException:
        st.close()
        os.unlink(st.path)
        raise

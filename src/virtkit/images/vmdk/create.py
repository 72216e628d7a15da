"""Writing streamOptimized VMDK: the format VMware, OVA appliances and clouds import.

A stream-optimized extent is written front to back in one pass, as VMware's
own tools do: the header (with the grain directory "at the end") and the
descriptor, then every non-zero grain deflate-compressed behind a grain
marker, each grain table behind a GT marker once its grains are written, the
grain directory behind a GD marker, a footer (the header again, now with the
directory's offset) and the end-of-stream marker. Memory holds one grain
table and the directory (4 bytes per 32 MiB of disk), whatever the size.
QEMU reads such a file through its footer (``vmdk_open_vmdk4``).
"""

from __future__ import annotations

import os
import secrets
import zlib
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from virtkit.errors import ConfigError, ImageError, UnsupportedFeatureError
from virtkit.images.args import check_choice
from virtkit.images.base import Image
from virtkit.images.storage import FileStorage
from virtkit.images.vmdk import descriptor, layout

__all__ = ["SUBFORMATS", "write_stream"]

#: qemu-img's VMDK subformats; virtkit writes only streamOptimized.
SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
GRANULARITY = 128  # sectors: 64 KiB grains, as qemu-img and VMware
GTES = 512
_DESC_SECTORS = 20
_GRAIN_OFFSET = 128  # sectors: first grain at 64 KiB
_READ = 2 << 20
_ZERO = bytes(GRANULARITY * layout.SECTOR)

Progress = Callable[[int, int], None]


def check_options(options: dict[str, Any]) -> dict[str, str]:
    """Validate VMDK create options; return subformat/adapter_type/hwversion/toolsversion.

    Raises:
        ConfigError: an unknown option or value.
        UnsupportedFeatureError: a subformat virtkit does not write.
    """
    known = {"subformat", "adapter_type", "hwversion", "toolsversion"}
    for name, value in options.items():
        if name not in known:
            raise ConfigError(
                f"unknown vmdk option {name!r}; known: {', '.join(sorted(known))}", field=name
            )
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"'{name}' must be a str (got {value!r})", field=name, value=value)
    sub = options.get("subformat") or "streamOptimized"
    check_choice(sub, SUBFORMATS, "subformat")
    if sub != "streamOptimized":
        raise UnsupportedFeatureError(
            f"virtkit writes VMDK only as streamOptimized (got subformat {sub!r}); "
            "use qemu-img for other subformats",
            feature=f"vmdk subformat {sub}",
        )
    adapter = options.get("adapter_type") or "ide"
    check_choice(adapter, ADAPTERS, "adapter_type")
    hw = options.get("hwversion") or "4"
    tools = options.get("toolsversion") or "2147483647"
    for name, value in (("hwversion", hw), ("toolsversion", tools)):
        if not value.isdigit() or len(value) > 10:
            raise ConfigError(f"'{name}' must be a number (got {value!r})", field=name, value=value)
    return {"subformat": sub, "adapter_type": adapter, "hwversion": hw, "toolsversion": tools}


class _Stream:
    """Sequential writer with a running file position (sector-aligned appends)."""

    def __init__(self, st: FileStorage) -> None:
        self.st = st
        self.pos = 0

    def append(self, data: bytes) -> int:
        """Write ``data`` padded to a whole sector; return its sector number."""
        sector = self.pos // layout.SECTOR
        pad = -len(data) % layout.SECTOR
        self.st.pwrite(self.pos, data + bytes(pad) if pad else data)
        self.pos += len(data) + pad
        return sector


def write_stream(
    src: Image,
    path: str,
    name: str,
    *,
    progress: Progress | None = None,
    **options: Any,
) -> None:
    """Write ``src`` (its chain flattened) as a new streamOptimized VMDK at ``path``.

    Args:
        src: the image to copy.
        path: the file to create (it must not exist).
        name: the file name recorded in the descriptor's extent line (the
            final name when ``path`` is a temporary one).
        progress: ``progress(done, total)`` as the copy advances.
        options: ``subformat`` (``"streamOptimized"``), ``adapter_type``
            (``ide``, ``lsilogic``, ``buslogic``, ``legacyESX``), ``hwversion``,
            ``toolsversion``.

    Raises:
        ConfigError: a bad option.
        ImageError: reading or writing failed.
    """
    opts = check_options(options)
    size = src.virtual_size
    sectors = -(-size // layout.SECTOR)
    if sectors == 0:  # capacity 0 means "descriptor only" to readers: nobody could open it
        raise ConfigError("cannot write an empty (0-byte) disk as VMDK", field="size", value=0)
    grain = GRANULARITY * layout.SECTOR
    span = grain * GTES
    gd = array("I", bytes(4 * (-(-sectors // (GRANULARITY * GTES)))))
    desc = descriptor.render(
        cid=secrets.randbits(32) & 0xFFFFFFFE,
        create_type="streamOptimized",
        extent_lines=[f'RW {sectors} SPARSE "{os.path.basename(name)}"'],
        sectors=sectors,
        adapter_type=opts["adapter_type"],
        hwversion=opts["hwversion"],
        toolsversion=opts["toolsversion"],
    )
    if len(desc) > _DESC_SECTORS * layout.SECTOR:  # pragma: no cover - bounded options
        raise ImageError("descriptor too long", path=path)
    header = layout.SparseHeader(
        magic=layout.MAGIC,
        version=3,
        flags=layout.FLAG_NL_DETECT | layout.FLAG_COMPRESSED | layout.FLAG_MARKERS,
        capacity=sectors,
        granularity=GRANULARITY,
        desc_offset=1,
        desc_size=_DESC_SECTORS,
        num_gtes_per_gt=GTES,
        rgd_offset=0,
        gd_offset=layout.GD_AT_END,
        grain_offset=_GRAIN_OFFSET,
        compress_algorithm=layout.COMPRESSION_DEFLATE,
    )
    st = FileStorage(path, writable=True, create=True)
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        out = _Stream(st)
        out.append(header.pack())
        out.append(desc)
        out.pos = _GRAIN_OFFSET * layout.SECTOR
        table = array("I", bytes(4 * GTES))
        table_no = 0

        def close_tables(upto: int) -> None:
            nonlocal table, table_no
            while table_no < upto:
                if any(table):
                    out.append(layout.marker_sector(GTES * 4 // layout.SECTOR, layout.MARKER_GT))
                    gd[table_no] = out.append(_le(table))
                    table = array("I", bytes(4 * GTES))
                table_no += 1

        if progress is not None:
            progress(0, size)
        written = 0  # grains below this offset are done (extents can share a grain)
        for ext in src.block_status(0, size, include_backing=True):
            end = ext.start + ext.length
            if ext.kind != "data" or end <= written:
                continue
            pos = max(ext.start // grain * grain, written)
            while pos < end:
                stop = min(pos + _READ, -(-end // grain) * grain, size)
                data = src.read(pos, stop - pos)
                grains = [
                    (pos + at, data[at : at + grain].ljust(grain, b"\0"))
                    for at in range(0, len(data), grain)
                    if data[at : at + grain] != _ZERO[: min(grain, len(data) - at)]
                ]
                # zlib releases the GIL: the grains of a chunk compress on every core
                for (lba, _), packed in zip(grains, pool.map(_deflate, grains), strict=True):
                    close_tables(lba // span)
                    marker = layout.GRAIN_MARKER.pack(lba // layout.SECTOR, len(packed))
                    table[(lba // grain) % GTES] = out.append(marker + packed)
                pos = written = stop
                if progress is not None:
                    progress(min(pos, size), size)
        close_tables(len(gd))
        out.append(layout.marker_sector(-(-len(gd) * 4 // layout.SECTOR), layout.MARKER_GD))
        gd_sector = out.append(_le(gd))
        footer = attrs.evolve(header, gd_offset=gd_sector)
        out.append(layout.marker_sector(1, layout.MARKER_FOOTER))
        out.append(footer.pack())
        out.append(layout.marker_sector(0, layout.MARKER_EOS))
        st.flush()
        if progress is not None:
            progress(size, size)
    finally:
        pool.shutdown(cancel_futures=True)
        st.close()


def _deflate(item: tuple[int, bytes]) -> bytes:
    return zlib.compress(item[1], 6)


def _le(values: array[int]) -> bytes:
    if array("I", [1]).tobytes() != b"\x01\0\0\0":  # pragma: no cover - big-endian hosts
        values = array("I", values)
        values.byteswap()
    return values.tobytes()

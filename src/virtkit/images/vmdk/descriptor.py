"""The VMDK text descriptor: parsed as QEMU 7.2 reads it, and written for new images.

A descriptor is a small text file (or a block inside a sparse extent) such as::

    # Disk DescriptorFile
    version=1
    CID=fffffffe
    parentCID=ffffffff
    createType="twoGbMaxExtentSparse"
    RW 4194304 SPARSE "disk-s001.vmdk"
    RW 2048 FLAT "disk-flat.vmdk" 0

QEMU's rules (``vmdk_parse_extents``, ``vmdk_open_desc_file``) are kept
because they decide the disk's size: only ``RW`` extent lines count
(``RDONLY``/``NOACCESS`` lines and unknown types such as ``ZERO`` are
skipped), an extent of zero or fewer sectors is skipped, a ``FLAT`` line
needs an offset, ``VMFS`` must not have one. The text is untrusted: it is
read up to 1 MiB (QEMU's bound), the extent count and total size are bounded,
and file names are checked by the caller before any file is opened.
"""

from __future__ import annotations

import re

import attrs

from virtkit.errors import CorruptImageError, UnsupportedFeatureError

__all__ = ["Descriptor", "ExtentLine", "MAX_DESCRIPTOR", "MAX_EXTENTS", "parse", "render"]

#: Largest descriptor read (QEMU reads at most 1 MiB - 1).
MAX_DESCRIPTOR = (1 << 20) - 1
#: Most extents virtkit opens for one image (each is an open file).
MAX_EXTENTS = 1024
#: Largest virtual disk (bytes) a descriptor may describe: the largest file offset.
MAX_DISK = (1 << 63) - 1

#: createType values QEMU opens as a separate descriptor file.
DESCRIPTOR_TYPES = frozenset(
    {"monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
     "twoGbMaxExtentFlat"}
)  # fmt: skip
_KNOWN_TYPES = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})

# sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %" SCNd64, ...)
_EXTENT = re.compile(
    rb"[ \t]*(\S{1,10})[ \t]+([+-]?\d+)[ \t]+(\S{1,10})[ \t]+\"([^\n\r\"]{1,511})\""
    rb"(?:[ \t]+([+-]?\d+))?"
)


@attrs.frozen
class ExtentLine:
    """One extent line that QEMU would use: access ``RW``, a known type, sectors > 0."""

    sectors: int
    type: str
    filename: str
    offset: int  # sectors into the file (FLAT/VMFS); 0 otherwise


@attrs.frozen
class Descriptor:
    """The fields of a descriptor virtkit uses."""

    create_type: str | None
    cid: int
    parent_cid: int
    parent_hint: str | None
    extents: tuple[ExtentLine, ...]


def _text(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw[:MAX_DESCRIPTOR] if end < 0 else raw[: min(end, MAX_DESCRIPTOR)]


def _quoted(text: bytes, key: bytes) -> str | None:
    """QEMU's ``vmdk_parse_description``: the first ``key`` anywhere, then skip ``="``."""
    pos = text.find(key)
    if pos < 0:
        return None
    start = pos + len(key) + 2
    end = text.find(b'"', start)
    if start > len(text) or end < 0:
        return None
    return text[start:end].decode("utf-8", "replace")


def _cid(text: bytes, key: bytes) -> int:
    """QEMU's ``vmdk_read_cid``: hex after ``key=``; 0xffffffff when absent or unreadable."""
    pos = text.find(key)
    if pos < 0:
        return 0xFFFFFFFF
    m = re.match(rb"[ \t\n\r]*(?:0[xX])?([0-9a-fA-F]+)", text[pos + len(key) + 1 :])
    return int(m.group(1)[-8:], 16) if m else 0xFFFFFFFF


def parse(raw: bytes, *, path: str, extents: bool) -> Descriptor:
    """Parse descriptor text (up to its first NUL byte).

    Args:
        raw: the descriptor bytes.
        path: the file, for error messages.
        extents: parse extent lines too (a separate descriptor file); an
            embedded descriptor's extent line names the file itself.

    Raises:
        CorruptImageError: a malformed extent line or an absurd size.
        UnsupportedFeatureError: too many extents.
    """
    text = _text(raw)
    parent_hint = None
    pos = text.find(b"parentFileNameHint")
    if pos >= 0:
        end = text.find(b'"', pos + len(b"parentFileNameHint") + 2)
        if end < 0:
            raise CorruptImageError("parentFileNameHint has no closing quote", path=path)
        parent_hint = text[pos + len(b"parentFileNameHint") + 2 : end].decode("utf-8", "replace")
        if len(parent_hint) > 4095:
            raise CorruptImageError("parentFileNameHint is longer than 4095 bytes", path=path)
    lines: list[ExtentLine] = []
    if extents:
        total = 0
        for line in text.split(b"\n"):
            m = _EXTENT.match(line)
            if m is None or m.group(1) != b"RW":
                continue
            kind = m.group(3).decode("ascii", "replace")
            sectors = int(m.group(2))
            flat_offset = None if m.group(5) is None else int(m.group(5))
            bad = CorruptImageError(
                f"invalid extent line {line[:120].decode('utf-8', 'replace')!r}", path=path
            )
            if kind == "FLAT":
                if flat_offset is None or flat_offset < 0:
                    raise bad
            elif kind == "VMFS":
                if flat_offset is not None:
                    raise bad
                flat_offset = 0
            elif flat_offset is not None:
                raise bad
            if sectors <= 0 or kind not in _KNOWN_TYPES:
                continue
            total += sectors
            if total * 512 > MAX_DISK or (flat_offset is not None and flat_offset * 512 > MAX_DISK):
                raise CorruptImageError(f"extents add up to more than {MAX_DISK} bytes", path=path)
            if len(lines) >= MAX_EXTENTS:
                raise UnsupportedFeatureError(
                    f"more than {MAX_EXTENTS} extents", feature="vmdk extents", path=path
                )
            name = m.group(4).decode("utf-8", "surrogateescape")
            lines.append(ExtentLine(sectors, kind, name, flat_offset or 0))
    return Descriptor(
        create_type=_quoted(text, b"createType"),
        cid=_cid(text, b"CID"),
        parent_cid=_cid(text, b"parentCID"),
        parent_hint=parent_hint,
        extents=tuple(lines),
    )


def render(
    *,
    cid: int,
    create_type: str,
    extent_lines: list[str],
    sectors: int,
    adapter_type: str = "ide",
    hwversion: str = "4",
    toolsversion: str = "2147483647",
    parent_cid: int = 0xFFFFFFFF,
) -> bytes:
    """Write a descriptor as qemu-img does (same fields, same order)."""
    heads = 16 if adapter_type == "ide" else 255
    cylinders = sectors // (63 * heads)
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        f"parentCID={parent_cid:08x}\n"
        f'createType="{create_type}"\n'
        "\n"
        "# Extent description\n" + "".join(f"{line}\n" for line in extent_lines) + "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hwversion}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.toolsVersion = "{toolsversion}"\n'
    )
    return text.encode()

"""Format probing as qemu-img 7.2 does it: every driver scores the first 512 bytes.

QEMU's ``find_image_format`` (``block.c``) reads the first
``BLOCK_PROBE_BUF_SIZE`` (512) bytes of a file, zero-padded past its end,
and asks each driver's ``bdrv_probe`` for a score; the highest score wins and
raw, which scores 1 for anything, is the fallback. An empty file is raw
without probing. The scores and tests below follow each driver's ``*_probe``
function in QEMU 7.2's ``block/*.c``:

========== ===== ============================================================
format     score test
========== ===== ============================================================
qcow2      100   ``QFI\\xfb`` magic, big-endian version >= 2 (``qcow2.c``)
qcow       100   ``QFI\\xfb`` magic, version 1 (``qcow.c``)
vmdk       100   ``KDMV`` or ``COWD`` magic, or a text descriptor whose first
                 line that is not a comment or blank is ``version=1|2|3``
vdi        100   signature ``0xbeda107f`` (little-endian) at offset 64
vhdx       100   ``vhdxfile`` at offset 0
vpc        100   ``conectix`` at offset 0 (a dynamic VHD; a fixed VHD keeps its
                 footer only at the end and probes as raw, as in QEMU)
qed        100   ``QED\\0`` magic
parallels  100   ``WithoutFreeSpace`` or ``WithouFreSpacExt``, version 2
bochs      100   ``Bochs Virtual HD Image`` / ``Redolog`` / ``Growing``,
                 version 1.0 or 2.0
luks       100   ``LUKS\\xba\\xbe`` magic with header version 1 (``crypto.c``)
dmg        2     a file name ending in ``.dmg`` (content is not examined)
cloop      2     the cloop 2.0 shell-script preamble
raw        1     anything
========== ===== ============================================================

Ties keep the first format in the table order above (only dmg and cloop can tie:
qemu-img picks dmg).
"""

from __future__ import annotations

import builtins
import os
import struct
from collections.abc import Callable

from virtkit.errors import ConfigError, ImageError
from virtkit.images.args import check_path

__all__ = [
    "PROBE_SIZE",
    "PROBED_FORMATS",
    "check_declared_format",
    "format_for_name",
    "probe_bytes",
    "probe_file",
]

#: Bytes QEMU reads for probing (``BLOCK_PROBE_BUF_SIZE``).
PROBE_SIZE = 512

_VMDK_VERSIONS = tuple(f"version={v}{eol}".encode() for v in "123" for eol in ("\n", "\r\n"))
_CLOOP_V2 = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


#: The format a new image gets from its file name when none is given. The raw names are
#: ``virtkit.Disk``'s (``.raw``/``.img``/``.iso``/``.bin``), so a library call, the CLI
#: (which always creates raw, as qemu-img) and a ``Disk`` agree on such a file.
_NAME_FORMATS = {
    ".raw": "raw",
    ".img": "raw",
    ".iso": "raw",
    ".bin": "raw",
    ".vmdk": "vmdk",
    ".vhd": "vpc",
    ".vhdx": "vhdx",
    ".vdi": "vdi",
}


def format_for_name(path: str | os.PathLike[str]) -> str:
    """The format a new image at ``path`` is created in when the caller names none.

    ``.raw``, ``.img``, ``.iso`` and ``.bin`` are raw (as ``virtkit.Disk``
    infers them); ``.vmdk``, ``.vhd``, ``.vhdx`` and ``.vdi`` their formats;
    anything else qcow2. Only for files being created: an existing file's
    format is probed (:func:`probe_file`), never taken from its name.

    >>> from virtkit.images.probe import format_for_name
    >>> format_for_name("disk.img"), format_for_name("azure.vhd"), format_for_name("vm")
    ('raw', 'vpc', 'qcow2')
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    return _NAME_FORMATS.get(suffix, "qcow2")


def _cstr(field: bytes) -> bytes:
    """A fixed-size C char array up to its NUL (strcmp semantics; no NUL: the whole field)."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _qcow2(buf: bytes, name: str) -> int:
    return 100 if buf[:4] == b"QFI\xfb" and struct.unpack_from(">I", buf, 4)[0] >= 2 else 0


def _qcow(buf: bytes, name: str) -> int:
    return 100 if buf[:4] == b"QFI\xfb" and struct.unpack_from(">I", buf, 4)[0] == 1 else 0


def _vmdk(buf: bytes, name: str) -> int:
    if buf[:4] in (b"KDMV", b"COWD"):
        return 100
    # A text descriptor: comments and blank lines may come before "version=N".
    pos, end = 0, len(buf)
    while pos < end:
        ch = buf[pos : pos + 1]
        if ch == b"#":
            nl = buf.find(b"\n", pos)
            pos = end if nl < 0 else nl + 1
            continue
        if ch == b" ":
            while pos < end and buf[pos : pos + 1] == b" ":
                pos += 1
            if pos < end and buf[pos : pos + 1] == b"\r":
                pos += 1
            if pos == end or buf[pos : pos + 1] != b"\n":
                return 0
            pos += 1
            continue
        return 100 if any(buf.startswith(v, pos) for v in _VMDK_VERSIONS) else 0
    return 0


def _vdi(buf: bytes, name: str) -> int:
    return 100 if struct.unpack_from("<I", buf, 64)[0] == 0xBEDA107F else 0


def _vhdx(buf: bytes, name: str) -> int:
    return 100 if buf[:8] == b"vhdxfile" else 0


def _vpc(buf: bytes, name: str) -> int:
    return 100 if buf[:8] == b"conectix" else 0


def _qed(buf: bytes, name: str) -> int:
    return 100 if buf[:4] == b"QED\0" else 0


def _parallels(buf: bytes, name: str) -> int:
    magic_ok = buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt")
    return 100 if magic_ok and struct.unpack_from("<I", buf, 16)[0] == 2 else 0


def _bochs(buf: bytes, name: str) -> int:
    if (
        _cstr(buf[0:32]) == b"Bochs Virtual HD Image"
        and _cstr(buf[32:48]) == b"Redolog"
        and _cstr(buf[48:64]) == b"Growing"
        and struct.unpack_from("<I", buf, 64)[0] in (0x00010000, 0x00020000)
    ):
        return 100
    return 0


def _luks(buf: bytes, name: str) -> int:
    return 100 if buf[:6] == b"LUKS\xba\xbe" and struct.unpack_from(">H", buf, 6)[0] == 1 else 0


def _cloop(buf: bytes, name: str) -> int:
    return 2 if buf.startswith(_CLOOP_V2) else 0


def _dmg(buf: bytes, name: str) -> int:
    return 2 if len(name) > 4 and name.endswith(".dmg") else 0


_PROBES: tuple[tuple[str, Callable[[bytes, str], int]], ...] = (
    ("qcow2", _qcow2),
    ("qcow", _qcow),
    ("vmdk", _vmdk),
    ("vdi", _vdi),
    ("vhdx", _vhdx),
    ("vpc", _vpc),
    ("qed", _qed),
    ("parallels", _parallels),
    ("bochs", _bochs),
    ("luks", _luks),
    ("dmg", _dmg),  # before cloop: qemu-img picks dmg for a ".dmg" file with cloop's preamble
    ("cloop", _cloop),
)

#: Every format probing can answer, raw included.
PROBED_FORMATS: tuple[str, ...] = (*(name for name, _ in _PROBES), "raw")


def probe_bytes(head: bytes, filename: str = "") -> str:
    """Return the format qemu-img would pick for a file starting with ``head``.

    Args:
        head: the file's first bytes (only the first 512 are looked at; shorter
            input is zero-padded as QEMU's read past the end of a file is).
        filename: the file's name (the dmg driver probes by name only).
    """
    if not head:
        return "raw"
    buf = bytes(head[:PROBE_SIZE]).ljust(PROBE_SIZE, b"\0")
    best, best_score = "raw", 1
    for name, probe in _PROBES:
        score = probe(buf, filename)
        if score > best_score:
            best, best_score = name, score
    return best


def probe_file(path: str | os.PathLike[str]) -> str:
    """Probe the file at ``path`` (see :func:`probe_bytes`).

    Raises:
        ConfigError: ``path`` is not a file path.
        ImageError: the file cannot be read.
    """
    path = check_path(path)
    try:
        with builtins.open(path, "rb") as fh:
            head = fh.read(PROBE_SIZE)
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror}", path=path) from exc
    return probe_bytes(head, path)


def check_declared_format(path: str | os.PathLike[str], declared: str, field: str) -> None:
    """Refuse an existing image whose probed format is not the ``declared`` one.

    A VM's disk is handed to QEMU with its declared format, which
    ``virtkit.Disk`` infers from the file name when it is not given (a
    ``.img`` cloud image is often qcow2): a qcow2 image declared raw would
    show the guest qcow2's metadata as its disk, and the guest's writes
    would destroy the image. So the file is probed as qemu-img would, and a
    different answer is an error naming the field and the format found.
    A raw disk whose guest wrote a LUKS header at its start (``cryptsetup
    luksFormat`` of a whole disk) probes as ``luks``; that stays raw.

    Raises:
        ConfigError: the file probes as another format.
        ImageError: the file cannot be read.
    """
    found = probe_file(path)
    if found == declared or (declared == "raw" and found == "luks"):
        return
    if found in ("qcow2", "raw"):
        fix = f"set format={found!r}"
    else:
        fix = (
            f"convert it to qcow2 first (virtkit.images.convert({os.fspath(path)!r}, "
            "'disk.qcow2')): VM disks are qcow2 or raw"
        )
    raise ConfigError(
        f"'{field}' is {declared!r} but the image {os.fspath(path)} is {found} (probed as "
        f"qemu-img does; a disk's format is inferred from its name when omitted, .raw/.img/"
        f".iso/.bin meaning raw): {fix}; the guest would otherwise see the file's "
        f"{found} structure as its disk and could destroy it",
        field=field,
        value=declared,
    )

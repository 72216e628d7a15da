"""A differencing VHDX that virtkit did not write: qemu-img's layout, a parent locator packed here.

qemu-img 7.2 neither creates nor opens differencing VHDX files, and virtkit's
own writer and reader could share a misreading of MS-VHDX. So this child is
made by qemu-img as a dynamic VHDX (``block_state_zero=off``: unwritten blocks
are NOT_PRESENT), written by qemu-io, and then turned into a differencing disk
by packing MS-VHDX 2.6.2.6's parent locator in this file, from the spec's
offsets and GUIDs and without virtkit's layout module: the ``HasParent`` file
parameter, a metadata table entry, the locator header and its key/value
entries (``parent_linkage``, ``relative_path``) in UTF-16LE. The expected disk
is qemu-img's reading of the parent with the child's present blocks over it.
"""

from __future__ import annotations

import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_helpers import qemu_io, qemu_raw

import virtkit

Run = Callable[..., subprocess.CompletedProcess[str]]
KiB, MiB = 1 << 10, 1 << 20

# MS-VHDX 1.00: region and metadata item GUIDs, stored little-endian (bytes_le).
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
PARENT_LOCATOR_ITEM = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913").bytes_le
HAS_PARENT = 0x2
IS_VIRTUAL_DISK, IS_REQUIRED = 0x2, 0x4


def _data_write_guid(path: Path) -> str:
    """The current header's DataWriteGuid as the locator writes it: ``{XXXXXXXX-...}``."""
    data = path.read_bytes()[: 192 * KiB]
    best: tuple[int, bytes] | None = None
    for at in (64 * KiB, 128 * KiB):  # the two headers: "head", crc, sequence, 3 GUIDs
        sig, _crc, seq, _file_guid, data_guid = struct.unpack_from("<4sIQ16s16s", data, at)
        if sig == b"head" and (best is None or seq > best[0]):
            best = (seq, data_guid)
    assert best is not None
    return "{" + str(uuid.UUID(bytes_le=best[1])).upper() + "}"


def _locator(entries: dict[str, str]) -> bytes:
    """MS-VHDX 2.6.2.6: header (type GUID, reserved, count), 12-byte entries, UTF-16LE strings."""
    head = struct.pack("<16sHH", VHDX_LOCATOR_TYPE, 0, len(entries))
    at = len(head) + 12 * len(entries)
    table, blob = b"", b""
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        table += struct.pack("<IIHH", at + len(blob), at + len(blob) + len(k), len(k), len(v))
        blob += k + v
    return head + table + blob


def _make_differencing(child: Path, parent_name: str, linkage: str) -> None:
    """Turn the dynamic VHDX ``child`` into a differencing disk of ``parent_name``."""
    data = bytearray(child.read_bytes())
    # region table at 192 KiB: "regi", crc, count, reserved; 32-byte entries
    sig, _crc, count, _ = struct.unpack_from("<4sIII", data, 192 * KiB)
    assert sig == b"regi"
    meta_off = None
    for i in range(count):
        guid, off, length, _req = struct.unpack_from("<16sQII", data, 192 * KiB + 16 + 32 * i)
        if guid == METADATA_REGION:
            meta_off, meta_len = off, length
    assert meta_off is not None
    # metadata table: "metadata", reserved, entry count, 20 reserved; 32-byte entries
    sig, _res, n = struct.unpack_from("<8sHH", data, meta_off)
    assert sig == b"metadata"
    end = 64 * KiB
    for i in range(n):
        at = meta_off + 32 + 32 * i
        item, off, length, _flags = struct.unpack_from("<16sIII", data, at)
        end = max(end, off + length)
        if item == FILE_PARAMETERS:
            block_size, flags = struct.unpack_from("<II", data, meta_off + off)
            struct.pack_into("<II", data, meta_off + off, block_size, flags | HAS_PARENT)
    blob = _locator({"parent_linkage": linkage, "relative_path": parent_name})
    item_off = -(-end // 8) * 8
    assert item_off + len(blob) <= meta_len
    data[meta_off + item_off : meta_off + item_off + len(blob)] = blob
    struct.pack_into(
        "<16sIIII", data, meta_off + 32 + 32 * n, PARENT_LOCATOR_ITEM, item_off, len(blob),
        IS_VIRTUAL_DISK | IS_REQUIRED, 0,
    )  # fmt: skip
    struct.pack_into("<H", data, meta_off + 10, n + 1)
    child.write_bytes(bytes(data))


def test_hand_made_child_reads_over_its_parent(tmp_path: Path, qemu_img: Run) -> None:
    """virtkit reads the child's present blocks and the parent's elsewhere; convert flattens."""
    parent = tmp_path / "base.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", parent, "12M")
    qemu_io(parent, "write -P 0x11 0 3M", "write -P 0x22 10M 1M", fmt="vhdx")
    want = bytearray(qemu_raw(qemu_img, parent, tmp_path / "base.raw"))
    child = tmp_path / "child.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M,block_state_zero=off", child, "12M")
    # a whole block, and 512 bytes in block 1: QEMU makes block 1 present (zeroes elsewhere),
    # which in a differencing disk hides the parent's 0x11 there
    qemu_io(child, "write -P 0x33 4M 1M", f"write -P 0x44 {MiB + 4096} 512", fmt="vhdx")
    want[4 * MiB : 5 * MiB] = b"\x33" * MiB
    want[MiB : 2 * MiB] = bytes(MiB)
    want[MiB + 4096 : MiB + 4608] = b"\x44" * 512
    _make_differencing(child, ".\\base.vhdx", _data_write_guid(parent))

    proc = qemu_img("info", "-f", "vhdx", child, check=False)
    assert proc.returncode != 0  # qemu-img 7.2 itself cannot open a differencing VHDX
    with virtkit.images.open(child) as img:
        assert img.backing_file == ".\\base.vhdx"
        assert img.virtual_size == 12 * MiB
        assert img.read(0, img.virtual_size) == want
        own = [(e.start, e.length) for e in img.block_status(include_backing=False)
               if e.kind == "data"]  # fmt: skip
        assert own == [(MiB, MiB), (4 * MiB, MiB)]
    virtkit.images.convert(child, tmp_path / "flat.raw", format="raw")
    assert (tmp_path / "flat.raw").read_bytes() == want
    virtkit.images.convert(child, tmp_path / "flat.qcow2")
    assert qemu_img("compare", "-F", "qcow2", tmp_path / "flat.raw", tmp_path / "flat.qcow2")


def test_hand_made_child_with_wrong_linkage_is_refused(tmp_path: Path, qemu_img: Run) -> None:
    """A locator whose parent_linkage is not the parent's DataWriteGuid is refused, not read."""
    parent = tmp_path / "base.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", parent, "4M")
    child = tmp_path / "child.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M,block_state_zero=off", child, "4M")
    _make_differencing(child, ".\\base.vhdx", "{" + str(uuid.uuid4()).upper() + "}")
    with pytest.raises(virtkit.ImageError, match="modified"):
        virtkit.images.open(child)

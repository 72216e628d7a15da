"""Format probing matches qemu-img 7.2, and open() never shows a recognised format as raw."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit.images import probe

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20

#: qemu-img create arguments for every format it can create, keyed by the expected probe.
CREATED: dict[str, list[str]] = {
    "qcow2": ["-f", "qcow2"],
    "qcow": ["-f", "qcow"],
    "vmdk": ["-f", "vmdk"],
    "vdi": ["-f", "vdi"],
    "vhdx": ["-f", "vhdx"],
    "vpc": ["-f", "vpc"],
    "qed": ["-f", "qed"],
    "parallels": ["-f", "parallels"],
    "luks": [
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "luks",
        "-o",
        "key-secret=s0,iter-time=10",
    ],
    "raw": ["-f", "raw"],
}


def _create(qemu_img: Run, fmt: str, path: Path) -> None:
    """qemu-img create a 1 MiB image of ``fmt``.

    qemu-img's LUKS key-slot timing fails now and then on a loaded machine ("Unable to get
    accurate CPU usage": its first timing read no CPU time), so that one error is retried.
    """
    for _ in range(5):
        proc = qemu_img("create", *CREATED[fmt], path, "1M", check=False)
        if proc.returncode == 0 or "accurate CPU usage" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr


def _qemu_format(qemu_img: Run, path: Path) -> str | None:
    """The format qemu-img probes for ``path`` (None when the probed driver cannot open it)."""
    proc = qemu_img("info", "--output=json", "-U", path, check=False)
    if proc.returncode != 0:
        return None
    fmt: str = json.loads(proc.stdout)["format"]
    return fmt


def _bochs_header() -> bytes:
    head = bytearray(512)
    head[0:23] = b"Bochs Virtual HD Image\0"
    head[32:40] = b"Redolog\0"
    head[48:56] = b"Growing\0"
    struct.pack_into("<II", head, 64, 0x00020000, 512)
    struct.pack_into("<IIIQ", head, 72, 16, 512, 4096, 16 * 4096)  # catalog, bitmap, extent, size
    return bytes(head)


#: Hand-made heads for formats qemu-img reads but cannot create: (name, bytes, expected).
CRAFTED: list[tuple[str, bytes, str]] = [
    ("bochs", _bochs_header(), "bochs"),
    ("bochs_v1", _bochs_header()[:64] + struct.pack("<I", 0x00010000), "bochs"),
    ("bochs_bad_version", _bochs_header()[:64] + struct.pack("<I", 3), "raw"),
    (
        "cloop",
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 "
        b"/dev/cloop $1\n" + bytes(64),
        "cloop",
    ),
    ("cloop_prefix_only", b"#!/bin/sh\n#V2.0 Format\n", "raw"),
    ("vmdk_text", b"# Disk DescriptorFile\nversion=1\nCID=1\n", "vmdk"),
    ("vmdk_text_crlf", b'# c\r\n  \r\nversion=3\r\ncreateType="x"\r\n', "vmdk"),
    ("vmdk_text_blank_lines", b"#a\n   \n \nversion=2\n", "vmdk"),
    ("vmdk_text_empty_line", b"#a\n\nversion=2\n", "raw"),  # QEMU allows only ' ' lines
    ("vmdk_text_version_4", b"# Disk DescriptorFile\nversion=4\n", "raw"),
    ("vmdk_text_leading_tab", b"\tversion=1\n", "raw"),
    ("vmdk_text_space_then_text", b"  x\nversion=1\n", "raw"),
    ("cowd", b"COWD" + bytes(60), "vmdk"),
    ("qcow2_magic_version_0", b"QFI\xfb" + bytes(60), "raw"),
    ("qcow2_magic_version_7", b"QFI\xfb\0\0\0\x07" + bytes(56), "qcow2"),
    ("luks_v2", b"LUKS\xba\xbe\0\x02" + bytes(56), "raw"),
    ("parallels_v1", b"WithoutFreeSpace" + struct.pack("<I", 1) + bytes(44), "raw"),
    ("parallels_ext", b"WithouFreSpacExt" + struct.pack("<I", 2) + bytes(44), "parallels"),
    ("vdi_signature", bytes(64) + struct.pack("<I", 0xBEDA107F), "vdi"),
    ("vhdx_magic", b"vhdxfile" + bytes(56), "vhdx"),
    ("qed_magic", b"QED\0" + bytes(60), "qed"),
    ("zeros", bytes(4096), "raw"),
    ("one_byte", b"#", "raw"),
]


class TestProbeAgainstQemuImg:
    """probe_format() names what qemu-img 7.2 names, for every format it probes."""

    @pytest.mark.parametrize("fmt", sorted(CREATED))
    def test_created_images(self, fmt: str, qemu_img: Run, tmp_path: Path) -> None:
        """An image qemu-img created probes as its format, as qemu-img info says."""
        path = tmp_path / "disk.img"
        _create(qemu_img, fmt, path)
        assert _qemu_format(qemu_img, path) == fmt
        assert virtkit.images.probe_format(path) == fmt

    def test_fixed_vhd_probes_as_raw(self, qemu_img: Run, tmp_path: Path) -> None:
        """A fixed VHD keeps its footer at the end only: qemu-img probes it as raw, so do we."""
        path = tmp_path / "fixed.vhd"
        qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", path, "1M")
        assert _qemu_format(qemu_img, path) == "raw"
        assert virtkit.images.probe_format(path) == "raw"

    def test_empty_file_is_raw(self, qemu_img: Run, tmp_path: Path) -> None:
        """An empty file is raw without probing (even named .dmg)."""
        path = tmp_path / "empty.dmg"
        path.write_bytes(b"")
        assert _qemu_format(qemu_img, path) == "raw"
        assert virtkit.images.probe_format(path) == "raw"

    @pytest.mark.parametrize("case", CRAFTED, ids=[c[0] for c in CRAFTED])
    def test_crafted_heads(
        self, case: tuple[str, bytes, str], qemu_img: Run, tmp_path: Path
    ) -> None:
        """Hand-made heads probe as expected, and qemu-img agrees.

        qemu-img opens what it probes; a driver other than raw may refuse a
        hand-made image, but raw never does: so a failed open means qemu-img
        probed a non-raw format too.
        """
        _, head, expected = case
        path = tmp_path / "disk.img"
        path.write_bytes(head + bytes(-len(head) % 512 if len(head) > 1 else 0))
        assert probe.probe_bytes(path.read_bytes()[:512], str(path)) == expected
        assert virtkit.images.probe_format(path) == expected
        theirs = _qemu_format(qemu_img, path)
        if theirs is None:
            assert expected != "raw"
        else:
            assert theirs == expected

    def test_dmg_is_probed_by_name(self, qemu_img: Run, tmp_path: Path) -> None:
        """QEMU's dmg driver probes the file name only: zeros named .dmg are not raw."""
        named = tmp_path / "disk.dmg"
        named.write_bytes(bytes(MiB))
        other = tmp_path / "disk.img"
        other.write_bytes(bytes(MiB))
        assert virtkit.images.probe_format(named) == "dmg"
        assert _qemu_format(qemu_img, named) is None  # dmg claims it, then cannot open it
        assert virtkit.images.probe_format(other) == "raw"
        cloop = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
        named.write_bytes(cloop + bytes(MiB))  # a tie at score 2: qemu-img picks dmg
        assert virtkit.images.probe_format(named) == "dmg"
        proc = qemu_img("info", named, check=False)
        assert proc.returncode and "UDIF" in proc.stderr

    def test_mutated_heads_agree(self, qemu_img: Run, tmp_path: Path) -> None:
        """Single-byte mutations of real heads probe the same way qemu-img probes them."""
        heads = []
        for fmt in ("qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "qed", "parallels"):
            path = tmp_path / f"seed.{fmt}"
            _create(qemu_img, fmt, path)
            heads.append(path.read_bytes()[:512])
        heads += [case[1].ljust(512, b"\0") for case in CRAFTED if len(case[1]) > 1]
        rng = random.Random(11)
        for i in range(40):
            head = bytearray(rng.choice(heads))
            pos = rng.randrange(72)
            head[pos] = rng.choice([0, 0xFF, head[pos] ^ (1 << rng.randrange(8))])
            path = tmp_path / f"m{i}.img"
            path.write_bytes(bytes(head) + bytes(MiB - 512))
            ours = virtkit.images.probe_format(path)
            theirs = _qemu_format(qemu_img, path)
            assert ours == theirs if theirs is not None else ours != "raw", (bytes(head[:80]), ours)


class TestOpenRefusesUnreadableFormats:
    """A recognised format virtkit cannot read is an UnsupportedFeatureError, never raw."""

    @pytest.mark.parametrize("fmt", ["qcow", "qed", "parallels", "luks"])
    def test_open_names_the_format(self, fmt: str, qemu_img: Run, tmp_path: Path) -> None:
        """open() and convert() refuse with the format's name; format='raw' still gives raw."""
        path = tmp_path / "disk.img"
        _create(qemu_img, fmt, path)
        with pytest.raises(virtkit.UnsupportedFeatureError, match=f"in {fmt} format"):
            virtkit.images.open(path)
        with pytest.raises(virtkit.UnsupportedFeatureError, match=fmt):
            virtkit.images.convert(path, tmp_path / "out.qcow2")
        assert not (tmp_path / "out.qcow2").exists()
        with virtkit.images.open(path, format="raw") as img:
            assert img.format == "raw"
            assert img.virtual_size == path.stat().st_size

    def test_vmdk_is_no_longer_read_as_raw(self, qemu_img: Run, tmp_path: Path) -> None:
        """The issue's report: a 64 MiB VMDK converted as raw gave 64 KiB; now it gives 64 MiB."""
        path = tmp_path / "disk.vmdk"
        qemu_img("create", "-f", "vmdk", path, "64M")
        virtkit.images.convert(path, tmp_path / "out.qcow2")
        with virtkit.images.open(tmp_path / "out.qcow2") as img:
            assert img.virtual_size == 64 * MiB

    def test_probe_bytes_only_looks_at_512_bytes(self) -> None:
        """QEMU probes 512 bytes: a marker past them does not count."""
        assert probe.probe_bytes(bytes(512) + b"conectix") == "raw"
        assert probe.probe_bytes(b"conectix") == "vpc"
        assert probe.probe_bytes(b"") == "raw"
        assert set(probe.PROBED_FORMATS) >= {"qcow2", "vmdk", "vpc", "dmg", "cloop", "raw"}

"""VMDK: native read of every subformat qemu-img writes, and streamOptimized write, both
checked against qemu-img 7.2 (bytes, info, map, compare, check)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import virtkit
from virtkit.images.vmdk import descriptor, layout

Run = Callable[..., subprocess.CompletedProcess[str]]
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "streamOptimized",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
]


def _qemu_io(path: Path, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True, timeout=120)


def _pattern_raw(path: Path, size: int) -> Path:
    """A sparse raw disk of ``size`` bytes with data in odd places (partial grains, the end)."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    _qemu_io(
        path,
        "raw",
        "write -P 0x11 0 4k",
        "write -P 0x22 70k 3k",
        "write -P 0x33 1M 200k",
        f"write -P 0x44 {size // 2 - 512} 1k",
        f"write -P 0x55 {size - 1536} 1536",
    )
    return path


def _qemu_map(qemu_img: Run, path: Path, *fmt: str) -> list[tuple[int, int, str]]:
    """qemu-img map as merged (start, length, "data"/"zero") runs."""
    runs: list[tuple[int, int, str]] = []
    for e in json.loads(qemu_img("map", "--output=json", "-U", *fmt, path).stdout):
        kind = "zero" if e["zero"] else "data"
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], kind)
        else:
            runs.append((e["start"], e["length"], kind))
    return runs


def _our_map(img: virtkit.images.Image) -> list[tuple[int, int, str]]:
    runs: list[tuple[int, int, str]] = []
    for e in img.block_status():
        kind = "data" if e.kind == "data" else "zero"
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], runs[-1][1] + e.length, kind)
        else:
            runs.append((e.start, e.length, kind))
    return runs


def _info(qemu_img: Run, path: Path | str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    return out


def _same_raw(qemu_img: Run, image: Path, tmp: Path) -> None:
    """virtkit's convert to raw gives the bytes qemu-img convert -O raw gives."""
    theirs, ours = tmp / "theirs.raw", tmp / "ours.raw"
    qemu_img("convert", "-O", "raw", image, theirs)
    virtkit.images.convert(image, ours, format="raw")
    assert ours.stat().st_size == theirs.stat().st_size
    if theirs.stat().st_size <= 64 * MiB:
        assert ours.read_bytes() == theirs.read_bytes()
    else:
        qemu_img("compare", "-f", "raw", "-F", "raw", theirs, ours)


class TestReadMatrix:
    """Every qemu-img VMDK subformat reads exactly as qemu-img reads it."""

    @pytest.mark.parametrize("sub", SUBFORMATS)
    @pytest.mark.parametrize("size", [3 * MiB + 7 * 512, 8 * MiB])
    def test_subformat(self, sub: str, size: int, qemu_img: Run, tmp_path: Path) -> None:
        """Bytes, info() (qemu-img's keys and values) and block status match qemu-img."""
        src = _pattern_raw(tmp_path / "src.raw", size)
        image = tmp_path / "disk.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", src, image)
        assert virtkit.images.probe_format(image) == "vmdk"
        _same_raw(qemu_img, image, tmp_path)
        cwd = os.getcwd()
        os.chdir(tmp_path)  # same relative path for both tools, so filenames compare equal
        try:
            theirs = _info(qemu_img, "disk.vmdk")
            with virtkit.images.open("disk.vmdk") as img:
                ours = img.info().to_json()
                assert _our_map(img) == _qemu_map(qemu_img, Path("disk.vmdk"))
                assert img.read(0, 4096) == b"\x11" * 4096
                assert img.check().ok
        finally:
            os.chdir(cwd)
        theirs.pop("actual-size")
        ours.pop("actual-size")
        assert ours == theirs
        assert list(ours["format-specific"]["data"]) == list(theirs["format-specific"]["data"])

    @pytest.mark.parametrize("sub", SUBFORMATS)
    def test_libvmdk_agrees(self, sub: str, qemu_img: Run, tmp_path: Path) -> None:
        """libyal's libvmdk, a second reader written from VMware's spec, reads what we read."""
        src = _pattern_raw(tmp_path / "src.raw", 3 * MiB + 7 * 512)
        image = tmp_path / "disk.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", src, image)
        with virtkit.images.open(image) as img:
            ours = hashlib.sha256(img.read(0, img.virtual_size)).hexdigest()
            assert _libyal("pyvmdk", image) == (img.virtual_size, ours)

    @pytest.mark.parametrize("sub", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
    def test_two_gb_extents(self, sub: str, qemu_img: Run, tmp_path: Path) -> None:
        """A disk past 2 GiB spans several extent files; data across the boundary reads right."""
        image = tmp_path / "big.vmdk"
        qemu_img("create", "-f", "vmdk", "-o", f"subformat={sub}", image, f"{2 * GiB + 3 * MiB}")
        _qemu_io(image, "vmdk", f"write -P 0x6b {2 * GiB - 100 * KiB} 300k", "write -P 1 0 512")
        with virtkit.images.open(image) as img:
            extents = img.info().format_specific["extents"]
            assert len(extents) == 2
            assert img.read(2 * GiB - 100 * KiB, 300 * KiB) == b"\x6b" * (300 * KiB)
            assert img.read(2 * GiB + 200 * KiB, 512) == bytes(512)
            assert _our_map(img) == _qemu_map(qemu_img, image)
        _same_raw(qemu_img, image, tmp_path)

    def test_stream_with_gd_at_end(self, qemu_img: Run, tmp_path: Path) -> None:
        """A true stream (GD after the grains, header in the footer) written by virtkit reads back."""
        src = _pattern_raw(tmp_path / "src.raw", 5 * MiB)
        image = tmp_path / "s.vmdk"
        virtkit.images.convert(src, image, format="vmdk")
        head = layout.SparseHeader.unpack(image.read_bytes()[:512])
        assert head.gd_offset == layout.GD_AT_END
        _same_raw(qemu_img, image, tmp_path)


class TestParents:
    """parentFileNameHint parents are backing files, within the backing allow policy."""

    def _chain(self, qemu_img: Run, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        base = folder / "base.vmdk"
        qemu_img("create", "-f", "vmdk", base, "4M")
        _qemu_io(base, "vmdk", "write -P 0xb0 0 1M", "write -P 0xb1 3M 64k")
        mid = folder / "mid.vmdk"
        qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", mid)
        _qemu_io(mid, "vmdk", "write -P 0xc0 512k 4k")
        top = folder / "top.vmdk"
        qemu_img("create", "-f", "vmdk", "-b", "mid.vmdk", "-F", "vmdk", top)
        _qemu_io(top, "vmdk", "write -P 0xd0 1M 8k", "write -z 3M 4k")
        return top

    def test_chain_reads_like_qemu(self, qemu_img: Run, tmp_path: Path) -> None:
        """A three-level chain flattens to qemu-img's bytes; info names the parent."""
        top = self._chain(qemu_img, tmp_path / "c")
        _same_raw(qemu_img, top, tmp_path)
        with virtkit.images.open(top) as img:
            info = img.info()
            assert img.backing_file == "mid.vmdk"
            assert info.backing_format == "vmdk"
            assert (
                info.format_specific["parent-cid"]
                == _info(qemu_img, top.parent / "mid.vmdk")["format-specific"]["data"]["cid"]
            )
            statuses = list(img.block_status(0, 1 * MiB, include_backing=True))
            assert any(e.from_backing for e in statuses)
            assert all(
                e.kind == "unallocated"
                for e in img.block_status(0, 512 * KiB, include_backing=False)
            )

    def test_zeroed_grains_hide_the_parent(self, qemu_img: Run, tmp_path: Path) -> None:
        """With zeroed_grain=on, a zeroed grain reads zeroes; an unallocated one reads the parent."""
        base = tmp_path / "base.vmdk"
        qemu_img("create", "-f", "vmdk", base, "2M")
        _qemu_io(base, "vmdk", "write -P 0xaa 0 2M")
        child = tmp_path / "child.vmdk"
        qemu_img("create", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", "base.vmdk", "-F",
                 "vmdk", child)  # fmt: skip
        _qemu_io(child, "vmdk", "write -z 0 64k", "write -P 0x0c 1M 4k")
        _same_raw(qemu_img, child, tmp_path)
        with virtkit.images.open(child) as img:
            assert img.read(0, 64 * KiB) == bytes(64 * KiB)
            assert img.read(64 * KiB, 4) == b"\xaa" * 4
            own = list(img.block_status(include_backing=False))
            assert own[0] == virtkit.images.Extent(0, 64 * KiB, "zero")
            assert own[1].kind == "unallocated"

    def test_parent_outside_folder_needs_allow(self, qemu_img: Run, tmp_path: Path) -> None:
        """An absolute parent path outside the image's folder is refused unless allowed."""
        base = tmp_path / "elsewhere" / "base.vmdk"
        base.parent.mkdir()
        qemu_img("create", "-f", "vmdk", base, "1M")
        child = tmp_path / "vm" / "child.vmdk"
        child.parent.mkdir()
        qemu_img("create", "-f", "vmdk", "-b", base, "-F", "vmdk", child)
        with pytest.raises(virtkit.ImageError, match="allow_backing"):
            virtkit.images.open(child)
        with virtkit.images.open(child, allow_backing=[base.parent]) as img:
            assert img.read(0, 512) == bytes(512)

    def test_changed_parent_is_refused(self, qemu_img: Run, tmp_path: Path) -> None:
        """A parent whose CID changed is not read through (qemu-img fails the same way)."""
        top = self._chain(qemu_img, tmp_path / "c")
        mid = top.parent / "mid.vmdk"
        data = bytearray(mid.read_bytes())
        at = data.index(b"\nCID=") + 5
        data[at : at + 8] = b"0badcafe"
        mid.write_bytes(bytes(data))
        assert qemu_img("convert", "-O", "raw", top, tmp_path / "q.raw", check=False).returncode
        with virtkit.images.open(top) as img:
            assert img.read(1 * MiB, 8 * KiB) == b"\xd0" * (8 * KiB)  # allocated here: fine
            with pytest.raises(virtkit.CorruptImageError, match="parentCID"):
                img.read(0, 4096)


_LIBYAL = """
import hashlib, sys
import pyvmdk, pyvhdi
if sys.argv[1] == "pyvmdk":
    h = pyvmdk.handle(); h.open(sys.argv[2]); h.open_extent_data_files()
else:
    h = pyvhdi.file(); h.open(sys.argv[2])
size = h.get_media_size()
digest = hashlib.sha256()
pos = 0
while pos < size:
    chunk = h.read_buffer(min(1 << 22, size - pos))
    digest.update(chunk)
    pos += len(chunk)
print(size, digest.hexdigest())
"""


def _libyal(module: str, path: Path) -> tuple[int, str]:
    """Media size and SHA-256 of ``path`` as libyal's reader (Debian's python3-lib*) sees it."""
    proc = subprocess.run(["/usr/bin/python3", "-c", _LIBYAL, module, str(path)],
                          capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    size, digest = proc.stdout.split()
    return int(size), digest


def _descriptor(*lines: str, create_type: str = "monolithicFlat", extra: str = "") -> str:
    body = "".join(f"{line}\n" for line in lines)
    return (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n{extra}\n# Extent description\n{body}\n'
    )


class TestDescriptors:
    """Hand-written descriptors with several extents, read by QEMU's rules; hostile ones refused."""

    def test_several_extents(self, qemu_img: Run, tmp_path: Path) -> None:
        """FLAT at an offset, VMFS, a sparse extent; RDONLY, ZERO and empty lines skipped as QEMU."""
        flat = tmp_path / "a.bin"
        flat.write_bytes(bytes(range(256)) * 64 * 8)  # 128 KiB of pattern
        sparse = tmp_path / "s.vmdk"
        qemu_img("create", "-f", "vmdk", sparse, "1M")
        _qemu_io(sparse, "vmdk", "write -P 0x99 4k 8k")
        text = _descriptor(
            'RW 64 FLAT "a.bin" 32',
            'RDONLY 128 FLAT "a.bin" 0',
            "RW 16 ZERO",
            'RW 0 FLAT "a.bin" 0',
            'RW 2048 SPARSE "s.vmdk"',
            'RW 100 VMFS "a.bin"',
            'NOACCESS 8 FLAT "a.bin" 0',
        )
        desc = tmp_path / "multi.vmdk"
        desc.write_text(text)
        _same_raw(qemu_img, desc, tmp_path)
        with virtkit.images.open(desc) as img:
            assert (
                img.virtual_size == (64 + 2048 + 100) * 512 == _info(qemu_img, desc)["virtual-size"]
            )
            assert img.read(0, 512) == flat.read_bytes()[32 * 512 : 33 * 512]
            assert [e["format"] for e in img.info().format_specific["extents"]] == [
                "FLAT",
                "SPARSE",
                "VMFS",
            ]

    def test_flat_extent_shorter_than_declared(self, qemu_img: Run, tmp_path: Path) -> None:
        """A flat file shorter than its extent reads zeroes past its end, as QEMU does."""
        (tmp_path / "short.bin").write_bytes(b"\x42" * 1000)
        desc = tmp_path / "d.vmdk"
        desc.write_text(_descriptor('RW 8 FLAT "short.bin" 0'))
        _same_raw(qemu_img, desc, tmp_path)

    @pytest.mark.parametrize(
        ("lines", "create_type", "error", "match"),
        [
            (['RW 8 FLAT "../outside.bin" 0'], "monolithicFlat", virtkit.ImageError, "outside"),
            (['RW 8 FLAT "/etc/passwd" 0'], "monolithicFlat", virtkit.ImageError, "passwd"),
            (
                ['RW 8 FLAT "nbd:localhost:10809" 0'],
                "monolithicFlat",
                virtkit.ImageError,
                "protocol",
            ),
            (['RW 8 FLAT "missing.bin" 0'], "monolithicFlat", virtkit.ImageError, "does not exist"),
            (
                [f'RW {1 << 62} FLAT "x.bin" 0'],
                "monolithicFlat",
                virtkit.CorruptImageError,
                "bytes",
            ),
            (['RW 8 FLAT "x.bin"'], "monolithicFlat", virtkit.CorruptImageError, "extent line"),
            (['RW 8 FLAT "x.bin" -5'], "monolithicFlat", virtkit.CorruptImageError, "extent line"),
            (['RW 8 VMFS "x.bin" 3'], "vmfs", virtkit.CorruptImageError, "extent line"),
            (['RW 8 SPARSE "x.bin" 3'], "twoGbMaxExtentSparse", virtkit.CorruptImageError, "line"),
            (['RW 8 SPARSE "x.bin"'], "twoGbMaxExtentSparse", virtkit.CorruptImageError, "KDMV"),
            (['RW 8 FLAT "x.bin" 0'], "monolithicSparse", virtkit.UnsupportedFeatureError, "type"),
            (['RW 8 SESPARSE "x.bin"'], "seSparse", virtkit.UnsupportedFeatureError, "seSparse"),
            (
                ['RW 8 FLAT "x.bin" 0'] * 1100,
                "monolithicFlat",
                virtkit.UnsupportedFeatureError,
                "1024",
            ),
        ],
        ids=[
            "dotdot",
            "absolute",
            "protocol",
            "missing",
            "huge",
            "flat-no-offset",
            "negative-offset",
            "vmfs-offset",
            "sparse-offset",
            "sparse-not-kdmv",
            "monolithicSparse-descriptor",
            "sesparse",
            "too-many",
        ],
    )
    def test_hostile(
        self,
        lines: list[str],
        create_type: str,
        error: type[Exception],
        match: str,
        tmp_path: Path,
    ) -> None:
        """Each hostile descriptor is refused with a clear VirtkitError before any harm."""
        folder = tmp_path / "vm"
        folder.mkdir()
        (tmp_path / "outside.bin").write_bytes(bytes(4096))
        (folder / "x.bin").write_bytes(bytes(4096))
        desc = folder / "d.vmdk"
        desc.write_text(_descriptor(*lines, create_type=create_type))
        with pytest.raises(error, match=match):
            virtkit.images.open(desc)

    def test_outside_extent_with_allow(self, qemu_img: Run, tmp_path: Path) -> None:
        """An extent outside the folder opens once its folder is allowed."""
        folder = tmp_path / "vm"
        folder.mkdir()
        (tmp_path / "outside.bin").write_bytes(b"\x07" * 4096)
        desc = folder / "d.vmdk"
        desc.write_text(_descriptor('RW 8 FLAT "../outside.bin" 0'))
        with virtkit.images.open(desc, allow_backing=[tmp_path]) as img:
            assert img.read(0, 4096) == b"\x07" * 4096

    def test_no_create_type(self, tmp_path: Path) -> None:
        """A text file that probes as VMDK but has no createType is corrupt, not raw."""
        desc = tmp_path / "d.vmdk"
        desc.write_text("# Disk DescriptorFile\nversion=1\n")
        with pytest.raises(virtkit.CorruptImageError, match="createType"):
            virtkit.images.open(desc)

    def test_read_only(self, qemu_img: Run, tmp_path: Path) -> None:
        """VMDK opens read-only: writable=True and writes are UnsupportedFeatureErrors."""
        image = tmp_path / "d.vmdk"
        qemu_img("create", "-f", "vmdk", image, "1M")
        with pytest.raises(virtkit.UnsupportedFeatureError, match="read-only"):
            virtkit.images.open(image, writable=True)
        with virtkit.images.open(image) as img:
            with pytest.raises(virtkit.UnsupportedFeatureError):
                img.write(0, b"x")
            with pytest.raises(virtkit.UnsupportedFeatureError):
                img.create_snapshot("s")
        with pytest.raises(virtkit.UnsupportedFeatureError, match="convert"):
            virtkit.images.create(tmp_path / "new.vmdk", "1M", format="vmdk")


class TestStreamWrite:
    """convert(..., format="vmdk") writes streamOptimized VMDKs qemu-img reads identically."""

    @pytest.mark.parametrize("size", [10 * MiB + 3 * 512, 192 * KiB, 33 * MiB])
    def test_qemu_reads_ours(self, size: int, qemu_img: Run, tmp_path: Path) -> None:
        """qemu-img compare says identical, check is clean, info says streamOptimized."""
        src = tmp_path / "src.qcow2"
        qemu_img("create", "-f", "qcow2", src, str(size))
        _qemu_io(src, "qcow2", "write -P 0x61 0 5k", f"write -P 0x62 {size - 700} 700",
                 f"write -P 0x63 {size // 3} 100k")  # fmt: skip
        dst = tmp_path / "out.vmdk"
        seen: list[tuple[int, int]] = []
        virtkit.images.convert(src, dst, format="vmdk", progress=lambda d, t: seen.append((d, t)))
        assert seen[-1] == (size, size)
        qemu_img("compare", "-f", "qcow2", "-F", "vmdk", src, dst)
        assert "No errors" in qemu_img("check", dst).stdout
        info = _info(qemu_img, dst)
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
        assert info["virtual-size"] == -(-size // 512) * 512
        data = dst.read_bytes()
        assert b'RW %d SPARSE "out.vmdk"' % (-(-size // 512)) in data  # the final name
        # the stream's tail: footer marker, footer (a header with the GD's offset), EOS
        assert layout.MARKER.unpack_from(data, len(data) - 1536) == (1, 0, layout.MARKER_FOOTER)
        footer = layout.SparseHeader.unpack(data, len(data) - 1024)
        assert footer.magic == layout.MAGIC and footer.gd_offset != layout.GD_AT_END
        assert data[-512:] == bytes(512)
        gd_marker = layout.MARKER.unpack_from(data, (footer.gd_offset - 1) * 512)
        assert gd_marker[2] == layout.MARKER_GD
        with virtkit.images.open(dst) as img:
            assert img.read(size // 3, 100 * KiB) == b"\x63" * (100 * KiB)

    def test_libvmdk_reads_ours(self, tmp_path: Path) -> None:
        """libyal's libvmdk (VMware's spec, not QEMU's code) reads our stream byte for byte,
        including a grain table left out because its 32 MiB hold no data."""
        size = 100 * MiB
        src = tmp_path / "src.raw"
        with open(src, "wb") as fh:
            fh.truncate(size)
        _qemu_io(src, "raw", "write -P 0x31 0 1M", "write -P 0x32 33M 64k",
                 f"write -P 0x33 {size - 4096} 4k")  # fmt: skip
        dst = tmp_path / "out.vmdk"
        virtkit.images.convert(src, dst, format="vmdk", src_format="raw")
        assert _libyal("pyvmdk", dst) == (size, hashlib.sha256(src.read_bytes()).hexdigest())
        info = subprocess.run(["vmdkinfo", str(dst)], capture_output=True, text=True, check=True)
        assert "Stream optimized" in info.stdout

    def test_from_vmdk_and_empty(self, qemu_img: Run, tmp_path: Path) -> None:
        """vmdk -> vmdk works; an all-zero disk gives a small stream with no grains."""
        empty = tmp_path / "e.raw"
        empty.write_bytes(b"")
        os.truncate(empty, 100 * MiB)
        out = tmp_path / "e.vmdk"
        virtkit.images.convert(empty, out, format="vmdk", src_format="raw")
        assert out.stat().st_size < 128 * KiB
        qemu_img("compare", "-f", "raw", "-F", "vmdk", empty, out)
        src = _pattern_raw(tmp_path / "p.raw", 4 * MiB)
        first = tmp_path / "a.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", src, first)
        second = tmp_path / "b.vmdk"
        virtkit.images.convert(first, second, format="vmdk", subformat="streamOptimized")
        qemu_img("compare", "-f", "raw", "-F", "vmdk", src, second)

    def test_empty_disk_refused(self, tmp_path: Path) -> None:
        """A 0-byte disk is refused: capacity 0 reads as "descriptor only" (qemu-img fails too)."""
        empty = tmp_path / "e.raw"
        empty.write_bytes(b"")
        with pytest.raises(virtkit.ConfigError, match="empty"):
            virtkit.images.convert(empty, tmp_path / "e.vmdk", format="vmdk", src_format="raw")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["e.raw"]

    def test_options(self, qemu_img: Run, tmp_path: Path) -> None:
        """adapter_type and hwversion land in the descriptor; bad options leave no file."""
        src = _pattern_raw(tmp_path / "p.raw", 2 * MiB)
        dst = tmp_path / "o.vmdk"
        virtkit.images.convert(src, dst, format="vmdk", adapter_type="lsilogic", hwversion="6")
        text = dst.read_bytes()[512:4096]
        assert b'ddb.adapterType = "lsilogic"' in text
        assert b'ddb.virtualHWVersion = "6"' in text
        assert b'ddb.geometry.heads = "255"' in text
        for bad, error in (
            ({"subformat": "monolithicSparse"}, virtkit.UnsupportedFeatureError),
            ({"subformat": "bogus"}, virtkit.ConfigError),
            ({"adapter_type": "nvme"}, virtkit.ConfigError),
            ({"hwversion": "x"}, virtkit.ConfigError),
            ({"cluster_size": 4096}, virtkit.ConfigError),
        ):
            with pytest.raises(error):
                virtkit.images.convert(src, tmp_path / "bad.vmdk", format="vmdk", **bad)
            assert not (tmp_path / "bad.vmdk").exists()
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad.vmdk")]

    @given(st.binary(min_size=512, max_size=512))
    def test_header_pack_unpack(self, raw: bytes) -> None:
        """Any 512-byte header unpacks and packs back to its first 79 bytes (the rest is pad)."""
        assert layout.SparseHeader.unpack(raw).pack()[: layout.HEADER.size] == raw[:79]

    def test_header_roundtrip(self) -> None:
        """The header struct packs what it unpacks."""
        hdr = layout.SparseHeader(
            magic=layout.MAGIC, version=3, flags=0x30001, capacity=2048, granularity=128,
            desc_offset=1, desc_size=20, num_gtes_per_gt=512, rgd_offset=0,
            gd_offset=layout.GD_AT_END, grain_offset=128, compress_algorithm=1,
        )  # fmt: skip
        raw = hdr.pack()
        assert len(raw) == 512
        assert layout.SparseHeader.unpack(raw) == hdr
        assert struct.unpack_from("<I", raw, 4)[0] == 3


def test_convert_keeps_qemu_img_sizes(qemu_img: Run, tmp_path: Path) -> None:
    """A stream of an odd-sized qcow2 converted back with virtkit keeps every byte."""
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", src, "3000k")
    _qemu_io(src, "qcow2", "write -P 0x7a 2999k 1k")
    mid = tmp_path / "m.vmdk"
    virtkit.images.convert(src, mid, format="vmdk")
    back = tmp_path / "b.qcow2"
    virtkit.images.convert(mid, back)
    qemu_img("compare", src, back)


_TOKENS = ["RW", "RDONLY", "NOACCESS", "FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE", "ZERO",
           '"x.bin"', '"../x.bin"', '"/x"', '""', "0", "-1", "8", "99999999999999999999", str(1 << 62),
           "#", "\\", '"', "createType=", "parentFileNameHint=", 'CID=zz', "\r"]  # fmt: skip


class TestDescriptorFuzz:
    """Random descriptor text parses or raises a VirtkitError; opening one stays in bounds."""

    @given(
        st.lists(st.lists(st.sampled_from(_TOKENS), max_size=6), max_size=20),
        st.binary(max_size=64),
    )
    def test_parse(self, lines: list[list[str]], junk: bytes) -> None:
        """parse() never raises anything but CorruptImageError/UnsupportedFeatureError."""
        text = "\n".join(" ".join(words) for words in lines).encode() + junk
        try:
            desc = descriptor.parse(text, path="d.vmdk", extents=True)
        except (virtkit.CorruptImageError, virtkit.UnsupportedFeatureError):
            return
        assert all(e.sectors > 0 and e.offset >= 0 for e in desc.extents)
        assert len(desc.extents) <= descriptor.MAX_EXTENTS

    @given(st.lists(st.lists(st.sampled_from(_TOKENS), max_size=6), max_size=8))
    def test_open(self, tmp_path_factory: pytest.TempPathFactory, lines: list[list[str]]) -> None:
        """open() of a random descriptor next to a small file gives an image or a VirtkitError."""
        folder = tmp_path_factory.mktemp("d")
        (folder / "x.bin").write_bytes(b"\x01" * 4096)
        path = folder / "d.vmdk"
        body = "\n".join(" ".join(words) for words in lines)
        path.write_text(f'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n{body}\n')
        try:
            with virtkit.images.open(path) as img:
                size = img.virtual_size
                img.read(0, min(size, 8192))
                if size:
                    img.read(size - 1, 1)
                list(img.block_status(0, min(size, 1 << 30)))
        except virtkit.VirtkitError:
            pass

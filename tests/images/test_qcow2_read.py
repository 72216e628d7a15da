"""Interop read matrix: images made by real qemu-img/qemu-io, read byte-exactly by virtkit."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qcow2_helpers import WRITES, qemu_io, qemu_raw

from virtkit import images
from virtkit.errors import CorruptImageError, ImageError, UnsupportedFeatureError

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
SIZE = 4 * 1024 * 1024


def _make(qemu_img: QemuImg, path: Path, opts: str, size: int = SIZE) -> Path:
    args: list[Any] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, path, str(size))
    qemu_io(path, *WRITES)
    return path


def _assert_same(qemu_img: QemuImg, path: Path, tmp_path: Path, **open_kw: Any) -> None:
    expected = qemu_raw(qemu_img, path, tmp_path / "expected.raw")
    with images.open(path, **open_kw) as img:
        assert img.virtual_size == len(expected)
        assert img.read(0, img.virtual_size) == expected
        # unaligned small reads agree too
        for off, n in ((1, 7), (65535, 2), (70001, 2999), (SIZE - 5, 5)):
            if off + n <= len(expected):
                assert img.read(off, n) == expected[off : off + n]


class TestVariants:
    """Every header variant qemu-img makes reads back exactly."""

    @pytest.mark.parametrize(
        "opts",
        [
            "compat=0.10",
            "compat=1.1",
            "cluster_size=512",
            "cluster_size=4k",
            "cluster_size=2M",
            "refcount_bits=1",
            "refcount_bits=2",
            "refcount_bits=4",
            "refcount_bits=8",
            "refcount_bits=32",
            "refcount_bits=64",
            "extended_l2=on",
            "extended_l2=on,cluster_size=16k",
            "lazy_refcounts=on",
            "compat=0.10,cluster_size=512",
        ],
    )
    def test_variant_reads_like_qemu(self, qemu_img: QemuImg, tmp_path: Path, opts: str) -> None:
        """A qemu-io-written image of this variant reads exactly as qemu-img converts it."""
        path = _make(qemu_img, tmp_path / "img.qcow2", opts)
        _assert_same(qemu_img, path, tmp_path)

    def test_preallocated_metadata(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """preallocation=metadata images (allocated, sparse clusters) read right."""
        path = _make(qemu_img, tmp_path / "p.qcow2", "preallocation=metadata")
        _assert_same(qemu_img, path, tmp_path)

    def test_extended_l2_subclusters(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Subcluster-granular writes over a backing file mix own and backing data."""
        base = _make(qemu_img, tmp_path / "base.qcow2", "")
        top = tmp_path / "top.qcow2"
        qemu_img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top,
        )
        qemu_io(top, "write -P 0x77 4k 2k", "write -z 8k 2k", "write -P 0x66 1M 64k")
        _assert_same(qemu_img, top, tmp_path)
        with images.open(top) as img:
            kinds = {e.kind for e in img.block_status(0, 64 * 1024, include_backing=False)}
        assert kinds == {"data", "zero", "unallocated"}
        del base


class TestCompressed:
    """Compressed clusters (zlib and zstd) decompress to qemu-img's bytes."""

    @pytest.mark.parametrize("ctype", ["zlib", "zstd"])
    @pytest.mark.parametrize("cluster", ["4k", "64k"])
    def test_compressed(self, qemu_img: QemuImg, tmp_path: Path, ctype: str, cluster: str) -> None:
        """qemu-img convert -c output reads exactly."""
        src = _make(qemu_img, tmp_path / "src.qcow2", "")
        dst = tmp_path / "c.qcow2"
        qemu_img(
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            f"compression_type={ctype},cluster_size={cluster}",
            src,
            dst,
        )
        _assert_same(qemu_img, dst, tmp_path)
        with images.open(dst) as img:
            assert img.info().format_specific["compression-type"] == ctype


class TestBacking:
    """Reads fall through backing chains of qcow2 and raw files."""

    def test_three_level_chain_with_raw_base(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """raw <- qcow2 <- qcow2, with a shorter base that reads as zeroes past its end."""
        raw = tmp_path / "base.raw"
        raw.write_bytes(bytes(range(256)) * (2 * 1024 * 1024 // 256))  # 2 MiB, shorter
        mid = tmp_path / "mid.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, str(SIZE))
        qemu_io(mid, "write -P 0x21 64k 64k", "write -z 128k 4k")
        top = tmp_path / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
        qemu_io(top, "write -P 0x42 100k 1k", "write -P 0x43 3M 4k")
        _assert_same(qemu_img, top, tmp_path)
        with images.open(top) as img:
            assert img.backing_file == "mid.qcow2"
            ext = list(img.block_status(0, SIZE))
            assert any(e.from_backing for e in ext)
            assert ext[-1].kind in ("zero", "data")

    def test_backing_outside_directory_refused(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """An image whose backing file is /etc/passwd does not read it."""
        top = tmp_path / "evil.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", top, "1M")
        with pytest.raises(ImageError, match="outside the image's directory"):
            images.open(top)

    def test_dotdot_escape_needs_allow(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """A ../ backing name is refused by default and accepted when allowed."""
        (tmp_path / "base").mkdir()
        (tmp_path / "vm").mkdir()
        base = tmp_path / "base" / "b.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "1M")
        qemu_io(base, "write -P 0x99 0 4k")
        top = tmp_path / "vm" / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "../base/b.qcow2", "-F", "qcow2", top)
        with pytest.raises(ImageError):
            images.open(top)
        with images.open(top, allow_backing=[tmp_path / "base"]) as img:
            assert img.read(0, 4096) == b"\x99" * 4096

    def test_unrecorded_raw_backing_not_probed(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Without a recorded format a non-qcow2 backing file is refused, not guessed."""
        (tmp_path / "b.raw").write_bytes(bytes(1024 * 1024))
        top = tmp_path / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", top, "1M")
        with images.open(top, writable=True) as img:  # an old-style image: name, no format
            img.set_backing_file("b.raw", None)  # type: ignore[attr-defined]
        assert "backing file: b.raw" in qemu_img("info", "-U", top).stdout
        with pytest.raises(ImageError, match="no backing format"):
            images.open(top)

    def test_unrecorded_vmdk_backing_names_its_format(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """The refusal names the probed format and the command that records it; after it, reads."""
        base = tmp_path / "b.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", base, "1M")
        qemu_io(base, "write -P 0x42 0 64k", fmt="vmdk")
        top = tmp_path / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", top, "1M")
        with images.open(top, writable=True) as img:
            img.set_backing_file("b.vmdk", None)  # type: ignore[attr-defined]
        with pytest.raises(ImageError, match="probes as vmdk.*rebase -u -F vmdk"):
            images.open(top)
        qemu_img("rebase", "-u", "-F", "vmdk", "-b", "b.vmdk", top)
        with images.open(top) as img:
            assert img.read(0, 65536 + 1) == b"\x42" * 65536 + b"\0"


class TestBackingPolicy:
    """Backing names that must not be followed, and chains that must not be walked."""

    def _with_backing(self, qemu_img: QemuImg, path: Path, name: str, fmt: str | None) -> Path:
        qemu_img("create", "-q", "-f", "qcow2", path, "1M")
        with images.open(path, writable=True) as img:
            img.set_backing_file(name, fmt)  # type: ignore[attr-defined]
        return path

    @pytest.mark.parametrize(
        "case",
        [
            ("missing.qcow2", "qcow2", ImageError, "does not exist"),
            ("nbd://example.org/disk", "raw", ImageError, "protocol"),
            ("json:{}", "raw", ImageError, "protocol"),
            ("base.raw", "qed", UnsupportedFeatureError, "qed"),
        ],
        ids=["missing", "nbd", "json", "qed"],
    )
    def test_refused_names(
        self, qemu_img: QemuImg, tmp_path: Path, case: tuple[str, str, type[Exception], str]
    ) -> None:
        """Missing files, protocols and unknown formats are refused by name."""
        name, fmt, error, fragment = case
        (tmp_path / "base.raw").write_bytes(bytes(1024 * 1024))
        path = self._with_backing(qemu_img, tmp_path / "t.qcow2", name, fmt)
        with pytest.raises(error, match=fragment):
            images.open(path)

    def test_symlink_escape_refused(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """A symlink inside the folder that points outside it does not pass."""
        (tmp_path / "vm").mkdir()
        (tmp_path / "vm" / "link.raw").symlink_to("/etc/hostname")
        path = self._with_backing(qemu_img, tmp_path / "vm" / "t.qcow2", "link.raw", "raw")
        with pytest.raises(ImageError, match="outside"):
            images.open(path)

    def test_loop_detected(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """a -> b -> a is reported as a corrupt chain, not followed forever."""
        a = self._with_backing(qemu_img, tmp_path / "a.qcow2", "b.qcow2", "qcow2")
        self._with_backing(qemu_img, tmp_path / "b.qcow2", "a.qcow2", "qcow2")
        with pytest.raises(CorruptImageError, match="loops"):
            images.open(a)


class TestHeaderFeatures:
    """Header extensions and feature bits are handled as QEMU does."""

    def test_external_data_file_reads(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """An image with an external data file reads its clusters from that file."""
        path = tmp_path / "d.qcow2"
        data = tmp_path / "d.data"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", path, str(SIZE))
        qemu_io(path, *WRITES)
        _assert_same(qemu_img, path, tmp_path)
        with images.open(path) as img:
            assert img.info().format_specific["data-file"] == str(data)
            assert img.check().ok

    def test_bitmaps_tolerated_and_checked(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """A persistent bitmap does not stop reads, and check counts its clusters."""
        path = _make(qemu_img, tmp_path / "b.qcow2", "")
        qemu_img("bitmap", "--add", path, "b0")
        qemu_img("bitmap", "--add", "-g", "128k", "--disable", path, "other")
        qemu_io(path, "write -P 0x31 512k 64k")
        _assert_same(qemu_img, path, tmp_path)
        theirs = json.loads(qemu_img("info", "--output=json", path).stdout)
        with images.open(path) as img:
            assert img.check().ok
            ours = img.info().format_specific
        assert ours == theirs["format-specific"]["data"]
        assert [b["name"] for b in ours["bitmaps"]] == ["b0", "other"]
        with images.open(path, writable=True) as img:
            img.write(1024 * 1024, b"w" * 70_000)
        # our write is recorded in the enabled bitmap, left consistent at close
        assert "in-use" not in qemu_img("info", path).stdout
        with images.open(path) as img:
            assert img.bitmap_extents("b0") == [(512 * 1024, 65536), (1024 * 1024, 131072)]
            assert img.bitmap_extents("other") == []
        qemu_img("check", path)

    def test_unknown_incompatible_bit(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """An unknown incompatible feature bit is refused by number."""
        path = _make(qemu_img, tmp_path / "u.qcow2", "")
        with path.open("r+b") as fh:
            fh.seek(72)
            fh.write((1 << 9).to_bytes(8, "big"))
        with pytest.raises(UnsupportedFeatureError, match="bit 9") as info:
            images.open(path)
        assert info.value.feature is not None and "9" in info.value.feature

    def test_dirty_lazy_refcount_image_repaired_on_write_open(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """A lazy-refcounts image left dirty by a killed qemu-io is rebuilt before writes."""
        path = tmp_path / "l.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, str(SIZE))
        proc = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 256k", "-c", "abort", str(path)],
            capture_output=True,
            check=False,
        )
        assert proc.returncode != 0
        with images.open(path) as img:
            assert img.info().dirty_flag
            assert img.read(0, 4096) == b"\x44" * 4096
        with images.open(path, writable=True) as img:
            assert not img.info().dirty_flag
            img.write(1024 * 1024, b"x" * 1000)
        qemu_img("check", path)
        qemu_io(path, "read -P 0x44 0 256k")


class TestSnapshotsFromQemu:
    """Snapshots qemu-img made are listed, read and reverted by virtkit."""

    def test_list_read_revert(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """qemu-img snapshot -c images: listing, snapshot reads and revert all match."""
        path = _make(qemu_img, tmp_path / "s.qcow2", "")
        before = qemu_raw(qemu_img, path, tmp_path / "before.raw")
        qemu_img("snapshot", "-c", "first", path)
        qemu_io(path, "write -P 0xee 0 128k", "write -P 0xef 3M 64k")
        after = qemu_raw(qemu_img, path, tmp_path / "after.raw")
        with images.open(path) as img:
            (snap,) = img.snapshots
            assert (snap.id, snap.name, snap.vm_state_size) == ("1", "first", 0)
            assert snap.disk_size == SIZE
            assert img.read(0, SIZE) == after
            assert img.read_snapshot("first", 0, SIZE) == before  # type: ignore[attr-defined]
            assert img.check().ok
        with images.open(path, writable=True) as img:
            img.revert_snapshot("first")
            assert img.read(0, SIZE) == before
        qemu_img("check", path)
        assert qemu_raw(qemu_img, path, tmp_path / "reverted.raw") == before


class TestBlockStatus:
    """block_status agrees with qemu-img map."""

    def test_matches_qemu_img_map(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Data, zero and backing ranges line up with qemu-img map's answer."""
        base = tmp_path / "b.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "1M")
        qemu_io(base, "write -P 1 0 128k")
        top = tmp_path / "t.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top, "2M")
        qemu_io(top, "write -P 2 64k 64k", "write -z 256k 64k")
        theirs = json.loads(qemu_img("map", "--output=json", top).stdout)
        want = []
        for e in theirs:
            kind = "data" if e["data"] else "zero"
            want.append((e["start"], e["length"], kind, kind == "data" and e["depth"] > 0))
        with images.open(top) as img:
            got = [(e.start, e.length, e.kind, e.from_backing) for e in img.block_status()]
            own = [(e.start, e.length, e.kind) for e in img.block_status(include_backing=False)]
        merged: list[tuple[int, int, str, bool]] = []
        for item in want:  # qemu-img splits zero runs by depth; we merge them
            if merged and merged[-1][2] == item[2] == "zero":
                start, length, kind, fb = merged[-1]
                merged[-1] = (start, length + item[1], kind, fb)
            else:
                merged.append(item)
        assert got == merged
        assert own == [
            (0, 65536, "unallocated"),
            (65536, 65536, "data"),
            (131072, 131072, "unallocated"),
            (262144, 65536, "zero"),
            (327680, 2 * 1024 * 1024 - 327680, "unallocated"),
        ]

"""check()/check(repair=True) against qemu-img check, and header validation."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_helpers import qemu_io

from virtkit import images
from virtkit.errors import CorruptImageError, ImageError, UnsupportedFeatureError

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
SIZE = 4 * 1024 * 1024


def _qemu_check(qemu_img: QemuImg, path: Path) -> dict[str, int]:
    proc = qemu_img("check", "--output=json", path, check=False)
    out: dict[str, int] = json.loads(proc.stdout)
    return out


def _refcount_slot(path: Path, cluster: int) -> int:
    """File offset of ``cluster``'s 16-bit refcount (first refcount block)."""
    raw = path.read_bytes()
    cb = struct.unpack_from(">I", raw, 20)[0]
    rt_off = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, rt_off)[0]
    assert cluster < (1 << cb) // 2
    return int(block) + 2 * cluster


def _poke16(path: Path, offset: int, value: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(value.to_bytes(2, "big"))


@pytest.fixture
def written(qemu_img: QemuImg, tmp_path: Path) -> Path:
    """A qemu-img image with a little data."""
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
    qemu_io(path, "write -P 0xab 0 128k", "write -P 0xcd 2M 64k")
    return path


class TestCheck:
    """Leaks and corruptions are reported as qemu-img reports them."""

    def test_clean_image(self, written: Path, qemu_img: QemuImg) -> None:
        """A fresh qemu-img image checks clean, with qemu-img's cluster figures."""
        with images.open(written) as img:
            result = img.check()
        ours = _qemu_check(qemu_img, written)
        assert result.ok and not result.problems
        assert result.image_end_offset == ours["image-end-offset"]
        assert result.allocated_clusters == ours["allocated-clusters"]
        assert result.total_clusters == ours["total-clusters"]

    def test_leak_reported_and_repaired(self, written: Path, qemu_img: QemuImg) -> None:
        """A refcount bumped by hand is one leak at that cluster; repair fixes it."""
        size = written.stat().st_size
        leaked = size // 65536 - 1  # the last data cluster: refcount 1 -> 2
        _poke16(written, _refcount_slot(written, leaked), 2)
        theirs = _qemu_check(qemu_img, written)
        with images.open(written) as img:
            result = img.check()
        # as qemu-img: one leak, plus the COPIED flag that no longer matches refcount 2
        assert (result.leaks, result.corruptions) == (theirs["leaks"], theirs["corruptions"])
        assert (result.leaks, result.corruptions) == (1, 1)
        problem = next(p for p in result.problems if p.kind == "leak")
        assert problem.offset == leaked * 65536
        assert f"cluster {leaked} refcount=2 reference=1" in problem.message
        assert not result.ok
        with images.open(written, writable=True) as img:
            fixed = img.check(repair=True)
            assert (fixed.leaks_fixed, fixed.corruptions_fixed) == (1, 1) and fixed.ok
        qemu_img("check", written)

    def test_orphan_cluster_past_data(self, written: Path, qemu_img: QemuImg) -> None:
        """A cluster with a refcount but no reference (a crash leak) is found and freed."""
        end = written.stat().st_size // 65536
        _poke16(written, _refcount_slot(written, end + 3), 1)
        with images.open(written) as img:
            assert img.check().leaks == 1
        with images.open(written, writable=True) as img:
            assert img.check(repair=True).ok
        qemu_img("check", written)

    def test_refcount_too_low_is_corruption(self, written: Path, qemu_img: QemuImg) -> None:
        """A used cluster whose refcount reads 0 is a corruption; repair restores it."""
        raw = written.read_bytes()
        l1_off = struct.unpack_from(">Q", raw, 40)[0]
        l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
        data_off = struct.unpack_from(">Q", raw, l2_off)[0] & 0x00FFFFFFFFFFFE00
        _poke16(written, _refcount_slot(written, data_off // 65536), 0)
        assert _qemu_check(qemu_img, written)["corruptions"] >= 1
        with images.open(written) as img:
            result = img.check()
        assert result.corruptions >= 1 and not result.ok
        assert any(p.offset == data_off for p in result.problems)
        with images.open(written, writable=True) as img:
            assert img.check(repair=True).ok
        qemu_img("check", written)
        qemu_io(written, "read -P 0xab 0 128k")

    def test_repair_needs_writable(self, written: Path) -> None:
        """repair on a read-only image is refused."""
        with images.open(written) as img, pytest.raises(ImageError, match="writable"):
            img.check(repair=True)


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))


class TestHeaderValidation:
    """Malformed headers raise CorruptImageError with the file and offset."""

    @pytest.mark.parametrize(
        ("offset", "fmt", "value", "field_offset"),
        [
            (20, ">I", 30, 20),  # cluster_bits
            (36, ">I", 1 << 31, 36),  # l1_size: 16 GiB of L1 claimed
            (40, ">Q", 12345, 40),  # l1_table_offset unaligned
            (48, ">Q", 1 << 40, 48),  # refcount table past end of file
            (56, ">I", 1 << 20, 56),  # refcount table too large
            (60, ">I", 70000, 60),  # too many snapshots
            (96, ">I", 7, 96),  # refcount_order
            (100, ">I", 1 << 20, 100),  # header_length
            (24, ">Q", 1 << 62, 24),  # virtual size
        ],
    )
    def test_bad_field(
        self, written: Path, offset: int, fmt: str, value: int, field_offset: int
    ) -> None:
        """Each damaged field is named by offset, quickly and without huge allocations."""
        _patch(written, offset, fmt, value)
        with pytest.raises(CorruptImageError) as info:
            images.open(written)
        assert info.value.path == str(written)
        assert info.value.offset == field_offset

    def test_extension_overruns_header(self, written: Path) -> None:
        """A header extension claiming more bytes than the cluster holds is corrupt."""
        _patch(written, 112 + 4, ">I", 1 << 30)
        with pytest.raises(CorruptImageError, match="extension"):
            images.open(written)

    def test_l2_table_past_end(self, written: Path) -> None:
        """An L1 entry pointing past the file end fails the read, not the process."""
        raw = written.read_bytes()
        l1_off = struct.unpack_from(">Q", raw, 40)[0]
        _patch(written, l1_off, ">Q", (1 << 63) | (1 << 40))
        with images.open(written) as img, pytest.raises(CorruptImageError, match="L2 table"):
            img.read(0, 512)

    def test_encrypted_refused(self, written: Path) -> None:
        """An AES-encrypted header is an unsupported feature, not a crash."""
        _patch(written, 32, ">I", 1)
        with pytest.raises(UnsupportedFeatureError, match="encrypt"):
            images.open(written)

    def test_not_qcow2(self, tmp_path: Path) -> None:
        """A file without the magic is rejected as not qcow2."""
        path = tmp_path / "x.qcow2"
        path.write_bytes(b"NOPE" + bytes(100))
        with pytest.raises(CorruptImageError, match="magic"):
            images.open(path, format="qcow2")


class TestHostileWrites:
    """Writes over hostile entries stop with CorruptImageError, promptly and in bounds."""

    def test_release_of_far_compressed_cluster(self, tmp_path: Path) -> None:
        """Replacing a compressed entry that points 2^60 bytes away marks corruption."""
        path = tmp_path / "h.qcow2"
        with images.create(path, "1M", cluster_size=512) as img:
            img.write_compressed(0, b"c" * 512)  # type: ignore[attr-defined]
            l2_off = img.l1[0] & 0x00FFFFFFFFFFFE00  # type: ignore[attr-defined]
        _patch(path, l2_off, ">Q", 0x7FFFFFFFFFFFFFFF)  # compressed, offset ~2^61
        size = path.stat().st_size
        with images.open(path, writable=True) as img:
            with pytest.raises(CorruptImageError):
                img.write_zeroes(0, 512)
            assert img.corrupt  # type: ignore[attr-defined]
        assert path.stat().st_size <= size + 4 * 512

    def test_unaligned_refcount_table_entry(self, written: Path) -> None:
        """A refcount table entry with reserved bits is reported, not looped on."""
        raw = written.read_bytes()
        rt_off = struct.unpack_from(">Q", raw, 48)[0]
        _patch(written, rt_off, ">Q", 1)
        with images.open(written, writable=True) as img, pytest.raises(CorruptImageError):
            img.write(3 * 1024 * 1024, b"x" * 4096)


class TestRebuild:
    """Repair rebuilds refcount blocks that are gone or misplaced."""

    @pytest.mark.parametrize("entry", [0, 12345], ids=["dropped", "unaligned"])
    def test_lost_refcount_block(self, written: Path, qemu_img: QemuImg, entry: int) -> None:
        """With refcount block 0 gone, every cluster is an error; repair recounts them all."""
        raw = written.read_bytes()
        rt_off = struct.unpack_from(">Q", raw, 48)[0]
        _patch(written, rt_off, ">Q", entry)
        assert _qemu_check(qemu_img, written)["corruptions"] > 0
        with images.open(written) as img:
            found = img.check()
        assert found.corruptions >= 4 and not found.ok
        with images.open(written, writable=True) as img:
            fixed = img.check(repair=True)
            assert fixed.ok, fixed.problems
            img.write(3 * 1024 * 1024, b"after repair" * 100)
        qemu_img("check", written)
        qemu_io(written, "read -P 0xab 0 128k", "read -P 0xcd 2M 64k")

    def test_incompressible_cluster_stored_plain(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """write_compressed of random data stores it uncompressed, as QEMU does."""
        path = tmp_path / "r.qcow2"
        data = bytes(random.Random(5).randbytes(65536))
        with images.create(path, "1M") as img:
            img.write_compressed(65536, data)  # type: ignore[attr-defined]
            assert img.read(65536, 65536) == data
        assert "0.00% compressed" in qemu_img("check", path).stdout

    def test_write_into_qemu_zero_allocated_cluster(self, written: Path, qemu_img: QemuImg) -> None:
        """A partial write into a zero-flagged preallocated cluster keeps the rest zero."""
        qemu_io(written, "write -z 0 64k")  # keeps the allocation, sets the zero flag
        with images.open(written, writable=True) as img:
            img.write(100, b"x" * 10)
            assert img.read(0, 200) == bytes(100) + b"x" * 10 + bytes(90)
        qemu_img("check", written)
        qemu_io(written, "read -P 0 0 100", "read -P 0x78 100 10", "read -P 0 110 65426")

    def test_l2_table_on_refcount_table(self, written: Path) -> None:
        """An L1 entry aiming an L2 table at the refcount table is refused before writing."""
        raw = written.read_bytes()
        l1_off = struct.unpack_from(">Q", raw, 40)[0]
        rt_off = struct.unpack_from(">Q", raw, 48)[0]
        _patch(written, l1_off, ">Q", (1 << 63) | rt_off)
        before = written.read_bytes()[rt_off : rt_off + 65536]
        with (
            images.open(written, writable=True) as img,
            pytest.raises(CorruptImageError, match="overlaps"),
        ):
            img.write(0, b"x" * 100)
        assert written.read_bytes()[rt_off : rt_off + 65536] == before

    def test_refcount_block_on_l1_table(self, written: Path) -> None:
        """A refcount block placed on the L1 table is reported, never written through."""
        raw = written.read_bytes()
        l1_off = struct.unpack_from(">Q", raw, 40)[0]
        rt_off = struct.unpack_from(">Q", raw, 48)[0]
        _patch(written, rt_off, ">Q", l1_off)
        with images.open(written, writable=True) as img, pytest.raises(CorruptImageError):
            img.write(3 * 1024 * 1024, b"x" * 100)
        assert written.read_bytes()[l1_off : l1_off + 8] == raw[l1_off : l1_off + 8]

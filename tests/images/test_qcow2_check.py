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
        # as qemu-img: a lost block's counts are corruptions, an unreadable one's check errors
        assert found.corruptions + found.errors >= 4 and not found.ok
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


# --- every corruption qemu-img check flags, flagged by check() too ------------------------
def _u64(path: Path, offset: int) -> int:
    return int(struct.unpack_from(">Q", path.read_bytes(), offset)[0])


def _layout(path: Path) -> dict[str, int]:
    """Offsets of the first L1 entry, its L2 table and the header fields we poke."""
    raw = path.read_bytes()
    cb = struct.unpack_from(">I", raw, 20)[0]
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    return {"cs": 1 << cb, "l1": l1, "l2": l2}


def _or64(path: Path, offset: int, bits: int) -> None:
    _patch(path, offset, ">Q", _u64(path, offset) | bits)


def _agree(qemu_img: QemuImg, path: Path) -> tuple[int, int]:
    """check() and qemu-img check report the same corruptions and leaks (and exit code)."""
    proc = qemu_img("check", "--output=json", path, check=False)
    theirs = json.loads(proc.stdout)
    with images.open(path) as img:
        ours = img.check()
    counts = (ours.corruptions, ours.leaks)
    assert counts == (theirs.get("corruptions", 0), theirs.get("leaks", 0)), (
        [p.message for p in ours.problems],
        proc.stderr,
    )
    rc = 2 if ours.corruptions else 3 if ours.leaks else 0
    assert proc.returncode == rc
    return counts


def _l2_image(qemu_img: QemuImg, path: Path, options: str = "") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), path, "4M")
    qemu_io(path, "write -P 0xab 0 128k", "write -c -P 0x11 1M 64k")
    return path


class TestQemuCheckParity:
    """Each corruption qemu-img check flags (block/qcow2-refcount.c), check() flags alike."""

    @pytest.mark.parametrize("bit", [1, 8, 56, 62])
    def test_l1_entry_reserved_bits(self, tmp_path: Path, qemu_img: QemuImg, bit: int) -> None:
        """An L1 entry with a reserved bit (1..8, 56..62) set is a corruption."""
        path = _l2_image(qemu_img, tmp_path / "l1.qcow2")
        _or64(path, _layout(path)["l1"], 1 << bit)
        corruptions, _ = _agree(qemu_img, path)
        assert corruptions >= 1

    @pytest.mark.parametrize("bit", [1, 8, 56, 61])
    def test_l2_entry_reserved_bits(self, tmp_path: Path, qemu_img: QemuImg, bit: int) -> None:
        """A standard L2 entry with a reserved bit (1..8, 56..61) set is a corruption."""
        path = _l2_image(qemu_img, tmp_path / "l2.qcow2")
        _or64(path, _layout(path)["l2"] + 8, 1 << bit)
        assert _agree(qemu_img, path) == (1, 0)

    def test_unaligned_data_cluster(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """A data cluster offset inside a cluster is a corruption (its cluster still counted)."""
        path = _l2_image(qemu_img, tmp_path / "ua.qcow2")
        _or64(path, _layout(path)["l2"] + 8, 512)
        assert _agree(qemu_img, path)[0] >= 1

    def test_snapshot_l1_reserved_bits(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """Reserved bits in a snapshot's L1 table count too."""
        path = _l2_image(qemu_img, tmp_path / "s.qcow2")
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, "write -P 0xcd 0 64k")
        raw = path.read_bytes()
        snap_table = struct.unpack_from(">Q", raw, 64)[0]
        snap_l1 = struct.unpack_from(">Q", raw, snap_table)[0]
        _or64(path, snap_l1, 1 << 57)
        assert _agree(qemu_img, path)[0] == 1

    def test_incomplete_snapshot_entry(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """v3: a snapshot entry without disk_size in its extra data is a corruption."""
        path = _l2_image(qemu_img, tmp_path / "i.qcow2")
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, "write -P 0xcd 0 64k")  # clusters after the snapshot table
        _patch(path, 60, ">I", 2)  # a second entry: the zeroes after the first
        assert _agree(qemu_img, path) == (1, 0)

    def test_extended_alloc_and_zero(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """Extended L2: a subcluster both allocated and zero is a corruption."""
        path = _l2_image(qemu_img, tmp_path / "x.qcow2", "extended_l2=on,cluster_size=64k")
        _or64(path, _layout(path)["l2"] + 8, 1 << 32)  # bitmap of entry 0: zero bit 0 too
        assert _agree(qemu_img, path) == (1, 0)

    def test_extended_unallocated_with_alloc_bits(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """Extended L2: an unallocated cluster with allocation bits is a corruption."""
        path = _l2_image(qemu_img, tmp_path / "u.qcow2", "extended_l2=on,cluster_size=64k")
        _or64(path, _layout(path)["l2"] + 5 * 16 + 8, 1 << 3)
        assert _agree(qemu_img, path) == (1, 0)

    def test_extended_compressed_with_bitmap(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """Extended L2: a compressed cluster with any bitmap bit is a corruption."""
        path = _l2_image(qemu_img, tmp_path / "c.qcow2", "extended_l2=on,cluster_size=64k")
        lay = _layout(path)
        entry = lay["l2"] + (1 << 20) // lay["cs"] * 16
        assert _u64(path, entry) >> 62 & 1, "expected the compressed cluster there"
        _or64(path, entry + 8, 1 << 40)
        assert _agree(qemu_img, path) == (1, 1)  # and its cluster is not counted: a leak

    def test_unaligned_l2_table(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """An L2 table offset inside a cluster is a corruption."""
        path = _l2_image(qemu_img, tmp_path / "t.qcow2")
        _or64(path, _layout(path)["l1"], 512)
        assert _agree(qemu_img, path)[0] >= 1

    def test_refcount_overflow(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """With 1-bit refcounts, a cluster referenced twice overflows: a corruption per reference."""
        path = tmp_path / "o.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", path, "4M")
        qemu_io(path, "write -P 0xab 0 128k")
        l2 = _layout(path)["l2"]
        _patch(path, l2 + 8, ">Q", _u64(path, l2))  # cluster 1 maps to cluster 0's data
        assert _agree(qemu_img, path)[0] >= 1


class TestBitmapCheckParity:
    """Damaged persistent bitmaps: check() and qemu-img check agree."""

    def _bitmap_image(self, qemu_img: QemuImg, path: Path) -> tuple[int, int]:
        """An image with two bitmaps holding data; (directory offset, first table offset)."""
        qemu_img("create", "-q", "-f", "qcow2", path, "64M")
        qemu_img("bitmap", "--add", path, "a")
        qemu_img("bitmap", "--add", path, "b")
        qemu_io(path, "write 0 1M")
        raw = path.read_bytes()
        at = raw.find(bytes.fromhex("23852875"), 0, 65536)
        doff = struct.unpack_from(">Q", raw, at + 8 + 16)[0]
        table = struct.unpack_from(">Q", raw, doff)[0]
        return doff, table

    def test_clean(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """Bitmap data, tables and directory are all counted: no leak."""
        path = tmp_path / "b.qcow2"
        self._bitmap_image(qemu_img, path)
        assert _agree(qemu_img, path) == (0, 0)

    @pytest.mark.parametrize("bits", [1 << 1, 1 << 60, 1 | (1 << 20 << 9)])
    def test_table_entry_reserved_bits(self, tmp_path: Path, qemu_img: QemuImg, bits: int) -> None:
        """A bitmap table entry with reserved bits (or all-ones with an offset) is a corruption.

        qemu-img check cannot report it as one: it refuses to open the image
        (a consistent bitmap is loaded at open), and with the bitmap in-use
        its check fails ("Check failed: Invalid argument", exit code 1).
        check() counts one corruption; reading the bitmap is refused.
        """
        path = tmp_path / "t.qcow2"
        doff, table = self._bitmap_image(qemu_img, path)
        _or64(path, table, bits)
        assert qemu_img("check", path, check=False).returncode == 1
        with images.open(path) as img:
            assert img.check().corruptions == 1
            with pytest.raises(CorruptImageError, match="bitmap 'a'"):
                img.bitmap_extents("a")
        _patch(path, doff + 12, ">I", 3)  # flags: in-use | auto
        proc = qemu_img("check", path, check=False)
        assert proc.returncode == 1 and "Check failed" in proc.stderr
        with images.open(path) as img:
            assert img.check().corruptions == 1


class TestRefcountCheckParity:
    """Damaged refcount tables: check() and qemu-img check agree."""

    @pytest.mark.parametrize("change", ["reserved", "past-eof", "zeroed"])
    def test_refcount_table_entry(self, tmp_path: Path, qemu_img: QemuImg, change: str) -> None:
        """A refcount table entry with reserved bits, past the file, or lost."""
        path = _l2_image(qemu_img, tmp_path / "r.qcow2")
        rt = _u64(path, 48)
        entry = _u64(path, rt)
        value = {"reserved": entry | 0x8, "past-eof": 1 << 40, "zeroed": 0}[change]
        _patch(path, rt, ">Q", value)
        corruptions, _ = _agree(qemu_img, path)
        assert corruptions >= 1

    @pytest.mark.parametrize("change", ["reserved", "past-eof"])
    def test_repair_rebuilds(self, tmp_path: Path, qemu_img: QemuImg, change: str) -> None:
        """check(repair=True) rebuilds the refcounts; the data reads as before, qemu-img agrees."""
        path = _l2_image(qemu_img, tmp_path / "r.qcow2")
        before = qemu_io(path, "read -P 0xab 0 128k", "read -P 0x11 1M 64k")
        rt = _u64(path, 48)
        entry = _u64(path, rt)
        _patch(path, rt, ">Q", entry | 0x8 if change == "reserved" else 1 << 40)
        with images.open(path, writable=True) as img:
            result = img.check(repair=True)
            assert result.corruptions >= 1 and result.ok, result.problems
        qemu_img("check", path)
        assert qemu_io(path, "read -P 0xab 0 128k", "read -P 0x11 1M 64k").count("read") == (
            before.count("read")
        )


class TestPastTheEndParity:
    """References past the end of the file (and an L1 entry of reserved bits only)."""

    @pytest.mark.parametrize(
        "case", ["data", "data-just-past", "l2-table", "compressed", "l1-reserved-only"]
    )
    def test_counts_match(self, tmp_path: Path, qemu_img: QemuImg, case: str) -> None:
        """check() and qemu-img check count the same corruptions and leaks."""
        path = _l2_image(qemu_img, tmp_path / "p.qcow2")
        lay = _layout(path)
        end = -(-path.stat().st_size // lay["cs"]) * lay["cs"]
        compressed = lay["l2"] + (1 << 20) // lay["cs"] * 8
        entry, value = {
            "data": (lay["l2"] + 8, (1 << 63) | (end + 3 * lay["cs"])),
            "data-just-past": (lay["l2"] + 8, (1 << 63) | end),
            "l2-table": (lay["l1"], (1 << 63) | (end + 2 * lay["cs"])),
            "compressed": (
                compressed,
                (_u64(path, compressed) >> 54 << 54) | (end + 4 * lay["cs"]),
            ),
            "l1-reserved-only": (lay["l1"], 1 << 58),
        }[case]
        _patch(path, entry, ">Q", value)
        corruptions, _ = _agree(qemu_img, path)
        assert corruptions >= 1


def _mutations(path: Path, seed: int, count: int) -> list[tuple[int, str, int]]:
    """``count`` random bit flips in the L1, L2 (and bitmap) and refcount entries of ``path``."""
    raw = path.read_bytes()
    lay = _layout(path)
    extended = bool(struct.unpack_from(">Q", raw, 72)[0] & (1 << 4))
    step = 16 if extended else 8
    rt = _u64(path, 48)
    rb = _u64(path, rt)
    fields = [(lay["l1"], ">Q")]
    fields += [(lay["l2"] + step * i + k, ">Q") for i in (0, 1, 2, 3, 16, 17, 32)
               for k in ((0, 8) if extended else (0,))]  # fmt: skip
    fields += [(rt, ">Q")] + [(rb + 2 * i, ">H") for i in range(8)]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        offset, fmt = rng.choice(fields)
        bits = 64 if fmt == ">Q" else 16
        value = struct.unpack_from(fmt, raw, offset)[0] ^ (1 << rng.randrange(bits))
        if rng.random() < 0.3:
            value ^= 1 << rng.randrange(bits)
        out.append((offset, fmt, value))
    return out


def _parity_campaign(qemu_img: QemuImg, tmp_path: Path, count: int) -> dict[str, int]:
    bases = {
        "v3": "",
        "extended": "extended_l2=on",
        "snapshot": "",
    }
    figures = {"same": 0, "qemu-cannot-check": 0}
    for n, (name, options) in enumerate(bases.items()):
        base = _l2_image(qemu_img, tmp_path / f"{name}.qcow2", options)
        if name == "snapshot":
            qemu_img("snapshot", "-c", "s1", base)
            qemu_io(base, "write -P 0xcd 0 64k")
        seed = base.read_bytes()
        path = tmp_path / f"{name}-m.qcow2"
        for offset, fmt, value in _mutations(base, n, count):
            path.write_bytes(seed)
            _patch(path, offset, fmt, value)
            proc = qemu_img("check", "--output=json", path, check=False)
            if not proc.stdout.strip():
                figures["qemu-cannot-check"] += 1
                continue
            theirs = json.loads(proc.stdout)
            with images.open(path) as img:
                ours = img.check()
            expected = (theirs.get("corruptions", 0), theirs.get("leaks", 0))
            expected_errors = theirs.get("check-errors", 0)
            # check() also reports refcounts stored for clusters past the end of the file
            # as leaks; qemu-img looks at the file's clusters only
            end = path.stat().st_size
            leaks = sum(1 for p in ours.problems if p.kind == "leak" and (p.offset or 0) < end)
            got = (ours.corruptions, leaks)
            assert (got, ours.errors) == (expected, expected_errors), (
                f"{name}: {fmt} {value:#x} at {offset:#x}",
                [p.message for p in ours.problems],
                proc.stderr,
            )
            figures["same"] += 1
    return figures


class TestRandomDamageParity:
    """Random bit flips in L1, L2 and refcount entries: check() counts what qemu-img check counts."""

    def test_sampled(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """40 flips on each of three images (v3, extended L2, with a snapshot)."""
        figures = _parity_campaign(qemu_img, tmp_path, 40)
        print(f"check parity, sampled: {figures}")
        assert figures["same"] >= 100

    @pytest.mark.slow
    def test_campaign(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """1000 flips on each of the three images."""
        figures = _parity_campaign(qemu_img, tmp_path, 1000)
        print(f"check parity, campaign: {figures}")
        assert figures["same"] >= 2900

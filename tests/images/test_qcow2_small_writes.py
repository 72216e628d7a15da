"""The lean path of small qcow2 writes (one cluster, write-back mode) against QEMU.

A request inside one cluster of an existing L2 table is either an in-place
overwrite or one new cluster: each costs a single ``pwrite`` of the data (no
``ftruncate``, no metadata write, no flush until ``flush()``). The file may
then end inside its last cluster, as QEMU's do; both tools read the rest as
zeroes. Every case is compared byte for byte with the same writes made by
``qemu-io`` and checked with ``qemu-img check``; damaged entries still reach
the general path, which names the damage and marks the image corrupt.
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit import images
from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.image import Qcow2Image
from virtkit.testing import faults

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
CS = 64 * 1024
SIZE = 256 << 20


def _qemu_io(path: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for cmd in commands:
        argv += ["-c", cmd]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=300)


def _open(path: Path) -> Qcow2Image:
    img = images.open(path, writable=True)
    assert isinstance(img, Qcow2Image)
    return img


def _pair(qemu_img: QemuImg, tmp_path: Path) -> tuple[Path, Path]:
    """Two fresh images made by qemu-img: ours and QEMU's reference."""
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    for p in (ours, ref):
        qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={CS}", p, str(SIZE))
    return ours, ref


def _l2_entry(img: Qcow2Image, guest: int) -> tuple[int, int]:
    """(file offset of the L2 entry mapping ``guest``, its value), from the file."""
    l2 = img.l1[guest // CS // (CS // 8)] & layout.L1E_OFFSET_MASK
    where = l2 + (guest // CS) % (CS // 8) * 8
    (value,) = struct.unpack(">Q", img.st.pread(where, 8))
    return where, value


class TestOnePwritePerRequest:
    """What a small request costs in storage operations."""

    def test_each_allocating_write_is_one_pwrite_of_its_bytes(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """New clusters past the end of the file: one pwrite each, no truncate, no flush."""
        ours, ref = _pair(qemu_img, tmp_path)
        offsets = [i * CS + (i % 16) * 4096 for i in range(1, 60)]
        img = _open(ours)
        img.write(0, b"\x01" * 4096)  # the first write makes the L2 table (general path)
        with faults.inject(faults.Recorder(keep_log=True), only=ours) as rec:
            for n, off in enumerate(offsets, 1):
                img.write(off, bytes([n]) * 4096)
                assert rec.writes == n and rec.flushes == 0, rec.log[-3:]
        assert {op for _p, op, _o, _n in rec.log} == {"pwrite"}
        assert all(length == 4096 for *_, length in rec.log)
        assert img.metadata_cache.dirty
        img.close()
        _qemu_io(ref, "write -P 1 0 4k", *(f"write -P {n} {off} 4k" for n, off in
                                            enumerate(offsets, 1)))  # fmt: skip
        qemu_img("check", ours)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, ref)

    def test_overwrites_of_owned_clusters_touch_no_metadata(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """After a flush, overwriting allocated clusters writes the data only and stays clean."""
        ours, ref = _pair(qemu_img, tmp_path)
        img = _open(ours)
        img.write(0, b"a" * (8 * CS))
        img.flush()
        with faults.inject(faults.Recorder(keep_log=True), only=ours) as rec:
            for i in range(8):
                img.write(i * CS + 1000, b"b" * 3000)
        assert rec.writes == 8 and rec.flushes == 0
        assert not img.metadata_cache.dirty
        img.close()
        _qemu_io(ref, "write -P 0x61 0 512k", *(f"write -P 0x62 {i * CS + 1000} 3000"
                                               for i in range(8)))  # fmt: skip
        qemu_img("check", ours)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, ref)


class TestShortLastCluster:
    """A new last cluster gets only its bytes: the file ends inside it, reads give zeroes."""

    def test_rest_of_the_cluster_reads_as_zeroes_for_both_tools(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """Bytes before and after the write, in a cluster the file only partly covers."""
        ours, ref = _pair(qemu_img, tmp_path)
        img = _open(ours)
        img.write(0, b"x" * 4096)
        img.write(5 * CS + 8192, b"y" * 4096)  # a hole before it, the file ends after it
        assert img.st.size() % CS != 0
        assert img.read(5 * CS, CS) == bytes(8192) + b"y" * 4096 + bytes(CS - 12288)
        img.flush()
        img.write(5 * CS + 40000, b"z" * 100)  # in place, past the file's end
        img.close()
        with images.open(ours) as again:
            data = again.read(5 * CS, CS)
        assert data[:8192] == bytes(8192) and data[8192:12288] == b"y" * 4096
        assert data[12288:40000] == bytes(40000 - 12288) and data[40000:40100] == b"z" * 100
        assert data[40100:] == bytes(CS - 40100)
        _qemu_io(ours, f"read -P 0 {5 * CS} 8192", f"read -P 0 {5 * CS + 40100} {CS - 40100}")
        _qemu_io(ref, "write -P 0x78 0 4k", f"write -P 0x79 {5 * CS + 8192} 4k",
                 f"write -P 0x7a {5 * CS + 40000} 100")  # fmt: skip
        qemu_img("check", ours)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, ref)

    def test_qemu_writes_after_us_and_we_after_qemu(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """Each tool allocates after the other's short last cluster without damage."""
        ours, _ref = _pair(qemu_img, tmp_path)
        with contextlib.closing(_open(ours)) as img:
            img.write(0, b"a" * 4096)
            img.write(3 * CS, b"b" * 4096)
        _qemu_io(ours, f"write -P 0x63 {3 * CS + 8192} 4k", f"write -P 0x64 {9 * CS} 4k")
        with contextlib.closing(_open(ours)) as img:
            img.write(12 * CS + 512, b"e" * 512)
        qemu_img("check", ours)
        with images.open(ours) as img:
            assert img.read(3 * CS, 12288) == b"b" * 4096 + bytes(4096) + b"c" * 4096
            assert img.read(9 * CS, 4096) == b"d" * 4096
            assert img.read(12 * CS, 1024) == bytes(512) + b"e" * 512


class TestZeroFlags:
    """Clusters QEMU zeroed (v3 zero flag) are written like unallocated ones, or in place."""

    def test_zero_flag_without_a_cluster_gets_a_new_one(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """``write -z`` on an unallocated cluster, then a small write inside it."""
        ours, ref = _pair(qemu_img, tmp_path)
        for p in (ours, ref):
            _qemu_io(p, "write -P 0x11 0 4k", f"write -z {2 * CS} {2 * CS}")
        with contextlib.closing(_open(ours)) as img:
            assert _l2_entry(img, 2 * CS)[1] == layout.OFLAG_ZERO
            img.write(2 * CS + 4096, b"\x22" * 4096)
            img.write(3 * CS + 61440, b"\x33" * 4096)
            assert img.read(2 * CS, 8192) == bytes(4096) + b"\x22" * 4096
        _qemu_io(ref, f"write -P 0x22 {2 * CS + 4096} 4k", f"write -P 0x33 {3 * CS + 61440} 4k")
        qemu_img("check", ours)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, ref)

    def test_zeroed_allocated_cluster_keeps_its_cluster(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """A zero flag on an allocated cluster (``write -z`` without unmap) takes the general
        path: the cluster is zero-filled around the new bytes before the flag goes."""
        ours, ref = _pair(qemu_img, tmp_path)
        for p in (ours, ref):
            _qemu_io(p, "write -P 0x11 0 128k", f"write -z {CS} {CS}")
        with contextlib.closing(_open(ours)) as img:
            _where, entry = _l2_entry(img, CS)
            assert entry & layout.OFLAG_ZERO and entry & layout.L2E_OFFSET_MASK
            img.write(CS + 100, b"\x44" * 100)
            assert img.read(CS, 300) == bytes(100) + b"\x44" * 100 + bytes(100)
        _qemu_io(ref, f"write -P 0x44 {CS + 100} 100")
        qemu_img("check", ours)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, ref)


class TestDamagedEntries:
    """An entry the lean path cannot trust goes to the general path, which names the damage."""

    @pytest.mark.parametrize("target", ["l1", "past-eof"])
    def test_bad_host_offset_marks_the_image_corrupt(self, tmp_path: Path, target: str) -> None:
        """An owned entry pointing at the L1 table or past the file's end: refused, nothing
        written there, the image flagged corrupt."""
        path = tmp_path / "d.qcow2"
        images.create(path, SIZE, cluster_size=CS).close()
        with contextlib.closing(_open(path)) as img:
            img.write(0, b"a" * (2 * CS))
            l1_off = img.hdr.l1_table_offset
            where, _entry = _l2_entry(img, CS)
            end = img.st.size()
        bad = l1_off if target == "l1" else (end + 8 * CS) & ~(CS - 1)
        with path.open("r+b") as f:
            f.seek(where)
            f.write(struct.pack(">Q", bad | layout.OFLAG_COPIED))
        before = path.read_bytes()[l1_off : l1_off + CS]
        img = _open(path)
        with pytest.raises(virtkit.CorruptImageError, match="metadata|past the end"):
            img.write(CS + 512, b"b" * 512)
        assert img.corrupt
        img.close()
        assert path.read_bytes()[l1_off : l1_off + CS] == before

    def test_failed_small_write_leaves_a_clean_image(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """A full disk during a small allocating write: the caller gets ImageError, a retry
        after the space comes back succeeds, and qemu-img check is clean after repair."""
        ours, _ref = _pair(qemu_img, tmp_path)
        img = _open(ours)
        img.write(0, b"a" * 4096)
        plan = faults.NoSpace(at_write=1)
        with faults.inject(plan, only=ours):
            with pytest.raises(virtkit.ImageError, match="No space"):
                img.write(7 * CS, b"b" * 4096)
            plan.release()
            img.write(7 * CS, b"b" * 4096)
        assert img.read(7 * CS, 4096) == b"b" * 4096
        img.close()
        proc = qemu_img("check", ours, check=False)
        assert proc.returncode in (0, 3), proc.stdout  # a leak at most
        with contextlib.closing(_open(ours)) as img:
            assert img.check(repair=True).ok
            assert img.read(0, 4096) == b"a" * 4096 and img.read(7 * CS, 4096) == b"b" * 4096
        qemu_img("check", ours)

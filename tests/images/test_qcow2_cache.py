"""The qcow2 metadata cache modes: write-back (QEMU's contract) and writethrough."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit import images
from virtkit.images.qcow2.image import Qcow2Image
from virtkit.testing import faults

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
CS = 4096
SIZE = 64 << 20
L2_SPAN = CS // 8 * CS  # guest bytes one L2 table maps (4 KiB clusters: 2 MiB)


def _new(path: Path, **opts: Any) -> None:
    images.create(path, SIZE, cluster_size=CS, **opts).close()


def _open(path: Path, cache: str = "writeback") -> Qcow2Image:
    img = images.open(path, writable=True, cache=cache)  # type: ignore[arg-type]
    assert isinstance(img, Qcow2Image)
    return img


def _host(img: Qcow2Image, guest: int) -> int:
    """The host cluster offset guest offset ``guest`` maps to (the engine's own view)."""
    run = next(img._mapper.runs(guest, 1))
    return int(run.host) & ~(CS - 1)


class TestWriteBack:
    """cache="writeback": metadata in memory until flush(), eviction or close()."""

    def test_allocating_writes_take_no_fdatasync(self, tmp_path: Path) -> None:
        """200 allocating writes cost no flush at all; flush() then writes back in order."""
        path = tmp_path / "d.qcow2"
        _new(path)
        img = _open(path)
        with faults.inject(faults.Recorder(), only=path) as rec:
            for i in range(200):
                img.write(i * 3 * CS + 512, b"w" * 1000)
            assert rec.flushes == 0
            assert img.metadata_cache.dirty
            img.flush()
            assert not img.metadata_cache.dirty
            assert 1 <= rec.flushes <= 3
        img.close()

    def test_writethrough_flushes_every_write(self, tmp_path: Path) -> None:
        """cache="writethrough": every write call ends with an fdatasync."""
        path = tmp_path / "d.qcow2"
        _new(path)
        img = _open(path, "writethrough")
        assert img.cache_mode == "writethrough"
        with faults.inject(faults.Recorder(), only=path) as rec:
            for i in range(20):
                img.write(i * 3 * CS, b"w" * 100)
                assert rec.flushes >= i + 1
                assert not img.metadata_cache.dirty
        img.close()

    def test_reads_see_unflushed_writes_and_reopen_sees_closed_ones(
        self, tmp_path: Path, qemu_img: QemuImg
    ) -> None:
        """Reads come from the cache before write-back; close() writes everything."""
        path = tmp_path / "d.qcow2"
        _new(path)
        img = _open(path)
        img.write(5 * L2_SPAN + 100, b"abc" * 1000)
        img.write_zeroes(5 * L2_SPAN + 200, 10)
        assert img.read(5 * L2_SPAN + 100, 6) == b"abcabc"
        assert img.read(5 * L2_SPAN + 200, 10) == bytes(10)
        img.close()
        qemu_img("check", path)
        with images.open(path) as again:
            assert again.read(5 * L2_SPAN + 100, 6) == b"abcabc"
            assert again.read(5 * L2_SPAN + 200, 10) == bytes(10)

    def test_dirty_set_stays_bounded(self, tmp_path: Path, qemu_img: QemuImg) -> None:
        """Past the bound the cache writes itself back (no final fdatasync) and unpins."""
        path = tmp_path / "d.qcow2"
        _new(path)
        img = _open(path)
        img.metadata_cache._limit = 4
        with faults.inject(faults.Recorder(), only=path) as rec:
            for i in range(30):  # one new L2 table each
                img.write(i * L2_SPAN, b"x" * CS)
                assert len(img._mapper.pinned) <= 5
        assert img.metadata_cache.writebacks >= 5
        assert rec.flushes < 30
        img.close()
        qemu_img("check", path)

    def test_freed_cluster_not_reused_before_its_removal_is_durable(self, tmp_path: Path) -> None:
        """A discarded cluster keeps its count until the discard reached the disk."""
        path = tmp_path / "d.qcow2"
        _new(path)
        img = _open(path)
        img.write(0, b"a" * CS)
        img.flush()
        old = _host(img, 0)
        img.discard(0, CS)
        img.write(10 * CS, b"b" * CS)
        assert _host(img, 10 * CS) != old
        img.flush()  # now the discard is on disk: the cluster is free again
        img.write(20 * CS, b"c" * CS)
        assert _host(img, 20 * CS) == old
        img.close()

    def test_power_loss_keeps_flushed_loses_unflushed_never_corrupts(
        self, tmp_path: Path, qemu_img: QemuImg
    ) -> None:
        """Power lost during close(): flushed data intact, the unflushed write gone, no damage."""
        path = tmp_path / "d.qcow2"
        _new(path)
        pristine = path.read_bytes()

        def work(plan: faults.FaultPlan, state: dict[str, int]) -> None:
            img = _open(path)
            img.write(3 * CS, b"F" * CS)
            img.flush()
            state["acked"] = plan.writes  # writes done when flush() returned
            img.write(40 * CS, b"U" * (2 * CS))
            img.write(3 * CS + 10, b"u")
            img.close()

        with faults.inject(faults.Recorder(), only=path) as rec:
            work(rec, {})
        losses = 0
        for n in range(1, rec.writes + 1):
            path.write_bytes(pristine)
            state: dict[str, int] = {}
            with (
                faults.inject(faults.PowerLoss(n), only=path) as plan,
                contextlib.suppress(faults.SimulatedCrash),
            ):
                work(plan, state)
            out = qemu_img("check", "--output=json", path, check=False)
            assert out.returncode in (0, 3), out.stdout + out.stderr  # 3: leaks only
            with images.open(path) as img:
                if "acked" in state:  # the power went after flush() returned
                    first = img.read(3 * CS, CS)
                    assert first[:10] == b"F" * 10 and first[11:] == b"F" * (CS - 11), n
                late = img.read(40 * CS, 2 * CS)
                assert late in (bytes(2 * CS), b"U" * (2 * CS)), n
                losses += late != b"U" * (2 * CS)
        assert losses > 0  # some cut points really did lose the unflushed write

    def test_writethrough_write_survives_power_loss_without_flush(
        self, tmp_path: Path, qemu_img: QemuImg
    ) -> None:
        """In writethrough mode a write that returned survives the power going right after."""
        path = tmp_path / "d.qcow2"
        _new(path)
        img = _open(path, "writethrough")
        plan = faults.PowerLoss(1, keep=0.0)
        img.write(7 * CS + 3, b"D" * 5000)
        with faults.inject(plan, only=path), pytest.raises(faults.SimulatedCrash):
            img.write(90 * CS, b"E" * CS)
        qemu_img("check", path)
        with images.open(path) as again:
            assert again.read(7 * CS + 3, 5000) == b"D" * 5000


class TestCacheOption:
    """images.open(cache=...) is checked."""

    def test_unknown_mode_is_a_config_error(self, tmp_path: Path) -> None:
        """A cache mode QEMU has but virtkit does not implement is refused by name."""
        path = tmp_path / "d.qcow2"
        _new(path)
        with pytest.raises(virtkit.ConfigError, match="cache"):
            images.open(path, cache="none")  # type: ignore[arg-type]

    def test_raw_has_no_writethrough(self, tmp_path: Path) -> None:
        """A driver without the mode says so instead of ignoring it."""
        path = tmp_path / "d.raw"
        images.create(path, "1M", format="raw").close()
        with pytest.raises(virtkit.UnsupportedFeatureError, match="writethrough"):
            images.open(path, cache="writethrough")
        images.open(path, cache="writeback").close()


def test_check_of_an_open_writeback_image_sees_cached_metadata(tmp_path: Path) -> None:
    """check() writes back cached tables first: a COW after a snapshot made a new L2 table that
    lived only in the cache, past the file's end, and check() reported it as corruption."""
    path = tmp_path / "m.qcow2"
    images.create(path, 1024 * 1024, cluster_size=16384).close()
    with images.open(path, writable=True, cache="writeback") as img:
        img.write(0, b"\x01")
        img.create_snapshot("s0")
        img.write_zeroes(0, 16384)
        result = img.check()
        assert result.ok, result.problems


def test_a_refused_revert_keeps_the_frees_a_write_back_applied(tmp_path: Path) -> None:
    """A structural step writes the cache back first; its refcount drops must reach the file
    too: a revert refused for refcount overflow reloads from the file and used to lose them
    (two clusters leaked; found by the model test in CI)."""
    path = tmp_path / "m.qcow2"
    images.create(path, 256 * 1024, cluster_size=16384, refcount_bits=2).close()
    with images.open(path, writable=True, cache="writeback") as img:
        img.write(0, bytes(16385))
        img.create_snapshot("a")
        img.create_snapshot("b")
        img.write_zeroes(0, 1)  # copies the shared table: the old one's count drops later
        with pytest.raises(virtkit.ImageError, match="overflow"):
            img.revert_snapshot("a")
        result = img.check()
        assert result.ok, result.problems

"""virtkit.testing.faults: the fault plans do exactly what they promise, on real files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import virtkit
from virtkit import images
from virtkit.images import storage
from virtkit.testing import faults


def raw(path: Path, size: int = 64 * 1024) -> images.Image:
    """A fresh raw image, open for writing."""
    return images.create(path, size, format="raw")


class TestRecorder:
    """Recorder counts without changing anything."""

    def test_counts_writes_flushes_and_bytes(self, tmp_path: Path) -> None:
        """Each pwrite counts once, flushes separately, bytes add up, per-path counts kept."""
        path = tmp_path / "a.raw"
        with raw(path) as img, faults.inject(faults.Recorder(keep_log=True)) as rec:
            img.write(0, b"x" * 100)
            img.write(4096, b"y" * 10)
            img.flush()
        assert rec.writes == 2 and rec.bytes_written == 110 and rec.flushes >= 1
        assert rec.paths == {str(path): 2}
        assert [op for _p, op, _o, _l in rec.log][:3] == ["pwrite", "pwrite", "flush"]
        assert path.read_bytes()[:100] == b"x" * 100

    def test_only_limits_the_plan_to_matching_files(self, tmp_path: Path) -> None:
        """With ``only``, writes to other files are neither counted nor faulted."""
        (tmp_path / "in").mkdir()
        a, b = tmp_path / "in" / "a.raw", tmp_path / "b.raw"
        ia, ib = raw(a), raw(b)
        with faults.inject(faults.CrashAfter(1), only=a.parent) as p:
            ib.write(0, b"free")
            with pytest.raises(faults.SimulatedCrash):
                ia.write(0, b"dies")
        ib.close()
        assert p.writes == 1
        assert b.read_bytes()[:4] == b"free" and a.read_bytes()[:4] == bytes(4)

    def test_hook_removed_and_nesting_refused(self, tmp_path: Path) -> None:
        """Plans do not nest, and the hook is gone after the block even when it raised."""

        def nested() -> None:
            with faults.inject(faults.Recorder()), faults.inject(faults.Recorder()):
                pass

        with faults.inject(faults.Recorder()):
            with pytest.raises(virtkit.StateError):
                nested()
            assert storage._fault_hook is not None  # the outer plan is still in place

        def failing() -> None:
            with faults.inject(faults.Recorder()):
                raise RuntimeError

        with pytest.raises(RuntimeError):
            failing()
        assert storage._fault_hook is None


class TestCrashAfter:
    """CrashAfter(n): write n never happens; the process is dead from then on."""

    def test_nth_write_never_reaches_the_file(self, tmp_path: Path) -> None:
        """Writes before n land, write n does not, and nothing after it either."""
        path = tmp_path / "a.raw"
        img = raw(path)
        with faults.inject(faults.CrashAfter(2)) as plan:
            img.write(0, b"one")
            with pytest.raises(faults.SimulatedCrash) as info:
                img.write(512, b"two")
            assert info.value.index == 2 and info.value.op == "pwrite"
            with pytest.raises(faults.SimulatedCrash):
                img.write(1024, b"three")  # dead processes do not write
        assert plan.crashed is not None
        data = path.read_bytes()
        assert data[:3] == b"one" and data[512:515] == bytes(3) and data[1024:1029] == bytes(5)

    def test_not_an_exception(self, tmp_path: Path) -> None:
        """SimulatedCrash passes through ``except Exception`` (nothing in virtkit can swallow it)."""
        assert not issubclass(faults.SimulatedCrash, Exception)
        img = raw(tmp_path / "a.raw")

        def swallow() -> None:
            try:
                img.write(0, b"x")
            except Exception:
                pytest.fail("caught")

        with faults.inject(faults.CrashAfter(1)), pytest.raises(faults.SimulatedCrash):
            swallow()

    def test_dead_process_releases_its_locks(self, tmp_path: Path) -> None:
        """After the crashed block the descriptors are closed: the image reopens writable."""
        path = tmp_path / "d.qcow2"
        images.create(path, "1M").close()
        img = images.open(path, writable=True)
        with pytest.raises(faults.SimulatedCrash), faults.inject(faults.CrashAfter(1)):
            img.write(0, b"x" * 70000)
        with images.open(path, writable=True) as again:
            assert again.read(0, 4) == bytes(4)

    def test_bad_index(self) -> None:
        """A crash index below 1 is a ConfigError."""
        with pytest.raises(virtkit.ConfigError):
            faults.CrashAfter(0)


class TestPowerLoss:
    """PowerLoss(n): writes since a file's last flush are undone, then death."""

    def test_unflushed_writes_undone_flushed_kept(self, tmp_path: Path) -> None:
        """Flushed bytes stay; unflushed writes and growth vanish; the file size is restored."""
        path = tmp_path / "a.raw"
        img = raw(path, 4096)
        img.write(0, b"kept")
        img.flush()
        with faults.inject(faults.PowerLoss(4)) as plan:
            img.write(0, b"lost")
            img.resize(8192)
            img.write(6000, b"gone")
            with pytest.raises(faults.SimulatedCrash):
                img.write(100, b"never")
        assert plan.lost == 3
        data = path.read_bytes()
        assert len(data) == 4096 and data[:4] == b"kept" and data[100:105] == bytes(5)

    def test_keep_one_keeps_everything_written(self, tmp_path: Path) -> None:
        """keep=1.0 loses nothing that was written (a plain crash)."""
        path = tmp_path / "a.raw"
        img = raw(path, 4096)
        with faults.inject(faults.PowerLoss(3, keep=1.0)):
            img.write(0, b"aa")
            img.write(10, b"bb")
            with pytest.raises(faults.SimulatedCrash):
                img.write(20, b"cc")
        data = path.read_bytes()
        assert data[:2] == b"aa" and data[10:12] == b"bb" and data[20:22] == bytes(2)

    def test_reordered_loss_keeps_a_subset_in_order(self, tmp_path: Path) -> None:
        """With keep=0.5 each unflushed write survives or not; overlapping ones replay in order."""
        outcomes = set()
        for seed in range(12):
            path = tmp_path / f"a{seed}.raw"
            img = raw(path, 4096)
            with faults.inject(faults.PowerLoss(3, keep=0.5, seed=seed)):
                img.write(0, b"1111")
                img.write(2, b"22")
                with pytest.raises(faults.SimulatedCrash):
                    img.write(100, b"x")
            outcomes.add(path.read_bytes()[:4])
        assert outcomes <= {b"\0\0\0\0", b"1111", b"\0\x0022", b"1122"}
        assert len(outcomes) >= 3

    def test_surviving_write_past_the_end_lands_at_its_offset(self, tmp_path: Path) -> None:
        """A kept write that started past the end of the file is replayed where it was made,
        leaving a hole before it (it used to be replayed at the old end of the file)."""
        path = tmp_path / "a.raw"
        path.write_bytes(bytes(4096))
        st = storage.FileStorage(path, writable=True, lock=False)
        with faults.inject(faults.PowerLoss(2, keep=1.0)):
            st.pwrite(10000, b"far")
            with pytest.raises(faults.SimulatedCrash):
                st.pwrite(0, b"x")
        data = path.read_bytes()
        assert len(data) == 10003 and data[4096:10000] == bytes(5904) and data[10000:] == b"far"

    def test_renamed_file_is_restored(self, tmp_path: Path) -> None:
        """Undo follows the file, not its name: a rename does not save unflushed writes."""
        path, moved = tmp_path / "a.raw", tmp_path / "b.raw"
        img = raw(path, 4096)
        with faults.inject(faults.PowerLoss(2)):
            img.write(0, b"unflushed")
            os.replace(path, moved)
            with pytest.raises(faults.SimulatedCrash):
                img.write(10, b"x")
        assert moved.read_bytes()[:9] == bytes(9)

    def test_bad_keep(self) -> None:
        """keep outside [0, 1] is a ConfigError."""
        with pytest.raises(virtkit.ConfigError):
            faults.PowerLoss(1, keep=1.5)


class TestNoSpace:
    """NoSpace: ENOSPC where the OS would give it, translated by the engine."""

    def test_enospc_becomes_image_error(self, tmp_path: Path) -> None:
        """A write needing space fails with ImageError naming the file, ENOSPC as cause."""
        path = tmp_path / "a.raw"
        img = raw(path, 0)
        img.resize(4096)
        with faults.inject(faults.NoSpace(at_write=1)) as plan:
            with pytest.raises(virtkit.ImageError) as info:
                img.write(0, b"x" * 10)
            assert info.value.path == str(path) and "No space left" in str(info.value)
            assert isinstance(info.value.__cause__, OSError)
            assert info.value.__cause__.errno == errno.ENOSPC
            assert plan.failures == 1
            plan.release()
            img.write(0, b"ok")
        assert path.read_bytes()[:2] == b"ok"

    def test_overwrite_needs_no_space_unless_cow(self, tmp_path: Path) -> None:
        """Overwriting allocated bytes works on a full ext4-like disk, not on a cow one."""
        path = tmp_path / "a.raw"
        img = raw(path, 8192)
        img.write(0, b"y" * 4096)
        with faults.inject(faults.NoSpace(at_write=1)):
            img.write(0, b"z" * 10)
            with pytest.raises(virtkit.ImageError):
                img.write(4096, b"z" * 10)  # a hole: needs a block
        with (
            faults.inject(faults.NoSpace(at_write=1, cow=True)),
            pytest.raises(virtkit.ImageError),
        ):
            img.write(0, b"w")

    def test_partial_write_stores_prefix(self, tmp_path: Path) -> None:
        """A write crossing the limit stores what fits, as a short write would, then fails."""
        path = tmp_path / "a.raw"
        img = raw(path, 4096)
        with faults.inject(faults.NoSpace(after_bytes=5)), pytest.raises(virtkit.ImageError):
            img.write(0, b"abcdefgh")
        img.close()
        assert path.read_bytes()[:8] == b"abcde\0\0\0"

    def test_needs_one_limit(self) -> None:
        """Neither or both limits is a ConfigError."""
        with pytest.raises(virtkit.ConfigError):
            faults.NoSpace()
        with pytest.raises(virtkit.ConfigError):
            faults.NoSpace(after_bytes=1, at_write=1)

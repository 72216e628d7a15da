"""Crash consistency: a process cut off at any write leaves an image that only leaks.

Each public-API workload runs once to completion (under a
:class:`~virtkit.testing.faults.Recorder`, to count its writes), then again
from the same starting files cut off before write N, for a dense sample of N
(every N with ``-m slow`` or ``scripts/crash_campaign.py``). After each cut:
the image opens; real ``qemu-img check`` finds no corruption (leaks allowed;
the COPIED-flag window, which QEMU has too, only where it is provably
harmless); every byte a completed ``flush()`` acknowledged reads back;
``check(repair=True)`` reclaims the leaks and ``qemu-img check`` is then clean.

The workloads open their images in the default ``cache="writeback"`` mode, whose
contract is QEMU's (flushed data survives, unflushed may be lost, never
corruption); :class:`TestWritethrough` runs a sample in ``"writethrough"`` mode,
where every write that returned must survive.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import image_workloads
import pytest
from image_workloads import (
    CS,
    DEFAULT_POINTS,
    SIZE,
    WORKLOADS,
    Model,
    check_consistent,
    copied_flag_window,
    qemu_check,
    run_sweep,
)

from virtkit import images


class TestCrashAfterWrite:
    """CrashAfter(N): the write N never happens, nor anything after it."""

    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_sampled_crash_points(self, name: str, tmp_path: Path) -> None:
        """A dense sample of crash points leaves the image consistent, acknowledged data intact."""
        run_sweep(name, "crash", tmp_path, DEFAULT_POINTS)

    def test_crashes_leak_and_repair_reclaims(self, tmp_path: Path) -> None:
        """Cutting scattered writes short leaks clusters sometimes; repair always reclaims them."""
        figs = run_sweep("scattered", "crash", tmp_path, 30)
        assert 0 < figs.leaked < figs.tried

    @pytest.mark.slow
    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_every_crash_point(self, name: str, tmp_path: Path) -> None:
        """Every single write index of the workload is a survivable crash point."""
        run_sweep(name, "crash", tmp_path, None)


@pytest.fixture
def writethrough() -> Iterator[None]:
    """The workloads' writers open their images with cache="writethrough"."""
    image_workloads.OPEN["cache"] = "writethrough"
    try:
        yield
    finally:
        image_workloads.OPEN.clear()


@pytest.mark.usefixtures("writethrough")
class TestWritethrough:
    """cache="writethrough": every write that returned survives any crash or power loss."""

    @pytest.mark.parametrize("kind", ["crash", "reorder"])
    @pytest.mark.parametrize("name", ["scattered", "chain"])
    def test_every_returned_write_survives(self, name: str, kind: str, tmp_path: Path) -> None:
        """A sample of cut points: each write the workload saw return reads back."""
        run_sweep(name, kind, tmp_path, DEFAULT_POINTS // 4)

    def test_model_acknowledges_each_write(self, tmp_path: Path) -> None:
        """The model counts one acknowledgement per completed write in this mode."""
        path = tmp_path / "disk.qcow2"
        images.create(path, SIZE, cluster_size=CS).close()
        m = Model(bytes(SIZE))
        with images.open(path, writable=True, cache="writethrough") as img:
            m.write(img, 0, b"a" * 100)
            m.write_zeroes(img, CS, CS)
        assert m.acks == 2


class TestTheCheckerBites:
    """Negative controls: the after-crash checks fail on real damage."""

    def test_lost_acknowledged_write_is_caught(self, tmp_path: Path) -> None:
        """Zeroing a flushed data cluster behind the engine's back fails the model check."""
        path = tmp_path / "disk.qcow2"
        with images.create(path, SIZE, cluster_size=CS) as img:
            m = Model(bytes(SIZE))
            m.write(img, 10 * CS, b"\x77" * CS)
            m.flush(img)
            host = next(iter(img.block_status(10 * CS, CS, include_backing=False)))
            assert host.kind == "data"
        raw = bytearray(path.read_bytes())
        at = raw.index(b"\x77" * CS)
        raw[at : at + CS] = bytes(CS)
        path.write_bytes(bytes(raw))
        with images.open(path) as img, pytest.raises(AssertionError, match="acknowledged byte"):
            m.verify(img)

    def test_refcount_below_references_is_corruption(self, tmp_path: Path) -> None:
        """A zeroed refcount of a used cluster is reported as harmful, not as the flag window."""
        path = tmp_path / "disk.qcow2"
        with images.create(path, SIZE, cluster_size=CS, refcount_bits=16) as img:
            img.write(0, b"\x55" * CS)
        raw = bytearray(path.read_bytes())
        data_cluster = raw.index(b"\x55" * CS) // CS
        table = int.from_bytes(raw[48:56], "big")  # header: refcount_table_offset
        refblock = int.from_bytes(raw[table : table + 8], "big")  # its first entry
        raw[refblock + 2 * data_cluster : refblock + 2 * data_cluster + 2] = bytes(2)
        path.write_bytes(bytes(raw))
        report = qemu_check(path)
        _harmless, harmful = copied_flag_window(report)
        assert report["corruptions"] > 0 and harmful, report["stderr"]
        with pytest.raises(AssertionError, match="qemu-img check"):
            check_consistent(tmp_path, WORKLOADS["scattered"], {"model": Model(bytes(SIZE))}, "x")

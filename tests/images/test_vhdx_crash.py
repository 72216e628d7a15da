"""Writing VHDX when things go wrong: a crash, a power loss or a full disk never leaves a bad file."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_helpers import qemu_io

import virtkit
from virtkit.testing import faults

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20


@pytest.fixture
def source(tmp_path: Path, qemu_img: Run) -> Path:
    """A sparse qcow2 source with data in three 1 MiB blocks."""
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "6M")
    qemu_io(src, "write -P 0x11 0 100k", "write -P 0x22 2M 1M", "write -P 0x33 5M 4k")
    return src


def _convert(src: Path, dst: Path) -> None:
    virtkit.images.convert(src, dst, format="vhdx", block_size=MiB)


class TestCrashes:
    """convert(format="vhdx") is all or nothing under crashes, power loss and ENOSPC."""

    def test_crash_at_every_sampled_write(
        self, tmp_path: Path, source: Path, qemu_img: Run
    ) -> None:
        """Killed at any write, the destination is the old file (or absent), never half made."""
        dst = tmp_path / "out.vhdx"
        dst.write_bytes(b"old contents")
        with faults.inject(faults.Recorder()) as rec:
            _convert(source, tmp_path / "ref.vhdx")
        assert rec.writes > 5
        points = sorted({1, 2, 3, rec.writes // 2, rec.writes - 1, rec.writes})
        for n in points:
            with faults.inject(faults.PowerLoss(n)), pytest.raises(faults.SimulatedCrash):
                _convert(source, dst)
            assert dst.read_bytes() == b"old contents", n
            for leftover in tmp_path.glob(".out.vhdx.*"):  # a dead process leaves its temp file
                leftover.unlink()
        _convert(source, dst)
        qemu_img("check", dst)
        qemu_img("compare", source, dst)

    def test_enospc(self, tmp_path: Path, source: Path) -> None:
        """A full disk is an ImageError; no destination and no temporary file are left."""
        dst = tmp_path / "out.vhdx"
        with faults.inject(faults.NoSpace(after_bytes=2 * MiB)), pytest.raises(virtkit.ImageError):
            _convert(source, dst)
        assert not dst.exists()
        assert sorted(os.listdir(tmp_path)) == ["src.qcow2"]

    def test_create_is_atomic(self, tmp_path: Path) -> None:
        """A create killed while writing the skeleton leaves no file under the name."""
        with faults.inject(faults.Recorder()) as rec:
            virtkit.images.create(tmp_path / "a.vhdx", "4M", format="vhdx").close()
        for n in range(1, rec.writes + 1):
            target = tmp_path / f"b{n}.vhdx"
            with faults.inject(faults.CrashAfter(n)), contextlib.suppress(faults.SimulatedCrash):
                virtkit.images.create(target, "4M", format="vhdx").close()
            assert not target.exists() or virtkit.images.open(target).virtual_size == 4 * MiB

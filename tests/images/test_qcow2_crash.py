"""Write ordering: a process dying after any write leaves a leak at worst, never corruption."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtkit import images
from virtkit.images.qcow2 import metadata
from virtkit.images.qcow2.image import Qcow2Image
from virtkit.images.storage import FileStorage

QemuImg = Callable[..., subprocess.CompletedProcess[str]]


class Crash(BaseException):
    """The simulated death of the process (not an Exception: nothing may catch it)."""


class CrashingStorage(FileStorage):
    """A FileStorage that dies before its ``limit``-th write reaches the file."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path, writable=True, lock=False)
        self.limit = limit
        self.writes = 0

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Count writes; crash instead of performing the ``limit``-th one."""
        self.writes += 1
        if self.writes == self.limit:
            raise Crash
        super().pwrite(offset, data)

    def truncate(self, length: int) -> None:
        """Truncation counts as a write too."""
        self.writes += 1
        if self.writes == self.limit:
            raise Crash
        super().truncate(length)


def _workload(img: Qcow2Image, big: int) -> None:
    cs = img.cluster_size
    img.write(0, b"a" * (3 * cs))
    img.write(cs // 2, b"b" * cs)
    img.create_snapshot("s1", vm_state=b"state" * 100)
    img.write(100, b"c" * 5000)
    img.write_compressed(8 * cs, b"z" * cs)
    img.write_zeroes(cs, 2 * cs)
    img.create_snapshot("s2")
    img.write(2 * cs + 7, b"d" * 10)
    img.revert_snapshot("s1")
    img.write(20 * cs, b"e" * big)
    img.delete_snapshot("s1")
    img.discard(0, cs)
    img.delete_snapshot("s2")
    img.resize(img.virtual_size * 2)  # v2 cannot resize while snapshots exist
    img.write(img.virtual_size - 10, b"f" * 10)


def _run(path: Path, limit: int, big: int) -> int:
    st = CrashingStorage(path, limit)
    img = Qcow2Image(st, metadata.load(st), writable=True)
    try:
        _workload(img, big)
        img.close()  # write-back: the last metadata reaches the file here
    except Crash:
        st.close()
        return -1
    return st.writes


class TestCrashSafety:
    """Cut the write sequence at every point: the image only ever leaks."""

    @pytest.mark.parametrize(
        ("opts", "big"),
        [
            ({"compat": "1.1", "cluster_size": 4096, "refcount_bits": 2}, 40 * 4096),
            ({"compat": "0.10", "cluster_size": 512}, 40 * 512),
            # 64-bit refcounts on 512 B clusters: a block counts 64 clusters and the first
            # refcount table 4096, so this write adds refcount blocks and moves the table
            ({"compat": "1.1", "cluster_size": 512, "refcount_bits": 64}, 2_200_000),
        ],
        ids=["v3-2bit", "v2", "v3-reftable-growth"],
    )
    def test_crash_points(
        self, qemu_img: QemuImg, tmp_path: Path, opts: dict[str, Any], big: int
    ) -> None:
        """After a crash at write N, qemu-img check finds no corruption and repair is clean."""
        pristine = tmp_path / "pristine.qcow2"
        with images.create(pristine, "4M", **opts):
            pass
        full = tmp_path / "full.qcow2"
        shutil.copy(pristine, full)
        total = _run(full, 10**9, big)
        qemu_img("check", full)
        with images.open(full) as img, images.open(pristine) as old:
            before = old.hdr.refcount_table_offset  # type: ignore[attr-defined]
            grew = img.hdr.refcount_table_offset != before  # type: ignore[attr-defined]
        assert grew == (big > 1_000_000)
        assert total > 50
        work = tmp_path / "work.qcow2"
        # an even sample of ~150 crash points; VIRTKIT_CRASH_STEP=1 tries every write
        step = int(os.environ.get("VIRTKIT_CRASH_STEP", "0")) or max(1, total // 150)
        for limit in range(1, total + 1, step):
            shutil.copy(pristine, work)
            assert _run(work, limit, big) == -1
            proc = qemu_img("check", work, check=False)
            # Only leaks, or COPIED flags caught between their two writes (QEMU has the same
            # window: a flag and a refcount cannot change in one write); never a refcount
            # below its references, which is what lets data be overwritten.
            errors = [
                line
                for line in (proc.stdout + proc.stderr).splitlines()
                if line.startswith("ERROR") and "OFLAG_COPIED" not in line
            ]
            assert proc.returncode in (0, 2, 3) and not errors, (
                f"crash before write {limit}:\n{proc.stdout}{proc.stderr}"
            )
            with images.open(work, writable=True) as img:
                result = img.check(repair=True)
                bad = [
                    p
                    for p in result.problems
                    if p.kind == "corruption" and "OFLAG_COPIED" not in p.message
                ]
                assert not bad, (limit, bad)
                assert result.ok
                img.read(0, img.virtual_size)
            qemu_img("check", work)

"""images.create builds a qcow2 image under a temporary name and publishes it whole.

A create killed at any write (``kill -9``: a forked child ends with
``os._exit`` exactly there) leaves either nothing at the destination or a
complete image that ``qemu-img check`` finds without corruption (the write
made after the create may leak clusters); never a half-made file.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtkit import images
from virtkit.errors import ImageError
from virtkit.testing import faults

Run = Callable[..., subprocess.CompletedProcess[str]]
SIZE = 8 * 1024 * 1024


def _die_at(n: int, work: Callable[[], object], only: Path) -> int:
    """Run ``work`` in a child that ends with ``os._exit(137)`` at write ``n``; its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            with faults.inject(faults.CrashAfter(n, hard=True), only=only):
                work()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "prealloc": {"preallocation": "metadata", "cluster_size": 4096},
    "v2": {"compat": "0.10"},
}


class TestKilledCreate:
    """No half-made image at the destination, whichever write the kill lands on."""

    @pytest.mark.parametrize("case", list(CASES))
    def test_killed_at_each_write(self, tmp_path: Path, qemu_img: Run, case: str) -> None:
        """Each cut leaves no file at the path, or a complete image without corruption."""
        options = CASES[case]
        path = tmp_path / "new.qcow2"

        def create() -> None:
            with images.create(path, SIZE, **options) as img:
                img.write(0, b"x" * 512)

        with faults.inject(faults.Recorder(), only=tmp_path) as rec:
            create()
        counts = {"absent": 0, "complete": 0}
        for n in range(1, rec.writes + 1):
            path.unlink(missing_ok=True)
            for stray in tmp_path.glob(".new.qcow2.*.tmp"):
                stray.unlink()  # what a killed create leaves behind
            assert _die_at(n, create, tmp_path) == 137, f"create finished before write {n}"
            if not path.exists():
                counts["absent"] += 1
                continue
            proc = qemu_img("check", "--output=json", path, check=False)
            # a kill during the write after the create may leak clusters, nothing worse
            assert proc.returncode in (0, 3), f"killed at write {n}: {proc.stdout}{proc.stderr}"
            info = json.loads(qemu_img("info", "--output=json", path).stdout)
            assert info["virtual-size"] == SIZE
            counts["complete"] += 1
        print(f"create ({case}) killed at each of {rec.writes} writes: {counts}")
        assert counts["absent"] > 0 and counts["complete"] > 0
        assert sum(counts.values()) == rec.writes

    def test_exception_leaves_nothing(self, tmp_path: Path) -> None:
        """A create failing with an exception removes its temporary file too."""
        path = tmp_path / "gone.qcow2"
        with pytest.raises(faults.SimulatedCrash), faults.inject(faults.CrashAfter(2)):
            images.create(path, SIZE)
        assert list(tmp_path.iterdir()) == []


class TestPublish:
    """The published image is the one asked for, and nothing is ever replaced."""

    def test_existing_file_is_not_replaced(self, tmp_path: Path) -> None:
        """An existing destination is refused before anything is written, and kept."""
        path = tmp_path / "there.qcow2"
        path.write_bytes(b"precious")
        with pytest.raises(ImageError, match="exists"):
            images.create(path, SIZE)
        assert path.read_bytes() == b"precious"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["there.qcow2"]

    def test_image_open_at_its_name(self, tmp_path: Path, qemu_img: Run) -> None:
        """The returned image is open at the destination, with a relative backing file."""
        base = tmp_path / "base.qcow2"
        with images.create(base, SIZE) as img:
            img.write(0, b"b" * 4096)
        top = tmp_path / "top.qcow2"
        with images.create(top, backing="base.qcow2", backing_format="qcow2") as img:
            assert img.path == str(top)
            assert img.read(0, 4096) == b"b" * 4096
            img.write(4096, b"t" * 4096)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "top.qcow2"]
        proc = qemu_img("check", top, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


class TestKilledRawCreate:
    """A raw create with full preallocation, killed at any write, leaves no file behind."""

    def test_killed_at_each_write(self, tmp_path: Path) -> None:
        """Each cut leaves nothing at the path or the whole zero-filled image."""
        path = tmp_path / "new.raw"
        size = 4 * 1024 * 1024 + 4096

        def create() -> None:
            images.create(path, size, format="raw", preallocation="full").close()

        outcomes = set()
        for n in range(1, 12):
            if path.exists():
                path.unlink()
            code = _die_at(n, create, tmp_path)
            if path.exists():  # only a create that finished publishes the name
                assert code == 0, (n, code)
                assert path.stat().st_size == size, (n, code)
                outcomes.add("complete")
            else:
                assert code == 137, (n, code)
                outcomes.add("nothing")
        assert outcomes == {"nothing", "complete"}

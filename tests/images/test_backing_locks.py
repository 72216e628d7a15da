"""Backing files are locked as QEMU locks a backing child: read shared, write refused.

Checked against real qemu-io, qemu-img and a paused qemu-system-x86_64: nobody
may write a base while one of our overlays is open, yet overlays (ours and
QEMU's) share a base, and commit still writes into it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lock_helpers import Holder, holders

import virtkit
import virtkit.images
import virtkit.images.qcow2
from virtkit.images import locking

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20

#: What QEMU holds on a backing file: consistent read, not sharing write or resize.
BACKING_LOCKS = locking.LockHolders(
    held=locking.PERM_CONSISTENT_READ, unshared=locking.PERM_WRITE | locking.PERM_RESIZE
)
NO_LOCKS = locking.LockHolders(held=0, unshared=0)


@pytest.fixture
def hold() -> Iterator[Callable[[list[str], Path], Holder]]:
    """Start QEMU processes holding an overlay of ``base``; all are killed at the end."""

    def make(argv: list[str], base: Path) -> Holder:
        # QEMU first opens a raw chain sharing everything and restricts it once the
        # guest device is attached: wait for the settled state
        return Holder(argv, base, lambda h: bool(h.unshared & locking.PERM_WRITE))

    yield from holders(make)


def _tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe is not None, f"{name} is not installed (qemu-utils / qemu-system-x86)"
    return exe


def _qemu_system(top: Path) -> list[str]:
    """A paused qemu-system-x86_64 with ``top`` attached to a virtio disk (a guest device)."""
    return [
        _tool("qemu-system-x86_64"), "-nodefaults", "-display", "none", "-S", "-m", "16",
        "-machine", "pc,accel=tcg", "-drive", f"file={top},format=qcow2,if=virtio",
    ]  # fmt: skip


def _qemu_io(path: Path, fmt: str, *cmds: str) -> subprocess.CompletedProcess[str]:
    argv = [_tool("qemu-io"), "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    return subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, check=False, timeout=60
    )


def _fmt(path: Path) -> str:
    return "raw" if path.suffix == ".raw" else "qcow2"


@pytest.fixture(params=["qcow2", "raw"])
def base(request: pytest.FixtureRequest, tmp_path: Path, qemu_img: Run) -> Path:
    """A 2 MiB base image (qcow2 or raw) with a pattern in its first MiB."""
    path = tmp_path / f"base.{request.param}"
    qemu_img("create", "-q", "-f", request.param, path, "2M")
    out = _qemu_io(path, request.param, "write -P 0x11 0 1M")
    assert out.returncode == 0, out.stdout + out.stderr
    return path


def _overlay(qemu_img: Run, base: Path, name: str) -> Path:
    top = base.parent / name
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", _fmt(base), top)
    return top


def _write_base_refused(base: Path) -> None:
    """qemu-io cannot write the base, and neither can virtkit (here or in a child process)."""
    proc = _qemu_io(base, _fmt(base), "write -P 0x66 0 4k")
    assert proc.returncode != 0 or "wrote" not in proc.stdout, proc.stdout
    assert 'Failed to get "write" lock' in proc.stderr + proc.stdout
    with pytest.raises(virtkit.ImageLockedError) as info:
        virtkit.images.open(base, writable=True, format=_fmt(base))  # type: ignore[arg-type]
    assert info.value.permission == "write"
    child = subprocess.run(
        [sys.executable, "-c",
         "import sys, virtkit, virtkit.images as I\n"
         "try:\n    I.open(sys.argv[1], writable=True, format=sys.argv[2])\n"
         "except virtkit.ImageLockedError:\n    sys.exit(7)\n",
         str(base), _fmt(base)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert child.returncode == 7, child.stderr


class TestBackingLockBytes:
    """The bytes an open overlay locks on its backing file are QEMU's."""

    @pytest.mark.parametrize("writable", [False, True])
    def test_overlay_open_locks_base_for_reading(
        self, base: Path, qemu_img: Run, writable: bool
    ) -> None:
        """Read-only or writable, an overlay holds consistent read and refuses write/resize."""
        top = _overlay(qemu_img, base, "top.qcow2")
        with virtkit.images.open(top, writable=writable):
            assert locking.probe(base) == BACKING_LOCKS
        assert locking.probe(base) == NO_LOCKS

    def test_same_bytes_as_qemu_system(
        self, base: Path, qemu_img: Run, hold: Callable[[list[str], Path], Holder]
    ) -> None:
        """A running QEMU's overlay locks exactly the backing bytes ours does."""
        top = _overlay(qemu_img, base, "top.qcow2")
        qemu = hold(_qemu_system(top), base)
        theirs = locking.probe(base)
        qemu.stop()
        assert theirs == BACKING_LOCKS
        with virtkit.images.open(top, writable=True):
            assert locking.probe(base) == theirs

    def test_force_share_overlay_leaves_base_unlocked(self, base: Path, qemu_img: Run) -> None:
        """force_share (qemu-img -U) is inherited by the backing file: writers may open it."""
        top = _overlay(qemu_img, base, "top.qcow2")
        with virtkit.images.open(top, force_share=True) as img:
            assert locking.probe(base) == locking.LockHolders(
                held=locking.PERM_CONSISTENT_READ, unshared=0
            )
            proc = _qemu_io(base, _fmt(base), "write -P 0x66 1M 4k")
            assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
            assert img.read(MiB, 4096) == b"\x66" * 4096

    def test_data_file_locked_like_qemu_system(
        self, tmp_path: Path, qemu_img: Run, hold: Callable[[list[str], Path], Holder]
    ) -> None:
        """An external data file gets the bytes a read-only QEMU drive takes on it."""
        data = tmp_path / "d.raw"
        path = tmp_path / "d.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", path, "1M")
        argv = [
            _tool("qemu-system-x86_64"), "-nodefaults", "-display", "none", "-S", "-m", "16",
            "-machine", "pc,accel=tcg",
            "-drive", f"file={path},format=qcow2,if=virtio,readonly=on",
        ]  # fmt: skip
        qemu = hold(argv, data)
        theirs = locking.probe(data)
        qemu.stop()
        with virtkit.images.open(path):
            assert locking.probe(data) == theirs == BACKING_LOCKS
            proc = _qemu_io(data, "raw", "write 0 512")
            assert 'Failed to get "write" lock' in proc.stderr + proc.stdout

    def test_whole_chain_is_locked(self, tmp_path: Path, qemu_img: Run) -> None:
        """Every backing file down a three-deep chain is locked against writers."""
        base = tmp_path / "b.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "1M")
        mid = _overlay(qemu_img, base, "mid.qcow2")
        top = _overlay(qemu_img, mid, "top.qcow2")
        with virtkit.images.open(top, writable=True):
            assert locking.probe(mid) == BACKING_LOCKS
            assert locking.probe(base) == BACKING_LOCKS
            _write_base_refused(base)
            _write_base_refused(mid)


class TestWritersRefused:
    """Nobody writes a base while our overlay is open."""

    @pytest.mark.parametrize("writable", [False, True])
    def test_writer_refused_while_overlay_open(
        self, base: Path, qemu_img: Run, writable: bool
    ) -> None:
        """qemu-io and virtkit (in and out of process) cannot open the base writable."""
        top = _overlay(qemu_img, base, "top.qcow2")
        with virtkit.images.open(top, writable=writable) as img:
            _write_base_refused(base)
            assert img.read(0, 4096) == b"\x11" * 4096
        proc = _qemu_io(base, _fmt(base), "write -P 0x66 0 4k")
        assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr

    def test_qemu_img_commit_of_other_overlay_refused(self, base: Path, qemu_img: Run) -> None:
        """qemu-img commit of a second overlay cannot write the base under ours."""
        ours = _overlay(qemu_img, base, "ours.qcow2")
        other = _overlay(qemu_img, base, "other.qcow2")
        assert _qemu_io(other, "qcow2", "write -P 0x77 0 64k").returncode == 0
        with virtkit.images.open(ours) as img:
            proc = qemu_img("commit", other, check=False)
            assert proc.returncode != 0
            assert "lock" in proc.stderr
            assert img.read(0, 65536) == b"\x11" * 65536


class TestOverlaysShareBase:
    """Overlays on one base coexist: ours, and a running QEMU's."""

    def test_two_virtkit_overlays_on_one_base(self, base: Path, qemu_img: Run) -> None:
        """Two writable overlays on one base open together in one process."""
        a, b = _overlay(qemu_img, base, "a.qcow2"), _overlay(qemu_img, base, "b.qcow2")
        with (
            virtkit.images.open(a, writable=True) as img_a,
            virtkit.images.open(b, writable=True) as img_b,
        ):
            img_a.write(0, b"A" * 4096)
            img_b.write(4096, b"B" * 4096)
            assert img_a.read(0, 8192) == b"A" * 4096 + b"\x11" * 4096
            assert img_b.read(0, 8192) == b"\x11" * 4096 + b"B" * 4096
        for top in (a, b):
            assert qemu_img("check", top).returncode == 0

    def test_overlay_beside_running_qemu(
        self,
        base: Path,
        qemu_img: Run,
        tmp_path: Path,
        hold: Callable[[list[str], Path], Holder],
    ) -> None:
        """With QEMU running an overlay on the base, ours opens, writes and commits nothing."""
        theirs = _overlay(qemu_img, base, "theirs.qcow2")
        ours = _overlay(qemu_img, base, "ours.qcow2")
        hold(_qemu_system(theirs), base)
        with virtkit.images.open(ours, writable=True) as img:
            img.write(MiB, b"\x22" * 65536)
            assert img.read(0, 4096) == b"\x11" * 4096
            _write_base_refused(base)
        assert qemu_img("check", "-U", ours).returncode == 0
        raw = tmp_path / "ours.raw"
        qemu_img("convert", "-U", "-O", "raw", ours, raw)
        data = raw.read_bytes()
        assert data[:MiB] == b"\x11" * MiB
        assert data[MiB : MiB + 65536] == b"\x22" * 65536
        # committing would need the base writable: refused, the overlay keeps its data
        with pytest.raises(virtkit.ImageLockedError):
            virtkit.images.commit(ours)
        listed = json.loads(qemu_img("map", "-U", "--output=json", ours).stdout)
        assert any(e["depth"] == 0 and e["data"] for e in listed)

    def test_qemu_io_overlay_beside_ours(self, base: Path, qemu_img: Run) -> None:
        """While our overlay is open, qemu-io opens and writes another overlay on the base."""
        ours = _overlay(qemu_img, base, "ours.qcow2")
        theirs = _overlay(qemu_img, base, "theirs.qcow2")
        with virtkit.images.open(ours, writable=True) as img:
            img.write(0, b"o" * 512)
            proc = _qemu_io(theirs, "qcow2", "write -P 0x33 0 4k", "read -P 0x11 4k 4k")
            assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stdout + proc.stderr
            assert "Pattern verification failed" not in proc.stdout


class TestCommitReopensBase:
    """commit writes the base through the open overlay (the base reopened read-write)."""

    def test_commit_with_overlay_lock(self, base: Path, qemu_img: Run, tmp_path: Path) -> None:
        """commit works although the overlay's own open refuses other writers of the base."""
        top = _overlay(qemu_img, base, "top.qcow2")
        assert _qemu_io(top, "qcow2", "write -P 0x44 512k 64k").returncode == 0
        virtkit.images.commit(top)
        assert locking.probe(base) == NO_LOCKS
        out = tmp_path / "b.raw"
        qemu_img("convert", "-f", _fmt(base), "-O", "raw", base, out)
        assert out.read_bytes()[512 * 1024 : 576 * 1024] == b"\x44" * 65536
        assert qemu_img("compare", top, base).returncode == 0

    def test_reopen_backing_round_trip(self, base: Path, qemu_img: Run) -> None:
        """reopen_backing swaps the base between read-write and read-only locks."""
        top = _overlay(qemu_img, base, "top.qcow2")
        img = virtkit.images.qcow2.open(top, writable=True)
        with img:
            writable_base = img.reopen_backing(writable=True)
            assert writable_base.writable and img.backing is writable_base
            assert locking.probe(base).held & locking.PERM_WRITE
            writable_base.write(0, b"\x55" * 512)
            assert img.read(0, 512) == b"\x55" * 512  # reads fall through to the new open
            again = img.reopen_backing(writable=False)
            assert not again.writable and writable_base.closed
            assert locking.probe(base) == BACKING_LOCKS
            assert img.read(0, 512) == b"\x55" * 512

    def test_reopen_backing_refused_keeps_read_only_base(
        self, base: Path, qemu_img: Run, hold: Callable[[list[str], Path], Holder]
    ) -> None:
        """When another overlay's QEMU holds the base, the reopen fails and reads still work."""
        top = _overlay(qemu_img, base, "top.qcow2")
        other = _overlay(qemu_img, base, "other.qcow2")
        hold(_qemu_system(other), base)
        img = virtkit.images.qcow2.open(top, writable=True)
        with img:
            with pytest.raises(virtkit.ImageLockedError):
                img.reopen_backing(writable=True)
            assert img.backing is not None and not img.backing.writable
            assert img.read(0, 4096) == b"\x11" * 4096

    def test_read_only_overlay_cannot_reopen_base_writable(self, base: Path, qemu_img: Run) -> None:
        """A read-only overlay does not hand out a writable base."""
        top = _overlay(qemu_img, base, "top.qcow2")
        img = virtkit.images.qcow2.open(top)
        with img:
            with pytest.raises(virtkit.ImageError, match="read-only"):
                img.reopen_backing(writable=True)
            assert locking.probe(base) == BACKING_LOCKS

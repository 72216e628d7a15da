"""QEMU-compatible image locking, tested against real qemu-io / qemu-img / qemu-system."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lock_helpers import Holder, holders

import virtkit
from virtkit.images import locking
from virtkit.images.storage import FileStorage

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def raw_image(tmp_path: Path, qemu_img: Run) -> Path:
    """A small raw image made by qemu-img."""
    path = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", path, "1M")
    return path


@pytest.fixture
def qcow2_image(tmp_path: Path, qemu_img: Run) -> Path:
    """A small qcow2 image made by qemu-img (QEMU's qcow2 driver unshares write)."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", path, "1M")
    return path


@pytest.fixture
def hold() -> Iterator[Callable[..., Holder]]:
    """Start holder processes (``writer=False`` for readers); all are killed at the end."""

    def make(argv: list[str], path: Path, *, writer: bool = True) -> Holder:
        ready = (lambda h: h.writer) if writer else (lambda h: bool(h.held))
        return Holder(argv, path, ready)

    yield from holders(make)


def _qemu_io(path: Path, *extra: str) -> list[str]:
    exe = shutil.which("qemu-io")
    assert exe is not None, "qemu-io is not installed (qemu-utils)"
    fmt = "qcow2" if path.suffix == ".qcow2" else "raw"
    return [exe, "-f", fmt, *extra, str(path)]


_PY_HOLDER = (
    "import sys, virtkit.images as I\n"
    "img = I.open(sys.argv[1], writable=sys.argv[2] == 'rw', format='raw')\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


class TestLockBytes:
    """The exact bytes virtkit locks are the ones qemu-io locks."""

    def test_writable_open_locks_qemu_bytes(
        self, qcow2_image: Path, hold: Callable[..., Holder]
    ) -> None:
        """A writable open locks exactly the bytes a qemu-io qcow2 writer locks."""
        storage = FileStorage(qcow2_image, writable=True)
        ours = locking.probe(qcow2_image)
        storage.close()
        assert ours.held == locking.PERM_CONSISTENT_READ | locking.PERM_WRITE | locking.PERM_RESIZE
        assert ours.unshared == locking.PERM_WRITE | locking.PERM_RESIZE
        qemu = hold(_qemu_io(qcow2_image), qcow2_image)
        assert locking.probe(qcow2_image) == ours
        qemu.stop()

    def test_read_only_open_locks_qemu_reader_bytes(
        self, qcow2_image: Path, hold: Callable[..., Holder]
    ) -> None:
        """A read-only open locks exactly the bytes a qemu-io -r qcow2 reader locks."""
        storage = FileStorage(qcow2_image, writable=False)
        ours = locking.probe(qcow2_image)
        storage.close()
        qemu = hold(_qemu_io(qcow2_image, "-r"), qcow2_image, writer=False)
        assert locking.probe(qcow2_image) == ours
        qemu.stop()

    def test_read_only_and_force_share_bytes(self, raw_image: Path) -> None:
        """Read-only holds consistent read and unshares write; force_share unshares nothing."""
        with virtkit.images.open(raw_image, format="raw"):
            assert locking.probe(raw_image) == locking.LockHolders(
                held=locking.PERM_CONSISTENT_READ,
                unshared=locking.PERM_WRITE | locking.PERM_RESIZE,
            )
        with virtkit.images.open(raw_image, format="raw", force_share=True):
            assert locking.probe(raw_image) == locking.LockHolders(
                held=locking.PERM_CONSISTENT_READ, unshared=0
            )
        assert locking.probe(raw_image) == locking.LockHolders(held=0, unshared=0)

    def test_lock_false_takes_nothing(self, raw_image: Path) -> None:
        """FileStorage(lock=False) leaves the lock bytes alone (for callers that lock elsewhere)."""
        storage = FileStorage(raw_image, writable=True, lock=False)
        try:
            assert not storage.locked
            assert locking.probe(raw_image) == locking.LockHolders(held=0, unshared=0)
        finally:
            storage.close()

    def test_force_share_with_writable_refused(self, raw_image: Path) -> None:
        """force_share is for readers only, as in QEMU."""
        with pytest.raises(virtkit.ConfigError, match="force_share"):
            FileStorage(raw_image, writable=True, force_share=True)


class TestAgainstQemu:
    """Running QEMU tools and virtkit exclude each other as QEMU processes do."""

    def test_qemu_io_writer_blocks_our_writable_open(
        self, raw_image: Path, hold: Callable[..., Holder]
    ) -> None:
        """qemu-io holding the image writable makes our writable open fail naming 'write'."""
        hold(_qemu_io(raw_image), raw_image)
        with pytest.raises(virtkit.ImageLockedError, match="write") as info:
            virtkit.images.open(raw_image, writable=True, format="raw")
        assert isinstance(info.value, virtkit.ImageLockedError)
        assert info.value.permission == "write"
        assert info.value.path == str(raw_image)

    def test_qemu_io_writer_blocks_plain_reader_but_not_force_share(
        self, raw_image: Path, hold: Callable[..., Holder]
    ) -> None:
        """A plain read-only open refuses a live writer; force_share reads anyway."""
        hold(_qemu_io(raw_image), raw_image)
        with pytest.raises(virtkit.ImageLockedError, match='shared "write"'):
            virtkit.images.open(raw_image, format="raw")
        with virtkit.images.open(raw_image, format="raw", force_share=True) as img:
            assert img.read(0, 16) == bytes(16)

    def test_qemu_io_reader_blocks_our_writer_only(
        self, qcow2_image: Path, hold: Callable[..., Holder]
    ) -> None:
        """qemu-io -r on qcow2 unshares write: our writer fails, our reader succeeds."""
        hold(_qemu_io(qcow2_image, "-r"), qcow2_image, writer=False)
        with pytest.raises(virtkit.ImageLockedError, match='Failed to get "write" lock'):
            FileStorage(qcow2_image, writable=True)
        FileStorage(qcow2_image, writable=False).close()

    def test_our_writer_makes_qemu_img_info_fail(self, qcow2_image: Path, qemu_img: Run) -> None:
        """qemu-img info without -U fails on a qcow2 virtkit holds writable; -U works."""
        storage = FileStorage(qcow2_image, writable=True)
        try:
            proc = qemu_img("info", qcow2_image, check=False)
            assert proc.returncode != 0
            assert 'Failed to get shared "write" lock' in proc.stderr
            assert qemu_img("info", "-U", qcow2_image).returncode == 0
        finally:
            storage.close()
        assert qemu_img("info", qcow2_image).returncode == 0

    def test_qcow2_engine_takes_the_locks(
        self, qcow2_image: Path, qemu_img: Run, hold: Callable[..., Holder]
    ) -> None:
        """virtkit's qcow2 driver locks too: qemu-img refuses it, and it refuses qemu-io."""
        with virtkit.images.open(qcow2_image, writable=True) as img:
            assert img.format == "qcow2"
            proc = qemu_img("info", qcow2_image, check=False)
            assert 'Failed to get shared "write" lock' in proc.stderr
        hold(_qemu_io(qcow2_image), qcow2_image)
        with pytest.raises(virtkit.ImageLockedError, match="write"):
            virtkit.images.open(qcow2_image, writable=True)
        with virtkit.images.open(qcow2_image, force_share=True) as img:
            assert img.read(0, 512) == bytes(512)

    def test_readers_share_with_qemu_img(self, qcow2_image: Path, qemu_img: Run) -> None:
        """A plain virtkit reader and qemu-img info (no -U) coexist, as two QEMU readers do."""
        with virtkit.images.open(qcow2_image) as img:
            assert qemu_img("info", qcow2_image).returncode == 0
            assert img.virtual_size == 1 << 20

    def test_our_writer_makes_qemu_io_fail(self, raw_image: Path) -> None:
        """qemu-io (read-write) cannot open an image virtkit holds writable."""
        with virtkit.images.open(raw_image, writable=True, format="raw"):
            proc = subprocess.run(
                _qemu_io(raw_image, "-c", "write 0 512"),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stdout + proc.stderr

    def test_our_reader_blocks_qemu_writer(self, raw_image: Path) -> None:
        """A plain virtkit reader keeps qemu-io from writing; a force-share reader does not."""
        with virtkit.images.open(raw_image, format="raw"):
            proc = subprocess.run(
                _qemu_io(raw_image, "-c", "write 0 512"),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert 'Failed to get "write" lock' in proc.stdout + proc.stderr
        with virtkit.images.open(raw_image, format="raw", force_share=True):
            proc = subprocess.run(
                _qemu_io(raw_image, "-c", "write -P 7 0 512"),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
        with virtkit.images.open(raw_image, format="raw") as img:
            assert img.read(0, 512) == b"\x07" * 512

    def test_running_qemu_system_blocks_writer(
        self, raw_image: Path, hold: Callable[..., Holder]
    ) -> None:
        """A paused qemu-system-x86_64 with the disk attached makes our writable open fail."""
        exe = shutil.which("qemu-system-x86_64")
        assert exe is not None, "qemu-system-x86_64 is not installed"
        argv = [
            exe, "-nodefaults", "-display", "none", "-S",
            "-drive", f"file={raw_image},format=raw,if=virtio",
        ]  # fmt: skip
        qemu = hold(argv, raw_image)
        with pytest.raises(virtkit.ImageLockedError, match="write"):
            virtkit.images.open(raw_image, writable=True, format="raw")
        qemu.stop()
        with virtkit.images.open(raw_image, writable=True, format="raw") as img:
            img.write(0, b"free")

    def test_close_releases_locks(self, raw_image: Path, qemu_img: Run) -> None:
        """After close() the lock bytes are gone and QEMU tools open the image again."""
        img = virtkit.images.open(raw_image, writable=True, format="raw")
        img.close()
        assert locking.probe(raw_image) == locking.LockHolders(held=0, unshared=0)
        assert qemu_img("info", raw_image).returncode == 0


class TestVirtkitWriters:
    """Two virtkit writers exclude each other, across and within processes."""

    def test_two_writers_in_one_process(self, raw_image: Path) -> None:
        """OFD locks belong to the open file: a second in-process writable open fails."""
        with virtkit.images.open(raw_image, writable=True, format="raw"):
            with pytest.raises(virtkit.ImageLockedError):
                virtkit.images.open(raw_image, writable=True, format="raw")
            with pytest.raises(virtkit.ImageLockedError):
                virtkit.images.open(raw_image, format="raw")
        with virtkit.images.open(raw_image, writable=True, format="raw"):
            pass

    def test_writer_in_another_process(self, raw_image: Path, hold: Callable[..., Holder]) -> None:
        """A virtkit writer in a child process blocks our writer until it exits."""
        child = hold([sys.executable, "-c", _PY_HOLDER, str(raw_image), "rw"], raw_image)
        with pytest.raises(virtkit.ImageLockedError, match="write"):
            virtkit.images.open(raw_image, writable=True, format="raw")
        child.finish()
        assert child.proc.returncode == 0
        with virtkit.images.open(raw_image, writable=True, format="raw"):
            pass

    def test_two_readers_share(self, raw_image: Path, hold: Callable[..., Holder]) -> None:
        """Plain readers (ours and another process's) coexist, as qemu-img info instances do."""
        hold([sys.executable, "-c", _PY_HOLDER, str(raw_image), "ro"], raw_image, writer=False)
        with (
            virtkit.images.open(raw_image, format="raw") as a,
            virtkit.images.open(raw_image, format="raw") as b,
        ):
            assert a.read(0, 4) == b.read(0, 4)

    def test_failed_open_holds_nothing(self, raw_image: Path) -> None:
        """An open refused for a lock conflict leaves no lock bytes behind."""
        with virtkit.images.open(raw_image, writable=True, format="raw"):
            before = locking.probe(raw_image)
            with pytest.raises(virtkit.ImageLockedError):
                virtkit.images.open(raw_image, format="raw")
            assert locking.probe(raw_image) == before

"""Internal snapshots made by virtkit, used by qemu-img, and the other way round."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_helpers import qemu_io, qemu_raw

from virtkit import images
from virtkit.errors import ImageError

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
SIZE = 4 * 1024 * 1024


def _fill(img: images.Image, ref: bytearray, byte: int, spots: tuple[int, ...]) -> None:
    for off in spots:
        data = bytes([byte]) * 70_000
        img.write(off, data)
        ref[off : off + len(data)] = data


class TestOurSnapshotsInQemu:
    """Snapshots virtkit takes are listed, applied and checked clean by qemu-img."""

    @pytest.mark.parametrize("compat", ["0.10", "1.1"])
    def test_create_list_apply(self, qemu_img: QemuImg, tmp_path: Path, compat: str) -> None:
        """Two snapshots with VM state: qemu-img lists them and -a restores each."""
        path = tmp_path / "s.qcow2"
        states: dict[str, bytes] = {}
        ref = bytearray(SIZE)
        with images.create(path, SIZE, compat=compat) as img:
            _fill(img, ref, 0x11, (0, 100_000, 3_000_000))
            states["one"] = bytes(ref)
            img.create_snapshot("one", vm_state=b"machine state " * 1000)
            _fill(img, ref, 0x22, (50_000, 3_000_000))
            states["two"] = bytes(ref)
            img.create_snapshot("two")
            _fill(img, ref, 0x33, (0, 2_000_000))
            assert img.read(0, SIZE) == ref
            assert img.read_snapshot("one", 0, SIZE) == states["one"]  # type: ignore[attr-defined]
            assert img.snapshot_vm_state("one") == b"machine state " * 1000  # type: ignore[attr-defined]
            assert img.check().ok
        qemu_img("check", path)
        listing = qemu_img("snapshot", "-l", path).stdout
        assert "one" in listing and "two" in listing
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        snaps = {s["name"]: s for s in info["snapshots"]}
        assert snaps["one"]["vm-state-size"] == 14000
        assert snaps["two"]["vm-state-size"] == 0
        for name in ("two", "one"):
            qemu_img("snapshot", "-a", name, path)
            assert qemu_raw(qemu_img, path, tmp_path / f"{name}.raw") == states[name]
            qemu_img("check", path)

    def test_revert_and_delete(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Revert restores data; delete frees clusters with no leak left behind."""
        path = tmp_path / "r.qcow2"
        ref = bytearray(SIZE)
        with images.create(path, SIZE) as img:
            _fill(img, ref, 0x41, (0, 1_000_000))
            saved = bytes(ref)
            img.create_snapshot("base")
            _fill(img, ref, 0x42, (0, 1_000_000, 2_000_000))
            img.revert_snapshot("base")
            assert img.read(0, SIZE) == saved
            _fill(img, ref, 0x43, (500_000,))
            img.delete_snapshot("1")  # by id
            assert img.snapshots == ()
            result = img.check()
            assert result.ok, result.problems
        qemu_img("check", path)
        assert qemu_raw(qemu_img, path, tmp_path / "o.raw")[500_000:500_010] == b"\x43" * 10

    def test_revert_restores_virtual_size(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """After revert the image's size is the snapshot's (v3 may resize with snapshots)."""
        path = tmp_path / "z.qcow2"
        with images.create(path, SIZE) as img:
            img.write(0, b"small")
            img.create_snapshot("small")
            img.resize(2 * SIZE)
            img.write(SIZE + 10, b"big")
            assert img.virtual_size == 2 * SIZE
            img.revert_snapshot("small")
            assert img.virtual_size == SIZE
            assert img.read(0, 5) == b"small"
        qemu_img("check", path)
        assert json.loads(qemu_img("info", "--output=json", path).stdout)["virtual-size"] == SIZE

    def test_duplicate_and_missing_names(self, tmp_path: Path) -> None:
        """A duplicate snapshot name or an unknown one raises ImageError."""
        with images.create(tmp_path / "d.qcow2", "1M") as img:
            img.create_snapshot("a")
            with pytest.raises(ImageError, match="already exists"):
                img.create_snapshot("a")
            with pytest.raises(ImageError, match="no snapshot"):
                img.revert_snapshot("nope")

    def test_one_bit_refcounts_cannot_snapshot(self, tmp_path: Path) -> None:
        """refcount_bits=1 cannot count two owners: snapshot creation refuses."""
        with images.create(tmp_path / "o.qcow2", "1M", refcount_bits=1) as img:
            img.write(0, b"x")
            with pytest.raises(ImageError, match="refcount"):
                img.create_snapshot("s")


class TestQemuSnapshotsInVirtkit:
    """Snapshots qemu-img makes are deleted and reverted cleanly by virtkit."""

    def test_delete_qemu_snapshot(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Deleting a qemu-img snapshot leaves a clean image with the current data."""
        path = tmp_path / "q.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
        qemu_io(path, "write -P 0x10 0 1M")
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, "write -P 0x20 512k 1M")
        qemu_img("snapshot", "-c", "s2", path)
        qemu_io(path, "write -P 0x30 0 64k")
        current = qemu_raw(qemu_img, path, tmp_path / "cur.raw")
        with images.open(path, writable=True) as img:
            assert [s.name for s in img.snapshots] == ["s1", "s2"]
            img.delete_snapshot("s1")
            img.write(3 * 1024 * 1024, b"after delete")
            assert img.read(0, 1024 * 1024) == current[: 1024 * 1024]
        qemu_img("check", path)
        listing = qemu_img("snapshot", "-l", path).stdout
        assert "s2" in listing and "s1" not in listing
        qemu_img("snapshot", "-a", "s2", path)
        qemu_io(path, "read -P 0x10 0 512k", "read -P 0x20 512k 1M")


def _qemu_system(image: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run an empty QEMU machine (-M none) on ``image`` and quit from the monitor."""
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        pytest.fail("qemu-system-x86_64 is not installed: run the README test command")
    argv = [exe, "-M", "none", "-display", "none", "-serial", "none", "-monitor", "stdio",
            "-drive", f"file={image},if=none,id=d0,format=qcow2", *extra]  # fmt: skip
    return subprocess.run(
        argv, input="quit\n", capture_output=True, text=True, check=False, timeout=120
    )


class TestLoadvm:
    """QEMU's own savevm/loadvm work across virtkit's snapshot operations."""

    def test_loadvm_of_our_snapshot(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """A VM state saved by QEMU, re-saved in a virtkit snapshot, loads in QEMU."""
        path = tmp_path / "vm.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, "16M")
        saved = subprocess.run(
            [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-M", "none",
             "-display", "none", "-serial", "none", "-monitor", "stdio",
             "-drive", f"file={path},if=none,id=d0,format=qcow2"],
            input="savevm qemu-made\nquit\n", capture_output=True, text=True, check=False,
            timeout=120,
        )  # fmt: skip
        assert saved.returncode == 0, saved.stderr
        with images.open(path, writable=True) as img:
            (snap,) = img.snapshots
            state = img.snapshot_vm_state("qemu-made")  # type: ignore[attr-defined]
            assert len(state) == snap.vm_state_size > 0
            img.write(0, b"disk data" * 1000)
            img.create_snapshot("ours", vm_state=state)
            img.create_snapshot("garbage", vm_state=b"junk" * 300)
        qemu_img("check", path)
        for name in ("ours", "qemu-made"):
            proc = _qemu_system(path, "-loadvm", name)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        bad = _qemu_system(path, "-loadvm", "garbage")  # loadvm really parses the state
        assert bad.returncode != 0
        assert "migration stream" in bad.stdout + bad.stderr

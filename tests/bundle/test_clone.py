"""virtkit.clone: linked and full clones, opened with virtkit.images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import virtkit
from virtkit import (
    CdRom,
    ConfigError,
    Disk,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    StateError,
    bundle,
    images,
)

MIB = 1024**2


def _read(folder: Path, disk: Disk, offset: int = 0, length: int = 8) -> bytes:
    path = bundle.resolve_disk(folder, disk.active)
    with images.open(path, allow_backing=bundle.allowed_roots(folder)) as img:
        return img.read(offset, length)


def _write(folder: Path, disk: Disk, data: bytes, offset: int = 0) -> None:
    path = bundle.resolve_disk(folder, disk.active)
    with images.open(path, writable=True, allow_backing=bundle.allowed_roots(folder)) as img:
        img.write(offset, data)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A stopped VM folder: a written qcow2 root, a raw data disk, a read-only raw, an ISO, a kernel."""
    folder = tmp_path / "gold"
    m = Machine(
        name="gold",
        memory="64MiB",
        disks=[
            Disk(path="root.qcow2", size="4MiB"),
            Disk(path="data.raw", size="2MiB"),
            Disk(path="shared.raw", size="1MiB", read_only=True),
        ],
        cdroms=[CdRom(path="seed.iso"), CdRom()],
        nics=[Nic(forwards=[PortForward(2222, 22), PortForward(0, 80)])],
        kernel=KernelBoot("boot/vmlinuz", "boot/initrd", "console=ttyS0"),
    )
    virtkit.save(m, folder)
    (folder / "disks" / "seed.iso").write_bytes(b"ISO" * 1000)
    (folder / "boot").mkdir()
    (folder / "boot" / "vmlinuz").write_bytes(b"kernel")
    (folder / "boot" / "initrd").write_bytes(b"initrd")
    m = virtkit.load(folder)
    _write(folder, m.disks[0], b"rootdata", 3 * MIB)
    _write(folder, m.disks[1], b"datadata")
    _write(folder, m.disks[2], b"readonly")
    return folder


class TestLinked:
    def test_identity_and_files(self, source: Path, tmp_path: Path) -> None:
        """A linked clone: new name/uuid/MACs, host ports 0, overlays backed by the source's files."""
        gold = virtkit.load(source)
        c = virtkit.clone(source, tmp_path / "web-1")
        assert c.name == "web-1"
        assert c.uuid != gold.uuid
        assert {n.mac for n in c.nics}.isdisjoint({n.mac for n in gold.nics})
        assert [f.host_port for f in c.nics[0].forwards] == [0, 0]
        assert [f.guest_port for f in c.nics[0].forwards] == [22, 80]
        assert virtkit.load(tmp_path / "web-1") == c
        assert [d.path for d in c.disks] == [
            "root.qcow2",
            "data.qcow2",
            "../../gold/disks/shared.raw",
        ]
        assert [d.format for d in c.disks] == ["qcow2", "qcow2", "raw"]
        assert c.disks[2].read_only
        assert c.cdroms[0].path == "../../gold/disks/seed.iso"
        assert c.cdroms[1].path is None
        assert (tmp_path / "web-1" / "boot" / "vmlinuz").read_bytes() == b"kernel"
        assert c.kernel == gold.kernel
        # the source now writes a fresh top layer; the files below are frozen
        after = virtkit.load(source)
        assert after.disks[0].layers == ("root.c1.qcow2",)
        assert after.disks[1].layers == ("data.c1.qcow2",)
        assert after.disks[2].layers == ()
        # overlays are tiny and name their backing files by relative paths
        overlay = tmp_path / "web-1" / "disks" / "root.qcow2"
        assert overlay.stat().st_size < MIB
        with images.open(overlay, allow_backing=[source]) as img:
            assert img.backing_file == "../../gold/disks/root.qcow2"
        assert bundle.allowed_roots(tmp_path / "web-1") == [source]

    def test_bytes_and_isolation(self, source: Path, tmp_path: Path) -> None:
        """Clones read the source's bytes; writes by the source or a clone reach no one else."""
        c1 = virtkit.clone(source, tmp_path / "c1")
        c2 = virtkit.clone(source, tmp_path / "c2")
        gold = virtkit.load(source)
        for folder, m in ((tmp_path / "c1", c1), (tmp_path / "c2", c2), (source, gold)):
            assert _read(folder, m.disks[0], 3 * MIB) == b"rootdata"
            assert _read(folder, m.disks[1]) == b"datadata"
            assert _read(folder, m.disks[2]) == b"readonly"
        _write(source, gold.disks[0], b"SOURCE!!", 3 * MIB)
        _write(tmp_path / "c1", c1.disks[0], b"CLONE-1!", 3 * MIB)
        assert _read(source, gold.disks[0], 3 * MIB) == b"SOURCE!!"
        assert _read(tmp_path / "c1", c1.disks[0], 3 * MIB) == b"CLONE-1!"
        assert _read(tmp_path / "c2", c2.disks[0], 3 * MIB) == b"rootdata"
        # the same, in a fresh process through another backend's eyes: the folder is the truth
        assert virtkit.load(tmp_path / "c2").disks[0].active == "root.qcow2"

    def test_clone_of_a_clone(self, source: Path, tmp_path: Path) -> None:
        """A clone can be cloned again: chains cross two folders, bytes stay right."""
        c1 = virtkit.clone(source, tmp_path / "c1")
        _write(tmp_path / "c1", c1.disks[0], b"c1-bytes")
        c11 = virtkit.clone(tmp_path / "c1", tmp_path / "c11")
        _write(tmp_path / "c1", virtkit.load(tmp_path / "c1").disks[0], b"c1-later")
        # c11's chain reaches gold through c1: both are its allowed roots
        assert bundle.allowed_roots(tmp_path / "c11") == [tmp_path / "c1", source]
        path = bundle.resolve_disk(tmp_path / "c11", c11.disks[0].active)
        with images.open(path, allow_backing=bundle.allowed_roots(tmp_path / "c11")) as img:
            assert img.read(0, 8) == b"c1-bytes"
            assert img.read(3 * MIB, 8) == b"rootdata"

    def test_source_refuses_to_drop_shared_layers(self, source: Path, tmp_path: Path) -> None:
        """check_unshared refuses files a live clone reads; a deleted clone frees them."""
        virtkit.clone(source, tmp_path / "c1")
        with pytest.raises(StateError, match="linked clone .*c1") as info:
            bundle.check_unshared(source, ["disks/root.qcow2"], action="delete snapshot 's'")
        assert info.value.action == "delete snapshot 's'"
        with pytest.raises(StateError):
            bundle.check_unshared(source, [source / "disks" / "shared.raw"], action="x")
        bundle.check_unshared(source, ["disks/root.c1.qcow2"], action="x")  # the source's own top
        assert [p for p, _ in bundle.dependents(source)] == [tmp_path / "c1"]
        shutil.rmtree(tmp_path / "c1")
        assert bundle.dependents(source) == []
        bundle.check_unshared(source, ["disks/root.qcow2"], action="x")
        virtkit.clone(source, tmp_path / "c2")  # the stale record is dropped
        records = tomllib.loads((source / "links.toml").read_text())["clone"]
        assert [r["folder"] for r in records] == ["../c2"]

    def test_one_clone_of_a_source_at_a_time(
        self, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While another process holds the source folder's lock, clone() waits, then says so."""
        # virtkit.clone is the function; its module is in sys.modules
        monkeypatch.setattr(sys.modules["virtkit.clone"], "_LOCK_WAIT", 0.2)
        code = (
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code, str(source)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
            with pytest.raises(StateError, match="another clone of it is in progress"):
                virtkit.clone(source, tmp_path / "c1")
        finally:
            holder.kill()
            holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()
        assert not (tmp_path / "c1").exists()
        virtkit.clone(source, tmp_path / "c1")

    def test_recorded_in_both_folders(self, source: Path, tmp_path: Path) -> None:
        """links.toml in both folders, with relative paths only."""
        c = virtkit.clone(source, tmp_path / "c1", name="other-name")
        assert c.name == "other-name"
        base = tomllib.loads((tmp_path / "c1" / "links.toml").read_text())
        assert base["base"] == [{"folder": "../gold", "uuid": str(virtkit.load(source).uuid)}]
        rec = tomllib.loads((source / "links.toml").read_text())["clone"][0]
        assert rec["folder"] == "../c1"
        assert rec["uuid"] == str(c.uuid)
        assert set(rec["files"]) >= {"disks/root.qcow2", "disks/data.raw", "disks/shared.raw"}
        for path in [*rec["files"], rec["folder"], base["base"][0]["folder"]]:
            assert not os.path.isabs(path)

    def test_forged_base_is_not_allowed(self, source: Path, tmp_path: Path) -> None:
        """A folder naming '/' (or any folder that does not confirm it) as its base gains nothing."""
        evil = tmp_path / "evil"
        virtkit.save(Machine(name="evil"), evil)
        (evil / "links.toml").write_text(
            f'format-version = 2\n[[base]]\nfolder = "../../../../../../.."\nuuid = "{virtkit.load(evil).uuid}"\n'
            f'[[base]]\nfolder = "../gold"\nuuid = "{virtkit.load(source).uuid}"\n'
        )
        assert bundle.allowed_roots(evil) == []
        (evil / "machine.toml").write_text(
            (evil / "machine.toml").read_text()
            + '\n[[disks]]\npath = "../../gold/disks/root.qcow2"\n'
        )
        with pytest.raises(ConfigError, match="points outside the VM folder"):
            virtkit.load(evil)

    def test_moved_together(self, source: Path, tmp_path: Path) -> None:
        """Base and clone moved together keep working (every link is relative)."""
        virtkit.clone(source, tmp_path / "c1")
        moved = tmp_path / "moved"
        moved.mkdir()
        shutil.move(source, moved / "gold")
        shutil.move(tmp_path / "c1", moved / "c1")
        c = virtkit.load(moved / "c1")
        assert _read(moved / "c1", c.disks[0], 3 * MIB) == b"rootdata"
        assert [p for p, _ in bundle.dependents(moved / "gold")] == [moved / "c1"]

    def test_running_source_is_refused(self, source: Path, tmp_path: Path) -> None:
        """A source whose disk is held for writing (a running guest) cannot be cloned; nothing changes."""
        gold = virtkit.load(source)
        before = (source / "machine.toml").read_bytes()
        active = bundle.resolve_disk(source, gold.disks[0].active)
        with (
            images.open(active, writable=True),
            pytest.raises(StateError, match="in use by a running guest"),
        ):
            virtkit.clone(source, tmp_path / "c1")
        assert (source / "machine.toml").read_bytes() == before
        assert not (tmp_path / "c1").exists()
        assert not (source / "links.toml").exists()


class TestFull:
    def test_independent_sparse_copy(self, source: Path, tmp_path: Path) -> None:
        """linked=False flattens every chain into the clone; nothing is shared or recorded."""
        virtkit.clone(source, tmp_path / "c1")  # give the source a layer to flatten
        gold = virtkit.load(source)
        _write(source, gold.disks[0], b"newer!!!")
        seen: list[tuple[int, int]] = []
        c = virtkit.clone(
            source, tmp_path / "full", linked=False, progress=lambda d, t: seen.append((d, t))
        )
        full = tmp_path / "full"
        # data.raw had a layer (from the linked clone): flattened, it becomes qcow2
        assert [d.path for d in c.disks] == ["root.qcow2", "data.qcow2", "shared.raw"]
        assert [d.format for d in c.disks] == ["qcow2", "qcow2", "raw"]
        assert [d.layers for d in c.disks] == [(), (), ()]
        assert not (full / "links.toml").exists()
        assert bundle.allowed_roots(full) == []
        assert _read(full, c.disks[0]) == b"newer!!!"
        assert _read(full, c.disks[0], 3 * MIB) == b"rootdata"
        assert _read(full, c.disks[1]) == b"datadata"
        assert _read(full, c.disks[2]) == b"readonly"
        assert (full / "disks" / "seed.iso").read_bytes() == b"ISO" * 1000
        with images.open(full / "disks" / "root.qcow2") as img:
            assert img.backing_file is None
        assert (full / "disks" / "shared.raw").stat().st_blocks * 512 < MIB  # sparse raw
        assert (full / "disks" / "data.qcow2").stat().st_size < MIB  # only written clusters
        total = 4 * MIB + 2 * MIB + MIB
        assert seen[-1] == (total, total)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        # the source is not changed by a full clone and does not depend on it
        assert virtkit.load(source) == gold
        assert [p for p, _ in bundle.dependents(source)] == [tmp_path / "c1"]
        shutil.rmtree(source)
        assert _read(full, virtkit.load(full).disks[0]) == b"newer!!!"


class TestBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"linked": "yes"}, "linked"),
            ({"progress": 5}, "progress"),
            ({"name": "not a label"}, "name"),
        ],
    )
    def test_arguments(
        self, source: Path, tmp_path: Path, kwargs: dict[str, object], field: str
    ) -> None:
        """Bad arguments are ConfigErrors naming them; nothing is created."""
        with pytest.raises(ConfigError) as info:
            virtkit.clone(source, tmp_path / "c", **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
        assert not (tmp_path / "c").exists()
        assert not (source / "links.toml").exists()

    def test_folders(self, source: Path, tmp_path: Path) -> None:
        """Existing destination, nesting, a non-VM source and a bad default name are refused."""
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "x").write_text("x")
        cases = [
            (source, tmp_path / "taken", "dst_folder"),
            (source, source / "inner", "dst_folder"),
            (tmp_path / "taken", tmp_path / "c", "src_folder"),
            (source, tmp_path / "Bad_Name", "name"),
            (5, tmp_path / "c", "src_folder"),
        ]
        for src, dst, field in cases:
            with pytest.raises(ConfigError) as info:
                virtkit.clone(src, dst)  # type: ignore[arg-type]
            assert info.value.field == field, (src, dst)

    def test_empty_destination_folder_is_fine(self, source: Path, tmp_path: Path) -> None:
        """An existing empty destination folder is used."""
        (tmp_path / "empty").mkdir()
        c = virtkit.clone(source, tmp_path / "empty", linked=False)
        assert virtkit.load(tmp_path / "empty") == c

    def test_outside_disk_needs_allow(self, tmp_path: Path) -> None:
        """A source disk outside its folder is cloned only when the caller allows that place."""
        outside = tmp_path / "store"
        outside.mkdir()
        with images.create(outside / "big.qcow2", "1MiB") as img:
            img.write(0, b"outside!")
        src = tmp_path / "src"
        virtkit.save(Machine(name="src", disks=[Disk(path=str(outside / "big.qcow2"))]), src)
        with pytest.raises(ConfigError, match="points outside the VM folder"):
            virtkit.clone(src, tmp_path / "c1")
        c = virtkit.clone(src, tmp_path / "c1", allow=[outside], linked=False)
        assert c.disks[0].path == "big.qcow2"
        assert _read(tmp_path / "c1", c.disks[0]) == b"outside!"

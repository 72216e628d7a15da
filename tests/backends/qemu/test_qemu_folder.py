"""The folder is the truth: qemu's disk layers live in machine.toml and the snapshot index,
so a copied folder, the emulator backend and another process all see the same machine,
and linked clones run beside their source.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import virtkit
from virtkit import Disk, Machine, State
from virtkit.backends.qemu import QemuHypervisor
from virtkit.bundle import load_snapshots
from virtkit.testing import guests

SECTOR2 = b"written by the disk guest: " + guests.DISK_SECTOR1


@pytest.fixture
def ehv(tmp_path: Path) -> Iterator[virtkit.Hypervisor]:
    hyp = virtkit.connect("emulator", root=tmp_path / "eguests")
    yield hyp
    hyp.close()


def _folder_with(tmp_path: Path, name: str, guest: str) -> Path:
    """A VM folder whose disk (inside it) boots ``guest``."""
    folder = tmp_path / name
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "root.qcow2", guest, format="qcow2")
    virtkit.save(
        Machine(name=name, memory="16MiB", disks=[Disk(path="root.qcow2", bus="ide")]), folder
    )
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read_in_other_process(path: Path, offset: int, length: int) -> bytes:
    script = (
        "import sys, virtkit\n"
        f"with virtkit.images.open({str(path)!r}) as img:\n"
        f"    sys.stdout.write(img.read({offset}, {length}).hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return bytes.fromhex(out.stdout)


class TestLayersInTheFolder:
    def test_disk_snapshot_is_recorded_relative_and_a_copy_is_the_same_separate_machine(
        self, hv: QemuHypervisor, ehv: virtkit.Hypervisor, tmp_path: Path
    ) -> None:
        """A disk snapshot on qemu: machine.toml names the overlay relative to disks/, the index
        names the frozen layer, no backend file. A copy of the folder: the emulator boots it and
        sees the guest's write, images.open in another process reads the same bytes, and the
        copy's own writes never reach the original folder."""
        folder = _folder_with(tmp_path, "orig", "disk")
        guest = hv.define(virtkit.load(folder), folder=folder)
        guest.snapshot("before", memory=False)
        guest.start()
        assert guest.wait(timeout=60) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["disk"]

        stored = virtkit.load(folder)
        assert stored.disks[0].layers == ("root.s1.qcow2",)
        assert [s.layers for s in load_snapshots(folder)] == [{"hda": "root.qcow2"}]
        assert not (folder / "qemu-layers.json").exists()
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(folder / "disks" / "root.s1.qcow2")],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        assert info["backing-filename"] == "root.qcow2"  # relative: the folder is relocatable

        with guest.open_disk(0) as img:
            original = img.read(0, 4096)
        assert original[1024 : 1024 + len(SECTOR2)] == SECTOR2

        copy = tmp_path / "copy"
        shutil.copytree(folder, copy)
        before = _hashes(folder)
        # another process, the image engine only, on the copy's active layer
        assert _read_in_other_process(copy / "disks" / "root.s1.qcow2", 0, 4096) == original

        # the emulator backend on the copy: it boots the active layer and sees the write
        eguest = ehv.define(virtkit.load(copy), folder=copy)
        assert eguest.disk_path(eguest.machine.disks[0]) == copy / "disks" / "root.s1.qcow2"
        eguest.start()
        assert eguest.wait(timeout=30) is State.SHUTOFF
        assert b"sector 2: " + SECTOR2 in eguest.console.output
        with eguest.open_disk(0, writable=True) as img:
            img.write(8 * 512, b"the copy wrote this")
        with eguest.open_disk(0) as img:
            assert img.read(8 * 512, 19) == b"the copy wrote this"
        assert _hashes(folder) == before  # not a byte of the original changed
        with guest.open_disk(0) as img:
            assert img.read(8 * 512, 19) == bytes(19)

        # reverting in the copy (emulator) and in the original (qemu) are separate too
        guest.revert("before")
        with guest.open_disk(0) as img:
            assert img.read(1024, 16) == bytes(16)
        with eguest.open_disk(0) as img:
            assert img.read(8 * 512, 19) == b"the copy wrote this"

    def test_a_copy_naming_the_originals_active_layer_is_not_admitted(
        self, hv: QemuHypervisor, tmp_path: Path
    ) -> None:
        """A copied folder whose chain points at the original's files (absolute, as a v1
        qemu-layers.json did): it may not write the original's active layer while the original
        is defined - ResourceError at define() naming the file."""
        folder = _folder_with(tmp_path, "orig", "counter")
        hv.define(virtkit.load(folder), folder=folder).snapshot("s", memory=False)
        stale = virtkit.load(folder)
        disk = stale.disks[0]
        absolute = attrs.evolve(
            disk,
            path=str(folder / "disks" / disk.path),
            layers=tuple(str(folder / "disks" / n) for n in disk.layers),
        )
        copy = tmp_path / "copy"
        shutil.copytree(folder, copy)
        intruder = attrs.evolve(stale, name="intruder", disks=(absolute,))
        with pytest.raises(virtkit.ResourceError, match=r"root\.s1\.qcow2.*'orig'"):
            hv.define(intruder, folder=copy)


class TestLinkedClones:
    def test_two_linked_clones_and_the_source_run_at_once(
        self, hv: QemuHypervisor, tmp_path: Path
    ) -> None:
        """virtkit.clone twice (linked) and once more (linked=False): the source, both linked
        clones and the source's other (full) clone are defined and run at the same time on qemu,
        each counting on its own top layer; the shared base is never written."""
        src = _folder_with(tmp_path, "src", "counter")
        source = hv.define(virtkit.load(src), folder=src)  # defined before the clones exist
        virtkit.clone(src, tmp_path / "c1", name="c1")
        virtkit.clone(src, tmp_path / "c2", name="c2")
        virtkit.clone(src, tmp_path / "full", name="full", linked=False)
        c1 = hv.define(virtkit.load(tmp_path / "c1"), folder=tmp_path / "c1")
        c2 = hv.define(virtkit.load(tmp_path / "c2"), folder=tmp_path / "c2")
        full = hv.define(virtkit.load(tmp_path / "full"), folder=tmp_path / "full")
        assert full.machine.disks[0].layers == ()  # a copy: no chain into the source
        with full.open_disk(0) as img:
            assert img.backing_file is None
        shared = sorted((src / "disks").glob("*.qcow2"))
        frozen = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shared}
        running = (source, c1, c2, full)
        for g in running:
            g.start()
        for g in running:
            g.console.expect("count 3\r\n", timeout=60)
            assert g.state is State.RUNNING
        # the source picked up the new top layer clone() gave it (the folder is the truth)
        assert source.machine.disks[0].layers == virtkit.load(src).disks[0].layers != ()
        tops = {g.disk_path(g.machine.disks[0]) for g in running}
        assert len(tops) == 4
        for g in running:
            g.kill()
        for name, digest in frozen.items():
            path = src / "disks" / name
            if path not in tops:
                assert hashlib.sha256(path.read_bytes()).hexdigest() == digest

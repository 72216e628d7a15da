"""Linked clones run on real backends: defined without allow=, source and clones at once.

The ``disk`` test guest prints sector 2 of its disk, then writes sector 1 into
sector 2: its first run prints an empty sector 2, later runs the written one.
So each guest's output says whose writes its disk has seen.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import virtkit
from virtkit import Disk, Machine, State, bundle, images
from virtkit.testing import guests

TIMEOUT = 60
FIRST_RUN = b"sector 2: \r\n"
LATER_RUN = b"sector 2: written by the disk guest: sector one says hello\r\n"


@pytest.fixture
def gold(tmp_path: Path) -> Path:
    """A stopped VM folder whose qcow2 disk boots the disk guest."""
    folder = tmp_path / "gold"
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "boot.qcow2", "disk", format="qcow2")
    virtkit.save(Machine(name="gold", memory="32MiB", disks=[Disk(path="boot.qcow2")]), folder)
    return folder


def _run(hv: virtkit.Hypervisor, folder: Path) -> virtkit.Guest:
    guest = hv.define(virtkit.load(folder), folder=folder)  # no allow= for a clone's base
    guest.start()
    return guest


def _finish(guest: virtkit.Guest) -> bytes:
    assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
    return guest.console.output


@pytest.mark.parametrize("backend", ["emulator", "qemu"])
def test_source_and_two_clones_run_at_once(backend: str, gold: Path, tmp_path: Path) -> None:
    """Two linked clones and their source run together; nobody sees another's writes."""
    c1 = virtkit.clone(gold, tmp_path / "c1")
    virtkit.clone(gold, tmp_path / "c2")
    base = (gold / "disks" / "boot.qcow2").read_bytes()
    with virtkit.connect(backend, root=tmp_path / "guests") as hv:
        running = [_run(hv, folder) for folder in (gold, tmp_path / "c1", tmp_path / "c2")]
        outputs = [_finish(g) for g in running]
        for out in outputs:
            assert FIRST_RUN in out, out  # each started from the frozen, unwritten state
        for g in running:
            hv.undefine(g)
        again = _run(hv, tmp_path / "c1")
        assert LATER_RUN in _finish(again)  # c1 kept its own write
        hv.undefine(again)
    assert (gold / "disks" / "boot.qcow2").read_bytes() == base  # the shared file is frozen
    # every disk holds exactly its own guest's write, read through its chain
    for folder in (gold, tmp_path / "c1", tmp_path / "c2"):
        m = virtkit.load(folder)
        path = bundle.resolve_disk(folder, m.disks[0].active)
        with images.open(path, allow_backing=bundle.allowed_roots(folder)) as img:
            assert img.read(1024, 22) == b"written by the disk gu"
    assert c1.disks[0].path == "boot.qcow2"


@pytest.mark.parametrize("backend", ["emulator", "qemu"])
def test_running_source_is_not_cloned(backend: str, tmp_path: Path) -> None:
    """While the source runs (its disk locked by the backend) clone() is a StateError."""
    folder = tmp_path / "busy"
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "boot.qcow2", "counter", format="qcow2")
    virtkit.save(Machine(name="busy", memory="32MiB", disks=[Disk(path="boot.qcow2")]), folder)
    before = (folder / "machine.toml").read_bytes()
    with virtkit.connect(backend, root=tmp_path / "guests") as hv:
        guest = _run(hv, folder)
        guest.console.expect(b"count 1", timeout=TIMEOUT)
        with pytest.raises(virtkit.StateError, match="in use by a running guest"):
            virtkit.clone(folder, tmp_path / "c1")
        assert (folder / "machine.toml").read_bytes() == before
        assert not (tmp_path / "c1").exists()
        guest.kill()
        c = virtkit.clone(folder, tmp_path / "c1")
        assert c.disks[0].path == "boot.qcow2"


@pytest.mark.parametrize("backend", ["qemu"])
def test_source_keeps_layers_its_clones_read(backend: str, gold: Path, tmp_path: Path) -> None:
    """Deleting the source's snapshot whose layers a clone reads is refused, naming the clone."""
    with virtkit.connect(backend, root=tmp_path / "guests") as hv:
        guest = hv.define(virtkit.load(gold), folder=gold)
        guest.snapshot("before", memory=False)
        hv.undefine(guest)
        virtkit.clone(gold, tmp_path / "c1")
        guest = hv.define(virtkit.load(gold), folder=gold)
        with pytest.raises(virtkit.StateError, match="linked clone"):
            guest.delete_snapshot("before")
        assert [s.name for s in guest.snapshots] == ["before"]
        guest.start()
        assert FIRST_RUN in _finish(guest)
    c1 = virtkit.load(tmp_path / "c1")
    with virtkit.connect(backend, root=tmp_path / "guests2") as hv:
        clone = _run(hv, tmp_path / "c1")
        assert FIRST_RUN in _finish(clone)  # the source's run did not reach it
    assert c1.disks[0].active == "boot.qcow2"

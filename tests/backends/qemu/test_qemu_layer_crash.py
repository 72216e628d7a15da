"""kill -9 at every file-system step of a layer update leaves the old or the new folder.

A child process defines a stopped guest on the qemu backend and runs one operation
(disk snapshot, revert, delete of a disk snapshot, offline attach of a new disk, media
change); it SIGKILLs itself just before its N-th file-system step (a write, fsync,
truncate, rename, unlink, mkdir, or a ``qemu-img`` run), for every N. The parent then opens
the folder as any backend would and checks it is exactly the old or the new state: it loads,
every layer it names exists and passes ``qemu-img check``, and what a user sees (the
snapshot list, the disk's bytes, the devices) is one state or the other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit import Disk, Machine
from virtkit.bundle import load_snapshots
from virtkit.testing import guests

# the operations, each run on a folder prepared by _prepare (a disk snapshot "s" taken,
# then "after-snapshot" written into the active layer)
OPERATIONS: dict[str, str] = {
    "snapshot": "guest.snapshot('t', memory=False)",
    "revert": "guest.revert('s')",
    "delete": "guest.delete_snapshot('s')",
    "attach": "guest.attach(Disk(path='extra.qcow2', size='1MiB'))",
    "media": "guest.change_media('cdrom0', 'media.iso')",
}

CHILD = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from virtkit import Disk, load
    from virtkit.backends.qemu import QemuHypervisor
    folder, crash_at, op = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    hv = QemuHypervisor(accel="tcg", root=os.path.join(folder, "..", "hvroot"))
    guest = hv.define(load(folder), folder=folder)
    steps = 0
    def step():
        global steps
        steps += 1
        if steps == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
    def wrap(mod, name):
        real = getattr(mod, name)
        def wrapper(*args, **kwargs):
            step()
            return real(*args, **kwargs)
        setattr(mod, name, wrapper)
    for name in ("write", "fsync", "ftruncate", "replace", "rename", "unlink", "mkdir"):
        wrap(os, name)
    wrap(subprocess, "run")
    exec(op)
    print("steps", steps, flush=True)
    """
)


def _prepare(folder: Path) -> None:
    """A stopped VM folder with disk snapshot 's' and a later write on top of it."""
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "root.qcow2", "hello", format="qcow2")
    (folder / "disks" / "media.iso").write_bytes(b"\0" * 4096)
    virtkit.save(
        Machine(
            name="crash",
            memory="16MiB",
            disks=[Disk(path="root.qcow2", bus="ide")],
            cdroms=[virtkit.CdRom()],
        ),
        folder,
    )
    hv = virtkit.connect("qemu", accel="tcg", root=folder.parent / "prep")
    try:
        guest = hv.define(virtkit.load(folder), folder=folder)
        guest.snapshot("s", memory=False)
        with guest.open_disk(0, writable=True) as img:
            img.write(4096, b"after-snapshot")
    finally:
        hv.close()


def _run_child(folder: Path, crash_at: int, op: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(crash_at), OPERATIONS[op]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _state(folder: Path) -> dict[str, Any]:
    """What any backend sees in the folder; asserts it is whole (loads, layers exist, check ok)."""
    machine = virtkit.load(folder)
    snaps = load_snapshots(folder)
    disks = folder / "disks"
    for disk in machine.disks:
        for name in disk.files():
            assert (disks / name).is_file(), f"{name} is recorded but missing"
    for snap in snaps:
        for name in snap.layers.values():
            assert (disks / name).is_file(), f"snapshot {snap.name} names missing {name}"
    root = machine.disks[0]
    active = disks / root.active
    check = subprocess.run(
        ["qemu-img", "check", "--output=json", str(active)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    chain = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--backing-chain", "--output=json", str(active)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert Path(chain[-1]["filename"]).name == root.path  # the chain ends at the disk's file
    with virtkit.images.open(active) as img:
        marker = img.read(4096, 14)
    return {
        "snapshots": sorted(s.name for s in snaps),
        "marker": marker,
        "disks": [d.path for d in machine.disks],
        "media": [c.path for c in machine.cdroms],
    }


def _campaign(tmp_path: Path, op: str, sample: int) -> int:
    pristine = tmp_path / "pristine" / "vm"
    _prepare(pristine)
    old = _state(pristine)
    probe = tmp_path / "probe" / "vm"
    shutil.copytree(pristine, probe)
    done = _run_child(probe, 0, op)
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.split()[-1])
    new = _state(probe)
    assert new != old
    assert total >= 3
    points = list(range(1, total + 1))[::sample]
    for n in points:
        work = tmp_path / f"run{n}" / "vm"
        shutil.copytree(pristine, work)
        killed = _run_child(work, n, op)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        seen = _state(work)
        assert seen in (old, new), f"kill before step {n}/{total} of {op}: {seen}"
        shutil.rmtree(work.parent)
    return len(points)


class TestLayerUpdateCrashes:
    @pytest.mark.parametrize("op", ["snapshot", "revert", "attach", "media"])
    def test_sampled_crash_points(self, tmp_path: Path, op: str) -> None:
        """A kill at every 4th file-system step of the operation leaves the old or new folder."""
        assert _campaign(tmp_path, op, sample=4) >= 1

    @pytest.mark.slow
    @pytest.mark.parametrize("op", sorted(OPERATIONS))
    def test_every_crash_point(self, tmp_path: Path, op: str) -> None:
        """The full sweep: a kill before each file-system step, for every operation."""
        assert _campaign(tmp_path, op, sample=1) >= 3


def test_child_script_counts_steps(tmp_path: Path) -> None:
    """The sweep is real: a snapshot takes several file-system steps, and a kill stops it."""
    folder = tmp_path / "vm"
    _prepare(folder)
    assert os.path.isdir(folder / "disks")
    done = _run_child(folder, 0, "snapshot")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 3

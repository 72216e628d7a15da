"""kill -9 at every file-system step of a layer update leaves the old or the new folder.

A child process (forked from a helper that imported virtkit once) defines a guest on the
qemu backend and runs one operation on it while it is stopped (disk snapshot, revert,
delete of a disk snapshot, attach of a new disk, media change) or running (disk snapshot,
disk hot-plug, media change: the kill takes QEMU with it); it SIGKILLs itself just before
its N-th file-system step (an ``open`` that may
create or truncate, a write or pwrite of the image engine, fsync/fdatasync, truncate,
rename, unlink, mkdir, or a ``qemu-img`` run), for every N. The parent then opens
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
import tempfile
import textwrap
from collections.abc import Iterator
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
# the same changes on a running guest (QMP: blockdev-snapshot, blockdev-change-medium,
# blockdev-add + device_add); the kill takes QEMU with it (PR_SET_PDEATHSIG)
LIVE_OPERATIONS = ("snapshot", "attach", "media")

# A zygote process imports virtkit once, then forks one child per run: the child defines the
# stopped guest, counts its file-system steps and SIGKILLs itself before step ``crash_at``
# (0: never). A fork costs milliseconds where a fresh interpreter importing virtkit cost
# 0.5-1.5 s, which is what lets the default run cut every step of every operation.
ZYGOTE = textwrap.dedent(
    """
    import ctypes, json, os, signal, subprocess, sys, time
    from virtkit import Disk, load
    from virtkit.backends.qemu import QemuHypervisor

    # orphaned QEMUs (their Python child killed) are re-parented here, so they can be reaped
    # before the parent looks at the folder (PR_SET_CHILD_SUBREAPER)
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)

    STEPS = (
        "write", "pwrite", "writev", "fsync", "fdatasync", "ftruncate", "posix_fallocate",
        "replace", "rename", "unlink", "mkdir", "rmdir", "link", "symlink",
        "copy_file_range", "sendfile",
    )

    def child(folder, crash_at, op, live):
        hv = QemuHypervisor(accel="tcg", root=os.path.join(folder, "..", "hvroot"))
        guest = hv.define(load(folder), folder=folder)
        if live:
            guest.start()
            guest.console.expect("count 1", timeout=60)
        steps = 0
        def step():
            nonlocal steps
            steps += 1
            if steps == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
        def wrap(real):
            def wrapper(*args, **kwargs):
                step()
                return real(*args, **kwargs)
            return wrapper
        changes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
        def opener(path, flags, *args, **kwargs):
            if flags & changes:  # an open that may create or truncate is a step; a read is not
                step()
            return saved["open"](path, flags, *args, **kwargs)
        saved = {name: getattr(os, name) for name in (*STEPS, "open") if hasattr(os, name)}
        real_run = subprocess.run
        for name in STEPS:
            if name in saved:
                setattr(os, name, wrap(saved[name]))
        os.open, subprocess.run = opener, wrap(real_run)
        exec(op, {"guest": guest, "Disk": Disk})
        for name, real in saved.items():
            setattr(os, name, real)
        subprocess.run = real_run
        if live:
            guest.kill()
        return steps

    def reap(pid, deadline):
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                return status
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return os.waitpid(pid, 0)[1]
            time.sleep(0.002)

    for line in sys.stdin:
        folder, crash_at, op, live = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, exit at once
            os.close(r)
            report = os.fdopen(w, "w")
            try:
                report.write(f"steps {child(folder, crash_at, op, live)}")
                code = 0
            except BaseException as exc:  # the parent asserts on the exit code and this text
                report.write(f"error {exc!r}")
                code = 1
            report.flush()
            os._exit(code)
        os.close(w)
        deadline = time.monotonic() + 120
        status = reap(pid, deadline)
        while True:  # and every QEMU the child left (killed by its PDEATHSIG)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.002)
            except ChildProcessError:
                break
        with os.fdopen(r) as fh:
            said = fh.read()
        signal_ = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        print(json.dumps({"signal": signal_, "code": code, "said": said}), flush=True)
    """
)


class Zygote:
    """The forking helper process: ``run(folder, crash_at, op)`` -> what became of the child."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("w")
        # QEMU's sockets live in the runtime dir: a short path (UNIX sockets: 107 bytes), and
        # the dirs a killed child could not remove go away with it
        self.run_dir = Path(tempfile.mkdtemp(prefix="vklc-"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": str(self.run_dir)},
        )

    def run(self, folder: Path, crash_at: int, op: str, *, live: bool = False) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([str(folder), crash_at, OPERATIONS[op], live]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[Zygote]:
    z = Zygote(tmp_path / "zygote.log")
    yield z
    z.close()


def _prepare(folder: Path, guest: str = "hello") -> None:
    """A stopped VM folder with disk snapshot 's' and a later write on top of it."""
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "root.qcow2", guest, format="qcow2")
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


def _campaign(tmp_path: Path, zygote: Zygote, op: str, *, live: bool = False) -> int:
    pristine = tmp_path / "pristine" / "vm"
    _prepare(pristine, "counter" if live else "hello")  # the counter runs until killed
    old = _state(pristine)
    probe = tmp_path / "probe" / "vm"
    shutil.copytree(pristine, probe)
    done = zygote.run(probe, 0, op, live=live)
    assert done["code"] == 0, done
    total = int(done["said"].split()[-1])
    new = _state(probe)
    assert new != old
    assert total >= 3
    for n in range(1, total + 1):
        work = tmp_path / f"run{n}" / "vm"
        shutil.copytree(pristine, work)
        killed = zygote.run(work, n, op, live=live)
        assert killed["signal"] == signal.SIGKILL, killed
        seen = _state(work)
        assert seen in (old, new), f"kill before step {n}/{total} of {op}: {seen}"
        shutil.rmtree(work.parent)
    return total


class TestLayerUpdateCrashes:
    @pytest.mark.parametrize("op", sorted(OPERATIONS))
    def test_every_crash_point(self, tmp_path: Path, zygote: Zygote, op: str) -> None:
        """A kill before each file-system step of the operation (every one, in the default
        run) leaves the old or the new folder."""
        assert _campaign(tmp_path, zygote, op) >= 5

    @pytest.mark.parametrize("op", LIVE_OPERATIONS)
    def test_every_crash_point_of_a_running_guest(
        self, tmp_path: Path, zygote: Zygote, op: str
    ) -> None:
        """The same on a running guest: the kill (before each step) takes QEMU with it, and
        the folder is the old or the new one."""
        assert _campaign(tmp_path, zygote, op, live=True) >= 3


def test_child_counts_steps_and_a_kill_stops_it(tmp_path: Path, zygote: Zygote) -> None:
    """The sweep is real: a snapshot takes several file-system steps, a kill before the first
    leaves the folder as it was, and the image engine's writes and creations count as steps."""
    folder = tmp_path / "vm"
    _prepare(folder)
    before = _state(folder)
    killed = zygote.run(folder, 1, "snapshot")
    assert killed["signal"] == signal.SIGKILL, killed
    assert _state(folder) == before
    done = zygote.run(folder, 0, "snapshot")
    assert done["code"] == 0, done
    assert int(done["said"].split()[-1]) >= 3
    attach = zygote.run(folder, 0, "attach")  # creates extra.qcow2 with virtkit.images
    assert attach["code"] == 0, attach
    assert int(attach["said"].split()[-1]) >= 10

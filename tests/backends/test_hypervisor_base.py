"""The shared Hypervisor/Guest base: admission control, isolation, snapshots, console.

A minimal in-test backend records the hooks the base calls, so these tests
pin what the base decides before any real backend runs.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

import virtkit
from virtkit import (
    AllocationPolicy,
    Disk,
    HostResources,
    HypervisorType,
    Machine,
    SnapshotKind,
    State,
)
from virtkit.backends.base import Guest, Hypervisor
from virtkit.backends.console import Console
from virtkit.model import Snapshot

GiB = 1024**3


class RecordingGuest(Guest):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.calls: list[str] = []
        self.fail_next: str | None = None
        self.ignore_acpi = False

    def _hook(self, name: str) -> None:
        if self.fail_next == name:
            self.fail_next = None
            raise virtkit.BackendError(f"{name} failed")
        self.calls.append(name)

    def _do_start(self) -> None:
        self._hook("start")

    def _do_pause(self) -> None:
        self._hook("pause")

    def _do_resume(self) -> None:
        self._hook("resume")

    def _do_reset(self) -> None:
        self._hook("reset")

    def _do_shutdown(self, timeout: float) -> None:
        self._hook("shutdown")
        if self.ignore_acpi:
            raise virtkit.TimeoutError("ignored", timeout=timeout)

    def _do_kill(self) -> None:
        self._hook("kill")

    def _do_snapshot(self, snap: Snapshot) -> None:
        self._hook(f"snapshot:{snap.name}:{snap.kind.value}")

    def _do_revert(self, snap: Snapshot) -> None:
        self._hook(f"revert:{snap.name}")

    def _do_delete_snapshot(self, snap: Snapshot) -> None:
        self._hook(f"delete:{snap.name}")


class RecordingHypervisor(Hypervisor):
    name = "recording"

    @property
    def kind(self) -> HypervisorType:
        return HypervisorType.TYPE2

    def _create_guest(self, machine: Machine, folder: Path) -> Guest:
        return RecordingGuest(self, machine, folder)


def hv(
    tmp_path: Path, cpus: int = 4, memory: int = 8 * GiB, storage: int = 100 * GiB, **policy: object
) -> RecordingHypervisor:
    return RecordingHypervisor(
        root=tmp_path,
        host=HostResources(cpus=cpus, memory=memory, storage=storage),
        policy=AllocationPolicy(**policy),  # type: ignore[arg-type]
    )


class TestLifecycleThroughGuest:
    def test_full_cycle(self, tmp_path: Path) -> None:
        """start/pause/resume/reset/shutdown walk the states and call each hook once."""
        g = hv(tmp_path).define(Machine(name="vm"))
        assert g.state is State.SHUTOFF
        g.start()
        g.pause()
        assert g.state is State.PAUSED
        g.resume()
        g.reset()
        assert g.state is State.RUNNING
        g.shutdown()
        assert g.state is State.SHUTOFF
        assert g.calls == ["start", "pause", "resume", "reset", "shutdown"]  # type: ignore[attr-defined]

    def test_illegal_transitions(self, tmp_path: Path) -> None:
        """Illegal calls raise StateError and call no hook."""
        g = hv(tmp_path).define(Machine(name="vm"))
        for op in (g.pause, g.resume, g.reset, g.kill, g.shutdown):
            with pytest.raises(virtkit.StateError):
                op()
        g.start()
        with pytest.raises(virtkit.StateError, match="cannot start guest 'vm': it is running"):
            g.start()
        assert g.calls == ["start"]  # type: ignore[attr-defined]

    def test_failed_hook_keeps_state(self, tmp_path: Path) -> None:
        """A backend failure in start leaves the guest SHUTOFF and the error propagates."""
        g = hv(tmp_path).define(Machine(name="vm"))
        g.fail_next = "start"  # type: ignore[attr-defined]
        with pytest.raises(virtkit.BackendError):
            g.start()
        assert g.state is State.SHUTOFF
        g.start()
        assert g.state is State.RUNNING

    def test_shutdown_ignored_keeps_running(self, tmp_path: Path) -> None:
        """A guest that ignores ACPI stays RUNNING after the TimeoutError."""
        g = hv(tmp_path).define(Machine(name="vm"))
        g.start()
        g.ignore_acpi = True  # type: ignore[attr-defined]
        with pytest.raises(virtkit.TimeoutError):
            g.shutdown(timeout=0.1)
        assert g.state is State.RUNNING

    def test_poweroff_notification_wakes_wait(self, tmp_path: Path) -> None:
        """wait() returns SHUTOFF when the backend reports a power-off from another thread."""
        g = hv(tmp_path).define(Machine(name="vm"))
        g.start()
        threading.Timer(0.05, g._notify_poweroff).start()
        assert g.wait(timeout=10) is State.SHUTOFF

    def test_crash_then_kill_then_start(self, tmp_path: Path) -> None:
        """CRASHED keeps the reason; kill() cleans up; start() works again."""
        g = hv(tmp_path).define(Machine(name="vm"))
        g.start()
        g._notify_crash("triple fault")
        assert g.state is State.CRASHED
        assert g.crash_reason == "triple fault"
        assert g.wait(timeout=1) is State.CRASHED
        g.kill()
        assert g.state is State.SHUTOFF
        g.start()
        assert g.state is State.RUNNING

    def test_context_manager_kills_and_undefines(self, tmp_path: Path) -> None:
        """Leaving the guest's with-block kills it and undefines it."""
        h = hv(tmp_path)
        with h.define(Machine(name="vm")) as g:
            g.start()
        assert g.state is State.SHUTOFF
        assert h.guests == ()


class TestAdmission:
    def test_define_refuses_too_much_memory(self, tmp_path: Path) -> None:
        """A guest bigger than host memory minus the reserve is refused, leaving no trace."""
        h = hv(tmp_path, memory=4 * GiB)
        with pytest.raises(virtkit.ResourceError, match="wants 4294967296 bytes of memory") as info:
            h.define(Machine(name="big", memory="4GiB"))
        assert info.value.resource == "memory"
        assert h.guests == ()
        assert not (tmp_path / "big").exists()
        assert h.host.allocated_memory == 0

    def test_define_refuses_too_many_vcpus(self, tmp_path: Path) -> None:
        """vCPUs beyond host CPUs x overcommit are refused."""
        h = hv(tmp_path, cpus=2, cpu_overcommit=2.0)
        with pytest.raises(virtkit.ResourceError, match="policy allows at most 4"):
            h.define(Machine(name="big", cpus=5))

    def test_define_refuses_storage(self, tmp_path: Path) -> None:
        """Disk sizes beyond storage x overcommit are refused, and no image is created."""
        h = hv(tmp_path, storage=GiB, storage_overcommit=1.0)
        h.define(Machine(name="a", disks=[Disk(path="a.raw", size="512MiB")]))
        with pytest.raises(virtkit.ResourceError, match="needs 1073741824 bytes of disk"):
            h.define(Machine(name="b", disks=[Disk(path="b.raw", size="1GiB")]))
        assert not (tmp_path / "b").exists()
        assert h.host.allocated_storage == 512 * 1024**2

    def test_start_refuses_overcommit_and_changes_nothing(self, tmp_path: Path) -> None:
        """Starting a guest that would exceed running memory is refused; it stays SHUTOFF."""
        h = hv(tmp_path, memory=3 * GiB, reserved_memory="1GiB")
        a = h.define(Machine(name="a", memory="1GiB"))
        b = h.define(Machine(name="b", memory="1GiB"))
        c = h.define(Machine(name="c", memory="1GiB"))
        a.start()
        b.start()
        assert h.host.allocated_memory == 2 * GiB
        with pytest.raises(virtkit.ResourceError, match="would commit"):
            c.start()
        assert c.state is State.SHUTOFF
        assert c.calls == []  # type: ignore[attr-defined]
        assert h.host.allocated_memory == 2 * GiB
        a.kill()
        c.start()
        assert h.host.allocated_memory == 2 * GiB
        assert h.host.allocated_cpus == 2

    def test_duplicate_name(self, tmp_path: Path) -> None:
        """Two guests with one name are refused."""
        h = hv(tmp_path)
        h.define(Machine(name="a"))
        with pytest.raises(virtkit.ConfigError, match="already defined"):
            h.define(Machine(name="a"))


class TestIsolation:
    def test_writable_disk_in_two_guests(self, tmp_path: Path) -> None:
        """One image attached writable to a second guest is refused."""
        h = hv(tmp_path)
        shared = tmp_path / "shared.raw"
        shared.write_bytes(b"\0" * 4096)
        h.define(Machine(name="a", disks=[Disk(path=str(shared))]))
        with pytest.raises(virtkit.ResourceError, match="already attached to guest 'a'"):
            h.define(Machine(name="b", disks=[Disk(path=str(shared), read_only=True)]))

    def test_read_only_sharing_allowed(self, tmp_path: Path) -> None:
        """Read-only in both guests may share an image."""
        h = hv(tmp_path)
        shared = tmp_path / "shared.raw"
        shared.write_bytes(b"\0" * 4096)
        h.define(Machine(name="a", disks=[Disk(path=str(shared), read_only=True)]))
        h.define(Machine(name="b", disks=[Disk(path=str(shared), read_only=True)]))

    def test_each_guest_has_its_own_folder(self, tmp_path: Path) -> None:
        """Relative disk paths land in each guest's own folder."""
        h = hv(tmp_path)
        a = h.define(Machine(name="a", disks=[Disk(path="root.raw", size="1MiB")]))
        b = h.define(Machine(name="b", disks=[Disk(path="root.raw", size="1MiB")]))
        assert a.disk_path(a.machine.disks[0]) == tmp_path / "a" / "disks" / "root.raw"
        assert b.disk_path(b.machine.disks[0]) == tmp_path / "b" / "disks" / "root.raw"
        assert virtkit.load(tmp_path / "a") == a.machine


class TestSnapshots:
    def test_tree_and_persistence(self, tmp_path: Path) -> None:
        """Snapshots form a tree, are saved in the folder, and survive a new connection."""
        h = hv(tmp_path)
        g = h.define(Machine(name="vm"))
        g.start()
        s1 = g.snapshot("one")
        g.pause()
        s2 = g.snapshot("two", memory=False, description="disk")
        assert s1.kind is SnapshotKind.FULL and s1.state is State.RUNNING
        assert s2.kind is SnapshotKind.DISK and s2.parent == "one"
        assert [s.name for s in g.snapshots] == ["one", "two"]
        g.kill()
        h.undefine(g)
        g2 = h.define(virtkit.load(tmp_path / "vm"), folder=tmp_path / "vm")
        assert [s.name for s in g2.snapshots] == ["one", "two"]
        assert g2.current_snapshot is not None and g2.current_snapshot.name == "two"

    def test_revert_restores_run_state(self, tmp_path: Path) -> None:
        """Reverting to a snapshot taken while paused leaves the guest paused; disk-only leaves it off."""
        g = hv(tmp_path).define(Machine(name="vm"))
        g.start()
        g.pause()
        g.snapshot("paused")
        g.resume()
        g.snapshot("disk", memory=False)
        g.revert("paused")
        assert g.state is State.PAUSED
        g.revert("disk")
        assert g.state is State.SHUTOFF
        g.revert("paused")
        assert g.state is State.PAUSED

    def test_delete_reparents(self, tmp_path: Path) -> None:
        """Deleting a snapshot re-parents its children."""
        g = hv(tmp_path).define(Machine(name="vm"))
        g.start()
        g.snapshot("a")
        g.snapshot("b")
        g.snapshot("c")
        g.delete_snapshot("b")
        assert {s.name: s.parent for s in g.snapshots} == {"a": None, "c": "a"}

    def test_errors(self, tmp_path: Path) -> None:
        """Duplicate names, unknown names and full snapshots of a stopped guest are refused."""
        g = hv(tmp_path).define(Machine(name="vm"))
        with pytest.raises(virtkit.StateError, match="needs a running or paused guest"):
            g.snapshot("x")
        g.snapshot("x", memory=False)
        with pytest.raises(virtkit.ConfigError, match="already has a snapshot named 'x'"):
            g.snapshot("x", memory=False)
        with pytest.raises(virtkit.ConfigError, match="no snapshot named 'y'"):
            g.revert("y")


class TestConsole:
    def test_expect_like_pexpect(self) -> None:
        """expect searches after the previous match and returns a re.Match."""
        c = Console()
        c.open()
        c.feed(b"boot... login: x login: ")
        m1 = c.expect("login:")
        m2 = c.expect(re.compile(rb"log(in):"))
        assert m1.end() < m2.end()
        assert m2.group(1) == b"in"
        with pytest.raises(virtkit.TimeoutError, match="did not appear within 0.05 s"):
            c.expect("login:", timeout=0.05)

    def test_text_regex(self) -> None:
        """A str regex sees UTF-8 text."""
        c = Console()
        c.open()
        c.feed("température 21°C\n".encode())
        assert c.expect(re.compile(r"(\d+)°C")).group(1) == "21"

    def test_expect_wakes_on_feed_and_fails_on_stop(self) -> None:
        """expect returns when output arrives from another thread; raises StateError once closed."""
        c = Console()
        c.open()
        threading.Timer(0.05, c.feed, args=(b"ready\n",)).start()
        assert c.expect("ready", timeout=10).group() == b"ready"
        threading.Timer(0.05, c.close, args=("the guest powered off",)).start()
        with pytest.raises(virtkit.StateError, match="the guest powered off"):
            c.expect("never", timeout=10)

    def test_write(self) -> None:
        """write sends bytes through the backend's writer; refused when closed."""
        sent: list[bytes] = []
        c = Console(sent.append)
        with pytest.raises(virtkit.StateError):
            c.write(b"x")
        c.open()
        c.write("hi\n")
        assert sent == [b"hi\n"]

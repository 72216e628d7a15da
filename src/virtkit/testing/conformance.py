"""The backend conformance suite: one set of tests every virtkit backend passes.

A backend opts in with a test module of its own (as fsspec's abstract tests
are used)::

    from virtkit.testing.conformance import ConformanceSuite

    class TestEmulator(ConformanceSuite):
        backend = "emulator"

The suite drives real guests: the NASM boot sectors of
:mod:`virtkit.testing.guests`, on qcow2 disks by default. It uses only the
public API (``virtkit.connect``, ``Guest``, ``Console``, ``virtkit.images``),
so whatever passes here behaves the same to users. Behaviour a backend may
legitimately lack or do differently is a declared capability (class
attributes below, like SQLAlchemy's requirements), never a skip.

Every wait has a timeout: a broken backend fails, it never hangs the run.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import virtkit
from virtkit import images
from virtkit.backends import Guest, Hypervisor
from virtkit.errors import CapabilityWarning, ConfigError, StateError, TimeoutError, VirtkitError
from virtkit.model import CdRom, Disk, Machine, Serial, SnapshotKind, State
from virtkit.testing import guests

__all__ = [
    "ConformanceSuite",
    "ConsoleTests",
    "DeviceTests",
    "DiskTests",
    "ErrorTests",
    "GuestFactory",
    "LifecycleTests",
    "PowerTests",
    "SnapshotTests",
    "SuiteBase",
    "counts",
    "state_of",
    "stored",
]

GuestFactory = Callable[..., Guest]
_COUNT = re.compile(rb"count (\d+)\r\n")


def counts(data: bytes) -> list[int]:
    """The numbers of the complete ``count N`` lines in ``data``."""
    return [int(m.group(1)) for m in _COUNT.finditer(data)]


def stored(guest: Guest) -> Machine:
    """The machine as the guest's folder records it (what any other backend would load)."""
    return virtkit.load(guest.folder, allow=guest.backing_roots())


def state_of(guest: Guest) -> State:
    """The guest's state, read afresh (keeps type checkers from narrowing it)."""
    return guest.state


class SuiteBase:
    """Fixtures and settings shared by the suite's test classes.

    Class attributes a backend sets:

    * ``backend``: the name ``virtkit.connect()`` knows it by (required).
    * ``connect_options``: keyword options for ``virtkit.connect()``.
    * ``disk_format``: image format of the test disks (``"qcow2"``: full
      snapshots on QEMU need it).
    * ``memory``: guest RAM.
    * ``timeout``: seconds any single wait may take (boot, expect, power-off).
    * ``reports_boot_failure``: a machine with nothing to boot ends CRASHED
      with a reason (QEMU's SeaBIOS instead waits and retries, RUNNING).
    * ``crashes_on_triple_fault``: a triple fault ends CRASHED (QEMU's
      default is to reset the machine).
    * ``live_media``: ``change_media()`` works on a running guest (else it
      raises ``ConfigError`` and changes nothing; stopped guests always work).
    * ``hot_plug``: ``attach()`` of a virtio disk works on a running guest
      (else ``ConfigError``, nothing recorded or created).
    * ``reverts_live_disk_snapshots``: a disk-only snapshot taken while the
      guest ran can be reverted to (libvirt 9.0 cannot revert to such an
      external snapshot: it raises a ``VirtkitError`` and changes nothing).
    """

    backend: ClassVar[str]
    connect_options: ClassVar[dict[str, Any]] = {}
    disk_format: ClassVar[str] = "qcow2"
    memory: ClassVar[str] = "32MiB"
    timeout: ClassVar[float] = 30.0
    reports_boot_failure: ClassVar[bool] = False
    crashes_on_triple_fault: ClassVar[bool] = False
    live_media: ClassVar[bool] = False
    hot_plug: ClassVar[bool] = False
    reverts_live_disk_snapshots: ClassVar[bool] = True

    @pytest.fixture
    def hypervisor(self, tmp_path: Path) -> Iterator[Hypervisor]:
        """A connection whose guests live under ``tmp_path``; closed (guests killed) after."""
        hv = virtkit.connect(self.backend, root=tmp_path / "guests", **self.connect_options)
        try:
            yield hv
        finally:
            hv.close()

    @pytest.fixture
    def make_guest(self, hypervisor: Hypervisor, tmp_path: Path) -> GuestFactory:
        """``make_guest("hello", fmt=None, read_only=False, **machine_fields)`` -> a defined Guest.

        The test guest's disk image is written under ``tmp_path``; pass
        ``name=None`` for a machine without disks.
        """
        made = 0

        def make(
            guest: str | None,
            *,
            fmt: str | None = None,
            read_only: bool = False,
            **fields: Any,
        ) -> Guest:
            nonlocal made
            made += 1
            fmt = fmt or self.disk_format
            disks: tuple[Disk, ...] = ()
            if guest is not None:
                path = tmp_path / f"{guest}-{made}.{fmt}"
                guests.write_disk(path, guest, format=fmt)
                disks = (Disk(str(path), format=fmt, read_only=read_only),)
            fields.setdefault("memory", self.memory)
            machine = Machine(name=f"{(guest or 'empty')}-{made}", disks=disks, **fields)
            return hypervisor.define(machine)

        return make

    def wait_state(self, guest: Guest, state: State) -> None:
        """Wait (bounded) until ``guest.state`` is ``state``."""
        deadline = time.monotonic() + self.timeout
        while guest.state is not state:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"guest {guest.name} is {guest.state.value}, expected {state.value} "
                    f"(crash reason: {guest.crash_reason})"
                )
            time.sleep(0.02)

    def read_disk(self, guest: Guest, offset: int, length: int) -> bytes:
        """Read the guest's first disk through ``virtkit.images`` (guest stopped)."""
        disk = guest.machine.disks[0]
        with images.open(guest.disk_path(disk), format=disk.format) as image:  # type: ignore[arg-type]
            return image.read(offset, length)


class LifecycleTests(SuiteBase):
    """Start, pause, resume, reset, kill and the illegal transitions."""

    def test_new_guest_is_shut_off(self, make_guest: GuestFactory) -> None:
        """A freshly defined guest is SHUTOFF and has printed nothing."""
        guest = make_guest("hello")
        assert state_of(guest) is State.SHUTOFF
        assert guest.console.output == b""

    def test_start_runs_the_boot_sector(self, make_guest: GuestFactory) -> None:
        """start() boots the disk: the guest prints its greeting and powers itself off."""
        guest = make_guest("hello")
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["hello"]

    def test_start_on_a_running_guest_is_a_state_error(self, make_guest: GuestFactory) -> None:
        """A second start() raises StateError and leaves the guest running."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 0", timeout=self.timeout)
        with pytest.raises(StateError):
            guest.start()
        assert state_of(guest) is State.RUNNING

    def test_illegal_transitions_raise_state_error(self, make_guest: GuestFactory) -> None:
        """pause/resume/reset/shutdown/kill on a stopped guest, and resume on a running one."""
        guest = make_guest("counter")
        for action in (guest.pause, guest.resume, guest.reset, guest.kill):
            with pytest.raises(StateError):
                action()
        with pytest.raises(StateError):
            guest.shutdown(timeout=1)
        guest.start()
        with pytest.raises(StateError):
            guest.resume()
        with pytest.raises(StateError):
            guest.hypervisor.undefine(guest)
        assert state_of(guest) is State.RUNNING

    def test_pause_freezes_and_resume_continues(self, make_guest: GuestFactory) -> None:
        """While paused the counter prints nothing; after resume it carries on from there."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 2\r\n", timeout=self.timeout)
        guest.pause()
        assert state_of(guest) is State.PAUSED
        frozen = guest.console.output
        last = counts(frozen)[-1]
        with pytest.raises(TimeoutError):
            guest.console.expect(f"count {last + 1}\r\n", timeout=0.5)
        assert guest.console.output == frozen
        guest.resume()
        assert state_of(guest) is State.RUNNING
        guest.console.expect(f"count {last + 2}\r\n", timeout=self.timeout)
        seen = counts(guest.console.output)
        assert seen == list(range(len(seen)))

    def test_kill_stops_a_running_guest(self, make_guest: GuestFactory) -> None:
        """kill() ends a running guest at once; waiting on its console then fails."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 1", timeout=self.timeout)
        guest.kill()
        assert state_of(guest) is State.SHUTOFF
        with pytest.raises(StateError):
            guest.console.expect("count 1000", timeout=self.timeout)

    def test_kill_stops_a_paused_guest(self, make_guest: GuestFactory) -> None:
        """A paused guest can be killed too."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 0", timeout=self.timeout)
        guest.pause()
        guest.kill()
        assert state_of(guest) is State.SHUTOFF

    def test_reset_reboots_and_keeps_running(self, make_guest: GuestFactory) -> None:
        """reset() reboots: the boot sector runs again from the start, state stays RUNNING."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 2\r\n", timeout=self.timeout)
        guest.reset()
        assert state_of(guest) is State.RUNNING
        guest.console.expect("counter starts\r\ncount 0\r\n", timeout=self.timeout)
        assert guest.console.output.count(b"counter starts") == 2

    def test_reset_while_paused_stays_paused(self, make_guest: GuestFactory) -> None:
        """reset() of a paused guest keeps it paused; on resume it boots from the start."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 1\r\n", timeout=self.timeout)
        guest.pause()
        guest.reset()
        assert state_of(guest) is State.PAUSED
        guest.resume()
        guest.console.expect("counter starts\r\ncount 0\r\n", timeout=self.timeout)

    def test_running_guests_hold_host_resources(
        self, make_guest: GuestFactory, hypervisor: Hypervisor
    ) -> None:
        """A running guest's memory and vCPUs count as allocated until it stops."""
        base = hypervisor.host
        guest = make_guest("counter")
        guest.start()
        running = hypervisor.host
        assert running.allocated_memory == base.allocated_memory + guest.machine.memory
        assert running.allocated_cpus == base.allocated_cpus + guest.machine.vcpus
        guest.kill()
        assert hypervisor.host.allocated_memory == base.allocated_memory

    def test_a_powered_off_guest_starts_again(self, make_guest: GuestFactory) -> None:
        """After powering off, start() boots the guest again; output is appended."""
        guest = make_guest("hello")
        guest.start()
        guest.wait(timeout=self.timeout)
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["hello"] * 2

    def test_context_manager_kills_and_undefines(
        self, make_guest: GuestFactory, hypervisor: Hypervisor
    ) -> None:
        """Leaving ``with guest:`` kills a running guest and undefines it."""
        guest = make_guest("counter")
        with guest:
            guest.start()
            guest.console.expect("count 0", timeout=self.timeout)
        assert state_of(guest) is State.SHUTOFF
        assert guest not in hypervisor.guests

    def test_cpu_modes(self, make_guest: GuestFactory) -> None:
        """The guest can switch to 32-bit protected mode and 64-bit long mode and print."""
        guest = make_guest("modes")
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["modes"]


class ConsoleTests(SuiteBase):
    """The serial console: output, input, expect semantics, the log file."""

    def test_console_input_is_echoed(self, make_guest: GuestFactory) -> None:
        """Bytes written to the console reach the guest's COM1; its replies come back."""
        guest = make_guest("echo")
        guest.start()
        guest.console.expect("echo ready\r\n", timeout=self.timeout)
        guest.console.write("hello virtkit\r")
        guest.console.expect("hello virtkit\r\n", timeout=self.timeout)
        guest.console.write(b"q")
        guest.console.expect("bye", timeout=self.timeout)
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert guest.console.output == b"echo ready\r\nhello virtkit\r\n\r\nbye\r\n"

    def test_expect_returns_the_match(self, make_guest: GuestFactory) -> None:
        """expect() takes a compiled regex and returns its match object."""
        guest = make_guest("hello")
        guest.start()
        match = guest.console.expect(re.compile(rb"Hello from the (\w+) hello"), self.timeout)
        assert match.group(1) == b"virtkit"

    def test_expect_searches_after_the_previous_match(self, make_guest: GuestFactory) -> None:
        """A second expect() of the same text needs a new occurrence."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count ", timeout=self.timeout)
        second = guest.console.expect(re.compile(rb"count (\d+)"), timeout=self.timeout)
        assert int(second.group(1)) >= 1

    def test_expect_times_out(self, make_guest: GuestFactory) -> None:
        """A pattern that never appears raises virtkit.TimeoutError; the guest keeps running."""
        guest = make_guest("ignore-acpi")
        guest.start()
        guest.console.expect("halting", timeout=self.timeout)
        with pytest.raises(TimeoutError) as info:
            guest.console.expect("never printed", timeout=0.3)
        assert isinstance(info.value, VirtkitError)
        assert state_of(guest) is State.RUNNING

    def test_expect_after_power_off_is_a_state_error(self, make_guest: GuestFactory) -> None:
        """Waiting for text from a guest that powered off raises StateError, not a hang."""
        guest = make_guest("hello")
        guest.start()
        guest.wait(timeout=self.timeout)
        with pytest.raises(StateError):
            guest.console.expect("more", timeout=self.timeout)

    def test_writing_to_a_stopped_guest_is_a_state_error(self, make_guest: GuestFactory) -> None:
        """Console input needs a running guest."""
        guest = make_guest("echo")
        with pytest.raises(StateError):
            guest.console.write(b"x")

    def test_serial_log_file_gets_the_output(self, make_guest: GuestFactory) -> None:
        """Serial(log=...) copies everything the guest prints into that file."""
        guest = make_guest("hello", serial=Serial(log="console.log"))
        guest.start()
        guest.wait(timeout=self.timeout)
        assert (guest.folder / "console.log").read_bytes() == guests.OUTPUT["hello"]


class DiskTests(SuiteBase):
    """int 13h reads and writes reach the image file, in every format."""

    def _check_disk_guest(self, guest: Guest) -> None:
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["disk"]
        written = self.read_disk(guest, 1024, 512)
        expected = b"written by the disk guest: " + guests.DISK_SECTOR1 + b"\0"
        assert written.startswith(expected)
        assert self.read_disk(guest, 512, 512).startswith(guests.DISK_SECTOR1)

    def test_disk_read_and_write_qcow2(self, make_guest: GuestFactory) -> None:
        """The disk guest reads sector 1 and its write to sector 2 is in the qcow2 file."""
        self._check_disk_guest(make_guest("disk", fmt="qcow2"))

    def test_disk_read_and_write_raw(self, make_guest: GuestFactory) -> None:
        """The same on a raw image."""
        self._check_disk_guest(make_guest("disk", fmt="raw"))

    def test_write_to_a_read_only_disk_fails_in_the_guest(self, make_guest: GuestFactory) -> None:
        """A read-only disk reads fine; the guest's write fails and the image is unchanged."""
        guest = make_guest("disk", read_only=True)
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        output = guest.console.output
        assert output.startswith(b"read: sector one says hello\r\n")
        assert output.endswith(b"disk error\r\n")
        assert self.read_disk(guest, 1024, 512) == bytes(512)

    def test_backing_chain(self, hypervisor: Hypervisor, tmp_path: Path) -> None:
        """A qcow2 overlay boots from its backing file; writes land in the overlay only."""
        base = tmp_path / "base.qcow2"
        guests.write_disk(base, "disk", format="qcow2")
        overlay = tmp_path / "overlay.qcow2"
        images.create(overlay, format="qcow2", backing="base.qcow2", backing_format="qcow2").close()
        guest = hypervisor.define(
            Machine(name="chain", memory=self.memory, disks=(Disk(str(overlay), format="qcow2"),))
        )
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["disk"]
        assert self.read_disk(guest, 1024, 27) == b"written by the disk guest: "
        with images.open(base) as image:
            assert image.read(1024, 512) == bytes(512)


class PowerTests(SuiteBase):
    """Guest power-off, wait(), the ACPI power button, halting."""

    def test_wait_returns_when_the_guest_powers_off(self, make_guest: GuestFactory) -> None:
        """wait() returns SHUTOFF once the guest writes SLP_EN|S5 to PM1a_CNT."""
        guest = make_guest("hello")
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert state_of(guest) is State.SHUTOFF

    def test_wait_times_out_on_a_running_guest(self, make_guest: GuestFactory) -> None:
        """wait(timeout) raises virtkit.TimeoutError while the guest runs on."""
        guest = make_guest("counter")
        guest.start()
        with pytest.raises(TimeoutError):
            guest.wait(timeout=0.3)
        assert state_of(guest) is State.RUNNING

    def test_shutdown_presses_the_acpi_power_button(self, make_guest: GuestFactory) -> None:
        """shutdown() sets PWRBTN_STS; a guest that polls it powers off and shutdown returns."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 1", timeout=self.timeout)
        guest.shutdown(timeout=self.timeout)
        assert state_of(guest) is State.SHUTOFF
        assert guest.console.output.endswith(b"power button pressed, bye\r\n")

    def test_shutdown_ignored_times_out_and_keeps_running(self, make_guest: GuestFactory) -> None:
        """A guest that ignores ACPI makes shutdown() raise TimeoutError; kill() still works."""
        guest = make_guest("ignore-acpi")
        guest.start()
        guest.console.expect("halting with interrupts off", timeout=self.timeout)
        with pytest.raises(TimeoutError):
            guest.shutdown(timeout=1.0)
        assert state_of(guest) is State.RUNNING
        guest.kill()
        assert state_of(guest) is State.SHUTOFF

    def test_halt_with_interrupts_off_stays_running(self, make_guest: GuestFactory) -> None:
        """cli; hlt leaves the guest RUNNING (halted), neither crashed nor off."""
        guest = make_guest("ignore-acpi")
        guest.start()
        guest.console.expect("halting", timeout=self.timeout)
        with pytest.raises(TimeoutError):
            guest.wait(timeout=0.5)
        assert state_of(guest) is State.RUNNING


class SnapshotTests(SuiteBase):
    """Full and disk-only snapshots, revert, the snapshot list."""

    def _run_to(self, guest: Guest, count: int) -> None:
        guest.console.expect(f"count {count}\r\n", timeout=self.timeout)

    def test_full_snapshot_revert_reproduces_output(self, make_guest: GuestFactory) -> None:
        """After reverting a paused full snapshot the output repeats what followed it."""
        guest = make_guest("counter")
        guest.start()
        self._run_to(guest, 2)
        guest.pause()
        mark = len(guest.console.output)
        snap = guest.snapshot("mid-run")
        assert snap.kind is SnapshotKind.FULL
        assert snap.state is State.PAUSED
        guest.resume()
        last = counts(guest.console.output)[-1] + 4
        self._run_to(guest, last)
        guest.pause()
        original = guest.console.output[mark:]
        original = original[: original.index(f"count {last}\r\n".encode())]
        guest.revert("mid-run")
        assert state_of(guest) is State.PAUSED
        mark2 = len(guest.console.output)
        guest.resume()
        self._run_to(guest, last)
        replay = guest.console.output[mark2:]
        assert replay.startswith(original)
        assert counts(replay)[0] == counts(original)[0]

    def test_snapshot_of_a_running_guest_reverts_to_running(self, make_guest: GuestFactory) -> None:
        """A full snapshot taken while running restores RUNNING and the counter it had."""
        guest = make_guest("counter")
        guest.start()
        self._run_to(guest, 1)
        before = counts(guest.console.output)[-1]
        snap = guest.snapshot("running")
        assert snap.state is State.RUNNING
        after = counts(guest.console.output)[-1]
        self._run_to(guest, after + 4)
        guest.pause()  # so nothing of the old run lands after the mark
        mark = len(guest.console.output)
        guest.revert("running")
        assert state_of(guest) is State.RUNNING
        self._run_to(guest, after + 2)
        replay = counts(guest.console.output[mark:])
        assert before < replay[0] <= after + 1

    def test_disk_snapshot_revert_restores_the_disk(self, make_guest: GuestFactory) -> None:
        """A disk-only snapshot taken before the guest wrote brings the old sector back.

        Checked through the guest's own eyes (it prints sector 2 before
        writing it), so backends with internal or external snapshots agree.
        """
        guest = make_guest("disk")
        snap = guest.snapshot("clean", memory=False)
        assert snap.kind is SnapshotKind.DISK
        assert snap.state is State.SHUTOFF
        guest.start()
        guest.wait(timeout=self.timeout)
        guest.start()
        guest.wait(timeout=self.timeout)
        written = b"sector 2: written by the disk guest: " + guests.DISK_SECTOR1 + b"\r\n"
        assert guest.console.output == guests.OUTPUT["disk"] + guests.OUTPUT["disk"].replace(
            b"sector 2: \r\n", written
        )
        guest.revert("clean")
        assert state_of(guest) is State.SHUTOFF
        mark = len(guest.console.output)
        guest.start()
        guest.wait(timeout=self.timeout)
        assert guest.console.output[mark:] == guests.OUTPUT["disk"]

    def test_disk_snapshot_of_a_running_guest(self, make_guest: GuestFactory) -> None:
        """memory=False on a running guest captures its disks; reverting restores them and
        leaves it shut off (or, without ``reverts_live_disk_snapshots``, a VirtkitError)."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 0", timeout=self.timeout)
        snap = guest.snapshot("live-disk", memory=False)
        assert snap.kind is SnapshotKind.DISK
        assert snap.state is State.RUNNING
        guest.console.expect("count 2", timeout=self.timeout)  # still running on
        guest.kill()
        if self.reverts_live_disk_snapshots:
            guest.revert("live-disk")
            assert state_of(guest) is State.SHUTOFF
        else:
            with pytest.raises(VirtkitError):
                guest.revert("live-disk")
            assert state_of(guest) is State.SHUTOFF
            assert [s.name for s in guest.snapshots] == ["live-disk"]
        guest.start()
        guest.console.expect("counter starts", timeout=self.timeout)
        guest.kill()

    def test_full_snapshot_needs_a_running_guest(self, make_guest: GuestFactory) -> None:
        """memory=True on a shut-off guest is a StateError and records nothing."""
        guest = make_guest("counter")
        with pytest.raises(StateError):
            guest.snapshot("nope", memory=True)
        assert guest.snapshots == ()

    def test_snapshot_list_parent_and_delete(self, make_guest: GuestFactory) -> None:
        """Snapshots are listed oldest first with their parent; deleted ones are gone."""
        guest = make_guest("counter")
        guest.start()
        self._run_to(guest, 0)
        first = guest.snapshot("first", description="at zero")
        second = guest.snapshot("second")
        assert [s.name for s in guest.snapshots] == ["first", "second"]
        assert first.parent is None
        assert second.parent == "first"
        assert first.description == "at zero"
        with pytest.raises(ConfigError):
            guest.snapshot("first")
        guest.delete_snapshot("first")
        assert [s.name for s in guest.snapshots] == ["second"]
        with pytest.raises(ConfigError):
            guest.revert("first")
        guest.kill()

    def test_revert_a_stopped_guest_to_a_full_snapshot(self, make_guest: GuestFactory) -> None:
        """Reverting a killed guest to a running snapshot starts it again from there."""
        guest = make_guest("counter")
        guest.start()
        self._run_to(guest, 1)
        guest.pause()
        captured = counts(guest.console.output)[-1]
        guest.snapshot("paused")
        guest.resume()
        guest.kill()
        guest.revert("paused")
        assert state_of(guest) is State.PAUSED
        mark = len(guest.console.output)
        guest.resume()
        self._run_to(guest, captured + 2)
        assert counts(guest.console.output[mark:])[0] == captured + 1


class ErrorTests(SuiteBase):
    """Bad input ends in a VirtkitError or CRASHED with a reason, never a hang."""

    def _assert_does_not_boot(self, guest: Guest) -> None:
        if self.reports_boot_failure:
            self.wait_state(guest, State.CRASHED)
            assert guest.crash_reason
            assert "bootable" in guest.crash_reason
            assert guest.wait(timeout=1) is State.CRASHED
        else:
            with pytest.raises(TimeoutError):
                guest.wait(timeout=1.0)
        assert guest.console.output == b""
        guest.kill()
        assert state_of(guest) is State.SHUTOFF

    def test_disk_without_boot_signature(self, make_guest: GuestFactory) -> None:
        """A disk whose sector 0 lacks 0x55AA is not booted."""
        guest = make_guest("no-signature")
        guest.start()
        self._assert_does_not_boot(guest)

    def test_machine_without_disks(self, make_guest: GuestFactory) -> None:
        """A machine with no disks at all has nothing to boot."""
        guest = make_guest(None)
        guest.start()
        self._assert_does_not_boot(guest)

    def test_triple_fault(self, make_guest: GuestFactory) -> None:
        """After a triple fault the guest's code never continues."""
        guest = make_guest("triple-fault")
        guest.start()
        guest.console.expect("triple fault next\r\n", timeout=self.timeout)
        with pytest.raises((TimeoutError, StateError)):
            guest.console.expect("still alive?", timeout=1.0)
        if self.crashes_on_triple_fault:
            assert guest.wait(timeout=self.timeout) is State.CRASHED
            assert guest.crash_reason is not None
            assert "triple fault" in guest.crash_reason
        guest.kill()

    def test_missing_disk_image(self, hypervisor: Hypervisor, tmp_path: Path) -> None:
        """Starting with a disk file that does not exist raises a VirtkitError; stays SHUTOFF."""
        machine = Machine(
            name="missing",
            memory=self.memory,
            disks=(Disk(str(tmp_path / "nowhere.qcow2"), format="qcow2"),),
        )
        guest = hypervisor.define(machine)
        with pytest.raises(VirtkitError):
            guest.start()
        assert state_of(guest) is State.SHUTOFF


class DeviceTests(SuiteBase):
    """The folder records media changes, attached and detached devices; dead handles."""

    def _iso(self, tmp_path: Path) -> Path:
        path = tmp_path / "medium.iso"
        path.write_bytes(bytes(64 * 1024))  # the drive reads it as data: no file system needed
        return path

    def test_media_change_of_a_stopped_guest_is_recorded(
        self, make_guest: GuestFactory, tmp_path: Path
    ) -> None:
        """change_media() on a shut-off guest edits the definition: insert, then eject."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CapabilityWarning)
            guest = make_guest("hello", cdroms=[CdRom()])
        iso = self._iso(tmp_path)
        guest.change_media("cdrom0", iso)
        assert stored(guest).cdroms[0].path == str(iso)
        assert guest.machine.cdroms[0].path == str(iso)
        guest.change_media("cdrom0", None)
        assert stored(guest).cdroms[0].path is None
        with pytest.raises(ConfigError, match="cdrom9"):
            guest.change_media("cdrom9", iso)

    def test_attach_and_detach_of_a_stopped_guest_are_recorded(
        self, make_guest: GuestFactory
    ) -> None:
        """attach() creates a sized disk in the folder and records it; detach() drops the
        record and keeps the file; the guest still boots."""
        guest = make_guest("hello")
        disk = guest.attach(Disk(path="extra.qcow2", size="1MiB"))
        assert isinstance(disk, Disk)
        assert disk.target is not None
        assert stored(guest).disks[-1] == disk
        assert (guest.folder / "disks" / "extra.qcow2").is_file()
        assert guest.detach(str(disk.target)) == disk
        assert len(stored(guest).disks) == 1
        assert (guest.folder / "disks" / "extra.qcow2").is_file()
        with pytest.raises(ConfigError):
            guest.detach("vdz")
        guest.start()
        assert guest.wait(timeout=self.timeout) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["hello"]

    def test_live_media_change(self, make_guest: GuestFactory, tmp_path: Path) -> None:
        """On a running guest: done and recorded (``live_media``), or a ConfigError that
        changes nothing."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CapabilityWarning)
            guest = make_guest("counter", cdroms=[CdRom()])
        guest.start()
        guest.console.expect("count 0", timeout=self.timeout)
        iso = self._iso(tmp_path)
        if self.live_media:
            guest.change_media("cdrom0", iso)
            assert stored(guest).cdroms[0].path == str(iso)
            guest.change_media("cdrom0", None)
            assert stored(guest).cdroms[0].path is None
        else:
            with pytest.raises(ConfigError, match="media"):
                guest.change_media("cdrom0", iso)
            assert stored(guest).cdroms[0].path is None
        assert state_of(guest) is State.RUNNING
        guest.kill()

    def test_live_attach(self, make_guest: GuestFactory) -> None:
        """attach() of a virtio disk to a running guest: done and recorded (``hot_plug``), or
        a ConfigError that records nothing and leaves no file."""
        guest = make_guest("counter")
        guest.start()
        guest.console.expect("count 0", timeout=self.timeout)
        extra = Disk(path="hot.qcow2", size="1MiB", bus="virtio")
        if self.hot_plug:
            disk = guest.attach(extra)
            assert stored(guest).disks[-1] == disk
        else:
            with pytest.raises(ConfigError, match="hot-plug"):
                guest.attach(extra)
            assert len(stored(guest).disks) == 1
            assert not (guest.folder / "disks" / "hot.qcow2").exists()
        assert state_of(guest) is State.RUNNING
        guest.kill()

    def test_an_undefined_guest_is_a_dead_handle(
        self, make_guest: GuestFactory, hypervisor: Hypervisor
    ) -> None:
        """After undefine() every call raises StateError and the guest never starts again."""
        guest = make_guest("counter")
        hypervisor.undefine(guest)
        for call in (guest.start, lambda: guest.snapshot("x", memory=False), guest.kill):
            with pytest.raises(StateError, match="undefined"):
                call()
        assert state_of(guest) is State.SHUTOFF

    def test_close_stops_every_running_guest(
        self, make_guest: GuestFactory, hypervisor: Hypervisor
    ) -> None:
        """close() stops running and paused guests; their handles are dead afterwards."""
        first, second = make_guest("counter"), make_guest("counter")
        first.start()
        second.start()
        second.console.expect("count 0", timeout=self.timeout)
        second.pause()
        hypervisor.close()
        for guest in (first, second):
            assert state_of(guest) is State.SHUTOFF
            with pytest.raises(StateError, match="closed"):
                guest.start()


class ConformanceSuite(
    LifecycleTests, ConsoleTests, DiskTests, PowerTests, SnapshotTests, ErrorTests, DeviceTests
):
    """Everything: subclass it as ``TestMyBackend`` and set ``backend``."""

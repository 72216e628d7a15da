"""Lifecycle over QMP and QMP events mapped onto the shared state machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import Disk, Machine, State

COUNT = re.compile(rb"count (\d+)\r\n")


def _machine(name: str, disk: Path) -> Machine:
    return Machine(name=name, memory="16MiB", disks=[Disk(path=str(disk), bus="ide")])


class TestLifecycle:
    def test_pause_and_resume_stop_and_continue_the_vcpus(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """pause() stops the vCPUs (QMP reports paused, no output); resume() continues counting."""
        guest = hv.define(_machine("pr", boot_disk("counter")))
        guest.start()
        guest.console.expect(COUNT, timeout=30)
        guest.pause()
        assert guest.state is State.PAUSED
        assert guest.qmp("query-status")["status"] == "paused"
        guest.resume()
        assert guest.state is State.RUNNING
        assert guest.qmp("query-status")["running"] is True
        guest.console.expect(COUNT, timeout=30)
        guest.kill()
        assert guest.state is State.SHUTOFF

    def test_stop_event_from_outside_virtkit_pauses_the_guest(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """A raw QMP 'stop' (STOP event) moves the guest to PAUSED, 'cont' (RESUME) back."""
        guest = hv.define(_machine("ev", boot_disk("counter")))
        guest.start()
        guest.qmp("stop")
        guest._lifecycle.wait_for(lambda s: s is State.PAUSED, 10, "pause")
        guest.qmp("cont")
        guest._lifecycle.wait_for(lambda s: s is State.RUNNING, 10, "resume")
        guest.kill()

    def test_reset_reboots_and_keeps_running(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """reset() reboots the machine (the boot sector prints again) and the state stays RUNNING."""
        guest = hv.define(_machine("rst", boot_disk("ignore-acpi")))
        guest.start()
        guest.console.expect("ignoring ACPI", timeout=30)
        guest.reset()
        guest.console.expect("ignoring ACPI", timeout=30)
        assert guest.state is State.RUNNING
        assert guest.resets >= 1
        guest.kill()

    def test_start_on_a_running_guest_is_a_state_error(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """start() twice raises StateError and leaves the first QEMU running."""
        guest = hv.define(_machine("twice", boot_disk("ignore-acpi")))
        guest.start()
        pid = guest.pid
        with pytest.raises(virtkit.StateError, match="running"):
            guest.start()
        assert guest.pid == pid and guest.state is State.RUNNING
        guest.kill()

    def test_shutdown_ignored_by_the_guest_times_out_and_keeps_running(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """A guest without ACPI handling ignores the power button: TimeoutError, still RUNNING."""
        guest = hv.define(_machine("deaf", boot_disk("ignore-acpi")))
        guest.start()
        guest.console.expect("ignoring ACPI", timeout=30)
        with pytest.raises(virtkit.TimeoutError, match="did not power off"):
            guest.shutdown(timeout=1)
        assert guest.state is State.RUNNING
        guest.kill()
        assert guest.state is State.SHUTOFF

    def test_guest_panic_event_crashes_the_guest(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """A pvpanic write (QMP GUEST_PANICKED) moves the guest to CRASHED with a reason; kill cleans up."""
        guest = hv.define(_machine("panic", boot_disk("panic")))
        guest.start()
        assert guest.wait(timeout=30) is State.CRASHED
        assert "panicked" in (guest.crash_reason or "")
        guest.kill()
        assert guest.state is State.SHUTOFF and guest.pid is None

    def test_expect_raises_state_error_when_the_guest_powers_off(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """Waiting for text that never comes ends with StateError once the guest powers off."""
        guest = hv.define(_machine("gone", boot_disk("hello")))
        guest.start()
        with pytest.raises(virtkit.StateError):
            guest.console.expect("never printed", timeout=30)
        guest.wait(timeout=30)

    def test_console_input_reaches_the_guest_serial_port(
        self, hv: QemuHypervisor, linux_boot
    ) -> None:  # type: ignore[no-untyped-def]
        """console.write() feeds COM1: a Linux shell echoes a computed answer."""
        guest = hv.define(Machine(name="echo", memory="256MiB", kernel=linux_boot))
        guest.start()
        guest.console.expect("virtkit-linux: ready", timeout=60)
        guest.console.expect("vk# ", timeout=30)
        guest.console.write("echo $((6 * 7))-answer\n")
        guest.console.expect("42-answer", timeout=30)
        guest.shutdown(timeout=30)
        assert guest.state is State.SHUTOFF

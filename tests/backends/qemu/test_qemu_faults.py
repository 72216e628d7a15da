"""Process faults: QEMU killed from outside, bad options, missing binaries and files."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import Disk, Machine, State


def _machine(name: str, disk: Path) -> Machine:
    return Machine(name=name, memory="16MiB", disks=[Disk(path=str(disk), bus="ide")])


class TestProcessFaults:
    def test_sigkill_from_outside_crashes_the_guest_with_the_reason(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """QEMU SIGKILLed behind virtkit's back: CRASHED, the reason names the signal, no zombie."""
        guest = hv.define(_machine("victim", boot_disk("ignore-acpi")))
        guest.start()
        guest.console.expect("ignoring ACPI", timeout=30)
        pid = guest.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert guest.wait(timeout=30) is State.CRASHED
        assert "SIGKILL" in (guest.crash_reason or "")
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped
        guest.start()  # the next run starts fine
        guest.console.expect("ignoring ACPI", timeout=30)
        guest.kill()

    def test_bad_option_at_start_is_a_backend_error_with_stderr(
        self, tmp_path: Path, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """QEMU exiting at start-up raises BackendError with exit code, argv and stderr tail."""
        wrapper = tmp_path / "qemu-bad"
        real = shutil.which("qemu-system-x86_64")
        wrapper.write_text(f'#!/bin/sh\nexec {real} "$@" -no-such-option\n')
        wrapper.chmod(0o755)
        with QemuHypervisor(accel="tcg", binary=str(wrapper), root=tmp_path / "g") as hyp:
            guest = hyp.define(_machine("bad", boot_disk("hello")))
            with pytest.raises(virtkit.BackendError) as info:
                guest.start()
            err = info.value
            assert err.exit_code == 1
            assert err.argv is not None and err.argv[0] == str(wrapper)
            assert "no-such-option" in (err.stderr_tail or "")
            assert guest.state is State.SHUTOFF

    def test_absent_binary_is_backend_unavailable_with_a_hint(self) -> None:
        """connect('qemu') with a QEMU that is not installed says how to install it."""
        with pytest.raises(virtkit.BackendUnavailable) as info:
            virtkit.connect("qemu", binary="/nonexistent/qemu-system-x86_64")
        assert info.value.hint is not None and "apt-get install" in info.value.hint

    def test_missing_disk_file_is_a_clear_image_error(
        self, hv: QemuHypervisor, tmp_path: Path
    ) -> None:
        """A disk whose file does not exist fails start() with ImageError naming the disk and path."""
        missing = tmp_path / "nope.qcow2"
        guest = hv.define(_machine("nodisk", missing))
        with pytest.raises(virtkit.ImageError, match=r"disks\[0\].*nope\.qcow2"):
            guest.start()
        assert guest.state is State.SHUTOFF

    def test_qmp_unresponsive_qemu_times_out(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """A QEMU that stops answering QMP (SIGSTOPped) gives virtkit.TimeoutError, then kill() works."""
        guest = hv.define(_machine("frozen", boot_disk("ignore-acpi")))
        guest.start()
        pid = guest.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(virtkit.TimeoutError, match="query-status"):
                guest.qmp("query-status", timeout=0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        guest.kill()
        assert guest.state is State.SHUTOFF

    def test_qmp_connection_closing_mid_command_is_a_backend_error(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """QEMU dying while a QMP command waits for its reply: BackendError, then CRASHED, no leftovers."""
        guest = hv.define(_machine("midcmd", boot_disk("ignore-acpi")))
        guest.start()
        pid = guest.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the command below is sent but never answered
        killer = threading.Timer(0.3, os.kill, (pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(virtkit.BackendError, match="closed|failed"):  # not TimeoutError
            guest.qmp("query-status", timeout=30)
        killer.join()
        assert guest.wait(timeout=30) is State.CRASHED
        assert "SIGKILL" in (guest.crash_reason or "")

    def test_qemu_refusing_a_locked_image_at_start_is_a_backend_error(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """An image another writer holds (QEMU-compatible locks): QEMU's lock error surfaces as
        BackendError with its stderr (never a raw qemu.qmp exception), and nothing is left
        running. (The same file attached twice in one machine is refused by the model now.)"""
        disk = boot_disk("ignore-acpi")
        machine = Machine(name="locked", memory="16MiB", disks=[Disk(path=str(disk), bus="ide")])
        guest = hv.define(machine)
        with virtkit.images.open(disk, writable=True), pytest.raises(virtkit.BackendError) as info:
            guest.start()
        assert "lock" in (info.value.stderr_tail or "")
        assert guest.state is State.SHUTOFF and guest.pid is None

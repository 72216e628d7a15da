"""Boot-sector guests under the qemu backend: serial output, int 13h disk I/O, ACPI power-off."""

from __future__ import annotations

from pathlib import Path

import pytest

import virtkit
import virtkit.images
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import Disk, Machine, Serial, State
from virtkit.testing import guests

HELLO = guests.OUTPUT["hello"].strip()


def _machine(name: str, disk: Path, **kw: object) -> Machine:
    return Machine(name=name, memory="16MiB", disks=[Disk(path=str(disk), bus="ide")], **kw)  # type: ignore[arg-type]


class TestSerialAndPower:
    def test_prints_on_com1_then_powers_off(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """The guest's COM1 output reaches console.expect and its ACPI power-off ends the run."""
        guest = hv.define(_machine("hello", boot_disk("hello")))
        guest.start()
        match = guest.console.expect(HELLO, timeout=30)
        assert match.group(0) == HELLO
        assert guest.wait(timeout=30) is State.SHUTOFF
        assert guest.crash_reason is None
        assert guest.last_exit is not None and guest.last_exit.returncode == 0
        assert guest.last_shutdown is not None and guest.last_shutdown["guest"] is True
        assert guest.last_shutdown["reason"] == "guest-shutdown"

    def test_console_log_file_receives_output(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """Serial(log=...) copies the console stream to a file in the guest folder."""
        guest = hv.define(_machine("logged", boot_disk("hello"), serial=Serial(log="console.log")))
        guest.start()
        guest.wait(timeout=30)
        assert HELLO in (guest.folder / "console.log").read_bytes()

    def test_guest_can_start_again_after_power_off(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """A guest that powered itself off starts again; output is appended, not rewound."""
        guest = hv.define(_machine("again", boot_disk("hello")))
        for _ in range(2):
            guest.start()
            guest.console.expect(HELLO, timeout=30)
            guest.wait(timeout=30)
        assert guest.console.output.count(HELLO) == 2


class TestDiskIO:
    def test_int13_read_and_write_reach_the_qcow2_image(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """BIOS int 13h reads LBA 1 written by virtkit.images; its write to LBA 2 is read back by it."""
        disk = boot_disk("disk", extra=b"sector-one-payload\r\n\0")
        guest = hv.define(_machine("disk", disk))
        guest.start()
        guest.console.expect("sector-one-payload", timeout=30)
        guest.console.expect("disk done", timeout=30)
        assert guest.wait(timeout=30) is State.SHUTOFF
        with virtkit.images.open(disk) as img:
            assert img.read(1024, 27) == b"written by the disk guest: "
            assert img.check().ok

    def test_guest_without_serial_port_runs_and_refuses_console_input(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """Serial(enabled=False): no COM1 in the command line, the guest runs, console.write is a
        StateError and nothing is printed."""
        guest = hv.define(_machine("mute", boot_disk("hello"), serial=Serial(enabled=False)))
        assert not any("isa-serial" in a for a in guest.qemu_argv())
        guest.start()
        assert guest.wait(timeout=30) is State.SHUTOFF
        assert guest.console.output == b""
        deaf = hv.define(_machine("mute2", boot_disk("ignore-acpi"), serial=Serial(enabled=False)))
        deaf.start()
        with pytest.raises(virtkit.StateError):
            deaf.console.write(b"x")
        deaf.kill()

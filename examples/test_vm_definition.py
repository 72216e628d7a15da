"""Unit tests of a VM definition with virtkit's pytest plugin (no conftest needed).

Run with ``pytest examples/test_vm_definition.py`` (the emulator, in-process)
or ``pytest --virtkit-backend=qemu examples/test_vm_definition.py`` (QEMU).
The guest is one of virtkit's test boot sectors; a real project points
``Disk`` at its own image.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import virtkit
from virtkit.testing import guests


def web_machine(folder: Path, guest: str = "echo") -> virtkit.Machine:
    """The definition under test: what would live in vms/web/machine.toml."""
    (folder / "disks").mkdir(parents=True, exist_ok=True)
    guests.write_disk(folder / "disks" / "boot.qcow2", guest, format="qcow2")
    return virtkit.Machine(
        name="web",
        cpus=1,
        memory="16MiB",
        disks=[virtkit.Disk("boot.qcow2", format="qcow2")],
    )


def test_console_answers(virtkit_guest, virtkit_vm_folder):  # type: ignore[no-untyped-def]
    """The guest boots, says it is ready and echoes what we type."""
    guest = virtkit_guest(web_machine(virtkit_vm_folder), folder=virtkit_vm_folder)
    guest.console.expect("echo ready", timeout=30)
    guest.console.write("ping\r")
    guest.console.expect("ping", timeout=30)


def test_powers_off_cleanly(virtkit_guest, virtkit_vm_folder):  # type: ignore[no-untyped-def]
    """Asked to quit, the guest powers itself off (no crash)."""
    guest = virtkit_guest(web_machine(virtkit_vm_folder), folder=virtkit_vm_folder)
    guest.console.expect("echo ready", timeout=30)
    guest.console.write("q")
    assert guest.wait(timeout=30) is virtkit.State.SHUTOFF


def test_snapshot_survives_a_bad_change(virtkit_guest, virtkit_vm_folder):  # type: ignore[no-untyped-def]
    """A disk snapshot taken before a change brings the disk back."""
    guest = virtkit_guest(web_machine(virtkit_vm_folder), folder=virtkit_vm_folder, start=False)
    guest.snapshot("known-good", memory=False)
    disk = guest.disk_path(guest.machine.disks[0])
    with virtkit.images.open(disk, writable=True) as img:
        img.write(0, bytes(512))  # a "bad upgrade" wipes the boot sector
    guest.revert("known-good")
    guest.start()
    guest.console.expect("echo ready", timeout=30)


@pytest.mark.virtkit_backend("emulator")
def test_always_on_the_emulator(virtkit_hypervisor):  # type: ignore[no-untyped-def]
    """A marker pins one test to a backend, whatever --virtkit-backend says."""
    assert virtkit_hypervisor.name == "emulator"

"""int 19h: start a directly booted kernel, or the first bootable device's boot sector."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from virtkit.backends.emulator.bios import BDA
from virtkit.backends.emulator.cpu import FLAG_IF
from virtkit.backends.emulator.disks import SECTOR
from virtkit.errors import ImageError

if TYPE_CHECKING:
    from virtkit.backends.emulator.disks import Drive
    from virtkit.backends.emulator.machine import PcMachine

__all__ = ["BOOT_ADDRESS", "boot"]

#: where a boot sector is loaded and entered (0000:7C00)
BOOT_ADDRESS = 0x7C00


def boot(pc: PcMachine) -> None:
    """Start ``pc``'s directly booted kernel, else its first bootable device.

    A boot sector is loaded at 0000:7C00 and entered in real mode. No
    bootable device crashes the guest with the reason, as SeaBIOS prints
    ``No bootable device``.
    """
    if pc.kernel is not None:
        if pc.platform is None:
            pc.kernel.load(pc.cpu, vmlinux=pc.vmlinux)
            return
        pc.platform.install()
        pc.kernel.load(
            pc.cpu,
            acpi_rsdp=pc.platform.rsdp_address,
            reserved=pc.platform.e820,
            vmlinux=pc.vmlinux,
        )
        return
    problems = list(pc.boot_problems)
    for drive in pc.drives:
        try:
            sector = drive.read(0, 1) if drive.sectors else b""
        except ImageError as exc:
            problems.append(f"{drive.spec.name} ({drive.spec.path}): {exc}")
            continue
        if len(sector) == SECTOR and sector[510:512] == b"\x55\xaa":
            _boot_from(pc, drive, sector)
            return
        found = sector[510:512].hex() if len(sector) == SECTOR else "nothing"
        problems.append(
            f"{drive.spec.name} ({drive.spec.path}) has no boot signature 55aa at offset "
            f"510 (found {found})"
        )
    if not pc.drives and not problems:
        problems.append("the machine has no disks")
    pc.fail("no bootable device: " + "; ".join(problems))


def _boot_from(pc: PcMachine, drive: Drive, sector: bytes) -> None:
    cpu = pc.cpu
    cpu.write(BOOT_ADDRESS, sector)
    cpu.reset_real_mode()
    cpu.set_reg(x86.UC_X86_REG_EDX, drive.number)
    cpu.set_reg(x86.UC_X86_REG_ESP, BOOT_ADDRESS)
    cpu.set_reg(x86.UC_X86_REG_EFLAGS, 0x2 | FLAG_IF)
    cpu.set_reg(x86.UC_X86_REG_EIP, BOOT_ADDRESS)
    cpu.write(BDA + 0x75, bytes([len(pc.drives)]))

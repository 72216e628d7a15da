"""The platform devices a Linux guest finds through ACPI: the tables and virtio-mmio disks.

:class:`PlatformDevices` puts one virtio-blk device (over a virtio-mmio
window) on each disk of the machine, maps the windows into the CPU's address
space (``uc.mmio_map`` at ``VIRTIO_BASE``, one 4 KiB page each, the first
``MMIO_WINDOW`` bytes announced), builds the ACPI tables that describe them
and writes the tables into RAM: the RSDP at ``RSDP_ADDRESS`` in the BIOS
area, everything else in the last ``TABLES_SIZE`` bytes of low RAM, which
the e820 map then reports as ACPI reclaimable memory. Each device's
interrupt is a level on ``VIRTIO_IRQS[n]`` of the master PIC; the ACPI SCI
(a fixed event such as the power button, enabled by the guest) is a level
on IRQ 9, through the slave PIC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from virtkit.backends.emulator.acpi import (
    RSDP_ADDRESS,
    SCI_IRQ,
    TABLES_SIZE,
    AcpiTables,
    MmioDeviceInfo,
    build_tables,
)
from virtkit.backends.emulator.bootparams import E820_ACPI
from virtkit.backends.emulator.cpu import Cpu, UcError
from virtkit.backends.emulator.disks import Drive
from virtkit.backends.emulator.virtio_blk import VirtioBlock
from virtkit.backends.emulator.virtio_mmio import MMIO_WINDOW, GuestMemory, MmioTransport
from virtkit.errors import BackendError, ConfigError

__all__ = ["VIRTIO_BASE", "VIRTIO_IRQS", "PlatformDevices"]

VIRTIO_BASE = 0xFEB0_0000  # as QEMU's microvm, inside the hole below 4 GiB
VIRTIO_STRIDE = 0x1000  # unicorn maps whole pages
#: free master-PIC lines (3: COM2, 5, 6: floppy, 7: LPT1 are not emulated)
VIRTIO_IRQS = (5, 6, 7, 3)

_HOLE = 0xE000_0000


class PlatformDevices:
    """ACPI tables plus a virtio-blk device per drive, for one machine.

    Args:
        cpu: the machine's CPU (its RAM and engine).
        drives: the disks, each becoming ``/dev/vda``, ``/dev/vdb``...
        sci: the level of the ACPI SCI (the chipset's PM1 events), raised on
            ``SCI_IRQ`` (9, on the slave PIC) as the FADT declares.

    Raises:
        ConfigError: more disks than free interrupt lines, or too little RAM
            for the tables.
    """

    def __init__(
        self, cpu: Cpu, drives: Sequence[Drive], *, sci: Callable[[], bool] = lambda: False
    ) -> None:
        if len(drives) > len(VIRTIO_IRQS):
            raise ConfigError(
                f"the emulator gives at most {len(VIRTIO_IRQS)} disks to a Linux guest "
                f"(got {len(drives)})",
                field="disks",
            )
        low = min(cpu.memory_size, _HOLE)
        if low < 0x200000 + TABLES_SIZE:
            raise ConfigError("the machine has too little memory for ACPI tables", field="memory")
        self.cpu = cpu
        self._sci = sci
        self.memory = GuestMemory(cpu.read, cpu.write, cpu.memory_size)
        self.transports: list[MmioTransport] = []
        self.irqs: list[int] = []
        infos: list[MmioDeviceInfo] = []
        for index, drive in enumerate(drives):
            device = VirtioBlock(drive.image, name=drive.spec.name, read_only=drive.spec.read_only)
            self.transports.append(MmioTransport(device, self.memory))
            self.irqs.append(VIRTIO_IRQS[index])
            infos.append(MmioDeviceInfo(self.base(index), MMIO_WINDOW, VIRTIO_IRQS[index]))
        self.tables: AcpiTables = build_tables(low - TABLES_SIZE, infos)
        self._mapped = False

    @staticmethod
    def base(index: int) -> int:
        """Guest-physical address of device ``index``'s register window."""
        return VIRTIO_BASE + VIRTIO_STRIDE * index

    @property
    def rsdp_address(self) -> int:
        """Where the RSDP is (for ``boot_params.acpi_rsdp_addr``)."""
        return RSDP_ADDRESS

    @property
    def e820(self) -> tuple[tuple[int, int, int], ...]:
        """The e820 entry to carve out of RAM: the tables, ACPI reclaimable."""
        return ((self.tables.address, TABLES_SIZE, E820_ACPI),)

    def map(self) -> None:
        """Map the register windows into the engine (once).

        Raises:
            BackendError: unicorn refused the mapping.
        """
        if self._mapped:
            return
        uc = self.cpu.uc
        for index, transport in enumerate(self.transports):

            def read(
                _uc: Any, offset: int, size: int, _data: Any, t: MmioTransport = transport
            ) -> int:
                return t.read(offset, size)

            def write(
                _uc: Any,
                offset: int,
                size: int,
                value: int,
                _data: Any,
                t: MmioTransport = transport,
            ) -> None:
                t.write(offset, size, value)

            try:
                uc.mmio_map(self.base(index), VIRTIO_STRIDE, read, None, write, None)
            except UcError as exc:
                raise BackendError(
                    f"unicorn could not map virtio-mmio device {index}: {exc}"
                ) from exc
        self._mapped = True

    def install(self) -> None:
        """Write the tables into RAM and reset the devices (at power-on)."""
        self.cpu.write(self.tables.rsdp_address, self.tables.rsdp)
        self.cpu.write(self.tables.address, self.tables.blob)
        for transport in self.transports:
            transport.reset()

    def pending_irqs(self) -> list[int]:
        """The interrupt lines raised now: the disks' and the SCI."""
        lines = [irq for irq, t in zip(self.irqs, self.transports, strict=True) if t.irq_pending()]
        return [*lines, SCI_IRQ] if self._sci() else lines

    def save(self) -> list[dict[str, Any]]:
        """Device state for a snapshot."""
        return [t.save() for t in self.transports]

    def load(self, state: list[dict[str, Any]]) -> None:
        """Restore :meth:`save` output."""
        for transport, saved in zip(self.transports, state, strict=True):
            transport.load(saved)


def _read_hook(transport: MmioTransport) -> Callable[[Any, int, int, Any], int]:
    def read(_uc: Any, offset: int, size: int, _data: Any) -> int:
        return transport.read(offset, size)

    return read


def _write_hook(transport: MmioTransport) -> Callable[[Any, int, int, int, Any], None]:
    def write(_uc: Any, offset: int, size: int, value: int, _data: Any) -> None:
        transport.write(offset, size, value)

    return write

"""The platform devices wired into the PC: ACPI tables in RAM, virtio-mmio disks, their IRQs.

``PcMachine(platform=True)`` (the ``PLATFORM_DEVICES`` flag, off by default
until Linux boots with ACPI) places the tables and maps the devices when it
boots a kernel directly; these tests check what the kernel will find: the
RSDP where ``boot_params`` says, the tables in an e820 ACPI range that the
initrd stays clear of, the register windows answering on the CPU's bus, a
disk write reaching the image, and the device's interrupt through the PIC.
The slow test boots Debian's cloud kernel with ACPI on and reads its table
log.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from unicorn import x86_const

from virtkit import ConfigError, Disk, KernelBoot, Machine, images
from virtkit.backends.emulator import EmulatorHypervisor
from virtkit.backends.emulator import machine as machine_module
from virtkit.backends.emulator import virtio_mmio as vm
from virtkit.backends.emulator.acpi import RSDP_ADDRESS, TABLES_SIZE
from virtkit.backends.emulator.bootparams import BOOT_PARAMS, E820_ACPI, E820_RAM, LinuxBoot
from virtkit.backends.emulator.cpu import FLAG_IF
from virtkit.backends.emulator.disks import DriveSpec
from virtkit.backends.emulator.machine import PcMachine
from virtkit.backends.emulator.platform import VIRTIO_BASE, VIRTIO_IRQS
from virtkit.backends.emulator.virtio_blk import S_OK, T_OUT
from virtkit.testing.linux import LinuxKernel, build_initramfs

MiB = 1 << 20
MEMORY = 256 * MiB


@pytest.fixture(scope="module")
def initrd(kernel: LinuxKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(kernel, tmp_path_factory.mktemp("initrd") / "initrd.gz")


def _machine(
    kernel: LinuxKernel, initrd: Path, disks: list[Path], *, platform: bool | None
) -> PcMachine:
    return PcMachine(
        memory=MEMORY,
        drives=[DriveSpec(f"vd{chr(97 + i)}", str(p), "qcow2") for i, p in enumerate(disks)],
        output=lambda _data: None,
        on_poweroff=lambda: None,
        on_crash=lambda _reason: None,
        kernel=LinuxBoot.from_files(kernel.vmlinuz, initrd, "console=ttyS0"),
        platform=platform,
    )


@pytest.fixture
def disks(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    for path in paths:
        images.create(path, 8 * MiB, format="qcow2").close()
    return paths


@pytest.fixture
def pc(kernel: LinuxKernel, initrd: Path, disks: list[Path]) -> Iterator[PcMachine]:
    machine = _machine(kernel, initrd, disks, platform=True)
    machine.power_on()
    yield machine
    machine.close()


def _e820(pc: PcMachine) -> list[tuple[int, int, int]]:
    count = pc.cpu.read(BOOT_PARAMS + 0x1E8, 1)[0]
    raw = pc.cpu.read(BOOT_PARAMS + 0x2D0, 20 * count)
    return [struct.unpack_from("<QQI", raw, 20 * i) for i in range(count)]


class TestTablesInRam:
    def test_rsdp_and_tables_are_where_boot_params_say(self, pc: PcMachine) -> None:
        """boot_params.acpi_rsdp_addr -> the RSDP in the BIOS area -> the tables in RAM."""
        assert pc.platform is not None
        tables = pc.platform.tables
        (rsdp_addr,) = struct.unpack("<Q", pc.cpu.read(BOOT_PARAMS + 0x70, 8))
        assert rsdp_addr == RSDP_ADDRESS
        assert pc.cpu.read(RSDP_ADDRESS, 36) == tables.rsdp
        assert pc.cpu.read(tables.address, len(tables.blob)) == tables.blob
        assert tables.address + TABLES_SIZE == MEMORY  # the top of low RAM
        dsdt = pc.cpu.read(tables.offsets["DSDT"], len(tables.table("DSDT")))
        assert dsdt.count(b"LNRO0005") == 2

    def test_e820_reports_the_tables_and_the_initrd_avoids_them(self, pc: PcMachine) -> None:
        """An ACPI (type 3) e820 range covers the tables; no RAM range and no initrd overlaps."""
        assert pc.platform is not None
        start = pc.platform.tables.address
        entries = _e820(pc)
        assert (start, TABLES_SIZE, E820_ACPI) in entries
        for base, size, kind in entries:
            if kind == E820_RAM:
                assert base + size <= start or base >= start + TABLES_SIZE
        initrd_addr, initrd_size = struct.unpack("<II", pc.cpu.read(BOOT_PARAMS + 0x218, 8))
        assert initrd_size > 0
        assert initrd_addr + initrd_size <= start

    def test_without_the_flag_nothing_changes(
        self, kernel: LinuxKernel, initrd: Path, disks: list[Path]
    ) -> None:
        """platform=False (the bare PC): no platform, no RSDP, no ACPI e820 entry."""
        machine = _machine(kernel, initrd, disks, platform=False)
        try:
            machine.power_on()
            assert machine.platform is None
            assert machine.cpu.read(RSDP_ADDRESS, 8) != b"RSD PTR "
            assert all(kind != E820_ACPI for _, _, kind in _e820(machine))
            assert struct.unpack("<Q", machine.cpu.read(BOOT_PARAMS + 0x70, 8)) == (0,)
        finally:
            machine.close()

    def test_too_many_disks_is_a_config_error(
        self, kernel: LinuxKernel, initrd: Path, tmp_path: Path
    ) -> None:
        """More disks than free PIC lines: a ConfigError naming disks, nothing left open."""
        paths = []
        for i in range(len(VIRTIO_IRQS) + 1):
            paths.append(tmp_path / f"{i}.qcow2")
            images.create(paths[-1], MiB, format="qcow2").close()
        with pytest.raises(ConfigError, match="disks"):
            _machine(kernel, initrd, paths, platform=True)
        with images.open(paths[0], writable=True):  # not left locked
            pass


class TestDevicesOnTheBus:
    def test_windows_answer_and_a_write_reaches_the_image(
        self, pc: PcMachine, disks: list[Path]
    ) -> None:
        """Each window is a virtio-blk device; a request through the bus lands in its disk."""
        uc = pc.cpu.uc

        def reg(index: int, offset: int) -> int:
            return int.from_bytes(uc.mem_read(VIRTIO_BASE + 0x1000 * index + offset, 4), "little")

        def put(offset: int, value: int) -> None:
            uc.mem_write(VIRTIO_BASE + 0x1000 + offset, value.to_bytes(4, "little"))

        for index in (0, 1):
            assert reg(index, vm.REG_MAGIC) == vm.MAGIC
            assert reg(index, vm.REG_DEVICE_ID) == 2
            assert reg(index, vm.REG_CONFIG) == 8 * MiB // 512
        # the second disk (vdb): a minimal driver set-up and one write
        put(vm.REG_STATUS, vm.ACKNOWLEDGE | vm.DRIVER)
        put(vm.REG_DRIVER_FEATURES_SEL, 1)
        put(vm.REG_DRIVER_FEATURES, 1)  # VIRTIO_F_VERSION_1
        put(vm.REG_STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK)
        desc, avail, used, buf = (0x0800_0000 + 0x1000 * i for i in range(4))
        pc.cpu.write(desc, bytes(0x3000))
        put(vm.REG_QUEUE_NUM, 8)
        put(vm.REG_QUEUE_DESC_LOW, desc)
        put(vm.REG_QUEUE_DRIVER_LOW, avail)
        put(vm.REG_QUEUE_DEVICE_LOW, used)
        put(vm.REG_QUEUE_READY, 1)
        put(vm.REG_STATUS, 0x0F)
        cpu = pc.cpu
        cpu.write(buf, struct.pack("<IIQ", T_OUT, 0, 3) + b"\xc3" * 512 + b"\xff")
        cpu.write(
            desc,
            struct.pack("<QIHH", buf, 16, 1, 1)
            + struct.pack("<QIHH", buf + 16, 512, 1, 2)
            + struct.pack("<QIHH", buf + 528, 1, 2, 0),
        )
        cpu.write(avail, struct.pack("<HHH", 0, 1, 0))
        put(vm.REG_QUEUE_NOTIFY, 0)
        assert cpu.read(buf + 528, 1)[0] == S_OK
        assert struct.unpack("<HHII", cpu.read(used, 12)) == (0, 1, 0, 1)
        # its level interrupt goes through the PIC once the guest unmasks the line
        assert pc.platform is not None
        irq = pc.platform.irqs[1]
        assert pc.platform.pending_irqs() == [irq]
        cpu.set_reg(x86_const.UC_X86_REG_EFLAGS, cpu.eflags | FLAG_IF)
        pc.chipset.pic_mask[0] = 0xFF
        assert not pc._irq_ready()
        pc.chipset.pic_mask[0] &= ~(1 << irq)
        assert pc._irq_ready()
        assert pc.chipset.irq_vector(irq) == pc.chipset.pic_base[0] + irq
        put(vm.REG_INTERRUPT_ACK, 1)
        assert not pc._irq_ready()
        assert pc.save_state()["platform"][1]["queues"][0][6] == 1  # used index in snapshots
        pc.close()
        with images.open(disks[1]) as image:
            assert image.read(3 * 512, 512) == b"\xc3" * 512
        with images.open(disks[0]) as image:
            assert image.read(0, 8 * MiB) == bytes(8 * MiB)


class TestSnapshotState:
    def test_device_state_round_trips_through_the_machine(self, pc: PcMachine) -> None:
        """save_state() carries each transport's registers; load_state() puts them back."""
        assert pc.platform is not None
        transport = pc.platform.transports[0]
        transport.write(vm.REG_STATUS, 4, vm.ACKNOWLEDGE | vm.DRIVER)
        transport.write(vm.REG_QUEUE_NUM, 4, 8)
        transport.interrupt_status = vm.INT_CONFIG
        state = pc.save_state()
        transport.reset()
        assert pc.platform.pending_irqs() == []
        pc.load_state(state)
        assert transport.read(vm.REG_STATUS, 4) == vm.ACKNOWLEDGE | vm.DRIVER
        assert transport.queues[0].num == 8
        assert pc.platform.pending_irqs() == [pc.platform.irqs[0]]


class TestSci:
    @staticmethod
    def _program_pics(pc: PcMachine) -> None:
        """What Linux's init_8259A writes: vectors 0x30/0x38, cascade on 2, only 2 and 9 open."""
        for port, value in (
            (0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01),
            (0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01),
            (0x21, 0xFB), (0xA1, 0xFD),
        ):  # fmt: skip
            pc.chipset.write(port, 1, value)
        pc.cpu.set_reg(x86_const.UC_X86_REG_EFLAGS, pc.cpu.eflags | FLAG_IF)

    def test_power_button_raises_the_sci_on_irq_9(self, pc: PcMachine) -> None:
        """PWRBTN_STS with PWRBTN_EN is a level on IRQ 9, through the slave PIC and EOIs."""
        assert pc.platform is not None
        self._program_pics(pc)
        pc.press_power_button()  # not enabled by the guest yet: nothing latches
        assert pc.platform.pending_irqs() == []
        pc.chipset.write(0x602, 2, 0x0100)  # PM1_EN.PWRBTN_EN
        pc.press_power_button()
        assert pc.platform.pending_irqs() == [9]
        assert pc.chipset.irq_vector(9) == 0x39
        assert pc._irq_ready()
        pc.chipset.acknowledge(9)  # the CPU took it
        assert pc.chipset.irq_vector(9) is None  # in service
        pc.chipset.write(0xA0, 1, 0x61)  # Linux: specific EOI to the slave (line 1)...
        pc.chipset.write(0x20, 1, 0x62)  # ...and to the master's cascade line
        assert pc.chipset.pic_isr == 0
        assert pc._irq_ready()  # level: still pending until the status bit is cleared
        pc.chipset.write(0x600, 2, 0x0100)  # write-1-to-clear PWRBTN_STS
        assert pc.platform.pending_irqs() == []
        assert not pc._irq_ready()

    def test_a_masked_cascade_blocks_the_slave(self, pc: PcMachine) -> None:
        """With the master's IRQ 2 masked, or a slave IRQ in service, IRQ 9 waits."""
        self._program_pics(pc)
        pc.chipset.write(0x602, 2, 0x0100)
        pc.press_power_button()
        pc.chipset.write(0x21, 1, 0xFF)
        assert pc.chipset.irq_vector(9) is None
        assert not pc._irq_ready()
        pc.chipset.write(0x21, 1, 0xFB)
        pc.chipset.acknowledge(8)  # the RTC's line, higher priority
        assert pc.chipset.irq_vector(9) is None
        pc.chipset.write(0xA0, 1, 0x20)  # non-specific EOI to the slave: clears IRQ 8
        pc.chipset.write(0x20, 1, 0x20)  # and the master's cascade
        assert pc.chipset.irq_vector(9) == 0x39


@pytest.mark.slow
def test_the_cloud_kernel_reads_the_tables(
    hv: EmulatorHypervisor,
    kernel: LinuxKernel,
    initrd: Path,
    disks: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Debian's kernel without ``acpi=off`` logs our RSDP, XSDT, FADT, DSDT and FACS."""
    monkeypatch.setattr(machine_module, "PLATFORM_DEVICES", True)
    append = "console=ttyS0 earlyprintk=serial,ttyS0 nolapic noapic nokaslr loglevel=8"
    guest = hv.define(
        Machine(
            name="acpi",
            memory="256MiB",
            kernel=KernelBoot(kernel=kernel.vmlinuz, initrd=initrd, append=append),
            disks=[Disk(path=str(disks[0]))],
        )
    )
    guest.start()
    try:
        guest.console.expect("ACPI: RSDP 0x00000000000E0000 000024 (v02 VIRTKT)", timeout=600)
        for line in (
            "ACPI: XSDT 0x000000000FFFC",
            "ACPI: FACP 0x000000000FFFC",
            "ACPI: DSDT 0x000000000FFFC040",
            "ACPI: FACS 0x000000000FFFC000 000040",
        ):
            guest.console.expect(line, timeout=120)
    finally:
        guest.kill()

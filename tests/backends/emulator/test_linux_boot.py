"""Direct kernel boot on the emulator: the boot protocol, checked on the real Debian cloud kernel.

The bzImage header parser and the boot_params builder are checked on the
real kernel and on damaged copies of its header; the kernel itself is then
started through ``Machine.kernel`` on the emulator. How far the kernel gets
is limited by the emulated platform (see docs/emulator.rst): these tests
check that the decompressor (``UNPACK_KERNEL`` off) reads boot_params and the
command line and talks to ttyS0, and that the kernel proper (unpacked on the
host by default, see test_vmlinux.py) prints its banner and its view of the
e820 map; test_linux_shell.py (slow) boots to the shell.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from virtkit import ConfigError, KernelBoot, Machine
from virtkit.backends.emulator import EmulatorHypervisor
from virtkit.backends.emulator import machine as machine_module
from virtkit.backends.emulator.bootparams import (
    BOOT_PARAMS,
    CMDLINE,
    E820_RAM,
    E820_RESERVED,
    KERNEL_LOAD,
    BzImage,
    e820_map,
    load_linux,
)
from virtkit.backends.emulator.cpu import Cpu
from virtkit.testing.linux import LinuxKernel, build_initramfs

MiB = 1 << 20
#: the kernel command line the emulator needs today (no APIC, no ACPI tables yet)
EMULATOR_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 nolapic noapic acpi=off nokaslr"


@pytest.fixture(scope="module")
def initrd(kernel: LinuxKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(kernel, tmp_path_factory.mktemp("initrd") / "initrd.gz")


class TestBzImage:
    def test_the_cloud_kernel_parses(self, vmlinuz: bytes) -> None:
        """The Debian kernel: protocol >= 2.15, relocatable, init_size covers the payload."""
        image = BzImage.parse(vmlinuz)
        assert image.protocol >= 0x020F
        assert image.relocatable
        assert image.setup_size == (vmlinuz[0x1F1] + 1) * 512
        assert image.payload == vmlinuz[image.setup_size :]
        assert image.init_size >= len(image.payload)
        assert image.cmdline_size >= 2047  # without the NUL
        assert image.header[0x202 - 0x1F1 : 0x206 - 0x1F1] == b"HdrS"

    @pytest.mark.parametrize(
        ("patch", "message"),
        [
            ((0x1FE, b"\0\0"), "boot flag"),
            ((0x202, b"XXXX"), "HdrS"),
            ((0x206, struct.pack("<H", 0x0204)), "older than 2.06"),
            ((0x211, b"\0"), "LOADED_HIGH"),
            ((0x201, b"\x00"), "setup header end"),
        ],
    )
    def test_damaged_headers_are_config_errors(
        self, vmlinuz: bytes, patch: tuple[int, bytes], message: str
    ) -> None:
        offset, data = patch
        bad = vmlinuz[:offset] + data + vmlinuz[offset + len(data) :]
        with pytest.raises(ConfigError, match=message) as info:
            BzImage.parse(bad, source="bad.bin")
        assert "bad.bin" in str(info.value)
        assert info.value.field == "kernel"

    def test_setup_beyond_the_file_is_refused(self, vmlinuz: bytes) -> None:
        """setup_sects claiming more than the file holds (a truncated kernel)."""
        with pytest.raises(ConfigError, match="setup_sects"):
            BzImage.parse(vmlinuz[:0x3000])

    def test_tiny_and_foreign_files_are_refused(self) -> None:
        with pytest.raises(ConfigError, match="too small"):
            BzImage.parse(b"\0" * 100)
        with pytest.raises(ConfigError, match="boot flag"):
            BzImage.parse(b"\x7fELF" + b"\0" * 0x2000)


class TestE820:
    def test_small_machine(self) -> None:
        """256 MiB: low memory, the EBDA and BIOS reserved, RAM from 1 MiB to the end."""
        assert e820_map(256 * MiB) == [
            (0, 0x9FC00, E820_RAM),
            (0x9FC00, 0x400, E820_RESERVED),
            (0xF0000, 0x10000, E820_RESERVED),
            (0x100000, 255 * MiB, E820_RAM),
        ]

    def test_memory_above_the_hole_is_mapped_from_4_gib(self) -> None:
        table = e820_map(4096 * MiB)
        assert (0x100000, 0xE000_0000 - 0x100000, E820_RAM) in table
        assert (1 << 32, 4096 * MiB - 0xE000_0000, E820_RAM) in table

    def test_reserved_ranges_are_carved_out(self) -> None:
        table = e820_map(64 * MiB, ((0x3F00000, 0x10000, 3),))
        assert (0x100000, 0x3F00000 - 0x100000, E820_RAM) in table
        assert (0x3F00000, 0x10000, 3) in table
        assert (0x3F10000, 64 * MiB - 0x3F10000, E820_RAM) in table


class TestLoad:
    def test_boot_params_command_line_and_initrd(self, vmlinuz: bytes) -> None:
        """What the kernel reads: the header copy, loader type, cmdline pointer, initrd, e820."""
        image = BzImage.parse(vmlinuz)
        cpu = Cpu(128 * MiB)
        try:
            ramdisk = b"INITRD" * 1000
            load_linux(cpu, image, initrd=ramdisk, cmdline="console=ttyS0 hello")
            params = cpu.read(BOOT_PARAMS, 0x1000)
            assert params[0x202:0x206] == b"HdrS"
            assert params[0x210] == 0xFF
            assert struct.unpack_from("<I", params, 0x228)[0] == CMDLINE
            assert cpu.read(CMDLINE, 20) == b"console=ttyS0 hello\0"
            address, size = struct.unpack_from("<II", params, 0x218)
            assert size == len(ramdisk)
            assert address % 0x1000 == 0
            assert address + size <= 128 * MiB
            assert address >= KERNEL_LOAD + image.init_size
            assert cpu.read(address, size) == ramdisk
            entries = params[0x1E8]
            e820 = [struct.unpack_from("<QQI", params, 0x2D0 + 20 * i) for i in range(entries)]
            assert e820 == e820_map(128 * MiB)
            assert cpu.read(KERNEL_LOAD, 64) == image.payload[:64]
            assert cpu.rip == KERNEL_LOAD
            assert not cpu.real_mode
        finally:
            cpu.close()

    def test_too_long_a_command_line(self, vmlinuz: bytes) -> None:
        image = BzImage.parse(vmlinuz)
        cpu = Cpu(128 * MiB)
        try:
            with pytest.raises(ConfigError, match="command line") as info:
                load_linux(cpu, image, initrd=None, cmdline="x" * (image.cmdline_size + 1))
            assert info.value.field == "append"
        finally:
            cpu.close()

    def test_too_little_memory(self, vmlinuz: bytes) -> None:
        """The kernel's init_size must fit; then the initrd must fit above it."""
        image = BzImage.parse(vmlinuz)
        cpu = Cpu(16 * MiB)
        try:
            with pytest.raises(ConfigError, match="init_size") as info:
                load_linux(cpu, image, initrd=None, cmdline="")
            assert info.value.field == "memory"
        finally:
            cpu.close()
        need = KERNEL_LOAD + image.init_size
        cpu = Cpu(need + 2 * MiB)
        try:
            with pytest.raises(ConfigError, match="initrd"):
                load_linux(cpu, image, initrd=b"x" * 4 * MiB, cmdline="")
        finally:
            cpu.close()


def _linux_machine(kernel: LinuxKernel, initrd: Path, append: str) -> Machine:
    return Machine(
        name="linux",
        memory="256MiB",
        kernel=KernelBoot(kernel=kernel.vmlinuz, initrd=initrd, append=append),
    )


class TestBoot:
    def test_the_decompressor_reads_the_command_line(
        self,
        hv: EmulatorHypervisor,
        kernel: LinuxKernel,
        initrd: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Machine.kernel on the emulator with UNPACK_KERNEL off: the decompressor runs,
        reads boot_params and the command line (it reports 'nokaslr' from it) and writes
        to ttyS0."""
        monkeypatch.setattr(machine_module, "UNPACK_KERNEL", False)
        guest = hv.define(_linux_machine(kernel, initrd, EMULATOR_CMDLINE))
        guest.start()
        try:
            guest.console.expect("KASLR disabled: 'nokaslr' on cmdline.", timeout=60)
        finally:
            guest.kill()

    def test_a_missing_kernel_is_a_config_error_at_start(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        guest = hv.define(
            Machine(name="nokernel", memory="64MiB", kernel=KernelBoot(kernel=tmp_path / "none"))
        )
        with pytest.raises(ConfigError, match="none"):
            guest.start()

    def test_the_kernel_proper_starts(
        self, vhv: EmulatorHypervisor, kernel: LinuxKernel, initrd: Path
    ) -> None:
        """The kernel unpacked on the host (the default) prints its banner and the e820
        map it was given (virtual clock: the run does not depend on the host's load); its
        decompressor never ran."""
        guest = vhv.define(_linux_machine(kernel, initrd, EMULATOR_CMDLINE + " loglevel=8"))
        guest.start()
        try:
            guest.console.expect("Linux version 6.1", timeout=120)
            guest.console.expect(
                "BIOS-e820: [mem 0x0000000000100000-0x000000000fffbfff] usable", timeout=60
            )
            # the platform's ACPI tables sit in the top 16 KiB of RAM
            guest.console.expect(
                "BIOS-e820: [mem 0x000000000fffc000-0x000000000fffffff] ACPI data", timeout=60
            )
            guest.console.expect("Kernel command line: " + EMULATOR_CMDLINE, timeout=600)
            assert b"KASLR disabled" not in guest.console.output  # the decompressor's line
        finally:
            guest.kill()

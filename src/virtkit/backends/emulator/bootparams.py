"""Direct kernel boot: the Linux x86 boot protocol, as a boot loader does it.

The kernel file (a bzImage) starts with the real-mode setup code and its
*setup header* (``HdrS`` at offset 0x202); the protected-mode kernel follows
the ``(setup_sects + 1) * 512`` bytes of setup. This module checks the header
(the file is untrusted: every size and offset is bounded), builds the
``boot_params`` "zero page" with an e820 map matching the machine's memory,
places the command line and the initrd where the header allows, and leaves
the CPU at the 32-bit protected-mode entry (``code32_start``) with a flat
GDT (``__BOOT_CS`` 0x10, ``__BOOT_DS`` 0x18), paging off, interrupts off and
``ESI`` pointing at ``boot_params`` — the 32-bit boot protocol of
``Documentation/x86/boot.rst``.

With an unpacked kernel (:mod:`virtkit.backends.emulator.vmlinux`: the
decompressor's job done on the host) the loader instead puts the kernel
proper's ELF segments at their physical addresses and enters ``startup_64``
in long mode — the 64-bit boot protocol: a GDT with ``__KERNEL_CS`` 0x10
(64-bit code) and ``__KERNEL_DS`` 0x18, paging on through identity-mapped
2 MiB pages covering the low 4 GiB, ``RSI`` pointing at ``boot_params``.

Memory layout used (guest-physical):

* ``0x07000`` boot_params (one page), ``0x08000`` GDT, ``0x09000`` the
  64-bit entry's page tables (PML4, PDPT, four page directories),
  ``0x20000`` the command line (up to ``cmdline_size`` bytes),
* ``0x100000`` the protected-mode kernel (the decompressor moves itself
  where it wants inside RAM, up to ``init_size``),
* the initrd at the highest page-aligned address below both the end of low
  RAM and ``initrd_addr_max``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import attrs
from unicorn import x86_const as x86

from virtkit.backends.emulator.cpu import CR0_PE, CR0_PG, EFER, Cpu
from virtkit.backends.emulator.vmlinux import Vmlinux, unpack
from virtkit.errors import ConfigError

__all__ = [
    "BOOT_PARAMS",
    "CMDLINE",
    "KERNEL_LOAD",
    "LinuxBoot",
    "E820_RAM",
    "E820_RESERVED",
    "BzImage",
    "e820_map",
    "load_linux",
]

BOOT_PARAMS = 0x7000
GDT = 0x8000
PAGE_TABLES = 0x9000
CMDLINE = 0x20000
KERNEL_LOAD = 0x100000
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
_E820_MAX = 128
#: the lowest protocol with the fields used here (initrd_addr_max, cmd_line_ptr, cmdline_size)
_MIN_PROTOCOL = 0x0206
_LOW_RAM_END = 0x9FC00  # conventional memory: the EBDA follows
_HOLE_START = 0xE000_0000  # RAM above this is mapped from 4 GiB (see Cpu)
_LOADED_HIGH = 0x01
_CAN_USE_HEAP = 0x80
_KASLR_FLAG = 0x02
_MIN_PAYLOAD_PROTOCOL = 0x0208  # payload_offset / payload_length
_CR0_ET_NE = 0x30
_CR4_PAE = 0x20
_EFER_LME_LMA = 0x500


@attrs.frozen
class BzImage:
    """A parsed bzImage: the setup header fields a loader needs.

    Use :meth:`parse`.
    """

    setup_size: int
    protocol: int
    header: bytes = attrs.field(repr=False)  # the setup header (copied into boot_params)
    code32_start: int
    initrd_addr_max: int
    cmdline_size: int
    init_size: int
    relocatable: bool
    payload: bytes = attrs.field(repr=False)  # the protected-mode kernel
    #: the compressed kernel proper inside :attr:`payload` (offset, length); (0, 0) before 2.08
    compressed: tuple[int, int] = (0, 0)

    @classmethod
    def parse(cls, data: bytes, *, source: str = "kernel") -> BzImage:
        """Check ``data`` as a bzImage and read its header.

        Raises:
            ConfigError: not a bzImage, a protocol older than 2.06, or a
                header whose sizes do not fit the file.
        """

        def bad(why: str) -> ConfigError:
            return ConfigError(f"{source} is not a bootable bzImage: {why}", field="kernel")

        if len(data) < 0x1000:
            raise bad(f"{len(data)} bytes is too small for setup code and a kernel")
        if data[0x1FE:0x200] != b"\x55\xaa":
            raise bad("no boot flag 0xAA55 at offset 0x1FE")
        if data[0x202:0x206] != b"HdrS":
            raise bad("no 'HdrS' setup header signature at offset 0x202 (a pre-2.0 zImage?)")
        protocol = struct.unpack_from("<H", data, 0x206)[0]
        if protocol < _MIN_PROTOCOL:
            raise bad(f"boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is older than 2.06")
        if not data[0x211] & _LOADED_HIGH:
            raise bad("not a bzImage (loadflags LOADED_HIGH clear: a zImage loads below 1 MiB)")
        setup_sects = data[0x1F1] or 4
        setup_size = (setup_sects + 1) * 512
        if setup_size >= len(data):
            raise bad(f"setup_sects {setup_sects} leaves no kernel in a {len(data)}-byte file")
        header_end = 0x202 + data[0x201]
        if header_end > setup_size or header_end < 0x264:
            raise bad(f"setup header end {header_end:#x} is outside the setup code")
        code32_start, _, _ = struct.unpack_from("<III", data, 0x214)
        (initrd_addr_max,) = struct.unpack_from("<I", data, 0x22C)
        relocatable = bool(data[0x234])
        (cmdline_size,) = struct.unpack_from("<I", data, 0x238)
        (init_size,) = struct.unpack_from("<I", data, 0x260)
        payload = data[setup_size:]
        init_size = max(init_size, len(payload))
        compressed = (0, 0)
        if protocol >= _MIN_PAYLOAD_PROTOCOL:
            compressed = struct.unpack_from("<II", data, 0x248)
        return cls(
            setup_size=setup_size,
            protocol=protocol,
            header=bytes(data[0x1F1:header_end]),
            code32_start=code32_start,
            initrd_addr_max=initrd_addr_max or 0x37FF_FFFF,
            cmdline_size=cmdline_size or 255,
            init_size=init_size,
            relocatable=relocatable,
            payload=bytes(payload),
            compressed=compressed,
        )

    def unpacked(self, *, source: str = "kernel") -> Vmlinux | None:
        """The kernel proper, decompressed on the host; None if that is not possible here.

        None for a protocol before 2.08 or a compression
        :mod:`~virtkit.backends.emulator.vmlinux` does not handle (the
        kernel's own decompressor then runs).

        Raises:
            ConfigError: ``payload_offset``/``payload_length`` outside the
                kernel, or a corrupt payload.
        """
        offset, length = self.compressed
        if self.protocol < _MIN_PAYLOAD_PROTOCOL or length == 0:
            return None
        if offset + length > len(self.payload):
            raise ConfigError(
                f"{source}: payload_offset {offset:#x} + payload_length {length:#x} pass the "
                f"end of the {len(self.payload)}-byte protected-mode kernel",
                field="kernel",
            )
        return unpack(self.payload[offset : offset + length], source=source)


@attrs.frozen
class LinuxBoot:
    """A kernel, initrd and command line to boot directly, read once at definition time.

    Use :meth:`from_files`.
    """

    image: BzImage
    initrd: bytes | None
    cmdline: str
    source: str = "kernel"

    @classmethod
    def from_files(cls, kernel: Path, initrd: Path | None, cmdline: str) -> LinuxBoot:
        """Read and check the kernel (and initrd).

        Raises:
            ConfigError: a file cannot be read or the kernel is not a bzImage.
        """
        try:
            data = kernel.read_bytes()
            ramdisk = initrd.read_bytes() if initrd is not None else None
        except OSError as exc:
            raise ConfigError(
                f"cannot read {exc.filename}: {exc.strerror}", field="kernel"
            ) from exc
        return cls(BzImage.parse(data, source=str(kernel)), ramdisk, cmdline, str(kernel))

    def unpacked(self) -> Vmlinux | None:
        """:meth:`BzImage.unpacked` for this kernel (cached: a second call is free).

        Raises:
            ConfigError: the kernel's compressed payload is corrupt.
        """
        return self.image.unpacked(source=self.source)

    def load(
        self,
        cpu: Cpu,
        *,
        acpi_rsdp: int = 0,
        reserved: tuple[tuple[int, int, int], ...] = (),
        vmlinux: Vmlinux | None = None,
    ) -> None:
        """Place everything in RAM and leave the CPU at the kernel's entry.

        ``acpi_rsdp``, ``reserved`` and ``vmlinux`` are passed to
        :func:`load_linux` (the ACPI tables' RSDP and their e820 range; the
        unpacked kernel to enter at its 64-bit entry).

        Raises:
            ConfigError: it does not fit the machine's memory.
        """
        load_linux(
            cpu,
            self.image,
            initrd=self.initrd,
            cmdline=self.cmdline,
            acpi_rsdp=acpi_rsdp,
            reserved=reserved,
            vmlinux=vmlinux,
        )


def e820_map(
    memory: int, reserved: tuple[tuple[int, int, int], ...] = ()
) -> list[tuple[int, int, int]]:
    """The BIOS memory map for ``memory`` bytes of RAM: (address, size, type) entries.

    Conventional memory up to the EBDA, the EBDA and BIOS areas reserved,
    RAM from 1 MiB to the end of low RAM (below the PCI hole at
    0xE0000000), and the rest from 4 GiB — as :class:`Cpu` maps it.
    ``reserved`` entries (e.g. ACPI tables) are carved out of RAM.
    """
    low = min(memory, _HOLE_START)
    entries = [
        (0, _LOW_RAM_END, E820_RAM),
        (_LOW_RAM_END, 0xA0000 - _LOW_RAM_END, E820_RESERVED),
        (0xF0000, 0x10000, E820_RESERVED),
    ]
    ram = [(0x100000, low - 0x100000)]
    for start, size, _kind in reserved:
        split = []
        for base, length in ram:
            end = base + length
            if start >= end or start + size <= base:
                split.append((base, length))
                continue
            if start > base:
                split.append((base, start - base))
            if start + size < end:
                split.append((start + size, end - start - size))
        ram = split
    entries += [(base, length, E820_RAM) for base, length in ram if length > 0]
    entries += list(reserved)
    if memory > low:
        entries.append((1 << 32, memory - low, E820_RAM))
    return sorted(entries)


def load_linux(
    cpu: Cpu,
    image: BzImage,
    *,
    initrd: bytes | None,
    cmdline: str,
    acpi_rsdp: int = 0,
    reserved: tuple[tuple[int, int, int], ...] = (),
    vmlinux: Vmlinux | None = None,
) -> None:
    """Put the kernel, boot_params, command line and initrd in RAM and enter the kernel.

    Without ``vmlinux`` the bzImage's protected-mode part goes to 1 MiB and
    the CPU starts its decompressor (32-bit entry); with it (the kernel
    proper, unpacked on the host) its segments go to their physical
    addresses and the CPU starts ``startup_64`` in long mode.

    Raises:
        ConfigError: the kernel, the initrd or the command line does not fit
            the machine's memory or the kernel's limits.
    """
    memory = cpu.memory_size
    low_end = min(memory, _HOLE_START)
    kernel_end = KERNEL_LOAD + max(image.init_size, len(image.payload))
    if vmlinux is not None:
        # init_size counts from where the kernel runs; the kernel proper uses RAM past _end
        kernel_end = max(vmlinux.end, vmlinux.start + image.init_size)
    if kernel_end > low_end:
        raise ConfigError(
            f"the kernel needs {kernel_end - KERNEL_LOAD} bytes from 1 MiB "
            f"(init_size) but the machine has {memory} bytes of RAM",
            field="memory",
        )
    line = cmdline.encode()
    if len(line) > image.cmdline_size:
        raise ConfigError(
            f"the kernel command line is {len(line)} bytes; this kernel takes at most "
            f"{image.cmdline_size}",
            field="append",
        )
    params = bytearray(0x1000)
    params[0x1F1 : 0x1F1 + len(image.header)] = image.header
    params[0x210] = 0xFF  # type_of_loader: undefined loader
    params[0x211] = (params[0x211] | _CAN_USE_HEAP) & 0xFF
    struct.pack_into("<H", params, 0x224, 0xFE00)  # heap_end_ptr (unused by the 32-bit entry)
    struct.pack_into("<I", params, 0x228, CMDLINE)
    if initrd:
        top = min(
            [low_end, image.initrd_addr_max + 1] + [s for s, _, _ in reserved if s >= kernel_end]
        )
        address = (top - len(initrd)) & ~0xFFF
        if address < kernel_end:
            raise ConfigError(
                f"the initrd ({len(initrd)} bytes) does not fit between the kernel "
                f"(ending at {kernel_end:#x}) and {top:#x}; give the machine more memory",
                field="memory",
            )
        cpu.write(address, initrd)
        struct.pack_into("<II", params, 0x218, address, len(initrd))
    if acpi_rsdp and image.protocol >= 0x020E:
        struct.pack_into("<Q", params, 0x070, acpi_rsdp)  # boot_params.acpi_rsdp_addr
    table = e820_map(memory, reserved)[:_E820_MAX]
    params[0x1E8] = len(table)
    for index, (base, size, kind) in enumerate(table):
        struct.pack_into("<QQI", params, 0x2D0 + 20 * index, base, size, kind)
    # screen_info: an 80x25 colour text console, so a VGA-less guest does not probe
    params[0x06] = 0  # orig_video_mode
    params[0x07] = 80  # orig_video_cols
    params[0x0E] = 25  # orig_video_lines
    params[0x0F] = 1  # orig_video_isVGA
    struct.pack_into("<H", params, 0x10, 16)  # orig_video_points
    cpu.write(CMDLINE, line + b"\0")
    if vmlinux is None:
        cpu.write(KERNEL_LOAD, image.payload)
        struct.pack_into("<I", params, 0x214, KERNEL_LOAD)  # code32_start: where it was put
        cpu.write(BOOT_PARAMS, bytes(params))
        _enter_protected(cpu, KERNEL_LOAD)
        return
    for segment in vmlinux.segments:
        cpu.write(segment.address, segment.data)
        cpu.write(segment.address + len(segment.data), bytes(segment.memsz - len(segment.data)))
    params[0x211] &= ~_KASLR_FLAG & 0xFF  # loaded at its link address: no randomisation
    cpu.write(BOOT_PARAMS, bytes(params))
    _enter_long(cpu, vmlinux.entry)


def _enter_protected(cpu: Cpu, entry: int) -> None:
    """Flat 32-bit protected mode, paging off, as the boot protocol requires."""
    _load_gdt(cpu, 0x00CF_9A00_0000_FFFF)  # 0x10 __BOOT_CS: 4 GiB execute/read, 32-bit
    cpu.uc.reg_write(x86.UC_X86_REG_CR0, 0x11)
    # the decompressor sets its own stack
    _start(cpu, entry, zeroed=_ZEROED_32, si=x86.UC_X86_REG_ESI, sp=x86.UC_X86_REG_ESP)


def _enter_long(cpu: Cpu, entry: int) -> None:
    """Long mode at ``entry`` as the 64-bit boot protocol requires (``startup_64``).

    Identity-mapped 2 MiB pages over the low 4 GiB, a GDT with 64-bit
    ``__KERNEL_CS`` (0x10) and ``__KERNEL_DS`` (0x18), interrupts off,
    ``RSI`` = boot_params. The kernel loads its own GDT, page tables and stack.
    """
    pml4, pdpt, directories = PAGE_TABLES, PAGE_TABLES + 0x1000, PAGE_TABLES + 0x2000
    tables = bytearray(0x6000)
    struct.pack_into("<Q", tables, 0, pdpt | 0x3)  # present, writable
    for gib in range(4):
        struct.pack_into("<Q", tables, 0x1000 + 8 * gib, (directories + gib * 0x1000) | 0x3)
    for index in range(4 * 512):
        struct.pack_into("<Q", tables, 0x2000 + 8 * index, (index << 21) | 0x83)  # 2 MiB page
    cpu.write(pml4, bytes(tables))
    _load_gdt(cpu, 0x00AF_9A00_0000_FFFF)  # 0x10 __KERNEL_CS: 64-bit code (L set, D clear)
    uc = cpu.uc
    uc.reg_write(x86.UC_X86_REG_CR4, _CR4_PAE)
    uc.reg_write(x86.UC_X86_REG_CR3, pml4)
    uc.msr_write(EFER, _EFER_LME_LMA)
    uc.reg_write(x86.UC_X86_REG_CR0, CR0_PE | CR0_PG | _CR0_ET_NE)
    # startup_64 sets its own stack
    _start(cpu, entry, zeroed=_ZEROED_64, si=x86.UC_X86_REG_RSI, sp=x86.UC_X86_REG_RSP)


_ZEROED_32 = (x86.UC_X86_REG_EBP, x86.UC_X86_REG_EDI, x86.UC_X86_REG_EBX, x86.UC_X86_REG_EAX)
_ZEROED_64 = (x86.UC_X86_REG_RBP, x86.UC_X86_REG_RDI, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RAX)


def _load_gdt(cpu: Cpu, code: int) -> None:
    """A GDT of two null entries, ``code`` at 0x10 and flat 4 GiB data at 0x18; no IDT."""
    gdt = bytes(16) + struct.pack("<QQ", code, 0x00CF_9200_0000_FFFF)  # 0x18: read/write
    cpu.write(GDT, gdt)
    cpu.uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT, len(gdt) - 1, 0))
    cpu.uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0, 0))


def _start(cpu: Cpu, entry: int, *, zeroed: tuple[int, ...], si: int, sp: int) -> None:
    """Run from ``entry`` with CS 0x10, data 0x18, ``zeroed`` cleared, the source index and
    stack at boot_params, interrupts off (the control registers are already set)."""
    uc = cpu.uc
    for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_SS):
        cpu.set_reg(reg, 0x18)
    cpu.set_reg(x86.UC_X86_REG_FS, 0x18)
    cpu.set_reg(x86.UC_X86_REG_GS, 0x18)
    cpu.set_reg(x86.UC_X86_REG_CS, 0x10)
    for reg in zeroed:
        uc.reg_write(reg, 0)
    uc.reg_write(si, BOOT_PARAMS)
    uc.reg_write(sp, BOOT_PARAMS)
    uc.reg_write(x86.UC_X86_REG_EFLAGS, 0x2)
    cpu.set_rip(entry)

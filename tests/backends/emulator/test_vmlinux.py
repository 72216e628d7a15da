"""The decompressor's job on the host: the bzImage payload to the kernel proper's ELF.

Checked on the real Debian cloud kernel (LZ4 legacy frames), on gzip and xz
payloads built here around a small ELF, and on damaged payloads and ELF
headers, which must be refused with a ConfigError naming what is wrong, never
crash or load outside RAM. The 64-bit entry state is checked on a CPU loaded
by :func:`load_linux`; the boots themselves are in test_linux_boot.py
(default run) and test_linux_shell.py (slow).
"""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest
from unicorn import x86_const as x86

from virtkit import ConfigError, KernelBoot, Machine
from virtkit.backends.emulator import EmulatorHypervisor
from virtkit.backends.emulator.bootparams import BOOT_PARAMS, PAGE_TABLES, BzImage, load_linux
from virtkit.backends.emulator.cpu import EFER, Cpu
from virtkit.backends.emulator.vmlinux import Vmlinux, decompress_payload, unpack

MiB = 1 << 20
LOAD_PHYSICAL_ADDR = 0x1000000


def _payload(vmlinuz: bytes) -> tuple[int, int]:
    """Where the compressed payload sits in the file (offset, length)."""
    image = BzImage.parse(vmlinuz)
    offset, length = image.compressed
    return image.setup_size + offset, length


def _elf(
    segments: list[tuple[int, bytes, int]], *, entry: int | None = None, machine: int = 62
) -> bytes:
    """A minimal ELF64 executable: (paddr, data, memsz) per PT_LOAD segment."""
    phoff = 64
    data_at = phoff + 56 * len(segments)
    headers = b""
    body = b""
    for paddr, data, memsz in segments:
        offset = data_at + len(body)
        headers += struct.pack(
            "<IIQQQQQQ",
            1,
            7,
            offset,
            (0xFFFF_FFFF_8000_0000 + paddr) % (1 << 64),
            paddr,
            len(data),
            memsz,
            8,
        )
        body += data
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,
        machine,
        1,
        segments[0][0] if entry is None else entry,
        phoff,
        0,
        0,
        64,
        56,
        len(segments),
        64,
        0,
        0,
    )
    return header + headers + body


class TestTheCloudKernel:
    def test_the_payload_is_lz4_and_unpacks_to_the_kernel_elf(self, vmlinuz: bytes) -> None:
        """payload_offset/length locate an LZ4 legacy frame whose last four bytes are the
        decompressed size; the result is the kernel proper, linked at LOAD_PHYSICAL_ADDR."""
        at, length = _payload(vmlinuz)
        payload = vmlinuz[at : at + length]
        assert payload[:4] == b"\x02\x21\x4c\x18"
        elf = decompress_payload(payload)
        assert elf is not None
        assert len(elf) == struct.unpack_from("<I", payload, length - 4)[0]
        kernel = Vmlinux.parse(elf)
        assert kernel.entry == LOAD_PHYSICAL_ADDR  # phys_startup_64
        assert kernel.start == LOAD_PHYSICAL_ADDR
        assert len(kernel.segments) >= 3
        image = BzImage.parse(vmlinuz)
        assert kernel.end <= LOAD_PHYSICAL_ADDR + image.init_size

    def test_a_second_unpack_is_the_cached_result(self, vmlinuz: bytes) -> None:
        image = BzImage.parse(vmlinuz)
        first = image.unpacked()
        assert first is not None
        assert BzImage.parse(vmlinuz).unpacked() is first

    def test_the_64_bit_entry_state(self, vmlinuz: bytes) -> None:
        """load_linux with the unpacked kernel: segments at their physical addresses,
        long mode with identity-mapped 2 MiB pages, CS 0x10 64-bit, RSI = boot_params,
        interrupts off, KASLR not requested."""
        image = BzImage.parse(vmlinuz)
        kernel = image.unpacked()
        assert kernel is not None
        cpu = Cpu(256 * MiB)
        try:
            load_linux(cpu, image, initrd=b"I" * 4096, cmdline="console=ttyS0", vmlinux=kernel)
            for segment in kernel.segments:
                assert cpu.read(segment.address, 256) == segment.data[:256]
            assert cpu.rip == kernel.entry
            assert cpu.long_mode
            assert cpu.reg(x86.UC_X86_REG_CS) == 0x10
            assert cpu.reg(x86.UC_X86_REG_RSI) == BOOT_PARAMS
            assert not cpu.eflags & 0x200
            assert cpu.reg(x86.UC_X86_REG_CR3) == PAGE_TABLES
            assert int(cpu.uc.msr_read(EFER)) & 0x500 == 0x500
            # the page directory entry covering the kernel: a 2 MiB identity page
            entry = struct.unpack_from(
                "<Q", cpu.read(PAGE_TABLES + 0x2000 + 8 * (LOAD_PHYSICAL_ADDR >> 21), 8)
            )[0]
            assert entry == LOAD_PHYSICAL_ADDR | 0x83
            params = cpu.read(BOOT_PARAMS, 0x1000)
            assert not params[0x211] & 0x02
            address, size = struct.unpack_from("<II", params, 0x218)
            assert size == 4096
            assert address >= kernel.end
        finally:
            cpu.close()


class TestOtherCompressions:
    def test_gzip_and_xz_with_the_size_trailer(self) -> None:
        elf = _elf([(0x100000, b"\xf4" * 100, 4096)])
        trailer = struct.pack("<I", len(elf))
        assert decompress_payload(gzip.compress(elf) + trailer) == elf
        xz = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
        assert decompress_payload(xz + trailer) == elf

    def test_an_unhandled_compression_falls_back_to_the_decompressor(self) -> None:
        assert decompress_payload(b"\x28\xb5\x2f\xfd" + bytes(100)) is None  # zstd
        assert unpack(b"BZh9" + bytes(100)) is None

    def test_corrupt_gzip(self) -> None:
        with pytest.raises(ConfigError, match="corrupt"):
            decompress_payload(b"\x1f\x8b\x08\x00" + bytes(40))

    def test_bss_is_zeroed(self) -> None:
        """p_memsz past p_filesz is zeroed over whatever RAM held."""
        kernel = Vmlinux.parse(_elf([(0x200000, b"\x90" * 16, 0x3000)]))
        image = BzImage.parse(_bzimage())
        cpu = Cpu(64 * MiB)
        try:
            cpu.write(0x200000, b"\xaa" * 0x4000)
            load_linux(cpu, image, initrd=None, cmdline="", vmlinux=kernel)
            assert cpu.read(0x200000, 16) == b"\x90" * 16
            assert cpu.read(0x200010, 0x3000 - 16) == bytes(0x3000 - 16)
            assert cpu.read(0x203000, 16) == b"\xaa" * 16
            assert cpu.rip == 0x200000
        finally:
            cpu.close()


def _bzimage() -> bytes:
    """A tiny bzImage header (protocol 2.08) around a zstd-tagged payload."""
    data = bytearray(0x2000)
    data[0x1F1] = 4
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x201] = 0x66
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x0208)
    data[0x211] = 0x01
    struct.pack_into("<II", data, 0x248, 0x10, 0x100)
    data[0xA00 + 0x10 : 0xA00 + 0x14] = b"\x28\xb5\x2f\xfd"
    return bytes(data)


class TestRefusals:
    @pytest.mark.parametrize(
        ("damage", "match"),
        [
            ("truncate", "passes the payload's end|trailer"),
            ("block-size", "passes the payload's end"),
            ("trailer", "trailer says"),
            ("block-bytes", "corrupt|trailer|ELF"),
            ("huge-trailer", "claims"),
        ],
    )
    def test_damaged_lz4_payloads(self, vmlinuz: bytes, damage: str, match: str) -> None:
        at, length = _payload(vmlinuz)
        payload = bytearray(vmlinuz[at : at + length])
        if damage == "truncate":
            payload = payload[: length // 2] + payload[-4:]
        elif damage == "block-size":
            struct.pack_into("<I", payload, 4, 0x7FFF_FFFF)
        elif damage == "trailer":
            struct.pack_into("<I", payload, len(payload) - 4, 1234)
        elif damage == "block-bytes":
            payload[8:4096] = b"\xff" * (4096 - 8)
        else:
            struct.pack_into("<I", payload, len(payload) - 4, 0xFFFF_FFFF)
        with pytest.raises(ConfigError, match=match) as info:
            unpack(bytes(payload), source="damaged")
        assert info.value.field == "kernel"
        assert "damaged" in str(info.value)

    def test_payload_offset_outside_the_kernel(self, vmlinuz: bytes) -> None:
        data = bytearray(vmlinuz)
        struct.pack_into("<I", data, 0x24C, len(vmlinuz))  # payload_length past the end
        with pytest.raises(ConfigError, match="payload_length"):
            BzImage.parse(bytes(data)).unpacked()

    @pytest.mark.parametrize(
        ("elf", "match"),
        [
            (b"MZ" + bytes(100), "not an ELF"),
            (_elf([(0x100000, b"x", 1)], machine=3), "not x86-64"),
            (_elf([(0x100000, b"x", 1)])[:100], "pass the end"),
            (_elf([(0x100000, b"x" * 8, 4)]), "exceeds memory size"),
            (_elf([(0x1000, b"x", 16)]), "not between 1 MiB and 4 GiB"),
            (_elf([(0xFFFF_F000, b"x", 0x2000)]), "not between 1 MiB and 4 GiB"),
            (_elf([(0x100000, b"x", 0x2000), (0x101000, b"y", 16)]), "overlap"),
            (_elf([(0x100000, b"x", 16)], entry=0x500000), "entry point"),
        ],
    )
    def test_bad_elf_headers(self, elf: bytes, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            Vmlinux.parse(elf)

    def test_a_segment_beyond_the_file(self) -> None:
        elf = bytearray(_elf([(0x100000, b"x" * 16, 16)]))
        struct.pack_into("<Q", elf, 64 + 8, 1 << 40)  # p_offset
        with pytest.raises(ConfigError, match="pass the end of the file"):
            Vmlinux.parse(bytes(elf))

    def test_a_corrupt_kernel_is_a_config_error_at_start(
        self, hv: EmulatorHypervisor, vmlinuz: bytes, tmp_path: Path
    ) -> None:
        """Through the public API: the damaged payload is refused when the guest starts."""
        at, _length = _payload(vmlinuz)
        data = bytearray(vmlinuz)
        data[at + 8 : at + 4096] = b"\xff" * (4096 - 8)
        bad = tmp_path / "vmlinuz-bad"
        bad.write_bytes(bytes(data))
        guest = hv.define(Machine(name="badkernel", memory="256MiB", kernel=KernelBoot(kernel=bad)))
        with pytest.raises(ConfigError, match="vmlinuz-bad"):
            guest.start()

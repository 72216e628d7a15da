"""The x86 CPU: a unicorn engine in 16-bit real mode, plus what unicorn lacks.

Unicorn executes guest code at full speed; it calls back into Python only
for port I/O (``UC_HOOK_INSN`` on IN/OUT), interrupts and exceptions
(``UC_HOOK_INTR``: unicorn does not vector through the IVT/IDT itself), and
invalid opcodes. This module wraps the engine: register access (including the
full 64-bit RIP/RSP of long mode, read through the saved context because a
16-bit unicorn instance cannot name 64-bit registers), running a slice,
and delivering interrupts the way a real CPU does in real, protected and
long mode.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Any

import unicorn as _unicorn_module
from unicorn import x86_const as x86

from virtkit.errors import BackendError

__all__ = ["Cpu", "CpuFault", "TripleFault", "UcError", "sign16", "unicorn"]

#: the unicorn module, untyped where its own hints are incomplete
unicorn: Any = _unicorn_module
#: unicorn's exception (``.errno`` holds a ``UC_ERR_*`` code)
UcError: type[Exception] = unicorn.UcError

_UNTIL = 0xFFFF_FFFF_FFFF_FFF0  # an address guest code never reaches: slices end by time/count
CR0_PE = 0x1
CR0_PG = 0x8000_0000
EFER = 0xC000_0080
EFER_LMA = 0x400
FLAG_IF = 0x200
FLAG_TF = 0x100
FLAG_CF = 0x1
FLAG_ZF = 0x40
_MASK64 = (1 << 64) - 1

EXCEPTION_NAMES = {
    0: "#DE divide error",
    1: "#DB debug",
    2: "NMI",
    3: "#BP breakpoint",
    4: "#OF overflow",
    5: "#BR bound range",
    6: "#UD invalid opcode",
    7: "#NM device not available",
    8: "#DF double fault",
    10: "#TS invalid TSS",
    11: "#NP segment not present",
    12: "#SS stack fault",
    13: "#GP general protection",
    14: "#PF page fault",
    16: "#MF x87 error",
    17: "#AC alignment check",
    18: "#MC machine check",
    19: "#XM SIMD error",
}


def sign16(value: int) -> int:
    """A 16-bit value read as signed."""
    value &= 0xFFFF
    return value - 0x10000 if value & 0x8000 else value


class CpuFault(Exception):
    """The guest did something the machine cannot continue from."""


class TripleFault(CpuFault):
    """An exception could not be delivered: a real PC would shut down (reset)."""


class Cpu:
    """A unicorn x86 CPU with ``memory`` bytes of RAM mapped from address 0.

    Args:
        memory: RAM size in bytes (rounded up to 4 KiB, at least 1 MiB).

    Raises:
        BackendError: unicorn cannot create the CPU or map the memory.
    """

    def __init__(self, memory: int) -> None:
        size = max((memory + 0xFFF) & ~0xFFF, 0x100000)
        self.memory_size = size
        try:
            self.uc: Any = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
            # RAM is an anonymous mapping we own: untouched pages cost nothing,
            # and snapshots read it without copying through unicorn.
            self.ram = mmap.mmap(-1, size)
            self._ram_c: Any = (ctypes.c_char * size).from_buffer(self.ram)
            self._ram_ptr = ctypes.addressof(self._ram_c)
            low = min(size, 0xE000_0000)
            self.uc.mem_map_ptr(0, low, unicorn.UC_PROT_ALL, self._ram_ptr)
            if size > low:
                self.uc.mem_map_ptr(1 << 32, size - low, unicorn.UC_PROT_ALL, self._ram_ptr + low)
        except UcError as exc:
            raise BackendError(
                f"unicorn could not create a CPU with {size} bytes of RAM: {exc}"
            ) from exc
        self._probe_context_layout()

    # -- context layout ----------------------------------------------------------------------------
    def _probe_context_layout(self) -> None:
        """Find where RAX..R15 and RIP live in unicorn's saved context."""
        uc = self.uc
        for i, reg in enumerate(_GPR32):
            uc.reg_write(reg, 0x5A5A_0000 + i)
        uc.reg_write(x86.UC_X86_REG_EIP, 0x5A5A_00FF)
        blob = bytes(uc.context_save())
        self._gpr_offset = blob.find(struct.pack("<Q", 0x5A5A_0000))
        self._rip_offset = blob.find(struct.pack("<Q", 0x5A5A_00FF))
        if self._gpr_offset < 0 or self._rip_offset != self._gpr_offset + 16 * 8:
            raise BackendError(
                "this unicorn build stores CPU registers in an unexpected layout; "
                f"unicorn {unicorn.__version__} is not supported by the emulator"
            )
        for reg in _GPR32:
            uc.reg_write(reg, 0)
        uc.reg_write(x86.UC_X86_REG_EIP, 0)

    # -- registers ---------------------------------------------------------------------------------
    def reg(self, reg: int) -> int:
        """Read a register (unsigned)."""
        value = int(self.uc.reg_read(reg))
        return value & _MASK64 if value < 0 else value

    def set_reg(self, reg: int, value: int) -> None:
        """Write a register."""
        self.uc.reg_write(reg, value)

    def context(self) -> bytes:
        """The engine's full CPU context as bytes."""
        return bytes(self.uc.context_save())

    def restore_context(self, blob: bytes) -> None:
        """Load a context from :meth:`context`."""
        ctx = self.uc.context_save()
        if len(blob) != ctx.size:
            raise BackendError(
                f"saved CPU state is {len(blob)} bytes, this unicorn build expects {ctx.size}; "
                "the snapshot was taken with another unicorn version"
            )
        ctx.__setstate__((blob, ctx.size, ctx.arch, ctx.mode))
        self.uc.context_restore(ctx)
        self.uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)

    def gpr64(self, index: int) -> int:
        """General register ``index`` (0=RAX ... 15=R15), all 64 bits."""
        blob = self.context()
        return int(struct.unpack_from("<Q", blob, self._gpr_offset + 8 * index)[0])

    def set_gpr64(self, index: int, value: int) -> None:
        """Write general register ``index`` with all 64 bits."""
        blob = bytearray(self.context())
        struct.pack_into("<Q", blob, self._gpr_offset + 8 * index, value & _MASK64)
        self.restore_context(bytes(blob))

    @property
    def rip(self) -> int:
        """The instruction pointer, all 64 bits."""
        return int(struct.unpack_from("<Q", self.context(), self._rip_offset)[0])

    def set_rip(self, value: int) -> None:
        """Write the instruction pointer (all 64 bits)."""
        blob = bytearray(self.context())
        struct.pack_into("<Q", blob, self._rip_offset, value & _MASK64)
        self.restore_context(bytes(blob))

    def idtr(self) -> tuple[int, int]:
        """The IDT register: (base, limit)."""
        value = self.uc.reg_read(x86.UC_X86_REG_IDTR)
        return int(value[1]), int(value[2])

    @property
    def cs(self) -> int:
        """The CS selector."""
        return self.reg(x86.UC_X86_REG_CS) & 0xFFFF

    @property
    def eflags(self) -> int:
        """EFLAGS."""
        return self.reg(x86.UC_X86_REG_EFLAGS) & 0xFFFF_FFFF

    @property
    def real_mode(self) -> bool:
        """CR0.PE clear."""
        return not self.reg(x86.UC_X86_REG_CR0) & CR0_PE

    @property
    def long_mode(self) -> bool:
        """EFER.LMA set."""
        return bool(int(self.uc.msr_read(EFER)) & EFER_LMA)

    def mode_name(self) -> str:
        """``"real"``, ``"protected"`` or ``"long"``."""
        if self.real_mode:
            return "real"
        return "long" if self.long_mode else "protected"

    def where(self) -> str:
        """CS:IP and mode, for messages."""
        return f"{self.cs:04x}:{self.rip:x} ({self.mode_name()} mode)"

    # -- memory ------------------------------------------------------------------------------------
    def read(self, address: int, length: int) -> bytes:
        """Read guest-physical memory."""
        return bytes(self.uc.mem_read(address, length))

    def write(self, address: int, data: bytes) -> None:
        """Write guest-physical memory (translated code there is invalidated)."""
        self.uc.mem_write(address, bytes(data))

    def read16(self, address: int) -> int:
        """Little-endian word at ``address``."""
        return int.from_bytes(self.read(address, 2), "little")

    def write16(self, address: int, value: int) -> None:
        """Store a little-endian word."""
        self.write(address, (value & 0xFFFF).to_bytes(2, "little"))

    def clear_ram(self) -> None:
        """Zero all RAM (pages are given back to the host) and drop translated code."""
        try:
            self.ram.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError):
            ctypes.memset(self._ram_ptr, 0, self.memory_size)
        self.flush_code()

    def flush_code(self) -> None:
        """Drop all translated code (after RAM was replaced behind the engine's back)."""
        self.uc.ctl_flush_tb()

    # -- running -----------------------------------------------------------------------------------
    def run(self, *, timeout_us: int = 0, count: int = 0) -> None:
        """Run from the current CS:RIP until stopped, halted, or the slice ends.

        Raises:
            unicorn.UcError: the engine stopped on an error (invalid opcode, bad memory).
        """
        # unicorn's set_pc in 16-bit mode computes eip = begin - (int16)CS * 16
        begin = (self.rip + sign16(self.cs) * 16) & _MASK64
        self.uc.emu_start(begin, _UNTIL, timeout=timeout_us, count=count)

    def stop(self) -> None:
        """Ask a running slice to end soon (callable from any thread)."""
        self.uc.emu_stop()

    # -- reset -------------------------------------------------------------------------------------
    def reset_real_mode(self) -> None:
        """Registers as a PC BIOS leaves them: real mode, flat 64 KiB segments."""
        uc = self.uc
        uc.msr_write(EFER, 0)
        uc.reg_write(x86.UC_X86_REG_CR0, 0x10)
        uc.reg_write(x86.UC_X86_REG_CR3, 0)
        uc.reg_write(x86.UC_X86_REG_CR4, 0)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0x3FF, 0))
        for reg in _GPR32:
            uc.reg_write(reg, 0)
        for seg in _SEGMENTS:
            uc.reg_write(seg, 0)
        uc.reg_write(x86.UC_X86_REG_EFLAGS, 0x2)

    def close(self) -> None:
        """Release the engine and the RAM mapping."""
        try:
            self.uc.mem_unmap(0, min(self.memory_size, 0xE000_0000))
            if self.memory_size > 0xE000_0000:
                self.uc.mem_unmap(1 << 32, self.memory_size - 0xE000_0000)
        except UcError:
            pass
        self.uc = None
        del self._ram_c
        self.ram.close()


_GPR32 = (
    x86.UC_X86_REG_EAX,
    x86.UC_X86_REG_ECX,
    x86.UC_X86_REG_EDX,
    x86.UC_X86_REG_EBX,
    x86.UC_X86_REG_ESP,
    x86.UC_X86_REG_EBP,
    x86.UC_X86_REG_ESI,
    x86.UC_X86_REG_EDI,
)
_SEGMENTS = (
    x86.UC_X86_REG_CS,
    x86.UC_X86_REG_DS,
    x86.UC_X86_REG_ES,
    x86.UC_X86_REG_SS,
    x86.UC_X86_REG_FS,
    x86.UC_X86_REG_GS,
)

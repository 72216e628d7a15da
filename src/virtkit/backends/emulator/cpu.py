"""The x86 CPU: a unicorn engine in 16-bit real mode, plus what unicorn lacks.

Unicorn executes guest code at full speed; it calls back into Python only
for port I/O (``UC_HOOK_INSN`` on IN/OUT), interrupts and exceptions
(``UC_HOOK_INTR``: unicorn does not vector through the IVT/IDT itself), and
invalid opcodes. This module wraps the engine: register access, running a slice, memory.

The engine is created in 16-bit mode, which gives the real-mode reset state
a PC BIOS leaves, and then *operated* in 64-bit mode: unicorn's mode only
selects how ``emu_start`` sets the program counter (16-bit mode writes IP
and would cut EIP/RIP to 16 bits on every resume) and which register names
exist; instruction decoding follows the guest's own CR0/EFER/CS state. The
mode lives in the engine's handle (``uc_struct.mode``, checked at start-up);
segment registers are written with 16-bit semantics, as the BIOS needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import struct
from typing import Any

import unicorn as _unicorn_module
from unicorn import x86_const as x86

from virtkit.backends.emulator import ramstore
from virtkit.errors import BackendError

__all__ = ["Cpu", "CpuFault", "TripleFault", "UcError", "counter_offset", "unicorn"]

#: the unicorn module, untyped where its own hints are incomplete
unicorn: Any = _unicorn_module
#: unicorn's exception (``.errno`` holds a ``UC_ERR_*`` code)
UcError: type[Exception] = unicorn.UcError

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
        self._mode = _engine_mode(self.uc)
        self._mode.value = unicorn.UC_MODE_64
        # No exit address: slices end by time, count or stop. With an ``until``
        # address unicorn translates ``until - 1`` through the guest's page
        # tables when a slice ends; unmapped there (as in Linux), that
        # overwrites CR2 after a page fault and turns the next one into #DF.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        offset = counter_offset()
        self._counter: Any = (
            None if offset is None else ctypes.c_size_t.from_address(self.uc._uch.value + offset)
        )
        self._last_count = 0

    # -- registers ---------------------------------------------------------------------------------
    def reg(self, reg: int) -> int:
        """Read a register (unsigned)."""
        value = int(self.uc.reg_read(reg))
        return value & _MASK64 if value < 0 else value

    def set_reg(self, reg: int, value: int) -> None:
        """Write a register.

        A segment register is loaded as the CPU would in its current mode: a
        real-mode base (selector * 16), or the GDT descriptor in protected
        and long mode.

        Raises:
            CpuFault: a protected-mode selector that cannot be loaded.
        """
        if reg not in _SEGMENTS:
            self.uc.reg_write(reg, value)
            return
        self._mode.value = unicorn.UC_MODE_16 if self.real_mode else unicorn.UC_MODE_32
        try:
            self.uc.reg_write(reg, value)
        except UcError as exc:
            raise CpuFault(f"segment selector {value:#06x} cannot be loaded: {exc}") from exc
        finally:
            self._mode.value = unicorn.UC_MODE_64

    def enter_ring0(self) -> None:
        """Drop the CPL to 0 before an interrupt loads a more privileged CS.

        unicorn checks segment loads against the current CPL, as ``mov`` to a
        segment register would; the CPU's own interrupt entry does not. A
        placeholder SS loaded through the 16-bit table (unchecked, DPL 0) sets
        CPL 0; the caller then loads CS and the real SS.
        """
        self._mode.value = unicorn.UC_MODE_16
        try:
            self.uc.reg_write(x86.UC_X86_REG_SS, 0)
        finally:
            self._mode.value = unicorn.UC_MODE_64

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

    def end_exception(self) -> None:
        """Tell the engine the exception it reported has been delivered.

        QEMU's CPU remembers the exception being delivered until its own
        interrupt entry finishes, and turns a second #PF (or contributory
        fault) into #DF. Unicorn hands exceptions to our hook instead and
        never finishes that entry, so the memory would stay set and the
        guest's next page fault would be a double fault. This clears it in
        the engine's context (a no-op when nothing is pending).
        """
        offset = _old_exception_offset()
        if offset is None:
            return
        ctx = self.uc.context_save()
        blob = bytes(ctx)
        if blob[offset : offset + 4] == _NO_EXCEPTION:
            return
        patched = blob[:offset] + _NO_EXCEPTION + blob[offset + 4 :]
        ctx.__setstate__((patched, ctx.size, ctx.arch, ctx.mode))
        self.uc.context_restore(ctx)

    def gpr64(self, index: int) -> int:
        """General register ``index`` (0=RAX ... 15=R15), all 64 bits."""
        return self.reg(_GPR64[index])

    def set_gpr64(self, index: int, value: int) -> None:
        """Write general register ``index`` with all 64 bits."""
        self.uc.reg_write(_GPR64[index], value & _MASK64)

    @property
    def rip(self) -> int:
        """The instruction pointer, all 64 bits."""
        return self.reg(x86.UC_X86_REG_RIP)

    def set_rip(self, value: int) -> None:
        """Write the instruction pointer (all 64 bits)."""
        self.uc.reg_write(x86.UC_X86_REG_RIP, value & _MASK64)

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
        # after a snapshot RAM is copy-on-write over the snapshot's copy, where
        # MADV_DONTNEED alone would bring that copy back: ramstore zeroes it then
        ramstore.forget(self)
        try:
            self.ram.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError):
            ctypes.memset(self._ram_ptr, 0, self.memory_size)
        self.flush_code()

    def flush_code(self) -> None:
        """Drop all translated code (after RAM was replaced behind the engine's back)."""
        self.uc.ctl_flush_tb()

    # -- running -----------------------------------------------------------------------------------
    def run(self, *, count: int) -> None:
        """Run from the current CS:RIP for at most ``count`` instructions.

        The slice ends early on ``hlt``, an engine error, or a :meth:`stop`
        from a hook.

        Raises:
            unicorn.UcError: the engine stopped on an error (invalid opcode, bad memory).
        """
        # in 64-bit engine mode emu_start sets RIP to ``begin`` as is
        self._last_count = count
        self.uc.emu_start(self.rip, 0, count=count)

    def slice_progress(self) -> int:
        """Instructions the running slice has executed so far (this one included).

        Read from a hook on the CPU thread; 0 without the engine's counter.
        """
        return 0 if self._counter is None else int(self._counter.value)

    def budget_used(self) -> bool | None:
        """Whether the last count-limited :meth:`run` executed its whole budget.

        False means it ended early: on ``hlt``, an error or a stop. None when
        this unicorn build's instruction counter was not found (see
        :func:`counter_offset`) or the slice had no count.
        """
        if self._counter is None or not self._last_count:
            return None
        # unicorn counts an instruction before running it and stops when the
        # count passes the budget: count + 1 means the budget ran out
        return int(self._counter.value) > self._last_count

    def stop(self) -> None:
        """End the running slice (from a hook on the CPU thread).

        Stopping the engine from another thread at a random point derailed
        Linux guests now and then; the machine never does it.
        """
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
_GPR64 = (
    x86.UC_X86_REG_RAX,
    x86.UC_X86_REG_RCX,
    x86.UC_X86_REG_RDX,
    x86.UC_X86_REG_RBX,
    x86.UC_X86_REG_RSP,
    x86.UC_X86_REG_RBP,
    x86.UC_X86_REG_RSI,
    x86.UC_X86_REG_RDI,
    x86.UC_X86_REG_R8,
    x86.UC_X86_REG_R9,
    x86.UC_X86_REG_R10,
    x86.UC_X86_REG_R11,
    x86.UC_X86_REG_R12,
    x86.UC_X86_REG_R13,
    x86.UC_X86_REG_R14,
    x86.UC_X86_REG_R15,
)
_SEGMENTS = (
    x86.UC_X86_REG_CS,
    x86.UC_X86_REG_DS,
    x86.UC_X86_REG_ES,
    x86.UC_X86_REG_SS,
    x86.UC_X86_REG_FS,
    x86.UC_X86_REG_GS,
)


_NO_EXCEPTION = b"\xff\xff\xff\xff"  # old_exception = -1


@functools.cache
def _old_exception_offset() -> int | None:
    """Where unicorn's context holds ``env->old_exception`` (found by experiment).

    A scratch engine takes one page fault; the one 32-bit field that went
    from -1 to 14 is it. None if this unicorn build shows no such field.
    """
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x20000)
    uc.mem_write(0x1000, struct.pack("<Q", 0x2003))  # PML4 -> PDPT
    uc.mem_write(0x2000, struct.pack("<Q", 0x3003))  # PDPT -> PD
    uc.mem_write(0x3000, struct.pack("<Q", 0x83))  # one 2 MiB page at 0
    code = b"\x48\xb8" + struct.pack("<Q", 0x4000_0000) + b"\x8b\x00"  # mov rax, 1G; mov eax,[rax]
    uc.mem_write(0x10000, code)
    uc.reg_write(x86.UC_X86_REG_CR3, 0x1000)
    uc.reg_write(x86.UC_X86_REG_CR4, 0x20 | int(uc.reg_read(x86.UC_X86_REG_CR4)))
    uc.reg_write(x86.UC_X86_REG_CR0, CR0_PG | int(uc.reg_read(x86.UC_X86_REG_CR0)))
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    seen: list[int] = []

    def hook(engine: Any, vector: int, _data: Any) -> None:
        seen.append(vector)
        engine.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INTR, hook)
    before = bytes(uc.context_save())
    with contextlib.suppress(UcError):
        uc.emu_start(0x10000, 0, count=4)
    after = bytes(uc.context_save())
    if seen != [14]:
        return None
    found = [
        offset
        for offset in range(0, len(before) - 3, 4)
        if before[offset : offset + 4] == _NO_EXCEPTION
        and struct.unpack_from("<i", after, offset)[0] == 14
    ]
    return found[0] if len(found) == 1 else None


@functools.cache
def counter_offset() -> int | None:
    """Where unicorn's engine handle keeps ``emu_counter`` (found by experiment).

    ``emu_start(count=n)`` counts instructions in ``uc_struct.emu_counter``,
    followed by ``emu_count`` (n). A scratch engine runs a one-instruction
    loop with two budgets; the one offset holding ``(n + 1, n)`` after both
    is it. The handle is read through ``/proc/self/mem``, which fails
    cleanly instead of crashing on an unmapped page. None if not found (or
    not on Linux): callers then cannot tell a ``hlt`` from a used budget.
    """
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, b"\xeb\xfe")  # jmp $
    address = uc._uch.value
    span = 0x4000
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        seen = []
        for budget in (1000, 777):
            uc.emu_start(0x1000, 0, count=budget)
            seen.append((budget, os.pread(fd, span, address)))
    except (OSError, UcError):
        return None
    finally:
        os.close(fd)
    found = [
        offset
        for offset in range(0, span - 15, 8)
        if all(
            len(blob) >= offset + 16 and struct.unpack_from("<QQ", blob, offset) == (n + 1, n)
            for n, blob in seen
        )
    ]
    return found[0] if len(found) == 1 else None


def _engine_mode(uc: Any) -> ctypes.c_int32:
    """The ``mode`` field of the engine's ``uc_struct`` (it starts ``arch, mode``).

    Raises:
        BackendError: the handle does not start with x86 / 16-bit mode, so this
            unicorn build is laid out differently.
    """
    address = uc._uch.value  # the C handle behind the Python object
    fields = (ctypes.c_int32 * 2).from_address(address)
    if (fields[0], fields[1]) != (unicorn.UC_ARCH_X86, unicorn.UC_MODE_16):
        raise BackendError(
            f"unicorn {unicorn.__version__} lays out its engine differently than the emulator "
            "expects; install the unicorn version virtkit supports (pip install 'unicorn>=2,<3')"
        )
    return ctypes.c_int32.from_address(address + 4)

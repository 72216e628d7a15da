"""CPUID, RDTSC and RDTSCP: instructions the emulator answers instead of unicorn.

* **CPUID** reports unicorn's CPU model (an Intel Haswell) minus what the
  emulated PC does not have or would make runs depend on the host: no local
  APIC (the PC has only the 8259 PIC), no x2APIC or TSC-deadline timer, no
  RDRAND/RDSEED (their values come from the host's random source, so a
  virtual-clock run would not repeat). The other answers are unicorn's own,
  read once per leaf from a scratch engine.
* **RDTSC/RDTSCP** return guest time at 1 GHz: one tick per guest
  nanosecond. With ``clock="virtual"`` that is the instruction count so far
  (8 ns each), exact to the instruction inside a slice, so the TSC, the PIT
  and the RTC agree and two runs read the same values; with the wall clock it
  is the machine's clock, which stops while the guest is paused (unicorn's
  own TSC follows the host and keeps running).

The Python binding wraps instruction hooks only for IN, OUT, SYSCALL and
CPUID; RDTSC and RDTSCP hooks exist in the engine and are added here
through the binding's low-level hook call, with registers written in one
batch call (see :class:`_RegisterWriter`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

from virtkit.backends.emulator.cpu import Cpu, UcError, unicorn
from virtkit.errors import BackendError

__all__ = ["CPUID_HIDDEN", "TSC_HZ", "install", "native_cpuid"]

#: the TSC's rate: one tick per guest nanosecond
TSC_HZ = 1_000_000_000
MSR_TSC_AUX = 0xC000_0103

#: (leaf, register) -> feature bits cleared from unicorn's answer
CPUID_HIDDEN: dict[tuple[int, str], int] = {
    (1, "edx"): 1 << 9,  # APIC: there is no local APIC
    (1, "ecx"): (1 << 21) | (1 << 24) | (1 << 30),  # x2APIC, TSC-deadline, RDRAND
    (7, "ebx"): 1 << 18,  # RDSEED
}

_INSN_CFUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_REGS = ("eax", "ebx", "ecx", "edx")
_REG_IDS = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX)


@functools.cache
def native_cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """Unicorn's own CPUID answer (EAX, EBX, ECX, EDX) for ``leaf``/``subleaf``."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\x0f\xa2")  # cpuid
    uc.reg_write(x86.UC_X86_REG_RAX, leaf)
    uc.reg_write(x86.UC_X86_REG_RCX, subleaf)
    uc.emu_start(0, 2)
    values = [int(uc.reg_read(reg)) & 0xFFFF_FFFF for reg in _REG_IDS]
    return values[0], values[1], values[2], values[3]


def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """The emulated CPU's CPUID answer: unicorn's, minus :data:`CPUID_HIDDEN`."""
    values = list(native_cpuid(leaf, subleaf if leaf in (4, 7, 0xB, 0xD) else 0))
    for index, name in enumerate(_REGS):
        values[index] &= ~CPUID_HIDDEN.get((leaf, name), 0)
    return values[0], values[1], values[2], values[3]


class _RegisterWriter:
    """Writes a fixed list of registers in one engine call (``uc_reg_write_batch``).

    An RDTSC hook runs millions of times in a Linux boot (the TSC is its clock
    source); the binding's ``reg_write`` made each one cost ~13 us, this ~2 us.
    """

    def __init__(self, uc: Any, registers: tuple[int, ...]) -> None:
        count = len(registers)
        self._handle = uc._uch
        self._registers = (ctypes.c_int * count)(*registers)
        self.values = (ctypes.c_uint64 * count)()
        base = ctypes.addressof(self.values)
        self._pointers = (ctypes.c_void_p * count)(*(base + 8 * i for i in range(count)))
        self._count = count
        self._write = uclib.uc_reg_write_batch

    def write(self) -> None:
        """Store :attr:`values` into the registers."""
        self._write(self._handle, self._registers, self._pointers, self._count)


class _MsrReader:
    """Reads one MSR through the engine's C call with a preallocated argument.

    The binding's ``msr_read`` builds its argument and picks the register class
    on every call (about 9 us); RDTSCP reads ``IA32_TSC_AUX`` each time and
    Linux executes it millions of times in a boot (``rdtsc_ordered``).
    """

    def __init__(self, uc: Any, msr: int) -> None:
        self._handle = uc._uch
        self._arg = _MsrArg(msr, 0)
        self._ref = ctypes.byref(self._arg)
        self._read = uclib.uc_reg_read

    def read(self) -> int:
        """The MSR's current value."""
        if self._read(self._handle, x86.UC_X86_REG_MSR, self._ref) != unicorn.UC_ERR_OK:
            raise BackendError("unicorn could not read IA32_TSC_AUX")
        return int(self._arg.val)


class _MsrArg(ctypes.Structure):
    """``uc_x86_msr``: the MSR's index and its value."""

    _fields_ = (("rid", ctypes.c_uint32), ("val", ctypes.c_uint64))


def install(cpu: Cpu, tsc: Callable[[], int], fail: Callable[[str], None]) -> None:
    """Hook CPUID, RDTSC and RDTSCP on ``cpu``; ``tsc()`` gives the counter's value.

    ``fail`` is called (on the CPU thread) with a reason if answering fails.

    Raises:
        BackendError: this unicorn build cannot hook RDTSC/RDTSCP.
    """
    uc = cpu.uc
    four = _RegisterWriter(uc, _REG_IDS)
    edx_eax = _RegisterWriter(uc, (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RDX))
    three = _RegisterWriter(uc, (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RCX))
    tsc_aux = _MsrReader(uc, MSR_TSC_AUX)

    def guarded(body: Callable[[], None]) -> Callable[[Any, Any], int]:
        def callback(_handle: Any, _data: Any) -> int:
            try:
                body()
            except Exception as exc:
                fail(f"emulator internal error in an instruction hook: {exc!r}")
            return 1  # the engine skips its own version of the instruction

        return callback

    def do_cpuid() -> None:
        leaf = cpu.reg(x86.UC_X86_REG_EAX) & 0xFFFF_FFFF
        subleaf = cpu.reg(x86.UC_X86_REG_ECX) & 0xFFFF_FFFF
        four.values[:] = list(cpuid(leaf, subleaf))
        four.write()

    def do_rdtsc() -> None:
        value = tsc()
        values = edx_eax.values
        values[0] = value & 0xFFFF_FFFF
        values[1] = (value >> 32) & 0xFFFF_FFFF
        edx_eax.write()

    def do_rdtscp() -> None:
        aux = tsc_aux.read() & 0xFFFF_FFFF
        value = tsc()
        three.values[:] = [value & 0xFFFF_FFFF, (value >> 32) & 0xFFFF_FFFF, aux]
        three.write()

    add = getattr(uc, "_Uc__do_hook_add", None)
    if add is None:
        raise BackendError(
            f"unicorn {unicorn.__version__}'s Python binding has no low-level hook call; "
            "install the unicorn version virtkit supports (pip install 'unicorn>=2.1,<3')"
        )
    for insn, body in (
        (x86.UC_X86_INS_CPUID, do_cpuid),
        (x86.UC_X86_INS_RDTSC, do_rdtsc),
        (x86.UC_X86_INS_RDTSCP, do_rdtscp),
    ):
        try:
            add(unicorn.UC_HOOK_INSN, _INSN_CFUNC(guarded(body)), 1, 0, ctypes.c_int(insn))
        except UcError as exc:
            raise BackendError(
                f"unicorn {unicorn.__version__} cannot hook instruction {insn}: {exc}"
            ) from exc

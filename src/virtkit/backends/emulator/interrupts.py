"""Interrupt and exception delivery, done in Python because unicorn does not do it.

Unicorn reports every software interrupt and CPU exception to a hook and
leaves the CPU where it was; a real x86 instead enters the handler the
interrupt table names. :func:`deliver` does that entry, as the Intel SDM
(vol. 3, chapter 6) describes it:

* real mode: push FLAGS, CS, IP; clear IF and TF; jump through the IVT.
* protected mode: 32- and 16-bit interrupt and trap gates, with a stack
  switch from the TSS (SS0:ESP0) when the handler runs at a higher
  privilege; an error code for the exceptions that have one.
* long mode: 64-bit gates, IST stacks, RSP0 from the 64-bit TSS, the
  16-byte aligned frame.

An entry the CPU cannot use (outside the IDT limit, not present, a task
gate) turns into #GP, then #DF; when even that fails it is a triple fault,
reported as :class:`TripleFault`. Tables and stacks are read through the
guest's page tables (:class:`Mmu`).
"""

from __future__ import annotations

import struct

from unicorn import x86_const as x86

from virtkit.backends.emulator.cpu import (
    CR0_PG,
    EFER,
    EFER_LMA,
    FLAG_IF,
    FLAG_TF,
    Cpu,
    CpuFault,
    TripleFault,
)

__all__ = [
    "ERROR_CODE_VECTORS",
    "Mmu",
    "PageFault",
    "deliver",
    "enter_syscall",
    "page_fault_error_code",
    "syscall_length",
]

#: exceptions that push an error code
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_NT = 0x4000
_RF = 0x10000
_VM = 0x20000
_ADDR = 0x000F_FFFF_FFFF_F000
CR4_PSE = 0x10
CR4_PAE = 0x20


class PageFault(CpuFault):
    """A linear address the guest's page tables do not map."""


class Mmu:
    """Linear-to-physical translation through the guest's current page tables."""

    def __init__(self, cpu: Cpu) -> None:
        self.cpu = cpu
        self.cr0 = cpu.reg(x86.UC_X86_REG_CR0)
        self.cr3 = cpu.reg(x86.UC_X86_REG_CR3)
        self.cr4 = cpu.reg(x86.UC_X86_REG_CR4)
        self.long = cpu.long_mode

    def _entry(self, table: int, index: int, size: int) -> int:
        raw = self.cpu.read(table + index * size, size)
        return int.from_bytes(raw, "little")

    def translate(self, linear: int) -> int:
        """The physical address of ``linear``.

        Raises:
            PageFault: it is not mapped.
        """
        if not self.cr0 & CR0_PG:
            return linear & 0xFFFF_FFFF
        if self.long:
            table = self.cr3 & _ADDR
            for shift, leaf_ok in ((39, False), (30, True), (21, True), (12, True)):
                entry = self._entry(table, (linear >> shift) & 0x1FF, 8)
                if not entry & 1:
                    raise PageFault(f"linear address {linear:#x} is not mapped")
                if shift == 12 or (leaf_ok and entry & 0x80):
                    mask = (1 << shift) - 1
                    return (entry & _ADDR & ~mask) | (linear & mask)
                table = entry & _ADDR
            raise PageFault(f"linear address {linear:#x} is not mapped")  # pragma: no cover
        if self.cr4 & CR4_PAE:
            pdpte = self._entry(self.cr3 & 0xFFFF_FFE0, (linear >> 30) & 3, 8)
            if not pdpte & 1:
                raise PageFault(f"linear address {linear:#x} is not mapped")
            pde = self._entry(pdpte & _ADDR, (linear >> 21) & 0x1FF, 8)
            if not pde & 1:
                raise PageFault(f"linear address {linear:#x} is not mapped")
            if pde & 0x80:
                return (pde & _ADDR & ~0x1FFFFF) | (linear & 0x1FFFFF)
            pte = self._entry(pde & _ADDR, (linear >> 12) & 0x1FF, 8)
        else:
            pde = self._entry(self.cr3 & 0xFFFF_F000, (linear >> 22) & 0x3FF, 4)
            if not pde & 1:
                raise PageFault(f"linear address {linear:#x} is not mapped")
            if pde & 0x80 and self.cr4 & CR4_PSE:
                return (pde & 0xFFC0_0000) | (linear & 0x3F_FFFF)
            pte = self._entry(pde & 0xFFFF_F000, (linear >> 12) & 0x3FF, 4)
        if not pte & 1:
            raise PageFault(f"linear address {linear:#x} is not mapped")
        return (pte & _ADDR) | (linear & 0xFFF)

    def read(self, linear: int, length: int) -> bytes:
        """Read guest memory by linear address (page by page)."""
        out = bytearray()
        while length > 0:
            chunk = min(length, 0x1000 - (linear & 0xFFF))
            out += self.cpu.read(self.translate(linear), chunk)
            linear += chunk
            length -= chunk
        return bytes(out)

    def write(self, linear: int, data: bytes) -> None:
        """Write guest memory by linear address."""
        while data:
            chunk = min(len(data), 0x1000 - (linear & 0xFFF))
            self.cpu.write(self.translate(linear), data[:chunk])
            linear += chunk
            data = data[chunk:]


PF_PRESENT = 0x1
PF_WRITE = 0x2
PF_USER = 0x4


def page_fault_error_code(cpu: Cpu, linear: int) -> int:
    """A #PF error code for a fault at ``linear``, rebuilt from the page tables.

    Unicorn reports the fault (and sets CR2) but not the error code the CPU
    computed. The code is rebuilt: P if the page is mapped, U if the CPU was
    at CPL 3, and W if the page is mapped but not writable (a read of a
    mapped page does not fault, so that fault was a write). A write to a
    page that is not present is reported as a read: the kernel maps the
    page, the write faults again as P|W, and takes its copy-on-write path
    then — one extra fault, the same outcome.
    """
    code = PF_USER if cpu.cs & 3 == 3 else 0
    mmu = Mmu(cpu)
    if not mmu.cr0 & CR0_PG or not mmu.long:
        return code
    table = mmu.cr3 & _ADDR
    writable = user = True
    for shift in (39, 30, 21, 12):
        entry = mmu._entry(table, (linear >> shift) & 0x1FF, 8)
        if not entry & 1:
            return code
        writable &= bool(entry & 0x2)
        user &= bool(entry & 0x4)
        if shift == 12 or (shift < 39 and entry & 0x80):
            break
        table = entry & _ADDR
    code |= PF_PRESENT
    if not writable and (user or not code & PF_USER):  # not a user/supervisor violation
        code |= PF_WRITE
    return code


def deliver(
    cpu: Cpu,
    vector: int,
    return_ip: int,
    *,
    software: bool = False,
    external: bool = False,
    error_code: int | None = None,
) -> None:
    """Enter the guest's handler for ``vector`` as the CPU would.

    Args:
        cpu: the CPU, stopped inside an interrupt hook or between slices.
        vector: interrupt or exception number.
        return_ip: where the handler's IRET returns (the next instruction for
            traps and ``int n``, the faulting one for faults).
        software: raised by an INT instruction (gate DPL is checked).
        external: a hardware interrupt (never has an error code).
        error_code: pushed for exceptions that have one (0 if unknown).

    Raises:
        TripleFault: the interrupt, then #GP, then #DF could not be delivered.
        CpuFault: the entry needs something the emulator does not model
            (task gates, virtual-8086 mode).
    """
    if cpu.real_mode:
        _deliver_real(cpu, vector, return_ip)
        return
    if error_code is None and not (software or external) and vector in ERROR_CODE_VECTORS:
        error_code = 0
    attempts = [(vector, error_code, software)]
    problems = []
    for _ in range(3):
        vec, code, soft = attempts[-1]
        try:
            if cpu.long_mode:
                _deliver_long(cpu, vec, return_ip, code, soft)
            else:
                _deliver_protected(cpu, vec, return_ip, code, soft)
            return
        except _Undeliverable as exc:
            problems.append(f"vector {vec:#04x}: {exc}")
            if vec == 8:
                break
            nxt = 8 if vec == 13 or (not soft and vec in ERROR_CODE_VECTORS) else 13
            attempts.append((nxt, 0, False))
        except PageFault as exc:
            problems.append(f"vector {vec:#04x}: {exc}")
            if vec == 8:
                break
            attempts.append((8, 0, False))
    raise TripleFault("; then ".join(problems) + f" ({cpu.mode_name()} mode)")


class _Undeliverable(Exception):
    """The gate cannot be used (the CPU raises #GP)."""


def _deliver_real(cpu: Cpu, vector: int, return_ip: int) -> None:
    idt_base, idt_limit = cpu.idtr()
    if vector * 4 + 3 > idt_limit:
        raise TripleFault(
            f"interrupt vector {vector:#04x} is beyond the real-mode IDT limit {idt_limit:#x}"
        )
    flags = cpu.eflags
    ss = cpu.reg(x86.UC_X86_REG_SS) & 0xFFFF
    sp = cpu.reg(x86.UC_X86_REG_SP) & 0xFFFF
    for word in (flags & 0xFFFF, cpu.cs, return_ip & 0xFFFF):
        sp = (sp - 2) & 0xFFFF
        cpu.write16((ss << 4) + sp, word)
    cpu.set_reg(x86.UC_X86_REG_SP, sp)
    cpu.set_reg(x86.UC_X86_REG_EFLAGS, flags & ~(FLAG_IF | FLAG_TF))
    off = cpu.read16(idt_base + vector * 4)
    seg = cpu.read16(idt_base + vector * 4 + 2)
    cpu.set_reg(x86.UC_X86_REG_CS, seg)
    cpu.set_reg(x86.UC_X86_REG_EIP, off)


def _descriptor(cpu: Cpu, mmu: Mmu, selector: int) -> tuple[int, int, int]:
    """(base, limit, access+flags word) of a GDT descriptor."""
    if selector & 4:
        raise _Undeliverable(f"selector {selector:#x} is in an LDT (not modelled)")
    gdt = cpu.uc.reg_read(x86.UC_X86_REG_GDTR)
    gdt_base, gdt_limit = int(gdt[1]), int(gdt[2])
    index = selector & ~7
    if index == 0 or index + 7 > gdt_limit:
        raise _Undeliverable(f"selector {selector:#x} is outside the GDT (limit {gdt_limit:#x})")
    raw = struct.unpack("<Q", mmu.read(gdt_base + index, 8))[0]
    base = ((raw >> 16) & 0xFFFFFF) | ((raw >> 56) << 24)
    limit = (raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16)
    flags = (raw >> 40) & 0xF0FF
    if flags & 0x8000:  # granularity
        limit = (limit << 12) | 0xFFF
    if not flags & 0x80:
        raise _Undeliverable(f"segment {selector:#x} is not present")
    return base, limit, flags


def _tss_base(cpu: Cpu) -> int:
    tr = cpu.uc.reg_read(x86.UC_X86_REG_TR)
    return int(tr[1])  # (selector, base, limit, flags)


def _deliver_protected(
    cpu: Cpu, vector: int, return_ip: int, error_code: int | None, software: bool
) -> None:
    mmu = Mmu(cpu)
    idt_base, idt_limit = cpu.idtr()
    if vector * 8 + 7 > idt_limit:
        raise _Undeliverable(f"beyond the IDT limit {idt_limit:#x}")
    raw = struct.unpack("<Q", mmu.read(idt_base + vector * 8, 8))[0]
    kind = (raw >> 40) & 0x1F
    present = (raw >> 47) & 1
    dpl = (raw >> 45) & 3
    if not present:
        raise _Undeliverable("the IDT entry is not present")
    if kind == 0x05:
        raise CpuFault(f"vector {vector:#04x} uses a task gate, which the emulator does not model")
    if kind not in (0x06, 0x07, 0x0E, 0x0F):
        raise _Undeliverable(f"the IDT entry has type {kind:#x}, not an interrupt or trap gate")
    cpl = cpu.cs & 3
    if software and dpl < cpl:
        raise _Undeliverable(f"gate DPL {dpl} is below CPL {cpl}")
    selector = (raw >> 16) & 0xFFFF
    offset = (raw & 0xFFFF) | ((raw >> 32) & 0xFFFF0000)
    wide = kind in (0x0E, 0x0F)
    if not wide:
        offset &= 0xFFFF
    _, _, target_flags = _descriptor(cpu, mmu, selector)
    target_dpl = (target_flags >> 5) & 3
    flags = cpu.eflags
    if flags & _VM:
        raise CpuFault("interrupts in virtual-8086 mode are not modelled by the emulator")
    old_ss = cpu.reg(x86.UC_X86_REG_SS) & 0xFFFF
    old_esp = cpu.reg(x86.UC_X86_REG_ESP) & 0xFFFF_FFFF
    frame = []
    if target_dpl < cpl:  # to an inner ring: the TSS gives the new stack
        tss = _tss_base(cpu)
        esp, ss = struct.unpack("<IH", mmu.read(tss + 4 + 8 * target_dpl, 6))
        frame += [old_ss, old_esp]
    else:
        ss, esp = old_ss, old_esp
    frame += [flags, cpu.cs, return_ip & 0xFFFF_FFFF]
    if error_code is not None:
        frame.append(error_code)
    ss_base, _, ss_flags = _descriptor(cpu, mmu, ss)
    word = 4 if wide else 2
    big_stack = bool(ss_flags & 0x4000)
    for value in frame:
        esp = (esp - word) & (0xFFFF_FFFF if big_stack else 0xFFFF)
        mmu.write(ss_base + esp, (value & ((1 << (8 * word)) - 1)).to_bytes(word, "little"))
    new_flags = flags & ~(FLAG_TF | _NT | _RF | _VM)
    if kind in (0x06, 0x0E):
        new_flags &= ~FLAG_IF
    cpu.set_reg(x86.UC_X86_REG_EFLAGS, new_flags)
    if target_dpl < cpl:
        cpu.enter_ring0()
    cpu.set_reg(x86.UC_X86_REG_CS, (selector & ~3) | target_dpl)
    if target_dpl < cpl:
        cpu.set_reg(x86.UC_X86_REG_SS, ss | target_dpl)
    cpu.set_reg(x86.UC_X86_REG_ESP, esp)
    cpu.set_reg(x86.UC_X86_REG_EIP, offset)


def _deliver_long(
    cpu: Cpu, vector: int, return_ip: int, error_code: int | None, software: bool
) -> None:
    mmu = Mmu(cpu)
    idt_base, idt_limit = cpu.idtr()
    if vector * 16 + 15 > idt_limit:
        raise _Undeliverable(f"beyond the IDT limit {idt_limit:#x}")
    lo, hi = struct.unpack("<QQ", mmu.read(idt_base + vector * 16, 16))
    kind = (lo >> 40) & 0x1F
    present = (lo >> 47) & 1
    dpl = (lo >> 45) & 3
    if not present:
        raise _Undeliverable("the IDT entry is not present")
    if kind not in (0x0E, 0x0F):
        raise _Undeliverable(f"the IDT entry has type {kind:#x}, not a 64-bit gate")
    cpl = cpu.cs & 3
    if software and dpl < cpl:
        raise _Undeliverable(f"gate DPL {dpl} is below CPL {cpl}")
    selector = (lo >> 16) & 0xFFFF
    ist = (lo >> 32) & 7
    offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFF_FFFF) << 32)
    _, _, target_flags = _descriptor(cpu, mmu, selector)
    target_dpl = (target_flags >> 5) & 3
    old_ss = cpu.reg(x86.UC_X86_REG_SS) & 0xFFFF
    old_rsp = cpu.gpr64(4)
    flags = cpu.eflags
    if ist:
        rsp = struct.unpack("<Q", mmu.read(_tss_base(cpu) + 0x24 + 8 * (ist - 1), 8))[0]
    elif target_dpl < cpl:
        rsp = struct.unpack("<Q", mmu.read(_tss_base(cpu) + 4 + 8 * target_dpl, 8))[0]
    else:
        rsp = old_rsp
    rsp &= ~0xF
    frame = [old_ss, old_rsp, flags, cpu.cs, return_ip]
    if error_code is not None:
        frame.append(error_code)
    for value in frame:
        rsp = (rsp - 8) & ((1 << 64) - 1)
        mmu.write(rsp, (value & ((1 << 64) - 1)).to_bytes(8, "little"))
    new_flags = flags & ~(FLAG_TF | _NT | _RF)
    if kind == 0x0E:
        new_flags &= ~FLAG_IF
    cpu.set_reg(x86.UC_X86_REG_EFLAGS, new_flags)
    if target_dpl < cpl:
        cpu.enter_ring0()  # leaves SS null with RPL 0, as a long-mode ring switch does
    cpu.set_reg(x86.UC_X86_REG_CS, (selector & ~3) | target_dpl)
    cpu.set_gpr64(4, rsp)
    cpu.set_rip(offset)


MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_FMASK = 0xC000_0084
EFER_SCE = 0x1
_SYSCALL_OPCODE = b"\x0f\x05"
_CS_LONG = 0x2000  # the L bit, in _descriptor()'s flags word


def syscall_length(cpu: Cpu, rip: int, cs_base: int = 0) -> int:
    """The length of the SYSCALL instruction at ``rip`` (prefixes included).

    Raises:
        PageFault: the instruction's bytes are not mapped.
    """
    mmu = Mmu(cpu)
    code = b""
    for _ in range(15):  # the longest x86 instruction
        code += mmu.read(cs_base + rip + len(code), 1)
        if code.endswith(_SYSCALL_OPCODE):
            return len(code)
    raise CpuFault(f"no SYSCALL instruction at {rip:#x}")  # pragma: no cover - unicorn said so


def enter_syscall(cpu: Cpu, length: int) -> None:
    """Do what SYSCALL does, for the instruction of ``length`` bytes at RIP.

    Unicorn does not implement SYSCALL: it reports it to an instruction hook
    and then moves RIP past it, as if it were a NOP. This does the entry the
    CPU would (Intel SDM vol. 2B, SYSCALL): RCX gets the return address, R11
    RFLAGS, RFLAGS is masked with IA32_FMASK, CS and SS are loaded from
    IA32_STAR[47:32] (ring 0), and RIP from IA32_LSTAR (IA32_CSTAR from
    compatibility mode; STAR[31:0] outside long mode). With EFER.SCE clear
    it is #UD instead. Because unicorn adds ``length`` to RIP once the hook
    returns, RIP is left ``length`` bytes before the target.

    Raises:
        TripleFault: the #UD could not be delivered.
    """
    uc = cpu.uc
    rip = cpu.rip
    efer = int(uc.msr_read(EFER))
    if not efer & EFER_SCE:
        deliver(cpu, 6, rip)
        cpu.set_rip(cpu.rip - length)
        return
    star = int(uc.msr_read(MSR_STAR))
    selector = (star >> 32) & 0xFFFC
    flags = cpu.eflags
    if efer & EFER_LMA:
        try:
            _, _, cs_flags = _descriptor(cpu, Mmu(cpu), cpu.cs)
        except (_Undeliverable, PageFault):
            cs_flags = _CS_LONG  # a user CS the GDT does not hold: treat as 64-bit
        code64 = bool(cs_flags & _CS_LONG)
        target = int(uc.msr_read(MSR_LSTAR if code64 else MSR_CSTAR))
        cpu.set_gpr64(1, rip + length)  # RCX
        cpu.set_gpr64(11, flags & ~_RF)  # R11
        new_flags = flags & ~(int(uc.msr_read(MSR_FMASK)) | _RF)
    else:
        target = star & 0xFFFF_FFFF
        cpu.set_gpr64(1, (rip + length) & 0xFFFF_FFFF)
        new_flags = flags & ~(FLAG_IF | _RF | _VM)
    cpu.set_reg(x86.UC_X86_REG_EFLAGS, new_flags)
    cpu.enter_ring0()
    cpu.set_reg(x86.UC_X86_REG_CS, selector)
    cpu.set_reg(x86.UC_X86_REG_SS, selector + 8)
    cpu.set_rip(target - length)

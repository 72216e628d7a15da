"""CPU behaviour Linux relies on that unicorn leaves to the emulator, checked with tiny guests.

Each guest is a boot sector that brings up long mode (the bring-up of the
``interrupts64`` test guest) and then exercises one thing: SYSCALL entry
(which unicorn reports to a hook and otherwise skips as a NOP), CPUID and the
time-stamp counter (answered by the emulator: see
``virtkit.backends.emulator.instructions``).
The guests print what they saw on COM1 and power off; a wrong entry prints
``bad ...`` or crashes.
"""

from __future__ import annotations

from pathlib import Path

from virtkit import images
from virtkit.backends.emulator import EmulatorHypervisor
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests

TIMEOUT = 30

#: long mode (entered straight from real mode) with the first 2 MiB
#: identity-mapped and user-accessible; a GDT with kernel code/data at
#: 0x08/0x10 and user data/code at 0x23/0x2B (the layout SYSCALL/SYSRET expect); an IDT at 0x5000; ``putc64`` (AL) and ``setgate``
#: (RAX handler, RDI gate). The guest's own code starts at the label ``main``
#: and reports with one character per step through ``putc64`` (AL).
_PRELUDE = """
bits 16
org 0x7C00
COM1 equ 0x3F8
PM1A_CNT equ 0x604
SLP_EN_S5 equ 0x2000
IDT equ 0x5000
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov di, 0x1000              ; PML4, PDPT, PD: the first 2 MiB, user-accessible
    xor eax, eax
    mov cx, 0x1000 * 3 / 4
    rep stosd
    mov byte [0x1000], 0x07
    mov byte [0x1001], 0x20
    mov byte [0x2000], 0x07
    mov byte [0x2001], 0x30
    mov byte [0x3000], 0x87
    mov eax, cr4
    or al, 1 << 5
    mov cr4, eax
    mov ax, 0x1000
    mov cr3, eax
    mov ecx, 0xC0000080         ; EFER.LME
    rdmsr
    or ah, 1
    wrmsr
    lgdt [gdtr]
    mov eax, cr0                ; straight from real mode to long mode
    or eax, 0x80000001
    mov cr0, eax
    jmp 0x08:lm
bits 64
lm:
    mov ax, 0x10
    mov ss, ax
    mov rsp, 0x7000
    mov edi, IDT
    xor eax, eax
    mov ecx, 32 * 2
    rep stosq
    lidt [rel idtr]
    jmp main
setgate:
    mov [rdi], ax
    mov word [rdi + 2], 0x08
    mov word [rdi + 4], 0x8E00
    shr rax, 16
    mov [rdi + 6], ax
    ret
putc64:                         ; AL to COM1 (its FIFO never fills here)
    mov dx, COM1
    out dx, al
    ret
off:
    mov dx, PM1A_CNT
    mov ax, SLP_EN_S5
    out dx, ax
    hlt
"""

_TABLES = """
align 8
gdt:
    dq 0
    dq 0x00AF9A000000FFFF
    dq 0x00CF92000000FFFF
    dq 0
    dq 0x00CFF2000000FFFF
    dq 0x00AFFA000000FFFF
gdtr:
    dw gdtr - gdt - 1
    dd gdt
idtr:
    dw 32 * 16 - 1
    dq IDT
"""

#: SYSCALL with EFER.SCE clear (#UD, whose handler sets SCE and retries), from
#: ring 0 (RCX, R11, the FMASK'd RFLAGS and CS checked), SYSRET to ring 3 and
#: SYSCALL from there (RAX and the return address checked).
SYSCALL_GUEST = (
    _PRELUDE
    + """
main:
    lea rax, [rel ud]
    mov edi, IDT + 6 * 16
    call setgate
    mov ecx, 0xC0000081         ; STAR: kernel CS 0x08, user base 0x18
    xor eax, eax
    mov edx, 0x00180008
    wrmsr
    inc ecx                     ; LSTAR
    lea rax, [rel entry]
    xor edx, edx
    wrmsr
    mov cl, 0x84                ; FMASK: IF and DF
    mov eax, 0x600
    wrmsr
    sti
    std
    syscall
ret0:
    mov al, 'R'                 ; SYSCALL fell through
    jmp fail

ud:                             ; #UD: SCE was clear; set it and retry
    mov al, 'U'
    call putc64
    mov ecx, 0xC0000080
    rdmsr
    or al, 1
    wrmsr
    iretq

entry:
    mov rsp, 0x7000
    mov bl, 'c'
    mov ax, cs
    cmp ax, 0x08
    jne bad
    mov ax, ss
    cmp ax, 0x10
    jne bad
    mov bl, 'f'
    pushfq
    pop rax
    test eax, 0x600             ; IF and DF masked
    jnz bad
    mov bl, 'r'
    cmp byte [count], 0
    jne .second
    inc byte [count]
    lea rax, [rel ret0]
    cmp rcx, rax
    jne bad
    mov bl, 'f'
    and r11d, 0x600             ; the saved RFLAGS had IF and DF set
    cmp r11d, 0x600
    jne bad
    mov al, '0'
    call putc64
    lea rcx, [rel user]
    mov r11d, 0x2
    o64 sysret
.second:
    lea rax, [rel ret3]
    cmp rcx, rax
    jne bad
    cmp r12, 42
    jne bad
    mov al, '3'
    jmp fail
bad:
    mov al, bl
fail:
    call putc64
    jmp off

user:
    mov ax, cs
    cmp ax, 0x2B
    jne user
    mov r12, 42
    syscall
ret3:
    jmp ret3

count: db 0
"""
    + _TABLES
    + "times 510 - ($ - $$) db 0\ndw 0xAA55\n"
)


#: CPUID without the local APIC and RDRAND bits; RDTSC across a counted loop on the
#: virtual clock (8 TSC ticks per instruction: 1003 instructions from one RDTSC to
#: the next); RDTSCP's ECX from IA32_TSC_AUX.
TSC_GUEST = (
    _PRELUDE
    + """
main:
    mov eax, 1
    cpuid
    mov al, 'A'
    test edx, 1 << 9            ; APIC
    jnz .nope
    test ecx, 1 << 30           ; RDRAND
    jnz .nope
    mov al, 'C'
.nope:
    call putc64
    rdtsc
    mov esi, eax
    mov ecx, 1000
.spin:
    loop .spin
    rdtsc
    sub eax, esi
    cmp eax, 1003 * 8
    mov al, 't'
    jne .tsc
    mov al, 'T'
.tsc:
    call putc64
    mov ecx, 0xC0000103         ; IA32_TSC_AUX
    mov eax, 0x55
    xor edx, edx
    wrmsr
    xor ecx, ecx
    rdtscp
    cmp ecx, 0x55
    mov al, 'p'
    jne .aux
    mov al, 'P'
.aux:
    call putc64
    jmp off
"""
    + _TABLES
    + "times 510 - ($ - $$) db 0\ndw 0xAA55\n"
)


def _run(hv: EmulatorHypervisor, tmp_path: Path, name: str, text: str) -> bytes:
    path = tmp_path / f"{name}.raw"
    with images.create(path, size="1MiB", format="raw") as image:
        image.write(0, guests.assemble(text, stem=name))
    guest = hv.define(Machine(name=name, memory="32MiB", disks=(Disk(str(path)),)))
    guest.start()
    assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF, guest.crash_reason
    return guest.console.output


def test_syscall_and_sysret(hv: EmulatorHypervisor, tmp_path: Path) -> None:
    """SYSCALL enters LSTAR at ring 0 with RCX/R11 saved and RFLAGS masked; #UD without
    EFER.SCE; SYSRET reaches ring 3 and SYSCALL comes back from there."""
    assert _run(hv, tmp_path, "syscall", SYSCALL_GUEST) == b"U03"


def test_cpuid_and_the_tsc_on_the_virtual_clock(vhv: EmulatorHypervisor, tmp_path: Path) -> None:
    """CPUID hides what the PC lacks; RDTSC counts 8 ticks per instruction (1 GHz of
    guest time at 8 ns per instruction), exactly, inside a slice; RDTSCP gives TSC_AUX."""
    assert _run(vhv, tmp_path, "tsc", TSC_GUEST) == b"CTP"

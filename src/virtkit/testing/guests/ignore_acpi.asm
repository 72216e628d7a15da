; ignore-acpi: say so, then halt with interrupts off forever: the ACPI
; power button is never looked at, so a graceful shutdown must time out.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
start:
    GUEST_START
    PRINT msg
.halt:
    cli
    hlt
    jmp .halt
msg: db "ignoring ACPI, halting with interrupts off", 13, 10, 0
BOOT_SIGNATURE

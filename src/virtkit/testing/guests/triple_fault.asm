; triple-fault: load an empty IDT and raise an interrupt. The CPU cannot
; deliver it (#GP), nor the #GP, nor the double fault: a triple fault.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
start:
    GUEST_START
    PRINT msg
    lidt [empty_idt]
    int 3
    PRINT survived
    POWER_OFF
empty_idt: dw 0
           dd 0
msg: db "triple fault next", 13, 10, 0
survived: db "still alive?", 13, 10, 0
BOOT_SIGNATURE

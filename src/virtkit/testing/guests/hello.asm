; hello: print a greeting on COM1, then power off through ACPI (PM1a_CNT).
bits 16
org 0x7C00
    jmp start
%include "common.inc"
start:
    GUEST_START
    PRINT msg
    POWER_OFF
msg: db "Hello from the virtkit hello guest!", 13, 10, 0
BOOT_SIGNATURE

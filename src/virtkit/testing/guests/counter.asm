; counter: print "count N" forever, one line per timer tick (sti/hlt paces it).
; The counter lives in memory, so a snapshot captures it. The ACPI power
; button (PWRBTN_STS, enabled in PM1a_EN) makes it say so and power off.
bits 16
org 0x7C00
    jmp start
%define NEED_PUTDEC
%include "common.inc"
start:
    GUEST_START
    mov dx, PM1A_EN
    mov ax, PWRBTN
    out dx, ax
    PRINT hello
.loop:
    PRINT count_msg
    mov eax, [counter]
    call putdec
    PRINT crlf
    inc dword [counter]
    mov dx, PM1A_STS
    in ax, dx
    test ax, PWRBTN
    jnz .button
    sti
    hlt
    jmp .loop
.button:
    mov dx, PM1A_STS
    mov ax, PWRBTN
    out dx, ax              ; write 1 to clear
    PRINT button
    POWER_OFF
align 4
counter: dd 0
hello: db "counter starts", 13, 10, 0
count_msg: db "count ", 0
button: db "power button pressed, bye", 13, 10, 0
crlf: db 13, 10, 0
BOOT_SIGNATURE

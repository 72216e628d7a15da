; echo: read COM1 input and echo it back; 'q' says bye and powers off.
; Waits with sti/hlt between polls so an idle guest does not spin.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
start:
    GUEST_START
    PRINT ready
.poll:
    mov dx, COM1 + 5
    in al, dx
    test al, 0x01           ; LSR.DR: a byte is waiting
    jnz .got
    sti
    hlt                     ; until the next timer tick
    jmp .poll
.got:
    mov dx, COM1
    in al, dx
    cmp al, 'q'
    je .quit
    cmp al, 13
    je .newline
    call putc
    jmp .poll
.newline:
    call putc
    mov al, 10
    call putc
    jmp .poll
.quit:
    PRINT bye
    POWER_OFF
ready: db "echo ready", 13, 10, 0
bye: db 13, 10, "bye", 13, 10, 0
BOOT_SIGNATURE

; echo-irq: like echo, but interrupt-driven: COM1's receive interrupt (IRQ4,
; unmasked at the PIC) runs a handler that echoes; the main loop only halts.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
start:
    GUEST_START
    cli
    mov word [0x0C * 4], isr
    mov word [0x0C * 4 + 2], 0
    mov dx, COM1 + 1
    mov al, 0x01            ; IER: received data available
    out dx, al
    in al, 0x21
    and al, 0xEF            ; unmask IRQ4
    out 0x21, al
    PRINT ready
    sti
.idle:
    hlt
    cmp byte [quit], 0
    je .idle
    PRINT bye
    POWER_OFF

isr:
    push ax
    push dx
.more:
    mov dx, COM1 + 5
    in al, dx
    test al, 0x01
    jz .done
    mov dx, COM1
    in al, dx
    cmp al, 'q'
    jne .echo
    mov byte [cs:quit], 1
    jmp .more
.echo:
    cmp al, 13
    jne .plain
    call putc
    mov al, 10
.plain:
    call putc
    jmp .more
.done:
    mov al, 0x20            ; EOI
    out 0x20, al
    pop dx
    pop ax
    iret

quit: db 0
ready: db "echo-irq ready", 13, 10, 0
bye: db 13, 10, "bye", 13, 10, 0
BOOT_SIGNATURE

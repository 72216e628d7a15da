; bios-info: print what the BIOS reports: the E820 memory map, the boot
; drive's geometry (int 13h AH=08h) and its EDD parameters (AH=48h).
bits 16
org 0x7C00
    jmp start
%define NEED_PUTDEC
%define NEED_PUTHEX
%include "common.inc"
BUF equ 0x8000
start:
    GUEST_START
    mov [drive], dl
    xor ebx, ebx
.e820:
    mov eax, 0xE820
    mov edx, 0x534D4150
    mov ecx, 20
    mov di, BUF
    int 0x15
    jc .disk
    PRINT e820_msg
    mov eax, [BUF + 4]
    call puthex
    mov eax, [BUF]
    call puthex
    mov al, ' '
    call putc
    mov eax, [BUF + 12]
    call puthex
    mov eax, [BUF + 8]
    call puthex
    mov al, ' '
    call putc
    mov eax, [BUF + 16]
    call putdec
    PRINT crlf
    test ebx, ebx
    jnz .e820
.disk:
    mov ah, 0x08
    mov dl, [drive]
    xor di, di
    int 0x13
    PRINT geo_msg
    movzx eax, cx
    call puthex
    mov al, ' '
    call putc
    movzx eax, dx
    call puthex
    PRINT crlf
    mov word [BUF], 0x1A
    mov ah, 0x48
    mov dl, [drive]
    mov si, BUF
    int 0x13
    PRINT edd_msg
    mov eax, [BUF + 16]
    call putdec
    mov al, ' '
    call putc
    movzx eax, word [BUF + 24]
    call putdec
    PRINT crlf
    POWER_OFF
drive: db 0
e820_msg: db "e820 ", 0
geo_msg: db "geometry ", 0
edd_msg: db "edd sectors ", 0
crlf: db 13, 10, 0
BOOT_SIGNATURE

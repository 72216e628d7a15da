; disk: read sectors 1 and 2 with int 13h CHS and print them, write sector 1
; (prefixed) to sector 2 with EDD/LBA (ah=43h), read sector 2 back with
; ah=42h, print it, power off.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
READ_BUF  equ 0x8000
WRITE_BUF equ 0x8400
BACK_BUF  equ 0x8800
start:
    GUEST_START
    mov [drive], dl
    ; CHS read: cylinder 0, head 0, sector 2 (= LBA 1), one sector to 0000:8000
    mov ax, 0x0201
    mov cx, 0x0002
    xor dh, dh
    mov dl, [drive]
    mov bx, READ_BUF
    int 0x13
    jc fail
    PRINT read_msg
    PRINT READ_BUF
    PRINT crlf
    ; CHS read of sector 3 (= LBA 2) to 0000:8800: what an earlier run wrote
    mov byte [BACK_BUF + 511], 0
    mov ax, 0x0201
    mov cx, 0x0003
    xor dh, dh
    mov dl, [drive]
    mov bx, BACK_BUF
    int 0x13
    jc fail
    PRINT before_msg
    PRINT BACK_BUF
    PRINT crlf
    ; EDD present?
    mov ah, 0x41
    mov bx, 0x55AA
    mov dl, [drive]
    int 0x13
    jc fail
    cmp bx, 0xAA55
    jne fail
    ; build the sector to write: prefix + what was read
    mov di, WRITE_BUF
    mov si, prefix
.copy1:
    lodsb
    test al, al
    jz .copy2s
    stosb
    jmp .copy1
.copy2s:
    mov si, READ_BUF
.copy2:
    lodsb
    stosb
    test al, al
    jnz .copy2
    ; LBA write of sector 2
    mov word [dap_buf], WRITE_BUF
    mov ah, 0x43
    xor al, al
    mov dl, [drive]
    mov si, dap
    int 0x13
    jc fail
    ; LBA read back
    mov word [dap_buf], BACK_BUF
    mov ah, 0x42
    mov dl, [drive]
    mov si, dap
    int 0x13
    jc fail
    PRINT back_msg
    PRINT BACK_BUF
    PRINT crlf
    PRINT done_msg
    POWER_OFF
fail:
    PRINT fail_msg
    POWER_OFF
drive: db 0
align 4
dap:     db 0x10, 0
         dw 1
dap_buf: dw 0, 0
         dq 2
read_msg: db "read: ", 0
before_msg: db "sector 2: ", 0
back_msg: db "readback: ", 0
prefix:   db "written by the disk guest: ", 0
done_msg: db "disk done", 13, 10, 0
fail_msg: db "disk error", 13, 10, 0
crlf:     db 13, 10, 0
BOOT_SIGNATURE

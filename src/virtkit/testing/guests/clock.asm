; clock: print what the guest sees of time, then power off: the BIOS tick
; count (int 1Ah), PIT channel 0's counter and the RTC seconds, eight times
; with busy work in between. Identical bytes on two runs need a virtual clock.
bits 16
org 0x7C00
    jmp start
%define NEED_PUTDEC
%include "common.inc"
start:
    GUEST_START
    mov cx, 8
.line:
    push cx
    PRINT tick_msg
    xor ah, ah
    int 0x1A
    movzx eax, dx
    call putdec
    PRINT pit_msg
    xor al, al
    out 0x43, al            ; latch channel 0
    in al, 0x40
    mov ah, al
    in al, 0x40
    xchg al, ah
    movzx eax, ax
    call putdec
    PRINT rtc_msg
    xor al, al
    out 0x70, al
    in al, 0x71
    movzx eax, al
    call putdec
    PRINT crlf
    mov ecx, 3000000        ; busy work between samples
.spin:
    dec ecx
    jnz .spin
    pop cx
    loop .line
    POWER_OFF
tick_msg: db "ticks ", 0
pit_msg: db " pit ", 0
rtc_msg: db " rtc ", 0
crlf: db 13, 10, 0
BOOT_SIGNATURE

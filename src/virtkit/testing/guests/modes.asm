; modes: print from 16-bit real mode, switch to 32-bit protected mode and
; print, enable paging and long mode and print from 64-bit code, power off.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
start:
    GUEST_START
    PRINT msg16
    cli
    in al, 0x92             ; fast A20
    or al, 2
    and al, 0xFE
    out 0x92, al
    lgdt [gdtr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:pm32

bits 32
pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7C00
    mov esi, msg32
    call puts32
    ; identity-map the first 2 MiB: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000
    mov edi, 0x1000
    xor eax, eax
    mov ecx, 3 * 1024
    rep stosd
    mov dword [0x1000], 0x2003
    mov dword [0x2000], 0x3003
    mov dword [0x3000], 0x83
    mov eax, cr4
    or eax, 1 << 5          ; PAE
    mov cr4, eax
    mov eax, 0x1000
    mov cr3, eax
    mov ecx, 0xC0000080     ; EFER
    rdmsr
    or eax, 1 << 8          ; LME
    wrmsr
    mov eax, cr0
    or eax, 1 << 31         ; PG
    mov cr0, eax
    jmp 0x18:lm64

puts32:
    lodsb
    test al, al
    jz .done
    mov ah, al
    mov dx, COM1 + 5
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    mov al, ah
    mov dx, COM1
    out dx, al
    jmp puts32
.done:
    ret

bits 64
lm64:
    mov rsi, msg64
.next:
    lodsb
    test al, al
    jz .off
    mov ah, al
    mov dx, COM1 + 5
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    mov al, ah
    mov dx, COM1
    out dx, al
    jmp .next
.off:
    mov dx, PM1A_CNT
    mov ax, SLP_EN_S5
    out dx, ax
.halt:
    cli
    hlt
    jmp .halt

align 8
gdt:
    dq 0
    dq 0x00CF9A000000FFFF   ; 0x08: 32-bit code
    dq 0x00CF92000000FFFF   ; 0x10: data
    dq 0x00AF9A000000FFFF   ; 0x18: 64-bit code
gdtr:
    dw gdtr - gdt - 1
    dd gdt
msg16: db "real mode: 16-bit", 13, 10, 0
msg32: db "protected mode: 32-bit", 13, 10, 0
msg64: db "long mode: 64-bit", 13, 10, 0
BOOT_SIGNATURE

; interrupts64: 64-bit long mode with an IDT of 64-bit gates: a breakpoint
; (int3) handled and returned from, then a page fault on an unmapped
; address whose handler prints CR2 and powers off.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
IDT equ 0x5000
start:
    GUEST_START
    cli
    lgdt [gdtr]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp 0x08:pm

bits 32
pm:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7000
    mov edi, 0x1000         ; PML4, PDPT, PD: identity-map the first 2 MiB
    xor eax, eax
    mov ecx, 0x1000 * 3 / 4
    rep stosd
    mov dword [0x1000], 0x2003
    mov dword [0x2000], 0x3003
    mov dword [0x3000], 0x83
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov eax, 0x1000
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov eax, cr0
    or eax, 1 << 31
    mov cr0, eax
    jmp 0x18:lm

bits 64
lm:
    mov rsp, 0x7000
    mov rdi, IDT
    xor eax, eax
    mov ecx, 16 * 4
    rep stosq               ; 16 gates
    lea rax, [rel breakpoint]
    mov edi, IDT + 3 * 16
    call setgate
    lea rax, [rel pagefault]
    mov edi, IDT + 14 * 16
    call setgate
    lidt [rel idtr]
    int3
    lea rsi, [rel msg_back]
    call puts64
    mov rax, [0x40000000]   ; not mapped
    lea rsi, [rel msg_lost]
    call puts64
    jmp off

setgate:                    ; rax = handler, rdi = gate
    mov [rdi], ax
    mov word [rdi + 2], 0x18
    mov word [rdi + 4], 0x8E00
    shr rax, 16
    mov [rdi + 6], ax
    ret

puts64:
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
    jmp puts64
.done:
    ret

breakpoint:
    lea rsi, [rel msg_bp]
    call puts64
    iretq
pagefault:
    lea rsi, [rel msg_pf]
    call puts64
    mov rbx, cr2
    shr rbx, 24
    add bl, 0x20            ; CR2 0x40000000 >> 24 = 0x40, + 0x20: prints "`"
    mov al, bl
    mov dx, COM1
    out dx, al
off:
    mov dx, PM1A_CNT
    mov ax, SLP_EN_S5
    out dx, ax
    hlt

align 8
gdt:
    dq 0
    dq 0x00CF9A000000FFFF
    dq 0x00CF92000000FFFF
    dq 0x00AF9A000000FFFF
gdtr:
    dw gdtr - gdt - 1
    dd gdt
idtr:
    dw 16 * 16 - 1
    dq IDT
msg_bp: db "int3 in long mode", 13, 10, 0
msg_back: db "back", 13, 10, 0
msg_pf: db "#PF ", 0
msg_lost: db "no", 0
BOOT_SIGNATURE

; usermode: 32-bit protected mode with a TSS; drop to ring 3 with iretd, then
; call back into ring 0 through a DPL-3 interrupt gate (int 0x30), which
; switches to the TSS stack. The kernel side prints for the user, then off.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
IDT equ 0x6000
TSS equ 0x6200
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
    mov edi, IDT            ; clear the IDT and the TSS after it
    xor eax, eax
    mov ecx, (TSS + 104 - IDT) / 4
    rep stosd
    mov dword [TSS + 4], 0x6F00   ; ESP0
    mov dword [TSS + 8], 0x10     ; SS0
    mov ax, 0x28
    ltr ax
    mov eax, syscall
    mov [IDT + 0x30 * 8], ax
    mov dword [IDT + 0x30 * 8 + 2], 0xEE000008   ; selector 0x08; P, DPL 3, 32-bit int gate
    shr eax, 16
    mov [IDT + 0x30 * 8 + 6], ax
    lidt [idtr]
    push dword 0x23         ; SS: user data, RPL 3
    push dword 0x5000       ; ESP
    push dword 0x2          ; EFLAGS
    push dword 0x1B         ; CS: user code, RPL 3
    push dword user
    iretd

user:                       ; ring 3: no port I/O allowed, ask the kernel
    mov esi, msg_user
    xor eax, eax
    int 0x30
    mov eax, 1
    int 0x30

syscall:                    ; ring 0, on the TSS stack; eax 0: print esi, 1: say bye, off
    push eax
    test eax, eax
    jz .put
    mov esi, msg_kernel
    mov bl, [esp + 8]       ; the caller's CS
    and bl, 3
    add bl, '0'
    mov [ring], bl
.put:
    lodsb
    test al, al
    jz .done
    mov dx, COM1
    out dx, al
    jmp .put
.done:
    pop eax
    test eax, eax
    jnz .off
    iretd
.off:
    mov dx, PM1A_CNT
    mov ax, SLP_EN_S5
    out dx, ax
    hlt

align 8
gdt:
    dq 0
    dq 0x00CF9A000000FFFF   ; 0x08 kernel code
    dq 0x00CF92000000FFFF   ; 0x10 kernel data
    dq 0x00CFFA000000FFFF   ; 0x18 user code
    dq 0x00CFF2000000FFFF   ; 0x20 user data
    dw 103, TSS             ; 0x28 TSS
    db 0, 0x89, 0, 0
gdtr:
    dw gdtr - gdt - 1
    dd gdt
idtr:
    dw 0x31 * 8 - 1
    dd IDT
msg_user: db "hello from ring 3", 13, 10, 0
msg_kernel: db "ring 0 again, called from ring "
ring: db "?", 13, 10, 0
BOOT_SIGNATURE

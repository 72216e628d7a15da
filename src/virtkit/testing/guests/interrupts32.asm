; interrupts32: 32-bit protected mode with an IDT: a software interrupt, a #GP
; that the handler skips, and timer interrupts on the remapped PIC, then off.
bits 16
org 0x7C00
    jmp start
%include "common.inc"
IDT equ 0x6000
start:
    GUEST_START
    cli
    mov si, pic_init
    mov cx, 10
.pic:
    lodsw                   ; al = port, ah = value
    mov dl, al
    xor dh, dh
    mov al, ah
    out dx, al
    loop .pic
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
    mov edi, IDT
    xor eax, eax
    mov ecx, 0x31 * 2
    rep stosd
    mov eax, gp
    mov bl, 0x0D
    call setgate
    mov eax, timer
    mov bl, 0x20
    call setgate
    mov eax, soft
    mov bl, 0x30
    call setgate
    lidt [idtr]
    int 0x30
    mov ax, 0x48            ; beyond the GDT limit: #GP
    mov ds, ax
    mov esi, msg_back
    call puts32
    sti
.wait:
    hlt
    cmp dword [ticks], 3
    jb .wait
    cli
    mov esi, msg_ticks
    call puts32
    POWER_OFF

setgate:                    ; eax = handler, bl = vector
    movzx ebx, bl
    lea edi, [IDT + ebx * 8]
    mov [edi], ax
    mov word [edi + 2], 0x08
    mov word [edi + 4], 0x8E00
    shr eax, 16
    mov [edi + 6], ax
    ret

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

soft:
    mov esi, msg_soft
    call puts32
    iretd
gp:
    add dword [esp + 4], 2  ; skip the faulting 2-byte mov ds, ax
    mov esi, msg_gp
    call puts32
    add esp, 4              ; drop the error code
    iretd
timer:
    inc dword [ticks]
    push eax
    mov al, 0x20
    out 0x20, al            ; EOI
    pop eax
    iretd

ticks: dd 0
pic_init:                   ; (port, value): ICW1-4 both PICs, then masks: IRQ0 only
    db 0x20, 0x11, 0xA0, 0x11, 0x21, 0x20, 0xA1, 0x28, 0x21, 0x04
    db 0xA1, 0x02, 0x21, 0x01, 0xA1, 0x01, 0x21, 0xFE, 0xA1, 0xFF
align 8
gdt:
    dq 0
    dq 0x00CF9A000000FFFF
    dq 0x00CF92000000FFFF
gdtr:
    dw gdtr - gdt - 1
    dd gdt
idtr:
    dw 0x31 * 8 - 1
    dd IDT
msg_soft: db "int 0x30 in protected mode", 13, 10, 0
msg_gp: db "#GP caught", 13, 10, 0
msg_back: db "back from the handlers", 13, 10, 0
msg_ticks: db "three timer interrupts", 13, 10, 0
BOOT_SIGNATURE

; The quickstart's guest: a 512-byte boot sector that says hello on COM1,
; then echoes what it receives in upper case, and powers off on 'q'.
; Assemble: nasm -f bin quickstart_guest.asm -o quickstart_guest.bin
; (examples/quickstart.py carries these bytes; tests/test_examples.py checks
; they still match this source.)
bits 16
org 0x7c00

COM1     equ 0x3f8
LSR      equ COM1 + 5
PM1A_CNT equ 0x604

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    mov si, hello
    call puts
.loop:
    mov dx, LSR
.wait:
    in al, dx
    test al, 1              ; data ready?
    jz .wait
    mov dx, COM1
    in al, dx
    cmp al, 'q'
    je poweroff
    cmp al, 'a'
    jb .echo
    cmp al, 'z'
    ja .echo
    sub al, 32              ; to upper case
.echo:
    call putc
    jmp .loop

poweroff:
    mov si, bye
    call puts
    mov dx, PM1A_CNT
    mov ax, 0x2000          ; SLP_EN with SLP_TYP = S5
    out dx, ax
.halt:
    hlt
    jmp .halt

puts:                       ; print the NUL-terminated string at DS:SI
    lodsb
    test al, al
    jz .done
    call putc
    jmp puts
.done:
    ret

putc:                       ; send AL once the transmitter is empty
    push ax
    mov dx, LSR
.busy:
    in al, dx
    test al, 0x20
    jz .busy
    pop ax
    mov dx, COM1
    out dx, al
    ret

hello db "Hello from virtkit!", 13, 10, "> ", 0
bye   db 13, 10, "Bye.", 13, 10, 0

times 510 - ($ - $$) db 0
dw 0xaa55

"""Boot-sector test guests for the qemu backend, assembled from NASM source.

Each guest is a 512-byte boot sector (``org 0x7c00``) that talks to the
host over COM1 (port 0x3F8, already set up by SeaBIOS) and powers off
through ACPI PM1a_CNT (port 0x604, SLP_EN | S5 on QEMU's ``pc`` machine).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import virtkit.images

_PRINT = """
print:                 ; ds:si -> NUL-terminated string to COM1
  lodsb
  test al, al
  jz .done
  mov dx, 0x3f8
  out dx, al
  jmp print
.done:
  ret
poweroff:
  mov dx, 0x604
  mov ax, 0x2000
  out dx, ax
.hang:
  hlt
  jmp .hang
"""

_HEAD = """
bits 16
org 0x7c00
  cli
  xor ax, ax
  mov ds, ax
  mov es, ax
  mov ss, ax
  mov sp, 0x7c00
  sti
"""

_TAIL = """
times 510-($-$$) db 0
dw 0xaa55
"""

SOURCES: dict[str, str] = {
    # prints a line and powers off
    "hello": """
  mov si, msg
  call print
  jmp poweroff
msg: db "hello from the boot sector", 13, 10, 0
""",
    # reads LBA 1 (CHS 0/0/2) with int 13h and prints it, writes a marker to LBA 2, powers off
    "disk": """
  mov [drive], dl
  mov ax, 0x0201          ; read 1 sector
  mov cx, 0x0002          ; cylinder 0, sector 2 (= LBA 1)
  xor dh, dh
  mov dl, [drive]
  mov bx, 0x8000
  int 0x13
  jc fail
  mov si, 0x8000
  call print
  mov ax, 0x0301          ; write 1 sector
  mov cx, 0x0003          ; LBA 2
  xor dh, dh
  mov dl, [drive]
  mov bx, marker
  int 0x13
  jc fail
  mov si, done
  call print
  jmp poweroff
fail:
  mov si, err
  call print
  jmp poweroff
drive: db 0
done: db "write ok", 13, 10, 0
err: db "disk error", 13, 10, 0
marker: db "WRITTEN-BY-GUEST"
""",
    # prints c=NNNN once per BIOS timer tick (18.2 Hz), forever
    "counter": """
  xor bx, bx
.loop:
  hlt
  mov ax, [0x46c]
  cmp ax, [last]
  je .loop
  mov [last], ax
  inc bx
  mov si, prefix
  call print
  mov ax, bx
  mov cx, 4
  mov di, digits+3
.digit:
  xor dx, dx
  push bx
  mov bx, 10
  div bx
  pop bx
  add dl, '0'
  mov [di], dl
  dec di
  loop .digit
  mov si, digits
  call print
  jmp .loop
last: dw 0
prefix: db "c=", 0
digits: db "0000", 13, 10, 0
""",
    # prints a line, then ignores everything (no ACPI handling): for shutdown timeouts
    "idle": """
  mov si, msg
  call print
.spin:
  hlt
  jmp .spin
msg: db "idle guest up", 13, 10, 0
""",
    # signals a panic through the pvpanic ISA device (port 0x505)
    "panic": """
  mov si, msg
  call print
  mov dx, 0x505
  mov al, 1
  out dx, al
.spin:
  hlt
  jmp .spin
msg: db "about to panic", 13, 10, 0
""",
}


def assemble(name: str, workdir: Path) -> bytes:
    """Assemble boot sector ``name`` with nasm; returns its 512 bytes."""
    nasm = shutil.which("nasm")
    if nasm is None:
        pytest.fail("nasm is not installed: run the README test command (apt-get install nasm)")
    src = workdir / f"{name}.asm"
    out = workdir / f"{name}.bin"
    src.write_text(_HEAD + SOURCES[name] + _PRINT + _TAIL)
    subprocess.run([nasm, "-f", "bin", "-o", str(out), str(src)], check=True)
    data = out.read_bytes()
    assert len(data) == 512
    return data


def make_boot_disk(path: Path, sector: bytes, *, size: int = 1024**2, extra: bytes = b"") -> Path:
    """A qcow2 image (written by virtkit.images) with ``sector`` at LBA 0 and ``extra`` at LBA 1."""
    with virtkit.images.create(path, size=size, format="qcow2") as img:
        img.write(0, sector)
        if extra:
            img.write(512, extra)
        img.flush()
    return path

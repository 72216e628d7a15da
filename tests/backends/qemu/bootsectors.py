"""The one QEMU-specific boot-sector guest: a pvpanic write (QMP GUEST_PANICKED).

The shared guests (hello, disk, counter, ignore-acpi...) come from
:mod:`virtkit.testing.guests`; this one exercises QEMU's ``pvpanic`` ISA
device at port 0x505, which only the qemu backend models. Like the shared
guests it is NASM source assembled at test time, and it prints on COM1.
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

"""Boot-sector test guests: NASM sources shipped as text, built at test time.

Each guest is one 512-byte boot sector (``<name>.asm`` next to this module,
sharing ``common.inc``) that talks to the world through COM1 and ACPI only,
so it prints the same bytes under the emulator and under
``qemu-system-x86_64``:

=================  ======================================================
``hello``          prints a greeting, powers off through PM1a_CNT (0x604)
``echo``           echoes COM1 input; ``q`` says bye and powers off
``echo-irq``       the same, driven by the UART's receive interrupt (IRQ4)
``disk``           int 13h: CHS reads of sectors 1 and 2, EDD write of
                   sector 2, EDD read back; prints what it read, powers off
``modes``          prints from real, protected and long mode, powers off
``counter``        prints ``count N`` each timer tick forever; the ACPI
                   power button makes it power off
``ignore-acpi``    halts with interrupts off: ignores the power button
``triple-fault``   empty IDT + ``int 3``: a triple fault
``clock``          prints the BIOS tick count, PIT and RTC eight times
``bios-info``      prints the E820 map and the boot drive's geometry
``interrupts32``   protected mode with an IDT: ``int 0x30``, a #GP it
                   skips, timer interrupts on the remapped PIC
``interrupts64``   long mode with an IDT: int3 and a page fault
``usermode``       ring 3 code calling ring 0 through a gate and the TSS
``no-signature``   the hello sector without the 0x55AA boot signature
=================  ======================================================

``build(name)`` runs ``nasm -f bin`` (Debian/Ubuntu: ``apt-get install
nasm``) into a cache folder keyed by the source's hash; ``write_disk()``
puts a guest into a raw or qcow2 image through :mod:`virtkit.images`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from virtkit import images
from virtkit.errors import BackendError, BackendUnavailable, ConfigError

__all__ = [
    "DISK_SECTOR1",
    "GUESTS",
    "OUTPUT",
    "assemble",
    "build",
    "cache_dir",
    "nasm_path",
    "source",
    "write_disk",
]

#: guest name -> source file
GUESTS: dict[str, str] = {
    "hello": "hello.asm",
    "echo": "echo.asm",
    "echo-irq": "echo_irq.asm",
    "disk": "disk.asm",
    "modes": "modes.asm",
    "counter": "counter.asm",
    "ignore-acpi": "ignore_acpi.asm",
    "triple-fault": "triple_fault.asm",
    "clock": "clock.asm",
    "bios-info": "bios_info.asm",
    "interrupts32": "interrupts32.asm",
    "interrupts64": "interrupts64.asm",
    "usermode": "usermode.asm",
    "no-signature": "hello.asm",
}

#: what sector 1 of a ``disk`` guest's image holds (a zero-terminated string)
DISK_SECTOR1 = b"sector one says hello"

#: the complete serial output of guests that end by themselves
OUTPUT: dict[str, bytes] = {
    "hello": b"Hello from the virtkit hello guest!\r\n",
    "disk": b"read: sector one says hello\r\n"
    b"sector 2: \r\n"
    b"readback: written by the disk guest: sector one says hello\r\n"
    b"disk done\r\n",
    "modes": b"real mode: 16-bit\r\nprotected mode: 32-bit\r\nlong mode: 64-bit\r\n",
    "interrupts32": b"int 0x30 in protected mode\r\n#GP caught\r\nback from the handlers\r\n"
    b"three timer interrupts\r\n",
    "interrupts64": b"int3 in long mode\r\nback\r\n#PF `",
    "usermode": b"hello from ring 3\r\nring 0 again, called from ring 3\r\n",
}


def _check_name(name: str) -> str:
    if name not in GUESTS:
        raise ConfigError(
            f"unknown test guest {name!r}; known: {', '.join(GUESTS)}", field="name", value=name
        )
    return GUESTS[name]


def source(name: str) -> str:
    """The NASM source of guest ``name``."""
    return resources.files(__name__).joinpath(_check_name(name)).read_text(encoding="utf-8")


def _include() -> str:
    return resources.files(__name__).joinpath("common.inc").read_text(encoding="utf-8")


def cache_dir() -> Path:
    """Where built guests are kept: ``$VIRTKIT_GUEST_CACHE`` or ``~/.cache/virtkit/guests``."""
    env = os.environ.get("VIRTKIT_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "virtkit" / "guests"


def nasm_path() -> str:
    """The ``nasm`` executable.

    Raises:
        BackendUnavailable: nasm is not installed.
    """
    found = shutil.which("nasm")
    if found is None:
        raise BackendUnavailable(
            "the test guests are assembled with nasm, which is not installed",
            hint="apt-get install nasm (Debian/Ubuntu) or dnf install nasm",
        )
    return found


def build(name: str, *, cache: str | os.PathLike[str] | None = None) -> bytes:
    """Assemble guest ``name`` and return its 512-byte boot sector.

    Args:
        name: one of :data:`GUESTS`.
        cache: folder for built sectors (default :func:`cache_dir`).

    Raises:
        ConfigError: unknown guest.
        BackendUnavailable: nasm is missing.
        BackendError: nasm rejected the source.
    """
    stem = GUESTS[name].removesuffix(".asm") if name in GUESTS else name
    sector = assemble(source(name), cache=cache, stem=stem)
    if name == "no-signature":
        sector = sector[:510] + b"\0\0"
    return sector


def assemble(
    text: str, *, cache: str | os.PathLike[str] | None = None, stem: str = "guest"
) -> bytes:
    """Assemble a boot sector from NASM source (``%include "common.inc"`` works).

    The result is cached by the hash of the source and ``common.inc``.

    Raises:
        BackendUnavailable: nasm is missing.
        BackendError: nasm failed, or the result is not 512 bytes.
    """
    include = _include()
    digest = hashlib.sha256((text + "\0" + include).encode()).hexdigest()[:16]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"{stem}-{digest}.bin"
    if target.exists() and target.stat().st_size == 512:
        return target.read_bytes()
    sector = _assemble(stem, text, include)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_bytes(sector)
    os.replace(tmp, target)
    return sector


def _assemble(stem: str, text: str, include: str) -> bytes:
    nasm = nasm_path()
    with tempfile.TemporaryDirectory(prefix="virtkit-nasm-") as work:
        src = Path(work) / f"{stem}.asm"
        src.write_text(text, encoding="utf-8")
        (Path(work) / "common.inc").write_text(include, encoding="utf-8")
        out = Path(work) / f"{stem}.bin"
        argv = [nasm, "-f", "bin", "-I", work + os.sep, "-o", str(out), str(src)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise BackendError(
                f"nasm could not assemble test guest {stem}",
                exit_code=proc.returncode,
                argv=argv,
                stderr_tail=proc.stderr[-2000:],
            )
        sector = out.read_bytes()
    if len(sector) != 512:
        raise BackendError(f"test guest {stem} assembled to {len(sector)} bytes, not 512")
    return sector


def write_disk(
    path: str | os.PathLike[str],
    name: str,
    *,
    format: str = "raw",  # noqa: A002 - qemu-img's own word
    size: int | str = "1MiB",
    cache: str | os.PathLike[str] | None = None,
) -> Path:
    """Create a disk image at ``path`` that boots guest ``name``.

    Sector 0 is the boot sector; a ``disk`` guest also gets
    :data:`DISK_SECTOR1` in sector 1.

    Args:
        path: the image to create (it must not exist).
        name: one of :data:`GUESTS`.
        format: ``"raw"`` or ``"qcow2"``.
        size: virtual size.
        cache: where built sectors are cached.

    Raises:
        ConfigError, ImageError: bad arguments or the image cannot be written.
    """
    if format not in ("raw", "qcow2"):
        raise ConfigError(f"'format' must be 'raw' or 'qcow2' (got {format!r})", field="format")
    sector = build(name, cache=cache)
    with images.create(path, size=size, format=format) as image:  # type: ignore[arg-type]
        image.write(0, sector)
        if name == "disk":
            image.write(512, DISK_SECTOR1.ljust(512, b"\0"))
    return Path(path)

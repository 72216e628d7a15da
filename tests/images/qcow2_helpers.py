"""Helpers for the qcow2 tests: run the real qemu-io / qemu-img and build references."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()) -> str:
    """Run ``qemu-io -f fmt -c cmd ... path``; fail the test if it fails."""
    exe = shutil.which("qemu-io")
    if exe is None:
        pytest.fail("qemu-io is not installed: run the README test command (qemu-utils)")
    argv = [exe, "-f", fmt, *extra]
    for cmd in commands:
        argv += ["-c", cmd]
    argv.append(str(path))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "error" in out.lower() or "failed" in out.lower():
        raise AssertionError(f"qemu-io {' '.join(commands)} failed:\n{out}")
    return out


def qemu_raw(qemu_img: object, path: Path, out: Path, *extra: str) -> bytes:
    """What ``qemu-img convert -O raw`` makes of ``path`` (the read oracle)."""
    assert callable(qemu_img)
    qemu_img("convert", *extra, "-O", "raw", path, out)
    return out.read_bytes()


#: The writes every read-matrix image gets (qemu-io syntax), and their effect.
WRITES = (
    "write -P 0xab 0 64k",
    "write -P 0xcd 1M 4k",
    "write -P 0x11 70000 3000",
    "write -z 2M 128k",
    "write -P 0x5a 3M 1k",
)

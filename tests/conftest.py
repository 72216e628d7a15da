"""Shared test helpers: the real qemu-img / qemu-system binaries the suite checks against."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # the test command installs QEMU; a missing binary is a set-up bug
        pytest.fail(
            f"{name} is not installed: run the README test command (it installs qemu-utils)"
        )
    return path


@pytest.fixture(scope="session")
def qemu_img() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real qemu-img; returns the CompletedProcess (check=False)."""
    exe = _tool("qemu-img")

    def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [exe, *map(str, args)], capture_output=True, text=True, check=False, timeout=300
        )
        if check and proc.returncode != 0:
            cmd = " ".join(map(str, args))
            out = proc.stdout + proc.stderr
            raise AssertionError(f"qemu-img {cmd} failed ({proc.returncode}):\n{out}")
        return proc

    return run


@pytest.fixture(scope="session")
def qemu_img_info(
    qemu_img: Callable[..., subprocess.CompletedProcess[str]],
) -> Callable[[Path], dict[str, Any]]:
    """``qemu-img info --output=json`` as a dict."""

    def info(path: Path) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
        return out

    return info

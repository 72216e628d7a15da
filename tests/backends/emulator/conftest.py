"""Fixtures for the emulator's own tests: a connection and boot disks for the test guests."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.emulator import EmulatorGuest, EmulatorHypervisor
from virtkit.testing import guests
from virtkit.testing.linux import LinuxKernel, fetch_kernel


def _cpu_threads() -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name.startswith("virtkit-emulator") and t.is_alive()
    ]


@pytest.fixture(autouse=True)
def no_leftover_cpu_threads() -> Iterator[None]:
    """Fail a test that leaves an emulator CPU thread running after its guests are gone."""
    before = set(_cpu_threads())
    yield
    deadline = time.monotonic() + 5
    while set(_cpu_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    left = set(_cpu_threads()) - before
    assert not left, f"emulator CPU threads still running: {left}"


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[EmulatorHypervisor]:
    """An emulator connection (wall clock) with its guests under tmp_path."""
    hyp = virtkit.connect("emulator", root=tmp_path / "guests")
    assert isinstance(hyp, EmulatorHypervisor)
    yield hyp
    hyp.close()


@pytest.fixture
def vhv(tmp_path: Path) -> Iterator[EmulatorHypervisor]:
    """An emulator connection with the virtual (instruction-driven) clock."""
    hyp = virtkit.connect("emulator", root=tmp_path / "vguests", clock="virtual")
    assert isinstance(hyp, EmulatorHypervisor)
    yield hyp
    hyp.close()


@pytest.fixture
def boot_disk(tmp_path: Path) -> Callable[..., Path]:
    """``boot_disk("hello", fmt="raw")`` -> a fresh image booting that test guest."""
    made = 0

    def make(name: str, fmt: str = "raw") -> Path:
        nonlocal made
        made += 1
        return guests.write_disk(tmp_path / f"{name}-{made}.{fmt}", name, format=fmt)

    return make


@pytest.fixture
def define(
    boot_disk: Callable[..., Path],
) -> Callable[..., EmulatorGuest]:
    """``define(hv, "hello", memory="32MiB", fmt="raw")`` -> a defined EmulatorGuest."""
    made = 0

    def make(
        hyp: EmulatorHypervisor, name: str | None, fmt: str = "raw", **fields: object
    ) -> EmulatorGuest:
        nonlocal made
        made += 1
        disks: tuple[virtkit.Disk, ...] = ()
        if name is not None:
            disks = (virtkit.Disk(str(boot_disk(name, fmt)), format=fmt),)
        fields.setdefault("memory", "32MiB")
        machine = virtkit.Machine(name=f"g{made}", disks=disks, **fields)  # type: ignore[arg-type]
        guest = hyp.define(machine)
        assert isinstance(guest, EmulatorGuest)
        return guest

    return make


@pytest.fixture(scope="session")
def qemu_system() -> str:
    """The real qemu-system-x86_64 (the README test command installs it)."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.fail("qemu-system-x86_64 is not installed: run the README test command")
    return path


@pytest.fixture(scope="module")
def kernel() -> LinuxKernel:
    """The real Debian cloud kernel the Linux boot tests use (fetched once, cached)."""
    return fetch_kernel()


@pytest.fixture(scope="module")
def vmlinuz(kernel: LinuxKernel) -> bytes:
    """That kernel's bzImage bytes."""
    return kernel.vmlinuz.read_bytes()

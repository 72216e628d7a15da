"""Fixtures for the qemu backend tests: a TCG hypervisor, test guests, a leak check.

Every test here is checked afterwards: no QEMU child process, no runtime
directory (with its QMP/console sockets) may be left behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bootsectors import assemble, make_boot_disk

import virtkit.images
from virtkit.backends.qemu import KernelBoot, QemuHypervisor
from virtkit.backends.qemu.process import runtime_base
from virtkit.testing import guests
from virtkit.testing.linux import (
    LINUX_CMDLINE,
    build_initramfs,
    fetch_kernel,
)


def _qemu_children() -> set[int]:
    """PIDs of qemu-system processes whose parent is this test process."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if comm.startswith("qemu-system") and int(fields[1]) == me:
            found.add(int(entry))
    return found


def _runtime_dirs() -> set[str]:
    return {p.name for p in runtime_base().glob(f"vkq-{os.getpid()}-*")}


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail the test if it leaves a QEMU process, socket or runtime dir behind."""
    dirs_before = _runtime_dirs()
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_qemu_children() or _runtime_dirs() - dirs_before):
        time.sleep(0.05)
    procs = _qemu_children()
    dirs = _runtime_dirs() - dirs_before
    assert not procs, f"QEMU processes left running: {sorted(procs)}"
    assert not dirs, f"runtime dirs (QMP/console sockets) left behind: {sorted(dirs)}"


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[QemuHypervisor]:
    """A TCG qemu hypervisor whose guests live under tmp_path; closed afterwards."""
    hyp = QemuHypervisor(accel="tcg", root=tmp_path / "guests")
    yield hyp
    hyp.close()


@pytest.fixture(scope="session")
def sectors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Boot sectors by name: the shared test guests plus the local pvpanic one."""
    built = {name: guests.build(name) for name in ("hello", "disk", "counter", "ignore-acpi")}
    built["panic"] = assemble("panic", tmp_path_factory.mktemp("nasm"))
    return built


@pytest.fixture
def boot_disk(tmp_path: Path, sectors: dict[str, bytes]):  # type: ignore[no-untyped-def]
    """``boot_disk(name, extra=b"")`` -> a qcow2 image booting that guest.

    Shared guests come from ``virtkit.testing.guests.write_disk`` (the disk
    guest gets its sector 1 there); ``extra`` replaces sector 1.
    """

    def make(name: str, extra: bytes = b"") -> Path:
        path = tmp_path / f"{name}.qcow2"
        if name == "panic":
            return make_boot_disk(path, sectors[name], extra=extra)
        guests.write_disk(path, name, format="qcow2")
        if extra:
            with virtkit.images.open(path, writable=True) as img:
                img.write(512, extra.ljust(512, b"\0"))
        return path

    return make


@pytest.fixture(scope="session")
def linux_boot(tmp_path_factory: pytest.TempPathFactory) -> KernelBoot:
    """Debian's cloud kernel (cached download) with a freshly built busybox initramfs."""
    kernel = fetch_kernel()
    initrd = build_initramfs(kernel, tmp_path_factory.mktemp("initrd") / "initrd.gz")
    return KernelBoot(kernel.vmlinuz, initrd, LINUX_CMDLINE)

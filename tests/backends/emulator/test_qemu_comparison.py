"""Every boot-sector test guest prints the same serial bytes on the emulator as on QEMU.

QEMU runs as ``qemu-system-x86_64 -accel tcg -display none -nodefaults
-serial file:... -drive file=...,format=raw`` (SeaBIOS, IDE disk): the
reference the emulator's PC imitates.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtkit.backends.emulator import EmulatorGuest, EmulatorHypervisor
from virtkit.model import State
from virtkit.testing import guests

TIMEOUT = 30.0
MEMORY = "32M"


def qemu_argv(qemu: str, disk: Path, serial: str) -> list[str]:
    return [
        qemu,
        "-accel",
        "tcg",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-m",
        MEMORY,
        "-serial",
        serial,
        "-drive",
        f"file={disk},format=raw",
        "-no-reboot",
    ]


def run_qemu(qemu: str, disk: Path, out: Path, until: bytes | None = None) -> bytes:
    """Boot ``disk`` under QEMU; return its serial output once it exits (or shows ``until``)."""
    proc = subprocess.Popen(
        qemu_argv(qemu, disk, f"file:{out}"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        if until is None:
            proc.wait(timeout=TIMEOUT)
        else:
            deadline = time.monotonic() + TIMEOUT
            while until not in (out.read_bytes() if out.exists() else b""):
                if time.monotonic() > deadline or proc.poll() is not None:
                    break
                time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()
    return out.read_bytes()


def run_emulator(guest: EmulatorGuest, until: bytes | None = None) -> bytes:
    guest.start()
    if until is None:
        guest.wait(timeout=TIMEOUT)
    else:
        guest.console.expect(until, timeout=TIMEOUT)
        guest.kill()
    return guest.console.output


class Runner:
    """Boots one test guest on both sides: a fresh disk for each."""

    def __init__(
        self,
        hv: EmulatorHypervisor,
        define: Callable[..., EmulatorGuest],
        boot_disk: Callable[..., Path],
        qemu: str,
        tmp_path: Path,
    ) -> None:
        self.hv, self.define, self.boot_disk = hv, define, boot_disk
        self.qemu, self.tmp_path = qemu, tmp_path

    def emulator(self, name: str, until: bytes | None = None) -> tuple[EmulatorGuest, bytes]:
        guest = self.define(self.hv, name)
        return guest, run_emulator(guest, until)

    def qemu_disk(self, name: str) -> Path:
        return self.boot_disk(name)

    def run_qemu(self, disk: Path, until: bytes | None = None) -> bytes:
        return run_qemu(self.qemu, disk, self.tmp_path / f"{disk.stem}.serial", until)


@pytest.fixture
def runner(
    hv: EmulatorHypervisor,
    define: Callable[..., EmulatorGuest],
    boot_disk: Callable[..., Path],
    qemu_system: str,
    tmp_path: Path,
) -> Runner:
    """Both machines, ready to boot a named guest."""
    return Runner(hv, define, boot_disk, qemu_system, tmp_path)


class TestSameSerialOutputAsQemu:
    """The emulator's serial bytes equal QEMU's for each test guest."""

    @pytest.mark.parametrize(
        "name",
        ["hello", "disk", "modes", "bios-info", "interrupts32", "interrupts64", "usermode"],
    )
    def test_guests_that_power_off(self, name: str, runner: Runner) -> None:
        """Complete output of a guest that ends by itself; the disks end up equal too."""
        guest, mine = runner.emulator(name)
        assert guest.state is State.SHUTOFF
        disk = runner.qemu_disk(name)
        theirs = runner.run_qemu(disk)
        assert mine == theirs
        assert mine
        if name in guests.OUTPUT:
            assert mine == guests.OUTPUT[name]
        assert guest.disk_path(guest.machine.disks[0]).read_bytes() == disk.read_bytes()

    @pytest.mark.parametrize(
        ("name", "until"),
        [
            ("counter", b"count 5\r\n"),
            ("ignore-acpi", b"interrupts off\r\n"),
            ("triple-fault", b"triple fault next\r\n"),
        ],
    )
    def test_guests_that_keep_running_or_fault(
        self, name: str, until: bytes, runner: Runner
    ) -> None:
        """Output up to a marker is the same (QEMU is stopped there, or exits on -no-reboot)."""
        _, mine = runner.emulator(name, until)
        theirs = runner.run_qemu(runner.qemu_disk(name), until)
        assert until in theirs
        cut = theirs.index(until) + len(until)
        assert mine[: mine.index(until) + len(until)] == theirs[:cut]

    @pytest.mark.parametrize("name", ["echo", "echo-irq"])
    def test_echo_with_console_input(self, name: str, runner: Runner) -> None:
        """The echo guests answer the same input with the same bytes (QEMU on -serial stdio)."""
        typed = b"abc 123\rsecond line\rq"
        ready = f"{name} ready\r\n".encode()
        guest = runner.define(runner.hv, name)
        guest.start()
        guest.console.expect(ready, timeout=TIMEOUT)
        guest.console.write(typed)
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        mine = guest.console.output

        proc = subprocess.Popen(
            qemu_argv(runner.qemu, runner.qemu_disk(name), "stdio"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        seen = bytearray()
        started = threading.Event()

        def reader() -> None:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(4096):
                seen.extend(chunk)
                if ready in seen:
                    started.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            assert started.wait(TIMEOUT)
            proc.stdin.write(typed)
            proc.stdin.flush()
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=TIMEOUT)
            thread.join(TIMEOUT)
            proc.stdin.close()
            proc.stdout.close()
        assert mine == bytes(seen)
        assert mine.endswith(b"bye\r\n")

    def test_no_signature_prints_nothing_on_either(self, runner: Runner) -> None:
        """Without 0x55AA neither machine runs the sector: COM1 stays silent on both."""
        guest, mine = runner.emulator("no-signature")
        assert guest.state is State.CRASHED
        disk = runner.qemu_disk("no-signature")
        out = runner.tmp_path / "nosig.serial"
        proc = subprocess.Popen(
            qemu_argv(runner.qemu, disk, f"file:{out}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=1.5)  # SeaBIOS keeps retrying the boot
        finally:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        assert mine == out.read_bytes() == b""

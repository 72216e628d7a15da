"""Console input written right after start() reaches the guest, though the guest resets
its UART's receive FIFO when it sets the port up (which drops bytes on real hardware)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.console import Console
from virtkit.model import Disk, Machine
from virtkit.testing import guests

BACKENDS = ["emulator", pytest.param("qemu", marks=pytest.mark.qemu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["echo", "echo-irq"])
def test_input_before_the_guest_is_ready(backend: str, name: str, tmp_path: Path) -> None:
    """Typed at once, echoed later: nothing lost, on both built-in backends."""
    if backend == "qemu" and shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: run the README test command")
    disk = guests.write_disk(tmp_path / "g.raw", name)
    options = {"accel": "tcg"} if backend == "qemu" else {}
    with virtkit.connect(backend, root=tmp_path / "root", **options) as hv:
        guest = hv.define(Machine(name="early", memory="32MiB", disks=[Disk(str(disk))]))
        guest.start()
        guest.console.write(b"early-input")
        guest.console.expect("early-input", timeout=30)
        guest.kill()


class TestHeldInput:
    """The console's hold: queued until the guest prints or reads, then sent once."""

    def test_held_until_first_output(self) -> None:
        """Writes before the first output are sent, in order, when it arrives."""
        sent: list[bytes] = []
        console = Console(sent.append)
        console.open(hold_input=True)
        console.write(b"ab")
        console.sendline("c")
        assert sent == []
        console.feed(b"boot\r\n")
        assert sent == [b"abc\n"]
        console.write(b"d")
        assert sent == [b"abc\n", b"d"]

    def test_release_and_close(self) -> None:
        """release_input() sends at once; close() drops what was held."""
        sent: list[bytes] = []
        console = Console(sent.append)
        console.open(hold_input=True)
        console.write(b"x")
        console.release_input()
        assert sent == [b"x"]
        console.open(hold_input=True)
        console.write(b"y")
        console.close("powered off")
        console.feed(b"late output")
        assert sent == [b"x"]

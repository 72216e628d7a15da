"""The 8042 keyboard controller answers Linux's i8042 probe at once.

Without answers, Linux's i8042 driver polled the status port in a ``udelay(50)``
loop until its 10,000-try timeout: half a second of guest time, 10,000 port
reads and millions of TSC reads (each a hook into Python) per boot. These tests
drive the chipset through the sequence the driver uses (drivers/input/serio/
i8042.c: flush, self-test, read/write the command byte, the mouse-port loop and
interface tests) and check that every answer is there on the first status read.
"""

from __future__ import annotations

from virtkit.backends.emulator.chipset import KBC_CTR_DEFAULT, Chipset, Request
from virtkit.backends.emulator.clock import Clock

OBF = 0x01  # output buffer full
AUXDATA = 0x20  # the byte came from the mouse port


def _chipset() -> tuple[Chipset, list[Request]]:
    requests: list[Request] = []
    return Chipset(Clock("virtual"), 32 * 2**20, requests.append), requests


def _command(chip: Chipset, command: int, data: int | None = None) -> tuple[int, int] | None:
    """Write a controller command (and its data byte); the reply's (status, byte) if any."""
    assert chip.read(0x64, 1) & 0x02 == 0  # input buffer empty: the driver may write
    chip.write(0x64, 1, command)
    if data is not None:
        chip.write(0x60, 1, data)
    status = chip.read(0x64, 1)
    if not status & OBF:
        return None
    return status, chip.read(0x60, 1)


def test_linux_i8042_probe_gets_every_answer_without_waiting() -> None:
    """Flush finds nothing; self-test 0x55; the command byte reads back what was written;
    the mouse port's loop echo lacks the mouse-data bit and its interface test fails, so
    the driver gives up the mouse port without a timeout; nothing is left to read."""
    chip, requests = _chipset()
    assert not chip.read(0x64, 1) & OBF  # i8042_flush: empty
    assert _command(chip, 0xAA) == (0x1D, 0x55)  # controller self-test passed
    got = _command(chip, 0x20)
    assert got is not None and got[1] == KBC_CTR_DEFAULT
    assert _command(chip, 0x60, 0x47) is None  # write the command byte: no reply
    got = _command(chip, 0x20)
    assert got is not None and got[1] == 0x47
    got = _command(chip, 0xD3, 0x5A)  # mouse-port loop: echoed, but not as mouse data
    assert got is not None and got[1] == 0x5A and not got[0] & AUXDATA
    assert _command(chip, 0xA9) == (0x1D, 0x01)  # mouse interface test: clock stuck low
    assert _command(chip, 0xAB) == (0x1D, 0x00)  # keyboard interface test passed
    assert _command(chip, 0xAD) is None  # disable keyboard: no reply
    assert not chip.read(0x64, 1) & OBF
    assert chip.read(0x60, 1) == 0  # an empty buffer reads 0
    assert requests == []


def test_output_port_a20_and_reset_still_work() -> None:
    """0xD0 reads the output port (A20 bit), 0xD1 writes it, 0xFE resets."""
    chip, requests = _chipset()
    assert _command(chip, 0xD0) == (0x1D, 0x03)
    _command(chip, 0xD1, 0x01)  # A20 off, reset line not pulsed
    assert not chip.a20
    assert _command(chip, 0xD0) == (0x1D, 0x01)
    assert requests == []
    chip.write(0x64, 1, 0xFE)
    assert requests == [Request.RESET]


def test_controller_state_in_snapshots() -> None:
    """The command byte and a reply not yet read survive save/load; a state saved before
    the controller answered commands loads with the boot-time command byte."""
    chip, _ = _chipset()
    _command(chip, 0x60, 0x12)
    chip.write(0x64, 1, 0xAA)  # reply left unread
    state = chip.save()
    other, _ = _chipset()
    other.load(state)
    assert other.read(0x64, 1) & OBF
    assert other.read(0x60, 1) == 0x55
    assert _command(other, 0x20) == (0x1D, 0x12)
    old = dict(state)
    del old["kbc_ctr"], old["kbc_out_full"]
    other.load(old)
    assert other.kbc_ctr == KBC_CTR_DEFAULT

"""A guest that powers off or crashes while ``start()`` is still returning.

A guest runs as soon as its hypervisor starts it, before ``start()`` has
recorded RUNNING; on a loaded host the caller's thread may wait seconds for a
CPU while a small guest boots, prints and powers off. The power-off reported
in that window used to be dropped (the state was still SHUTOFF, which a
power-off does not leave), then ``start()`` recorded RUNNING: the guest stayed
"running" for good and ``wait()`` timed out.

These tests open the window on purpose: ``_do_start`` returns only once the
guest's power-off (or crash) has been reported, on the backend's own thread.
(The emulator cannot be caught so: its CPU waits for the RUNNING state.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.backends.qemu.process import QemuProcess
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests

HELLO = guests.OUTPUT["hello"].strip()


def _hold_start_until(
    guest: Any, hook: str, then: Callable[[], None] = lambda: None
) -> threading.Event:
    """Make ``guest.start()`` return only after the backend called ``guest.<hook>``
    (``then`` runs first, once the guest was started)."""
    reported = threading.Event()
    notify, do_start = getattr(guest, hook), guest._do_start

    def reporting(*args: Any) -> None:
        notify(*args)
        reported.set()

    def held_start() -> None:
        do_start()
        then()
        assert reported.wait(60), f"the guest never reached {hook}"

    setattr(guest, hook, reporting)
    guest._do_start = held_start
    return reported


def test_power_off_before_start_returns_leaves_the_guest_shut_off(
    hv: QemuHypervisor, tmp_path: Path
) -> None:
    """The hello guest prints and powers off before start() returns: SHUTOFF, wait() returns,
    the output is kept, and the next start() runs it again."""
    disk = guests.write_disk(tmp_path / "g.raw", "hello")
    guest = hv.define(Machine(name="quick", memory="16MiB", disks=[Disk(str(disk))]))
    changes: list[tuple[State, State]] = []
    guest._lifecycle.add_listener(lambda old, new: changes.append((old, new)))
    reported = _hold_start_until(guest, "_notify_poweroff")
    guest.start()
    assert reported.is_set()
    assert guest.state is State.SHUTOFF
    assert guest.wait(timeout=5) is State.SHUTOFF
    assert changes == [(State.SHUTOFF, State.RUNNING), (State.RUNNING, State.SHUTOFF)]
    guest.console.expect(HELLO, timeout=5)  # what it printed before it went
    with pytest.raises(virtkit.StateError, match="powered off"):
        guest.console.expect("never printed", timeout=5)
    del guest._do_start  # the backend's own start again
    guest.start()
    assert guest.wait(timeout=60) is State.SHUTOFF


def test_crash_before_start_returns_leaves_the_guest_crashed(
    hv: QemuHypervisor, tmp_path: Path
) -> None:
    """QEMU is killed before start() returns: CRASHED with the reason, not RUNNING."""
    disk = guests.write_disk(tmp_path / "g.raw", "ignore-acpi")
    guest = hv.define(Machine(name="crash", memory="16MiB", disks=[Disk(str(disk))]))

    def kill_qemu() -> None:
        assert guest.pid is not None
        os.kill(guest.pid, signal.SIGKILL)

    reported = _hold_start_until(guest, "_notify_crash", then=kill_qemu)
    guest.start()
    assert reported.is_set()
    assert guest.state is State.CRASHED
    assert "SIGKILL" in (guest.crash_reason or "")
    with pytest.raises(virtkit.StateError, match="SIGKILL"):
        guest.console.expect("never printed", timeout=5)
    guest.kill()
    assert guest.wait(timeout=0) is State.SHUTOFF


def _zombie(pid: int | None) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.mark.parametrize("handshake", ["pending", "failed"])
def test_power_off_during_the_qmp_handshake_is_a_run_not_a_start_failure(
    hv: QemuHypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handshake: str
) -> None:
    """QEMU exits 0 (the guest powered off) before virtkit finished the QMP handshake:
    start() succeeds, the guest ends SHUTOFF with its output, no BackendError.

    The handshake is held until QEMU has exited (as a loaded host holds
    virtkit's loop). "pending": launch() sees the exit while the handshake
    still waits; "failed": the handshake fails on the closed connection as
    QEMU's exit is seen.
    """

    async def held(self: QemuProcess) -> None:
        if handshake == "pending":
            assert self._exit is not None
            await self._exit
            await asyncio.sleep(3600)  # cancelled by launch()
        while not _zombie(self.pid):  # every loop turn: fails with (not after) the exit
            await asyncio.sleep(0)
        raise EOFError("QEMU hung up during the QMP handshake")

    monkeypatch.setattr(QemuProcess, "_wait_connected", held)
    disk = guests.write_disk(tmp_path / "g.raw", "hello")
    guest = hv.define(Machine(name="shake", memory="16MiB", disks=[Disk(str(disk))]))
    guest.start()
    assert guest.wait(timeout=30) is State.SHUTOFF
    assert guest.last_exit is not None and guest.last_exit.returncode == 0
    assert guest.accelerator == "tcg"
    guest.console.expect(HELLO, timeout=5)


def test_a_start_up_failure_is_still_a_backend_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU exiting 0 before it connected anything is not taken for a run: BackendError."""
    wrapper = tmp_path / "qemu-gone"
    real = shutil.which("qemu-system-x86_64")
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = -version ] && exec {real} "$@"\nexit 0\n')
    wrapper.chmod(0o755)
    disk = guests.write_disk(tmp_path / "g.raw", "hello")
    with QemuHypervisor(accel="tcg", binary=str(wrapper), root=tmp_path / "root") as hyp:
        guest = hyp.define(Machine(name="gone", memory="16MiB", disks=[Disk(str(disk))]))
        with pytest.raises(virtkit.BackendError, match="exited during start-up") as info:
            guest.start()
        assert info.value.exit_code == 0
        assert guest.state is State.SHUTOFF

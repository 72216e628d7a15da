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

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
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

"""The interactive serial console of ``virtkit vm console``.

The terminal is put in raw mode (every key, Ctrl-C included, goes to the
guest, as with ``virsh console``) and restored on the way out whatever
happens; the escape key (Ctrl-] unless told otherwise) detaches. Works in
any terminal, tmux and screen included; with a pipe on stdin it forwards the
bytes and keeps showing output after the pipe ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import tty
from collections.abc import Iterator

from virtkit.backends import Guest
from virtkit.errors import StateError
from virtkit.model import State

__all__ = ["interactive"]

_POLL = 0.05  # seconds between looks at the guest's output when no key is pressed
_STOPPED = (State.SHUTOFF, State.CRASHED)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def interactive(guest: Guest, *, escape: bytes = b"\x1d") -> State | None:
    """Connect stdin/stdout to ``guest``'s serial console until the escape key or power-off.

    Returns the guest's final state if it stopped, None if the user detached.
    """
    fd_in = sys.stdin.fileno()
    out = sys.stdout.buffer
    shown = 0
    reading = True
    with _raw(fd_in):
        while True:
            data = guest.console.output
            if len(data) > shown:
                out.write(data[shown:])
                out.flush()
                shown = len(data)
            state = guest.state
            if state in _STOPPED:
                return state
            if not reading:
                guest_wait(guest)
                continue
            ready, _, _ = select.select([fd_in], [], [], _POLL)
            if not ready:
                continue
            keys = os.read(fd_in, 1024)
            if not keys:
                reading = False  # stdin ended (a pipe): keep showing output
                continue
            before, found, _ = keys.partition(escape)
            if before:
                with contextlib.suppress(StateError):  # it stopped meanwhile: seen next turn
                    guest.console.write(before)
            if found:
                return None


def guest_wait(guest: Guest) -> None:
    """Wait a moment for the guest to stop (used once stdin has ended)."""
    with contextlib.suppress(Exception):
        guest.wait(timeout=_POLL)

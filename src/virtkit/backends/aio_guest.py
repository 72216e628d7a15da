"""The coroutine twin of any backend's Guest, and the blocking-call guard.

``guest.aio`` on every backend gives the Guest API as coroutines. The qemu
backend has its own twin (``backends/qemu/aio.py``: QMP is asyncio already);
every other backend (the in-process emulator, libvirt, third-party ones)
gets :class:`AsyncGuest`, which runs each bounded blocking operation on a
worker thread so the caller's event loop never blocks (the emulator's guest
code runs on its own CPU thread, never on the loop), and waits
(``wait``, ``console.expect``) by polling on the loop without holding a
thread.

:func:`refuse_in_loop` is the one check behind "a blocking call inside a
running event loop is a clear StateError", on every backend.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from virtkit.errors import StateError, TimeoutError
from virtkit.images.args import check_timeout
from virtkit.model import Disk, Nic, Snapshot, State

if TYPE_CHECKING:
    from virtkit.backends.base import Guest
    from virtkit.backends.console import Pattern

__all__ = ["AsyncConsole", "AsyncGuest", "GuestTwin", "in_thread", "refuse_in_loop"]

T = TypeVar("T")
_POLL = 0.01  # seconds between looks at the console/state in the waiting coroutines
_STOPPED = (State.SHUTOFF, State.CRASHED)

#: bounded blocking operations awaited through a twin run here (sized for many guests)
_POOL = ThreadPoolExecutor(max_workers=128, thread_name_prefix="virtkit-aio")


def refuse_in_loop(action: str) -> None:
    """Raise ``StateError`` if called from a thread running an asyncio event loop.

    Every blocking public call (start, kill, wait, define, close, expect...)
    calls this first: blocking there would freeze every other task of that
    loop, silently. The coroutine twins run the same calls on worker threads,
    where there is no running loop.

    Raises:
        StateError: there is a running event loop in this thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise StateError(
        f"{action}() blocks and was called inside a running asyncio event loop, which it "
        "would freeze; await its coroutine twin instead (await guest.aio.start(), "
        "virtkit.aio.connect(...)) or run it in a thread (await asyncio.to_thread(...))",
        action=action,
    )


async def in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run the blocking ``fn(*args, **kwargs)`` on a worker thread and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))


class AsyncConsole:
    """Coroutine twin of :class:`~virtkit.backends.console.Console`."""

    def __init__(self, guest: Guest) -> None:
        self._guest = guest

    async def expect(self, pattern: Pattern, timeout: float | None = 30.0) -> re.Match[Any]:
        """Await ``pattern`` in the output (see ``Console.expect``); no thread is held.

        Raises:
            TimeoutError: it did not appear within ``timeout`` seconds.
            StateError: the guest stopped first.
        """
        console = self._guest.console
        limit = check_timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            try:
                return console.expect(pattern, timeout=0)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
                    raise TimeoutError(
                        f"console pattern {shown!r} did not appear within {limit} s; "
                        f"last output: {console.output[-200:]!r}",
                        timeout=limit,
                    ) from None
            await asyncio.sleep(_POLL)

    async def write(self, data: bytes | str) -> None:
        """Send ``data`` to the guest's serial input."""
        self._guest.console.write(data)

    @property
    def output(self) -> bytes:
        """Everything the guest has printed so far."""
        return self._guest.console.output


class GuestTwin(Protocol):
    """What ``guest.aio`` gives on every backend (the qemu backend's twin adds ``qmp``)."""

    #: the sync guest this twin drives
    guest: Any
    #: the console, with ``await expect(...)`` and ``await write(...)``
    console: Any

    @property
    def state(self) -> State:
        """The guest's run state."""

    async def start(self) -> None:
        """Power on."""

    async def pause(self) -> None:
        """Freeze the CPUs."""

    async def resume(self) -> None:
        """Continue."""

    async def reset(self) -> None:
        """Press reset."""

    async def shutdown(self, timeout: float = 30) -> None:
        """ACPI power button, then wait."""

    async def kill(self) -> None:
        """Pull the plug."""

    async def wait(self, timeout: float | None = None) -> State:
        """Until it stops by itself."""

    async def snapshot(self, name: str, *, memory: bool = True, description: str = "") -> Snapshot:
        """Take a snapshot."""

    async def revert(self, name: str) -> None:
        """Go back to a snapshot."""

    async def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot."""

    async def change_media(self, cdrom: str, path: str | os.PathLike[str] | None) -> None:
        """Insert or eject a CD-ROM's medium."""

    async def attach(self, device: Disk | Nic) -> Disk | Nic:
        """Add a disk or NIC (live where the backend can)."""

    async def detach(self, target: str) -> Disk | Nic:
        """Remove a disk or NIC."""


class AsyncGuest:
    """The Guest API as coroutines, for any backend; errors are the same virtkit errors.

    Args:
        guest: the (sync) guest to drive; kept as :attr:`guest`.
    """

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.console = AsyncConsole(guest)

    def __repr__(self) -> str:
        return f"<AsyncGuest {self.guest!r}>"

    @property
    def name(self) -> str:
        """The machine's name."""
        return self.guest.name

    @property
    def state(self) -> State:
        """The guest's run state."""
        return self.guest.state

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        """Snapshots of this guest, oldest first."""
        return self.guest.snapshots

    async def start(self) -> None:
        """Coroutine twin of ``Guest.start``."""
        await in_thread(self.guest.start)

    async def pause(self) -> None:
        """Coroutine twin of ``Guest.pause``."""
        await in_thread(self.guest.pause)

    async def resume(self) -> None:
        """Coroutine twin of ``Guest.resume``."""
        await in_thread(self.guest.resume)

    async def reset(self) -> None:
        """Coroutine twin of ``Guest.reset``."""
        await in_thread(self.guest.reset)

    async def shutdown(self, timeout: float = 30) -> None:
        """Coroutine twin of ``Guest.shutdown``."""
        await in_thread(self.guest.shutdown, timeout)

    async def kill(self) -> None:
        """Coroutine twin of ``Guest.kill``."""
        await in_thread(self.guest.kill)

    async def wait(self, timeout: float | None = None) -> State:
        """Coroutine twin of ``Guest.wait`` (polls on the caller's loop, no thread).

        Raises:
            TimeoutError: the guest still runs after ``timeout`` seconds.
        """
        limit = check_timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while (state := self.guest.state) not in _STOPPED:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"guest {self.guest.name!r} did not power off within {limit} s "
                    f"(state: {state.value})",
                    timeout=limit,
                )
            await asyncio.sleep(_POLL)
        return state

    async def snapshot(self, name: str, *, memory: bool = True, description: str = "") -> Snapshot:
        """Coroutine twin of ``Guest.snapshot``."""
        return await in_thread(self.guest.snapshot, name, memory=memory, description=description)

    async def revert(self, name: str) -> None:
        """Coroutine twin of ``Guest.revert``."""
        await in_thread(self.guest.revert, name)

    async def delete_snapshot(self, name: str) -> None:
        """Coroutine twin of ``Guest.delete_snapshot``."""
        await in_thread(self.guest.delete_snapshot, name)

    async def change_media(self, cdrom: str, path: str | os.PathLike[str] | None) -> None:
        """Coroutine twin of ``Guest.change_media``."""
        await in_thread(self.guest.change_media, cdrom, path)

    async def attach(self, device: Disk | Nic) -> Disk | Nic:
        """Coroutine twin of ``Guest.attach``."""
        return await in_thread(self.guest.attach, device)

    async def detach(self, target: str) -> Disk | Nic:
        """Coroutine twin of ``Guest.detach`` (the guest's release is awaited in a worker)."""
        return await in_thread(self.guest.detach, target)

"""The coroutine twin of the Guest API, for orchestrating many guests at once.

``await guest.aio.start()`` does what ``guest.start()`` does. The QMP,
console and process I/O already run on the backend's private event loop;
each coroutine here runs the state-checked operation on a worker thread of
a pool sized for many guests (not asyncio's small default executor), so the
caller's loop never blocks and dozens of guests proceed concurrently::

    await asyncio.gather(*(g.aio.start() for g in guests))
    await asyncio.gather(*(g.aio.console.expect("login:") for g in guests))
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from virtkit.errors import TimeoutError
from virtkit.images.args import check_timeout
from virtkit.model import Disk, Nic, Snapshot, State

if TYPE_CHECKING:
    from virtkit.backends.console import Pattern
    from virtkit.backends.qemu.guest import QemuGuest

__all__ = ["AsyncConsole", "AsyncQemuGuest"]

T = TypeVar("T")
_POLL = 0.01  # seconds between checks of console/state in the waiting coroutines

#: bounded blocking operations (start, kill, snapshot...) awaited through the
#: twin run here; waits (``wait``, ``console.expect``) hold no thread at all
_POOL = ThreadPoolExecutor(max_workers=128, thread_name_prefix="virtkit-qemu-aio")


async def _in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))


class AsyncConsole:
    """Coroutine twin of :class:`~virtkit.backends.console.Console`."""

    def __init__(self, guest: QemuGuest) -> None:
        self._guest = guest

    async def expect(self, pattern: Pattern, timeout: float | None = 30.0) -> re.Match[Any]:
        """Await ``pattern`` in the output (see ``Console.expect``).

        Waits on the caller's loop (checking the stream every few
        milliseconds), so no thread is held however many guests wait.
        """
        console = self._guest.console
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return console.expect(pattern, timeout=0)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
                    raise TimeoutError(
                        f"console pattern {shown!r} did not appear within {timeout} s; "
                        f"last output: {console.output[-200:]!r}",
                        timeout=timeout,
                    ) from None
            await asyncio.sleep(_POLL)

    async def write(self, data: bytes | str) -> None:
        """Send ``data`` to the guest's serial input."""
        self._guest.console.write(data)

    @property
    def output(self) -> bytes:
        """Everything the guest has printed so far."""
        return self._guest.console.output


class AsyncQemuGuest:
    """The same operations as :class:`QemuGuest`, as coroutines.

    Errors are the same virtkit errors the sync methods raise.
    """

    def __init__(self, guest: QemuGuest) -> None:
        self.guest = guest
        self.console = AsyncConsole(guest)

    @property
    def state(self) -> State:
        """The guest's run state."""
        return self.guest.state

    async def start(self) -> None:
        """Coroutine twin of ``Guest.start``."""
        await _in_thread(self.guest.start)

    async def pause(self) -> None:
        """Coroutine twin of ``Guest.pause``."""
        await _in_thread(self.guest.pause)

    async def resume(self) -> None:
        """Coroutine twin of ``Guest.resume``."""
        await _in_thread(self.guest.resume)

    async def reset(self) -> None:
        """Coroutine twin of ``Guest.reset``."""
        await _in_thread(self.guest.reset)

    async def shutdown(self, timeout: float = 30) -> None:
        """Coroutine twin of ``Guest.shutdown``."""
        await _in_thread(self.guest.shutdown, timeout)

    async def kill(self) -> None:
        """Coroutine twin of ``Guest.kill``."""
        await _in_thread(self.guest.kill)

    async def wait(self, timeout: float | None = None) -> State:
        """Coroutine twin of ``Guest.wait`` (waits on the caller's loop, no thread)."""
        stopped = (State.SHUTOFF, State.CRASHED)
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.guest.state) not in stopped:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"guest {self.guest.name!r} did not power off within {timeout} s "
                    f"(state: {state.value})",
                    timeout=timeout,
                )
            await asyncio.sleep(_POLL)
        return state

    async def snapshot(self, name: str, *, memory: bool = True, description: str = "") -> Snapshot:
        """Coroutine twin of ``Guest.snapshot``."""
        return await _in_thread(self.guest.snapshot, name, memory=memory, description=description)

    async def revert(self, name: str) -> None:
        """Coroutine twin of ``Guest.revert``."""
        await _in_thread(self.guest.revert, name)

    async def delete_snapshot(self, name: str) -> None:
        """Coroutine twin of ``Guest.delete_snapshot``."""
        await _in_thread(self.guest.delete_snapshot, name)

    async def change_media(self, cdrom: str, path: str | os.PathLike[str] | None) -> None:
        """Coroutine twin of ``Guest.change_media``."""
        await _in_thread(self.guest.change_media, cdrom, path)

    async def attach(self, device: Disk | Nic) -> Disk | Nic:
        """Coroutine twin of ``Guest.attach``."""
        return await _in_thread(self.guest.attach, device)

    async def detach(self, target: str) -> Disk | Nic:
        """Coroutine twin of ``Guest.detach`` (the guest's release is awaited in a worker)."""
        return await _in_thread(self.guest.detach, target)

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a raw QMP command (on the caller's loop over the sync monitor, no thread).

        Raises:
            ConfigError: ``command`` or ``arguments`` has the wrong type.
        """
        from virtkit.backends.qemu.qmp import check_command  # noqa: PLC0415

        check_command(command, arguments)
        proc = self.guest._proc
        if proc is None or not proc.alive:
            from virtkit.errors import StateError  # noqa: PLC0415

            raise StateError(f"QEMU for guest {self.guest.name!r} is not running", action=command)
        return await proc.qmp.call_async(command, arguments)

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

from typing import TYPE_CHECKING, Any

from virtkit.backends.aio_guest import AsyncGuest

if TYPE_CHECKING:
    from virtkit.backends.qemu.guest import QemuGuest

__all__ = ["AsyncQemuGuest"]


class AsyncQemuGuest(AsyncGuest):
    """The same operations as :class:`QemuGuest`, as coroutines.

    Everything :class:`~virtkit.backends.aio_guest.AsyncGuest` offers, plus
    raw QMP calls. Errors are the same
    virtkit errors the sync methods raise.
    """

    guest: QemuGuest

    def __init__(self, guest: QemuGuest) -> None:
        super().__init__(guest)

    def __repr__(self) -> str:
        return f"<AsyncQemuGuest {self.guest!r}>"

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

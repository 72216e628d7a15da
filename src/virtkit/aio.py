"""virtkit for asyncio: the hypervisor API as coroutines, on every backend.

::

    async with virtkit.aio.connect("emulator") as hv:      # or "qemu", a libvirt URI...
        guest = await hv.define(machine)                     # an async guest (guest.aio)
        await guest.start()
        await guest.console.expect("login:", timeout=30)
        async for event in hv.events():                      # lifecycle changes
            print(event.guest, event.old, "->", event.new)
            break

``connect`` returns an :class:`AsyncHypervisor`; use it with ``async with``
(closing kills every guest and removes a private root) or ``await`` it and
call :meth:`AsyncHypervisor.close`. Every blocking step (defining, which
may create disk images; starting; closing) runs on a worker thread, and the
emulator runs its guest code on its own CPU thread, so the event loop never
blocks. The sync API refuses to run inside a running loop with a
``StateError`` that points here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import Any

import attrs

from virtkit.backends import Guest, Hypervisor
from virtkit.backends import connect as _connect
from virtkit.backends.aio_guest import AsyncGuest, GuestTwin, in_thread
from virtkit.errors import ConfigError
from virtkit.model import HostResources, HypervisorType, Machine, State

__all__ = ["AsyncGuest", "AsyncHypervisor", "GuestEvent", "GuestTwin", "connect"]


@attrs.frozen
class GuestEvent:
    """A guest changed state: ``old`` -> ``new`` (``reason`` says why it crashed)."""

    #: the guest's name
    guest: str
    old: State
    new: State
    reason: str | None = None


def _twin(guest: Guest) -> GuestTwin:
    """``guest.aio``: the backend's coroutine twin (qemu's own, or a generic AsyncGuest)."""
    return guest.aio


class AsyncHypervisor:
    """A hypervisor connection whose blocking calls are coroutines.

    Args:
        hypervisor: the (sync) connection to drive; kept as :attr:`sync`.
    """

    def __init__(self, hypervisor: Hypervisor) -> None:
        self.sync = hypervisor
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[GuestEvent]]] = set()
        self._hooked: set[int] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncHypervisor {self.sync!r}>"

    @property
    def name(self) -> str:
        """The backend's name (``"emulator"``, ``"qemu"``...)."""
        return self.sync.name

    @property
    def kind(self) -> HypervisorType:
        """Type 1 or type 2."""
        return self.sync.kind

    @property
    def host(self) -> HostResources:
        """Host capacity and what the guests hold."""
        return self.sync.host

    @property
    def guests(self) -> tuple[GuestTwin, ...]:
        """The defined guests, as their coroutine twins (``guest.aio``)."""
        return tuple(_twin(g) for g in self.sync.guests)

    def guest(self, name: str) -> GuestTwin:
        """The coroutine twin of the defined guest called ``name``."""
        return _twin(self.sync.guest(name))

    async def define(
        self, machine: Machine, *, folder: str | os.PathLike[str] | None = None, **options: Any
    ) -> GuestTwin:
        """Coroutine twin of ``Hypervisor.define``; returns the guest's coroutine twin.

        Raises:
            ConfigError, ResourceError, StateError: as ``Hypervisor.define``.
        """
        guest = await in_thread(self.sync.define, machine, folder=folder, **options)
        self._hook(guest)
        return _twin(guest)

    async def undefine(self, guest: Any) -> None:
        """Coroutine twin of ``Hypervisor.undefine`` (takes a guest or its twin)."""
        sync_guest = getattr(guest, "guest", guest)
        await in_thread(self.sync.undefine, sync_guest)

    async def close(self) -> None:
        """Coroutine twin of ``Hypervisor.close``: kill every guest, forget them."""
        self._closed = True
        await in_thread(self.sync.close)

    async def __aenter__(self) -> AsyncHypervisor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- lifecycle events ----------------------------------------------------------
    def _hook(self, guest: Guest) -> None:
        if id(guest) in self._hooked:
            return
        self._hooked.add(id(guest))
        name = guest.name

        def changed(old: State, new: State) -> None:
            event = GuestEvent(name, old, new, guest.crash_reason)
            for loop, queue in list(self._subscribers):
                with contextlib.suppress(RuntimeError):  # that loop has closed
                    loop.call_soon_threadsafe(queue.put_nowait, event)

        # the shared lifecycle state machine reports every change, from any thread
        guest._lifecycle.add_listener(changed)

    async def events(self) -> AsyncIterator[GuestEvent]:
        """Yield every state change of this connection's guests, as it happens.

        Changes that happen while nobody iterates are not queued. The
        iterator ends when the connection is closed and all events are read.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GuestEvent] = asyncio.Queue()
        entry = (loop, queue)
        self._subscribers.add(entry)
        for guest in self.sync.guests:
            self._hook(guest)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if self._closed or getattr(self.sync, "_closed", False):
                        return
                    continue
                yield event
        finally:
            self._subscribers.discard(entry)


class _Connecting:
    """What :func:`connect` returns: ``await`` it, or use it with ``async with``."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self._name = name
        self._options = options
        self._hv: AsyncHypervisor | None = None

    async def _open(self) -> AsyncHypervisor:
        hv = await in_thread(_connect, self._name, **self._options)
        return AsyncHypervisor(hv)

    def __await__(self) -> Generator[Any, None, AsyncHypervisor]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncHypervisor:
        self._hv = await self._open()
        return self._hv

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hv is not None:
            await self._hv.close()


def connect(name: str = "emulator", **options: Any) -> _Connecting:
    """Open a hypervisor connection for asyncio: ``async with`` or ``await`` it.

    Args:
        name: a backend name (``"emulator"``, ``"qemu"``...), as
            :func:`virtkit.connect`.
        options: backend options, as :func:`virtkit.connect`.

    Raises:
        ConfigError: unknown backend or option (when awaited).
        BackendUnavailable: the backend cannot run here (when awaited).
    """
    if not isinstance(name, str):
        raise ConfigError(f"backend name must be a str (got {name!r})", field="backend")
    return _Connecting(name, options)

"""The libvirt guest's coroutine twin: libvirt's domain events, through libvirtaio, on asyncio.

``guest.aio`` on the libvirt backend is a :class:`LibvirtAsyncGuest`: the
shared :class:`~virtkit.backends.aio_guest.AsyncGuest` API (the same
coroutines on every backend), plus what libvirt's events give:

* :meth:`LibvirtAsyncGuest.events` yields the domain's libvirt lifecycle
  events (:class:`DomainEvent`: ``started/booted``, ``suspended/paused``,
  ``stopped/destroyed``...) as libvirt sends them, also for changes made
  behind virtkit's back (``virsh destroy``);
* :meth:`LibvirtAsyncGuest.wait` is woken by the state change those events
  cause, without polling.

libvirt calls its callbacks on virtkit's libvirtaio loop
(:mod:`~virtkit.backends.libvirt.events`); each is handed to the awaiting
coroutine's own loop with ``call_soon_threadsafe``, so no thread is held
while a coroutine waits and the caller's loop never blocks.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs

from virtkit.backends.aio_guest import AsyncGuest
from virtkit.errors import TimeoutError
from virtkit.images.args import check_timeout
from virtkit.model import State

if TYPE_CHECKING:
    from virtkit.backends.libvirt.guest import LibvirtGuest

__all__ = ["DomainEvent", "LibvirtAsyncGuest", "event_names"]

_STOPPED = (State.SHUTOFF, State.CRASHED)
#: seconds between looks at whether the connection closed while ``events()`` waits
_CLOSED_POLL = 0.5

_EVENTS = (
    "DEFINED",
    "UNDEFINED",
    "STARTED",
    "SUSPENDED",
    "RESUMED",
    "STOPPED",
    "SHUTDOWN",
    "PMSUSPENDED",
    "CRASHED",
)


@attrs.frozen
class DomainEvent:
    """A libvirt lifecycle event of one guest's domain.

    Attributes:
        guest: the guest's (machine's) name.
        domain: the libvirt domain's name.
        uri: the host's libvirt URI.
        event: libvirt's event, lower case (``"started"``, ``"stopped"``...).
        detail: its detail, lower case (``"booted"``, ``"destroyed"``, ``"shutdown"``...).

    The guest's :attr:`~virtkit.Guest.state` follows from these events once
    the backend has handled them (a stop after its console is drained), so
    read the state through ``wait()`` rather than at the moment an event
    arrives.
    """

    guest: str
    domain: str
    uri: str
    event: str
    detail: str


def event_names(lv: Any, event: int, detail: int) -> tuple[str, str]:
    """libvirt's lifecycle ``event`` and ``detail`` numbers as lower-case names."""
    name = next(
        (e for e in _EVENTS if getattr(lv, f"VIR_DOMAIN_EVENT_{e}", None) == event), str(event)
    )
    prefix = f"VIR_DOMAIN_EVENT_{name}_"
    detail_name = next(
        (
            attr[len(prefix) :]
            for attr in dir(lv)
            if attr.startswith(prefix) and getattr(lv, attr) == detail
        ),
        str(detail),
    )
    return name.lower(), detail_name.lower()


class LibvirtAsyncGuest(AsyncGuest):
    """The libvirt guest's API as coroutines, fed by libvirt's domain events.

    Get it as ``guest.aio`` (one per guest); everything else is as
    :class:`~virtkit.backends.aio_guest.AsyncGuest`.

    Args:
        guest: the libvirt guest to drive.
    """

    guest: LibvirtGuest

    def __init__(self, guest: LibvirtGuest) -> None:
        super().__init__(guest)
        self._lock = threading.Lock()
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[DomainEvent]]] = set()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        guest._lifecycle.add_listener(self._state_changed)

    def __repr__(self) -> str:
        return f"<LibvirtAsyncGuest {self.guest!r}>"

    # -- from libvirt's event loop / the lifecycle state machine (any thread) ---------------
    def domain_event(self, event: int, detail: int) -> None:
        """Hand one libvirt lifecycle event to every ``events()`` iterator."""
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            return
        guest = self.guest
        event_name, detail_name = event_names(guest._conn.lv, event, detail)
        uri = guest.hypervisor.uri
        item = DomainEvent(guest.name, guest.domain_name, uri, event_name, detail_name)
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def _state_changed(self, _old: State, _new: State) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, flag in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(flag.set)

    # -- coroutines --------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[DomainEvent]:
        """Yield this guest's libvirt domain events as libvirt delivers them.

        Events that happen while nobody iterates are not queued. The
        iterator ends when the hypervisor connection is closed.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[DomainEvent] = asyncio.Queue()
        entry = (loop, queue)
        with self._lock:
            self._subscribers.add(entry)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=_CLOSED_POLL)
                except builtins.TimeoutError:
                    if self.guest.hypervisor._closed:
                        return
                    continue
                yield item
        finally:
            with self._lock:
                self._subscribers.discard(entry)

    async def wait(self, timeout: float | None = None) -> State:
        """Coroutine twin of ``Guest.wait``, woken by libvirt's events (no polling, no thread).

        Raises:
            TimeoutError: the guest still runs after ``timeout`` seconds.
        """
        limit = check_timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        flag = asyncio.Event()
        entry = (asyncio.get_running_loop(), flag)
        with self._lock:
            self._waiters.add(entry)
        try:
            while (state := self.guest.state) not in _STOPPED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"guest {self.guest.name!r} did not power off within {limit} s "
                        f"(state: {state.value})",
                        timeout=limit,
                    )
                with contextlib.suppress(builtins.TimeoutError):
                    await asyncio.wait_for(flag.wait(), timeout=left)
                flag.clear()
            return state
        finally:
            with self._lock:
                self._waiters.discard(entry)

"""libvirt's event loop: ``libvirtaio`` on an asyncio loop of virtkit's own.

libvirt dispatches domain events, keep-alives and connection-close callbacks
through one event implementation per process. virtkit registers
``libvirtaio`` (libvirt-python's asyncio implementation) bound to an asyncio
event loop that runs on a daemon thread, :data:`EVENT_THREAD_NAME`, so every
libvirt callback runs as an asyncio callback on that loop:

* the sync backend's lifecycle handling (libvirt domain events -> the shared
  state machine) runs there;
* the async twin (:class:`~virtkit.backends.libvirt.aio.LibvirtAsyncGuest`)
  receives libvirt's domain events from there as asyncio callbacks and hands
  them to the caller's loop, so its ``events()`` and ``wait()`` are woken by
  libvirt itself rather than by polling.

libvirtaio assumes that libvirt registers its handles and timers from the
loop's own thread; virtkit opens connections and streams from any thread.
:class:`_ThreadSafeImpl` is the adapter: it hands out handle and timer
numbers at once, applies every registration to libvirtaio on the loop in
the order libvirt made them (``call_soon_threadsafe``, which also wakes the
loop), and once a handle or timer is removed, never calls it again (as
libvirt's own default implementation promises).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["EVENT_THREAD_NAME", "ensure_event_loop", "event_loop"]

#: the thread that runs libvirt's event loop (callbacks run there).
EVENT_THREAD_NAME = "virtkit-libvirt-events"

_lock = threading.Lock()
_state: dict[str, Any] = {"loop": None}


class _ThreadSafeImpl:
    """libvirt's six event-implementation functions, thread-safe, over libvirtaio."""

    def __init__(self, lv: Any, impl: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._lv = lv
        self._impl = impl  # a libvirtaio.virEventAsyncIOImpl bound to ``loop``
        self._loop = loop
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._live: set[int] = set()  # ours, not removed (checked before every dispatch)
        self._theirs: dict[int, int] = {}  # ours -> libvirtaio's (touched on the loop only)
        self._pending: list[Callable[[], None]] = []  # registrations the loop has yet to apply

    def register(self) -> None:
        """Make this the process's libvirt event implementation."""
        self._lv.virEventRegisterImpl(
            self.add_handle,
            self.update_handle,
            self.remove_handle,
            self.add_timeout,
            self.update_timeout,
            self.remove_timeout,
        )

    def _later(self, fn: Callable[[], None]) -> None:
        # one wake-up of the loop for a burst of changes (an RPC turns the connection's
        # watch off and on again): the first queues the drain, the rest join it
        with self._lock:
            self._pending.append(fn)
            wake = len(self._pending) == 1
        if wake:
            self._loop.call_soon_threadsafe(self._apply)

    def _apply(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn in pending:
            fn()

    def _dispatch(self, ours: int, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            live = ours in self._live
        if live:
            fn(ours, *args)

    # -- file handles ----------------------------------------------------------------------
    def add_handle(self, fd: int, event: int, cb: Callable[..., Any], opaque: Any) -> int:
        """libvirt's ``virEventAddHandleFunc``: watch ``fd``; returns the watch number."""
        ours = next(self._ids)
        with self._lock:
            self._live.add(ours)

        def fire(_theirs: int, fd_: int, event_: int, opaque_: Any) -> None:
            self._dispatch(ours, cb, fd_, event_, opaque_)

        def apply() -> None:
            self._theirs[ours] = self._impl._add_handle(fd, event, fire, opaque)

        self._later(apply)
        return ours

    def update_handle(self, watch: int, event: int) -> None:
        """libvirt's ``virEventUpdateHandleFunc``."""

        def apply() -> None:
            theirs = self._theirs.get(watch)
            if theirs is not None:
                self._impl._update_handle(theirs, event)

        self._later(apply)

    def remove_handle(self, watch: int) -> int:
        """libvirt's ``virEventRemoveHandleFunc``: the callback is never called again."""
        with self._lock:
            if watch not in self._live:
                return -1
            self._live.discard(watch)

        def apply() -> None:
            theirs = self._theirs.pop(watch, None)
            if theirs is not None:
                self._impl._remove_handle(theirs)  # frees libvirt's opaque data

        self._later(apply)
        return 0

    # -- timers ----------------------------------------------------------------------------
    def add_timeout(self, timeout: int, cb: Callable[..., Any], opaque: Any) -> int:
        """libvirt's ``virEventAddTimeoutFunc`` (``timeout`` in ms, -1 disabled)."""
        ours = next(self._ids)
        with self._lock:
            self._live.add(ours)

        def fire(_theirs: int, opaque_: Any) -> None:
            self._dispatch(ours, cb, opaque_)

        def apply() -> None:
            self._theirs[ours] = self._impl._add_timeout(timeout, fire, opaque)

        self._later(apply)
        return ours

    def update_timeout(self, timer: int, timeout: int) -> None:
        """libvirt's ``virEventUpdateTimeoutFunc``."""

        def apply() -> None:
            theirs = self._theirs.get(timer)
            if theirs is not None:
                self._impl._update_timeout(theirs, timeout)

        self._later(apply)

    def remove_timeout(self, timer: int) -> int:
        """libvirt's ``virEventRemoveTimeoutFunc``: the callback is never called again."""
        with self._lock:
            if timer not in self._live:
                return -1
            self._live.discard(timer)

        def apply() -> None:
            theirs = self._theirs.pop(timer, None)
            if theirs is not None:
                self._impl._remove_timeout(theirs)

        self._later(apply)
        return 0


def ensure_event_loop(lv: Any) -> asyncio.AbstractEventLoop:
    """Register libvirtaio on virtkit's event loop thread (once per process); the loop.

    Args:
        lv: the ``libvirt`` module.
    """
    with _lock:
        loop: asyncio.AbstractEventLoop | None = _state["loop"]
        if loop is not None:
            return loop
        import libvirtaio  # noqa: PLC0415 - part of libvirt-python, loaded with the backend

        loop = asyncio.new_event_loop()
        impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
        _ThreadSafeImpl(lv, impl, loop).register()
        libvirtaio._current_impl = impl  # what libvirtaio.getCurrentImpl() reports

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()

        threading.Thread(target=run, name=EVENT_THREAD_NAME, daemon=True).start()
        _state["loop"] = loop
        return loop


def event_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop libvirt's callbacks run on (None before the first connection)."""
    loop: asyncio.AbstractEventLoop | None = _state["loop"]
    return loop

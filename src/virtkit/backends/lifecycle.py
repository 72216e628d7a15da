"""The guest lifecycle state machine shared by every backend.

::

    SHUTOFF --start--> RUNNING <--pause/resume--> PAUSED
       ^                  |  \\                      |
       |   shutdown/kill/ |   `--crash--> CRASHED <--'
       `---- power-off ---'                |
       ^---------------kill----------------'

``Lifecycle`` only decides and records; it does no I/O. Public operations run
under an operation lock (one at a time per guest); backends report what the
guest does by itself (power-off, crash, pause) through ``notify_*`` from any
thread, which never waits for that operation lock.

A guest runs before ``start()`` returns, and a quick one may power off or
crash in that window (a loaded host may not run the caller's thread for
seconds). Between :meth:`Lifecycle.begin_start` and
:meth:`Lifecycle.finish_start` what the guest reports is applied to the run
being started, not to the SHUTOFF state it starts from: ``finish_start``
records RUNNING and then what the guest did meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from virtkit.errors import StateError, TimeoutError
from virtkit.images.args import check_timeout
from virtkit.model import State

__all__ = ["ALLOWED", "Lifecycle"]

_ALL = frozenset(State)
_LIVE = frozenset({State.RUNNING, State.PAUSED})

#: action -> states it may start from
ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({State.SHUTOFF, State.CRASHED}),
    "pause": frozenset({State.RUNNING}),
    "resume": frozenset({State.PAUSED}),
    "reset": _LIVE,
    "shutdown": frozenset({State.RUNNING}),
    "kill": _LIVE | {State.CRASHED},
    "snapshot": _ALL,
    "revert": _ALL,
    "delete_snapshot": _ALL,
    "change_media": _ALL,
    "attach": _ALL,
    "detach": _ALL,
    "undefine": frozenset({State.SHUTOFF, State.CRASHED}),
}

_WHY = {
    State.SHUTOFF: "it is shut off",
    State.RUNNING: "it is running",
    State.PAUSED: "it is paused",
    State.CRASHED: "it has crashed",
}

_HINT = {
    "start": "kill() or wait() for it first",
    "pause": "start() or resume() it first",
    "resume": "pause() it first",
    "reset": "start() it first",
    "shutdown": "resume() it first, or kill() it",
    "kill": "it is already stopped",
    "undefine": "kill() or shutdown() it first",
}


class Lifecycle:
    """Run state of one guest, its legal transitions, and waiting for changes."""

    def __init__(self, name: str, state: State = State.SHUTOFF) -> None:
        self.name = name
        self._state = state
        self.crash_reason: str | None = None
        self._cond = threading.Condition()
        self._op_lock = threading.RLock()
        self._listeners: list[Callable[[State, State], None]] = []
        #: why the guest handle is dead (undefined, its hypervisor closed), or None.
        self.retired: str | None = None
        #: while a start runs: the state the new run has reached (and its crash reason)
        self._starting: tuple[State, str | None] | None = None

    @property
    def state(self) -> State:
        """The current state."""
        with self._cond:
            return self._state

    def add_listener(self, callback: Callable[[State, State], None]) -> None:
        """Call ``callback(old, new)`` after every change (outside the lock)."""
        self._listeners.append(callback)

    def retire(self, why: str) -> None:
        """Make the handle dead: every later operation raises ``StateError`` saying ``why``."""
        with self._cond:
            self.retired = why
            self._cond.notify_all()

    def check_alive(self, action: str) -> None:
        """Raise ``StateError`` if the handle was retired."""
        why = self.retired
        if why is not None:
            raise StateError(
                f"cannot {action.replace('_', ' ')} guest {self.name!r}: {why}; this handle is "
                "dead (define the machine again for a new one)",
                state=self.state,
                action=action,
            )

    def check(self, action: str) -> None:
        """Raise ``StateError`` unless ``action`` is legal now (and the handle is alive)."""
        self.check_alive(action)
        with self._cond:
            state = self._state
        if state not in ALLOWED[action]:
            hint = _HINT.get(action)
            raise StateError(
                f"cannot {action.replace('_', ' ')} guest {self.name!r}: {_WHY[state]}"
                + (f" ({hint})" if hint else ""),
                state=state,
                action=action,
            )

    @contextmanager
    def operation(self, action: str) -> Iterator[None]:
        """Hold the operation lock and check ``action`` is legal; on exception
        inside the block the state is left as the block left it."""
        with self._op_lock:
            self.check(action)
            yield

    def set(self, state: State, *, reason: str | None = None) -> None:
        """Record a new state (``reason`` is kept for CRASHED)."""
        with self._cond:
            changes = self._record(state, reason)
        self._tell(changes)

    def _record(self, state: State, reason: str | None) -> list[tuple[State, State]]:
        """Change the state (the condition's lock held); the change for the listeners."""
        old = self._state
        self._state = state
        self.crash_reason = reason if state is State.CRASHED else None
        self._cond.notify_all()
        return [] if old is state else [(old, state)]

    def _tell(self, changes: list[tuple[State, State]]) -> None:
        for old, new in changes:
            for callback in list(self._listeners):
                callback(old, new)

    def notify(
        self, state: State, *, reason: str | None = None, only_from: frozenset[State] = _ALL
    ) -> bool:
        """Record a change the guest made by itself, if the current state allows it.

        Returns whether the state changed. A power-off reported after a kill
        (already SHUTOFF) is ignored rather than an error. While a start runs
        the change applies to the run being started and is recorded by
        :meth:`finish_start` (``False`` is returned).
        """
        with self._cond:
            if self._starting is not None:
                current = self._starting[0]
                if current in only_from and current is not state:
                    self._starting = (state, reason)
                return False
            if self._state not in only_from or self._state is state:
                return False
            changes = self._record(state, reason)
        self._tell(changes)
        return True

    def begin_start(self) -> None:
        """A start is under way (operation lock held): the new run counts as RUNNING
        for :meth:`notify` until :meth:`finish_start` or :meth:`abort_start`."""
        with self._cond:
            self._starting = (State.RUNNING, None)

    def abort_start(self) -> None:
        """The start failed: forget what the run that did not start reported."""
        with self._cond:
            self._starting = None

    def finish_start(self) -> State:
        """The start succeeded: record RUNNING, then the state the guest reached
        meanwhile (SHUTOFF if it already powered off, CRASHED, PAUSED), and return it.

        Both changes reach the listeners, in order.
        """
        with self._cond:
            reached, reason = self._starting or (State.RUNNING, None)
            self._starting = None
            changes = self._record(State.RUNNING, None)
            if reached is not State.RUNNING:
                changes += self._record(reached, reason)
        self._tell(changes)
        return reached

    def wait_for(
        self, predicate: Callable[[State], bool], timeout: float | None, what: str
    ) -> State:
        """Block until ``predicate(state)`` holds; raise ``TimeoutError`` after ``timeout``.

        Raises:
            ConfigError: ``timeout`` is not None or a number of seconds >= 0.
        """
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.check_alive("wait for")
        with self._cond:
            while not predicate(self._state):
                if self.retired is not None:
                    self.check_alive("wait for")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"guest {self.name!r} did not {what} within {timeout} s "
                        f"(state: {self._state.value})",
                        timeout=timeout,
                    )
                self._cond.wait(remaining)
            return self._state

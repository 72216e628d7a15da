"""The whole sync conformance suite, every blocking call made through :mod:`virtkit.aio`.

:class:`AioDriven` replaces the suite's ``hypervisor`` fixture with a
connection opened by ``virtkit.aio.connect`` on an event loop of its own
(a thread), seen through a thin sync facade: ``define``, ``undefine`` and
``close`` await :class:`~virtkit.aio.AsyncHypervisor`'s coroutines, and each
guest's ``start``, ``pause``, ``resume``, ``reset``, ``shutdown``, ``kill``,
``wait``, ``snapshot``, ``revert``, ``delete_snapshot``, ``change_media``,
``attach``, ``detach`` and its console's ``expect`` and ``write`` await the
coroutine twin (``guest.aio``). Reads (state, console output, the machine,
the folder) go to the guest itself. So every behaviour the sync suite pins
is checked through the async API too::

    from virtkit.testing.aio_driven import AioDriven
    from virtkit.testing.conformance import ConformanceSuite

    class TestEmulatorThroughAio(AioDriven, ConformanceSuite):
        backend = "emulator"
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

import virtkit
from virtkit.model import State

__all__ = ["AioDriven", "AioDrivenGuest", "AioDrivenHypervisor", "LoopThread", "aio_driven"]

T = TypeVar("T")

#: the guest calls that await the coroutine twin
GUEST_COROUTINES = frozenset(
    {
        "start",
        "pause",
        "resume",
        "reset",
        "shutdown",
        "kill",
        "wait",
        "snapshot",
        "revert",
        "delete_snapshot",
        "change_media",
        "attach",
        "detach",
    }
)


class LoopThread:
    """An asyncio event loop running on a daemon thread; :meth:`run` awaits a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="virtkit-aio-driven", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


class _Console:
    def __init__(self, guest: AioDrivenGuest) -> None:
        self._guest = guest

    def expect(self, pattern: Any, timeout: float | None = 30.0) -> Any:
        return self._guest._loop.run(self._guest.aio.console.expect(pattern, timeout=timeout))

    def write(self, data: bytes | str) -> None:
        self._guest._loop.run(self._guest.aio.console.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._guest.sync.console, name)


class AioDrivenGuest:
    """A guest whose blocking calls await its coroutine twin; everything else is the guest's."""

    def __init__(self, twin: Any, hypervisor: AioDrivenHypervisor) -> None:
        self.aio = twin
        self.sync: virtkit.Guest = twin.guest
        self.hypervisor = hypervisor
        self._loop = hypervisor.loop
        self.console = _Console(self)

    def __repr__(self) -> str:
        return f"<AioDrivenGuest {self.sync!r}>"

    def __getattr__(self, name: str) -> Any:
        if name in GUEST_COROUTINES:
            coroutine = getattr(self.aio, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                return self._loop.run(coroutine(*args, **kwargs))

            return call
        return getattr(self.sync, name)

    def __enter__(self) -> AioDrivenGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """As ``Guest``'s: kill it if it runs, then undefine it (both awaited)."""
        if self.sync.state in (State.RUNNING, State.PAUSED):
            self._loop.run(self.aio.kill())
        self.hypervisor.undefine(self)


class AioDrivenHypervisor:
    """The sync ``Hypervisor`` API over an :class:`~virtkit.aio.AsyncHypervisor`."""

    def __init__(self, ahv: virtkit.aio.AsyncHypervisor, loop: LoopThread) -> None:
        self.aio = ahv
        self.sync = ahv.sync
        self.loop = loop
        self._facades: dict[int, AioDrivenGuest] = {}

    def __repr__(self) -> str:
        return f"<AioDrivenHypervisor {self.sync!r}>"

    def _facade(self, twin: Any) -> AioDrivenGuest:
        key = id(twin.guest)
        found = self._facades.get(key)
        if found is None or found.sync is not twin.guest:
            found = self._facades[key] = AioDrivenGuest(twin, self)
        return found

    def define(self, machine: virtkit.Machine, **options: Any) -> AioDrivenGuest:
        """``await hv.define(...)``."""
        return self._facade(self.loop.run(self.aio.define(machine, **options)))

    def undefine(self, guest: Any) -> None:
        """``await hv.undefine(guest)``."""
        self.loop.run(self.aio.undefine(getattr(guest, "sync", guest)))

    def close(self) -> None:
        """``await hv.close()``."""
        self.loop.run(self.aio.close())

    @property
    def guests(self) -> tuple[AioDrivenGuest, ...]:
        """The defined guests, as facades (the same object for the same guest)."""
        return tuple(self._facade(t) for t in self.aio.guests)

    def guest(self, name: str) -> AioDrivenGuest:
        """The facade of the guest called ``name``."""
        return self._facade(self.aio.guest(name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sync, name)


@contextlib.contextmanager
def aio_driven(
    backend: str, root: str | os.PathLike[str], **options: Any
) -> Iterator[AioDrivenHypervisor]:
    """``await virtkit.aio.connect(backend, root=root, **options)`` on a loop thread of its
    own, as a sync facade; closed (awaited) and the loop stopped on exit."""
    loop = LoopThread()
    try:

        async def open_it() -> virtkit.aio.AsyncHypervisor:
            return await virtkit.aio.connect(backend, root=root, **options)

        hv = AioDrivenHypervisor(loop.run(open_it()), loop)
        try:
            yield hv
        finally:
            hv.close()
    finally:
        loop.close()


class AioDriven:
    """Mixin for a conformance suite class: its ``hypervisor`` is driven through virtkit.aio.

    Put it before the suite in the bases; the class's ``backend`` and
    ``connect_options`` are used as by the suite.
    """

    backend: str
    connect_options: dict[str, Any]

    @pytest.fixture
    def hypervisor(self, tmp_path: Path) -> Iterator[AioDrivenHypervisor]:
        """A connection made by ``await virtkit.aio.connect(...)``; closed (awaited) after."""
        with aio_driven(self.backend, tmp_path / "guests", **self.connect_options) as hv:
            yield hv

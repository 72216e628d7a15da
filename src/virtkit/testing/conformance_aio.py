"""The conformance suite driven through the asyncio API (:mod:`virtkit.aio`).

The same behaviours :mod:`virtkit.testing.conformance` pins through the sync
API (lifecycle, console, power, snapshots, errors), here reached only
through ``virtkit.aio.connect`` / ``await hv.define`` / ``guest.aio``, plus
what only the async API has: ``async with``, lifecycle events, and the
clear error a blocking call raises inside a running loop. A backend opts in
as with the sync suite::

    class TestMyBackendAio(AsyncConformanceSuite):
        backend = "mybackend"

Each test runs its coroutine with :func:`asyncio.run`, so no pytest plugin
for asyncio is needed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import pytest

import virtkit
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests

__all__ = ["AsyncConformanceSuite"]

Factory = Callable[..., Awaitable[Any]]


def _state(guest: Any) -> State:
    return guest.state  # type: ignore[no-any-return]


class AsyncConformanceSuite:
    """Conformance tests through the async API; subclass and set ``backend``.

    Class attributes, as the sync suite's: ``backend``, ``connect_options``,
    ``disk_format``, ``memory``, ``timeout``.
    """

    backend: ClassVar[str]
    connect_options: ClassVar[dict[str, Any]] = {}
    disk_format: ClassVar[str] = "qcow2"
    memory: ClassVar[str] = "32MiB"
    timeout: ClassVar[float] = 30.0

    def run(
        self,
        tmp_path: Path,
        body: Callable[[virtkit.aio.AsyncHypervisor, Factory], Coroutine[Any, Any, None]],
    ) -> None:
        """Run ``body(hv, make)`` in a fresh event loop with a connection under ``tmp_path``."""

        async def main() -> None:
            made = 0

            async def make(guest: str, **fields: Any) -> Any:
                nonlocal made
                made += 1
                path = tmp_path / f"{guest}-{made}.{self.disk_format}"
                guests.write_disk(path, guest, format=self.disk_format)
                fields.setdefault("memory", self.memory)
                machine = Machine(
                    name=f"{guest}-{made}",
                    disks=[Disk(str(path), format=self.disk_format)],
                    **fields,
                )
                return await hv.define(machine)

            async with virtkit.aio.connect(
                self.backend, root=tmp_path / "guests", **self.connect_options
            ) as hv:
                await asyncio.wait_for(body(hv, make), self.timeout * 4)

        asyncio.run(main())

    # -- lifecycle ---------------------------------------------------------------------
    def test_start_runs_and_powers_off(self, tmp_path: Path) -> None:
        """await start(); await wait() returns SHUTOFF after the hello guest's output."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("hello")
            assert guest.state is State.SHUTOFF
            await guest.start()
            assert await guest.wait(timeout=self.timeout) is State.SHUTOFF
            assert guest.console.output == guests.OUTPUT["hello"]

        self.run(tmp_path, body)

    def test_pause_resume_kill(self, tmp_path: Path) -> None:
        """pause freezes the counter, resume continues it, kill stops it."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("counter")
            await guest.start()
            await guest.console.expect("count 1", timeout=self.timeout)
            await guest.pause()
            assert guest.state is State.PAUSED
            frozen = guest.console.output
            await asyncio.sleep(0.3)
            assert guest.console.output == frozen
            await guest.resume()
            await guest.console.expect(re.compile(rb"count \d+"), timeout=self.timeout)
            assert _state(guest) is State.RUNNING
            await guest.kill()
            assert _state(guest) is State.SHUTOFF

        self.run(tmp_path, body)

    def test_illegal_transition_is_a_state_error(self, tmp_path: Path) -> None:
        """await pause() on a shut-off guest raises StateError, as the sync call does."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("counter")
            with pytest.raises(virtkit.StateError, match="shut off"):
                await guest.pause()
            await guest.start()
            with pytest.raises(virtkit.StateError):
                await guest.start()
            await guest.kill()

        self.run(tmp_path, body)

    def test_shutdown_presses_the_power_button(self, tmp_path: Path) -> None:
        """await shutdown() powers the counter guest off through ACPI."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("counter")
            await guest.start()
            await guest.console.expect("count 0", timeout=self.timeout)
            await guest.shutdown(timeout=self.timeout)
            assert guest.state is State.SHUTOFF

        self.run(tmp_path, body)

    # -- console -----------------------------------------------------------------------
    def test_console_write_and_expect(self, tmp_path: Path) -> None:
        """Input written through the twin is echoed; expect times out with TimeoutError."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("echo")
            await guest.start()
            await guest.console.expect("echo ready\r\n", timeout=self.timeout)
            await guest.console.write(b"abc\r")
            match = await guest.console.expect("abc\r\n", timeout=self.timeout)
            assert match.group(0) == b"abc\r\n"
            with pytest.raises(virtkit.TimeoutError):
                await guest.console.expect("never printed", timeout=0.2)
            await guest.console.write(b"q")
            await guest.console.expect("bye", timeout=self.timeout)
            assert await guest.wait(timeout=self.timeout) is State.SHUTOFF

        self.run(tmp_path, body)

    def test_many_guests_concurrently(self, tmp_path: Path) -> None:
        """Three guests started with gather all print and power off."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            many = [await make("hello") for _ in range(3)]
            await asyncio.gather(*(g.start() for g in many))
            states = await asyncio.gather(*(g.wait(timeout=self.timeout) for g in many))
            assert states == [State.SHUTOFF] * 3
            assert all(g.console.output == guests.OUTPUT["hello"] for g in many)
            assert len(hv.guests) == 3

        self.run(tmp_path, body)

    # -- snapshots ---------------------------------------------------------------------
    def test_snapshot_revert_delete(self, tmp_path: Path) -> None:
        """A full snapshot taken while running reverts to running; delete removes it."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("counter")
            await guest.start()
            await guest.console.expect("count 1", timeout=self.timeout)
            snap = await guest.snapshot("s1", memory=True)
            assert snap.name == "s1"
            await guest.kill()
            await guest.revert("s1")
            assert guest.state is State.RUNNING
            await guest.kill()
            await guest.delete_snapshot("s1")
            assert [s.name for s in guest.guest.snapshots] == []

        self.run(tmp_path, body)

    # -- what only the async API has ---------------------------------------------------
    def test_events_report_lifecycle_changes(self, tmp_path: Path) -> None:
        """hv.events() yields SHUTOFF->RUNNING and RUNNING->SHUTOFF for a guest that runs."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("hello")
            seen: list[virtkit.aio.GuestEvent] = []

            async def collect() -> None:
                async for event in hv.events():
                    seen.append(event)
                    if event.new is State.SHUTOFF:
                        return

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.05)  # let the iterator subscribe
            await guest.start()
            await asyncio.wait_for(task, self.timeout)
            assert [(e.guest, e.old, e.new) for e in seen] == [
                (guest.guest.name, State.SHUTOFF, State.RUNNING),
                (guest.guest.name, State.RUNNING, State.SHUTOFF),
            ]

        self.run(tmp_path, body)

    def test_blocking_call_inside_the_loop_is_refused(self, tmp_path: Path) -> None:
        """The sync start(), wait(), define() and expect() raise StateError inside a loop."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("counter")
            for call in (
                guest.guest.start,
                lambda: guest.guest.wait(timeout=1),
                lambda: guest.guest.console.expect("x", timeout=1),
                lambda: hv.sync.define(Machine(name="other", memory=self.memory)),
            ):
                with pytest.raises(virtkit.StateError, match="running asyncio event loop"):
                    call()
            assert guest.state is State.SHUTOFF
            assert len(hv.guests) == 1

        self.run(tmp_path, body)

    def test_undefine_and_close(self, tmp_path: Path) -> None:
        """await undefine() forgets a stopped guest; the connection closes by async with."""

        async def body(hv: virtkit.aio.AsyncHypervisor, make: Factory) -> None:
            guest = await make("hello")
            await hv.undefine(guest)
            assert hv.guests == ()
            running = await make("counter")
            await running.start()

        self.run(tmp_path, body)

"""virtkit.aio: connect as await or async with, the twins, events, and the loop guard."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit.backends.aio_guest import AsyncGuest, refuse_in_loop
from virtkit.testing import guests


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def _machine(tmp_path: Path, guest: str, name: str | None = None) -> virtkit.Machine:
    disk = tmp_path / f"{name or guest}.raw"
    guests.write_disk(disk, guest, format="raw")
    return virtkit.Machine(
        name=name or guest, memory="2MiB", disks=[virtkit.Disk(str(disk), format="raw")]
    )


class TestConnect:
    def test_await_then_close(self, tmp_path: Path) -> None:
        """await connect() gives an open connection; await close() kills guests and closes it."""

        async def main() -> None:
            hv = await virtkit.aio.connect("emulator", root=tmp_path / "g")
            assert hv.name == "emulator" and hv.kind is virtkit.HypervisorType.TYPE2
            assert hv.host.cpus > 0
            guest = await hv.define(_machine(tmp_path, "counter"))
            await guest.start()
            await hv.close()
            assert guest.state is not virtkit.State.RUNNING
            with pytest.raises(virtkit.StateError):
                await hv.define(_machine(tmp_path, "hello"))

        run(main())

    def test_async_with_closes_on_error(self, tmp_path: Path) -> None:
        """Leaving `async with` by an exception still kills the running guest."""
        seen: list[Any] = []

        async def main() -> None:
            async with virtkit.aio.connect("emulator", root=tmp_path / "g") as hv:
                guest = await hv.define(_machine(tmp_path, "counter"))
                await guest.start()
                seen.append(guest)
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            run(main())
        assert seen[0].state is not virtkit.State.RUNNING

    def test_bad_backend(self) -> None:
        """An unknown backend is a ConfigError when awaited; a non-str name at once."""
        with pytest.raises(virtkit.ConfigError, match="unknown backend 'nope'"):
            run(virtkit.aio.connect("nope").__aenter__())
        with pytest.raises(virtkit.ConfigError, match="backend name"):
            virtkit.aio.connect(3)  # type: ignore[arg-type]

    def test_guest_lookup_and_undefine(self, tmp_path: Path) -> None:
        """guests/guest(name) give twins; undefine takes a twin or a sync guest."""

        async def main() -> None:
            async with virtkit.aio.connect("emulator", root=tmp_path / "g") as hv:
                a = await hv.define(_machine(tmp_path, "hello", "a"))
                await hv.define(_machine(tmp_path, "hello", "b"))
                assert [g.guest.name for g in hv.guests] == ["a", "b"]
                assert hv.guest("b").guest is hv.sync.guest("b")
                assert isinstance(a, AsyncGuest) and a.name == "a"
                await hv.undefine(a)
                await hv.undefine(hv.sync.guest("b"))
                assert hv.guests == ()

        run(main())


class TestEvents:
    def test_events_end_when_the_connection_closes(self, tmp_path: Path) -> None:
        """An events() iterator finishes once the connection is closed."""

        async def main() -> list[virtkit.aio.GuestEvent]:
            hv = await virtkit.aio.connect("emulator", root=tmp_path / "g")
            guest = await hv.define(_machine(tmp_path, "counter"))
            got: list[virtkit.aio.GuestEvent] = []

            async def collect() -> None:
                async for event in hv.events():
                    got.append(event)

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.05)
            await guest.start()
            await guest.pause()
            await guest.resume()
            await hv.close()
            await asyncio.wait_for(task, 10)
            return got

        events = run(main())
        transitions = [(e.old, e.new) for e in events]
        assert transitions[:3] == [
            (virtkit.State.SHUTOFF, virtkit.State.RUNNING),
            (virtkit.State.RUNNING, virtkit.State.PAUSED),
            (virtkit.State.PAUSED, virtkit.State.RUNNING),
        ]
        assert transitions[-1][1] is virtkit.State.SHUTOFF  # killed by close()

    def test_crash_reason_is_in_the_event(self, tmp_path: Path) -> None:
        """A triple fault arrives as a CRASHED event carrying the reason."""

        async def main() -> virtkit.aio.GuestEvent:
            async with virtkit.aio.connect("emulator", root=tmp_path / "g") as hv:
                guest = await hv.define(_machine(tmp_path, "triple-fault"))
                events = hv.events()
                first = asyncio.ensure_future(events.__anext__())
                await asyncio.sleep(0.05)
                await guest.start()
                await first
                return await asyncio.wait_for(events.__anext__(), 30)

        event = run(main())
        assert event.new is virtkit.State.CRASHED
        assert event.reason


class TestLoopGuard:
    def test_every_blocking_call_is_refused_in_a_loop(self, tmp_path: Path) -> None:
        """Sync calls inside a running loop raise one StateError naming the call; twins work."""
        hv = virtkit.connect("emulator", root=tmp_path / "g")
        guest = hv.define(_machine(tmp_path, "counter"))
        try:

            async def main() -> None:
                calls = {
                    "start": guest.start,
                    "kill": guest.kill,
                    "wait": lambda: guest.wait(1),
                    "snapshot": lambda: guest.snapshot("s", memory=False),
                    "define": lambda: hv.define(_machine(tmp_path, "hello")),
                    "undefine": lambda: hv.undefine(guest),
                    "close": hv.close,
                    "expect": lambda: guest.console.expect("x", timeout=5),
                }
                for name, call in calls.items():
                    with pytest.raises(virtkit.StateError, match=rf"{name}\(\) blocks"):
                        call()
                assert guest.console.output == b""  # nothing happened
                await guest.aio.start()
                await guest.aio.console.expect("count 0", timeout=30)
                await guest.aio.kill()

            run(main())
            assert guest.state is virtkit.State.SHUTOFF
            assert [g.name for g in hv.guests] == ["counter"]
        finally:
            hv.close()

    def test_guard_is_silent_outside_a_loop_and_in_threads(self) -> None:
        """refuse_in_loop() passes in plain code and on worker threads of a loop."""
        refuse_in_loop("start")

        async def main() -> None:
            await asyncio.to_thread(refuse_in_loop, "start")
            with pytest.raises(virtkit.StateError):
                refuse_in_loop("start")

        run(main())


@pytest.mark.qemu
class TestQemuTwin:
    def test_qemu_guests_keep_their_own_twin(self, tmp_path: Path) -> None:
        """Through virtkit.aio a qemu guest's twin is the qemu backend's (it has qmp())."""

        async def main() -> None:
            async with virtkit.aio.connect("qemu", accel="tcg", root=tmp_path / "g") as hv:
                guest = await hv.define(_machine(tmp_path, "counter"))
                await guest.start()
                status = await guest.qmp("query-status")  # type: ignore[attr-defined]
                assert status["status"] == "running"
                await guest.console.expect("count 0", timeout=60)

        run(main())


_BACKENDS = [
    pytest.param("emulator", {}, id="emulator"),
    pytest.param("qemu", {"accel": "tcg"}, id="qemu", marks=pytest.mark.qemu),
    pytest.param(
        "libvirt", {"uri": "qemu:///system", "accel": "tcg"}, id="libvirt", marks=pytest.mark.qemu
    ),
]


class TestLoopGuardOnEveryBackend:
    @pytest.mark.parametrize(("backend", "options"), _BACKENDS)
    def test_the_same_error_on_every_backend(
        self, tmp_path: Path, backend: str, options: dict[str, Any]
    ) -> None:
        """Each blocking call raises the very same StateError on the emulator, qemu and
        libvirt, starts nothing, and the coroutine twins still work afterwards."""
        if backend == "libvirt":  # the test command starts libvirtd; so does this
            script = Path(__file__).resolve().parents[1] / "scripts" / "libvirtd"
            subprocess.run([str(script), "start"], check=True, capture_output=True, timeout=300)
        name = f"guard-{os.getpid()}-{time.monotonic_ns() % 100000}"
        hv = virtkit.connect(backend, root=tmp_path / "g", **options)
        try:
            guest = hv.define(_machine(tmp_path, "counter", name=name))
            messages: dict[str, str] = {}

            async def main() -> None:
                calls = {
                    "start": guest.start,
                    "pause": guest.pause,
                    "kill": guest.kill,
                    "shutdown": guest.shutdown,
                    "wait": lambda: guest.wait(1),
                    "define": lambda: hv.define(_machine(tmp_path, "hello")),
                    "undefine": lambda: hv.undefine(guest),
                    "close": hv.close,
                }
                for action, call in calls.items():
                    with pytest.raises(virtkit.StateError) as info:
                        call()
                    messages[action] = str(info.value)
                assert guest.state is virtkit.State.SHUTOFF  # nothing was started
                await guest.aio.start()
                await guest.aio.console.expect("count 1", timeout=60)
                await guest.aio.kill()

            run(main())
            for action, message in messages.items():
                assert message == _GUARD.format(action=action), (backend, message)
        finally:
            hv.close()


_GUARD = (
    "{action}() blocks and was called inside a running asyncio event loop, which it would "
    "freeze; await its coroutine twin instead (await guest.aio.start(), "
    "virtkit.aio.connect(...)) or run it in a thread (await asyncio.to_thread(...))"
)

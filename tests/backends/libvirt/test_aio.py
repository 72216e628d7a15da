"""The asyncio conformance suite on the libvirt backend (qemu:///system, TCG), and libvirt's
events through libvirtaio to the async twin."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, ClassVar

import libvirtaio
import pytest
from libvirt_hosts import LOCAL, PREFIX, run

import virtkit
import virtkit.aio
from virtkit.backends.libvirt import LibvirtGuest, LibvirtHypervisor
from virtkit.backends.libvirt.aio import LibvirtAsyncGuest
from virtkit.backends.libvirt.events import EVENT_THREAD_NAME, event_loop
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests
from virtkit.testing.conformance_aio import AsyncConformanceSuite

TIMEOUT = 60


def connect(root: Path) -> LibvirtHypervisor:
    hv = virtkit.connect("libvirt", uri=LOCAL, accel="tcg", root=root, name_prefix=PREFIX + "aio-")
    assert isinstance(hv, LibvirtHypervisor)
    return hv


def machine(tmp_path: Path, name: str, kind: str) -> Machine:
    disk = tmp_path / f"{name}.qcow2"
    guests.write_disk(disk, kind, format="qcow2")
    return Machine(name=name, memory="32MiB", disks=(Disk(str(disk)),))


@pytest.mark.usefixtures("libvirtd")
class TestLibvirtAio(AsyncConformanceSuite):
    """libvirt domains driven through virtkit.aio."""

    backend = "libvirt"
    connect_options: ClassVar[dict[str, Any]] = {
        "uri": "qemu:///system",
        "accel": "tcg",
        "name_prefix": PREFIX + "aio-",
    }
    timeout = 60.0


class TestLibvirtEventsOnAsyncio:
    """libvirt's events run through libvirtaio; the async twin is woken by them."""

    def test_libvirtaio_dispatches_libvirt_events(self, libvirtd: str, tmp_path: Path) -> None:
        """libvirt's event implementation is libvirtaio on virtkit's loop thread, and the
        lifecycle callbacks run there as asyncio callbacks."""
        seen: list[tuple[str, bool]] = []
        hv = connect(tmp_path)
        try:
            impl = libvirtaio.getCurrentImpl()
            assert impl is not None
            assert impl.loop is event_loop()
            assert impl.loop.is_running()
            guest = hv.define(machine(tmp_path, "where", "hello"))
            assert isinstance(guest, LibvirtGuest)
            original = guest._on_lifecycle

            def spy(event: int, detail: int) -> None:
                loop = asyncio.get_running_loop()  # raises outside an asyncio callback
                seen.append((threading.current_thread().name, loop is impl.loop))
                original(event, detail)

            guest._on_lifecycle = spy  # type: ignore[method-assign]
            guest.start()
            assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        finally:
            hv.close()
        assert seen
        assert all(entry == (EVENT_THREAD_NAME, True) for entry in seen)

    def test_domain_events_reach_the_async_twin(self, libvirtd: str, tmp_path: Path) -> None:
        """events() yields libvirt's own lifecycle events, virsh's too; wait() wakes on the
        destroy done behind virtkit's back and reports the crash."""

        async def scenario() -> list[tuple[str, str]]:
            async with virtkit.aio.connect(
                "libvirt", uri=LOCAL, accel="tcg", root=tmp_path, name_prefix=PREFIX + "aio-"
            ) as hv:
                twin = await hv.define(machine(tmp_path, "evented", "counter"))
                assert isinstance(twin, LibvirtAsyncGuest)
                guest = twin.guest
                assert guest.aio is twin  # one twin per guest
                got: list[tuple[str, str]] = []

                async def collect() -> None:
                    async for event in twin.events():
                        assert event.guest == "evented"
                        assert event.domain == PREFIX + "aio-evented"
                        assert event.uri == LOCAL
                        got.append((event.event, event.detail))
                        if event.event == "stopped":
                            return

                collector = asyncio.create_task(collect())
                await asyncio.sleep(0)
                await twin.start()
                await twin.console.expect("count 1", timeout=TIMEOUT)
                await twin.pause()
                await twin.resume()
                with pytest.raises(virtkit.TimeoutError, match="within 0.2 s"):
                    await twin.wait(timeout=0.2)
                waiter = asyncio.create_task(twin.wait(timeout=TIMEOUT))
                await asyncio.sleep(0.2)
                assert not waiter.done()
                await asyncio.to_thread(run, "virsh", "-c", LOCAL, "destroy", guest.domain_name)
                assert await waiter is State.CRASHED
                assert "destroyed outside virtkit" in str(guest.crash_reason)
                await asyncio.wait_for(collector, TIMEOUT)
                return got

        got = asyncio.run(scenario())
        assert ("started", "booted") in got
        assert ("suspended", "paused") in got
        assert ("resumed", "unpaused") in got
        assert got[-1] == ("stopped", "destroyed")

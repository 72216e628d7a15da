"""The whole sync conformance suite with every blocking call made through virtkit.aio.

:class:`~virtkit.testing.aio_driven.AioDriven` opens the connection with
``virtkit.aio.connect`` and routes define/undefine/close and each guest's
lifecycle, snapshot, device and console calls through their coroutines, on
both built-in backends (the async suite in test_conformance_aio.py adds what
only the async API has: ``async with``, events, the loop guard).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import virtkit
from virtkit.testing import guests
from virtkit.testing.aio_driven import AioDriven, aio_driven
from virtkit.testing.conformance import ConformanceSuite


class TestEmulatorThroughAio(AioDriven, ConformanceSuite):
    """The in-process emulator, every blocking call awaited."""

    backend = "emulator"
    timeout = 10.0
    reports_boot_failure = True
    crashes_on_triple_fault = True


@pytest.mark.qemu
class TestQemuThroughAio(AioDriven, ConformanceSuite):
    """qemu-system-x86_64 (TCG), every blocking call awaited."""

    backend = "qemu"
    connect_options = {"accel": "tcg"}  # noqa: RUF012 - read-only class setting
    timeout = 60.0
    live_media = True
    hot_plug = True


class TestTheFacade:
    def test_calls_go_through_the_coroutine_twins(self, tmp_path: Path) -> None:
        """Blocking calls run as coroutines on the loop thread (their twin's), not here."""
        seen: list[str] = []
        with aio_driven("emulator", tmp_path / "g") as hv:
            assert isinstance(hv.aio, virtkit.aio.AsyncHypervisor)
            disk = tmp_path / "hello.raw"
            guests.write_disk(disk, "hello", format="raw")
            guest = hv.define(
                virtkit.Machine(
                    name="hello", memory="2MiB", disks=[virtkit.Disk(str(disk), format="raw")]
                )
            )
            real_start = guest.aio.start

            async def start() -> None:
                seen.append(threading.current_thread().name)
                await real_start()

            guest.aio.start = start
            guest.start()
            assert guest.wait(timeout=30) is virtkit.State.SHUTOFF
            assert seen == ["virtkit-aio-driven"]  # awaited on the facade's loop thread
            assert hv.guests == (guest,)

"""The coroutine twin of the Guest API and the sync API's refusal inside an event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import Disk, Machine, State


class TestAsync:
    def test_guests_start_and_stop_concurrently_without_cross_talk(
        self, hv: QemuHypervisor, tmp_path: Path, sectors
    ) -> None:  # type: ignore[no-untyped-def]
        """Three guests driven with asyncio.gather each see only their own console output."""
        from bootsectors import make_boot_disk

        guests = []
        for i in range(3):
            disk = make_boot_disk(tmp_path / f"g{i}.qcow2", sectors["ignore-acpi"])
            guests.append(
                hv.define(
                    Machine(name=f"g{i}", memory="16MiB", disks=[Disk(path=str(disk), bus="ide")])
                )
            )

        async def main() -> None:
            await asyncio.gather(*(g.aio.start() for g in guests))
            await asyncio.gather(*(g.aio.console.expect("ignoring ACPI", 30) for g in guests))
            statuses = await asyncio.gather(*(g.aio.qmp("query-status") for g in guests))
            assert all(s["running"] for s in statuses)
            await asyncio.gather(*(g.aio.kill() for g in guests))

        asyncio.run(main())
        assert all(g.state is State.SHUTOFF for g in guests)
        assert all(g.console.output.count(b"ignoring ACPI") == 1 for g in guests)
        assert hv.host.allocated_memory == 0

    def test_sync_call_inside_a_running_loop_is_refused(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """guest.start() from a coroutine raises StateError pointing at guest.aio, and starts nothing."""
        guest = hv.define(
            Machine(
                name="sync",
                memory="16MiB",
                disks=[Disk(path=str(boot_disk("ignore-acpi")), bus="ide")],
            )
        )

        async def main() -> None:
            with pytest.raises(virtkit.StateError, match="aio"):
                guest.start()

        asyncio.run(main())
        assert guest.state is State.SHUTOFF and guest.pid is None

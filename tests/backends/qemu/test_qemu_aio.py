"""The coroutine twin of the Guest API and the sync API's refusal inside an event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import CdRom, Disk, Machine, State


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

    def test_async_waits_time_out_and_report_power_off(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """aio.console.expect and aio.wait raise virtkit.TimeoutError naming their limit; aio.wait
        returns SHUTOFF once the guest powers itself off."""
        guest = hv.define(
            Machine(
                name="await", memory="16MiB", disks=[Disk(path=str(boot_disk("hello")), bus="ide")]
            )
        )
        idle = hv.define(
            Machine(
                name="idle",
                memory="16MiB",
                disks=[Disk(path=str(boot_disk("ignore-acpi")), bus="ide")],
            )
        )

        async def main() -> State:
            await asyncio.gather(guest.aio.start(), idle.aio.start())
            with pytest.raises(virtkit.TimeoutError, match="within 0.2 s"):
                await idle.aio.console.expect("never printed", 0.2)
            with pytest.raises(virtkit.TimeoutError, match="within 0.2 s"):
                await idle.aio.wait(0.2)
            await idle.aio.kill()
            return await guest.aio.wait(30)

        assert asyncio.run(main()) is State.SHUTOFF


class TestAioDevices:
    def test_media_and_attach_through_the_coroutine_twin(self, hv: QemuHypervisor) -> None:
        """await guest.aio.change_media / attach on a running guest: recorded in the folder."""
        guest = hv.define(Machine(name="aiodev", memory="16MiB", cdroms=[CdRom()]))

        async def run() -> None:
            await guest.aio.start()
            iso = guest.folder / "disks" / "m.iso"
            iso.write_bytes(bytes(4096))
            await guest.aio.change_media("cdrom0", "m.iso")
            disk = await guest.aio.attach(Disk(path="hot.qcow2", size="1MiB"))
            assert disk.target == "vda"
            await guest.aio.kill()

        asyncio.run(run())
        stored = virtkit.load(guest.folder)
        assert stored.cdroms[0].path == "m.iso"
        assert [d.path for d in stored.disks] == ["hot.qcow2"]

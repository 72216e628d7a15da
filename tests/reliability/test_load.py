"""Load: many emulator guests started and stopped at once, from threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import virtkit
from virtkit import Disk, Machine, State
from virtkit.testing import guests

GUESTS = 16
ROUNDS = 2


def _life(hv: virtkit.Hypervisor, folder: Path, index: int, rnd: int) -> bytes:
    """Boot an echo guest, talk to it with a token of its own, and let it power off."""
    name = f"g{index}"
    guest = (
        hv.guest(name)
        if rnd
        else hv.define(
            Machine(name=name, memory="2MiB", disks=[Disk(path="boot.raw")]), folder=folder / name
        )
    )
    guest.start()
    guest.console.expect("echo ready", timeout=60)
    token = f"<{name}-r{rnd}>".encode()
    guest.console.write(token)
    guest.console.expect(token, timeout=60)
    guest.console.write(b"q")
    assert guest.wait(timeout=60) is State.SHUTOFF
    return guest.console.output


class TestConcurrentEmulatorGuests:
    def test_sixteen_guests_from_threads(self, tmp_path: Path) -> None:
        """16 guests at once, twice: no console cross-talk, allocations back to zero, no leaked threads."""
        baseline = threading.active_count()
        sector_disk = tmp_path / "template.raw"
        guests.write_disk(sector_disk, "echo")
        # 16 one-vCPU guests on a 2-CPU host need an overcommit above the default 4x
        policy = virtkit.AllocationPolicy(cpu_overcommit=GUESTS)
        with virtkit.connect("emulator", root=tmp_path / "root", policy=policy) as hv:
            for i in range(GUESTS):
                disk = tmp_path / "vms" / f"g{i}" / "disks" / "boot.raw"
                disk.parent.mkdir(parents=True)
                disk.write_bytes(sector_disk.read_bytes())
            for rnd in range(ROUNDS):
                with ThreadPoolExecutor(max_workers=GUESTS) as pool:
                    outputs = list(
                        pool.map(lambda i, r=rnd: _life(hv, tmp_path / "vms", i, r), range(GUESTS))
                    )
                for i, out in enumerate(outputs):
                    mine = f"<g{i}-r{rnd}>".encode()
                    assert mine in out
                    others = [f"<g{j}-r{rnd}>".encode() for j in range(GUESTS) if j != i]
                    assert not any(o in out for o in others), (
                        f"guest g{i} saw another guest's input"
                    )
                host = hv.host
                assert host.allocated_cpus == 0
                assert host.allocated_memory == 0
                assert all(g.state is State.SHUTOFF for g in hv.guests)
        assert threading.active_count() <= baseline + 1

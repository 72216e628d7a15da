"""virtkit.Fleet over two libvirt hosts: listing, placement by real figures, migration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from libvirt_hosts import LOCAL, PREFIX, SecondHost

import virtkit
from virtkit import ConfigError, ResourceError
from virtkit.model import AllocationPolicy, Disk, Machine, State
from virtkit.testing import guests
from virtkit.testing.conformance import counts

TIMEOUT = 60


def fleet(second: SecondHost, tmp_path: Path, **options: Any) -> virtkit.Fleet:
    return virtkit.Fleet(
        [LOCAL, second.uri],
        root=tmp_path / "fleet",
        accel="tcg",
        name_prefix=PREFIX + "fl-",
        shared_storage=True,
        host_options={
            LOCAL: {"migration_uri": second.local_migration_uri},
            second.uri: {"migration_uri": second.migration_uri},
        },
        **options,
    )


def counter(tmp_path: Path, name: str, memory: str = "32MiB") -> Machine:
    disk = tmp_path / f"{name}.qcow2"
    guests.write_disk(disk, "counter", format="qcow2")
    return Machine(name=name, memory=memory, disks=(Disk(str(disk)),))


class TestFleet:
    """Guests across hosts; the policy decides where; migrate moves them."""

    def test_place_list_migrate(self, second_host: SecondHost, tmp_path: Path) -> None:
        """Two guests spread over two hosts; one migrates to the other host and keeps counting."""
        with fleet(second_host, tmp_path) as hosts:
            assert [h.uri for h in hosts.hosts] == [LOCAL, second_host.uri]
            # 2 GiB (QEMU touches only what the guest uses): more than the other test runs'
            # guests on the shared local daemon hold, which count on that host too
            first = hosts.define(counter(tmp_path, "one", memory="2GiB"))
            first.start()
            second = hosts.define(counter(tmp_path, "two"))
            # the first guest's memory counts on its host, so the second goes to the other
            assert second.hypervisor is not first.hypervisor
            second.start()
            domains = hosts.domains()
            assert PREFIX + "fl-one" in domains[first.hypervisor.uri]
            assert PREFIX + "fl-two" in domains[second.hypervisor.uri]
            assert {g.name for g in hosts.guests} == {"one", "two"}
            load = hosts.load(first.hypervisor)
            assert load.used_memory >= first.machine.memory
            assert load.used_cpus >= 1
            first.console.expect("count 1\r\n", timeout=TIMEOUT)
            moved = hosts.migrate("one")
            assert moved.hypervisor is second.hypervisor
            assert hosts.where("one") is moved
            last = counts(moved.console.output)[-1]
            moved.console.expect(f"count {last + 1}\r\n", timeout=TIMEOUT)
            assert moved.state is State.RUNNING

    def test_no_host_admits(self, second_host: SecondHost, tmp_path: Path) -> None:
        """A machine bigger than every host's policy allows: ResourceError naming each host."""
        policy = AllocationPolicy(cpu_overcommit=1.0)
        with fleet(second_host, tmp_path, policy=policy) as hosts:
            big = Machine(name="big", cpus=64, memory="32MiB")
            with pytest.raises(ResourceError) as info:
                hosts.place(big)
            assert LOCAL in str(info.value)
            assert second_host.uri in str(info.value)

    def test_bad_arguments(self, second_host: SecondHost, tmp_path: Path) -> None:
        """Empty, repeated or non-list URIs, unknown hosts and guests are ConfigErrors."""
        for uris in ([], [LOCAL, LOCAL], LOCAL, [3]):
            with pytest.raises(ConfigError):
                virtkit.Fleet(uris)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="host_options"):
            virtkit.Fleet([LOCAL], host_options={"qemu:///nowhere": {}})
        with fleet(second_host, tmp_path) as hosts:
            with pytest.raises(ConfigError):
                hosts.where("nobody")
            with pytest.raises(ConfigError):
                hosts.host("qemu:///nowhere")
            with pytest.raises(ConfigError):
                hosts.place("not a machine")  # type: ignore[arg-type]

"""The object model: construction, defaults, and a ConfigError per bad input."""

from __future__ import annotations

import re
import uuid

import attrs
import pytest

import virtkit
from virtkit import (
    CdRom,
    ConfigError,
    CpuTopology,
    Disk,
    Machine,
    Nic,
    PortForward,
    Serial,
)


def _raises(match: str, field: str | None = None) -> pytest.RaisesContext[virtkit.ConfigError]:
    return pytest.raises(virtkit.ConfigError, match=re.escape(match))


class TestMachine:
    def test_issue_example(self) -> None:
        """The README example builds and converts friendly input."""
        m = Machine(name="web", cpus=2, memory="1GiB", disks=[Disk(path="root.qcow2", size="4GiB")])
        assert m.memory == 1024**3
        assert m.vcpus == 2
        assert m.disks[0].size == 4 * 1024**3
        assert m.disks[0].target == "vda"
        assert m.disks[0].format == "qcow2"
        assert isinstance(m.uuid, uuid.UUID)

    def test_frozen_and_value_equality(self) -> None:
        """Machines are immutable values; evolve() makes changed copies."""
        m = Machine(name="a")
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            m.name = "b"  # type: ignore[misc]
        assert attrs.evolve(m, memory="512MiB") == attrs.evolve(m, memory=512 * 1024**2)
        assert Machine(name="a") != Machine(name="a")  # distinct generated uuids

    def test_sizes(self) -> None:
        """Sizes accept 512MiB, 2G, 1.5GiB and plain ints; decimal MB that is no whole MiB is refused."""
        assert Machine(name="a", memory="512MiB").memory == 512 * 1024**2
        assert Machine(name="a", memory="2G").memory == 2 * 1024**3
        assert Machine(name="a", memory="1.5GiB").memory == 3 * 1024**3 // 2
        with pytest.raises(ConfigError, match="whole number of MiB") as info:
            Machine(name="a", memory="100MB")  # QEMU would silently run 95 MiB
        assert info.value.field == "memory"
        assert Machine(name="a", memory=64 * 1024**2).memory == 64 * 1024**2

    def test_topology(self) -> None:
        """A CpuTopology gives sockets*cores*threads vCPUs."""
        m = Machine(name="a", cpus=CpuTopology(sockets=2, cores=2, threads=2))
        assert m.vcpus == 8
        assert Machine(name="a", cpus=3).topology == CpuTopology(cores=3)

    def test_targets_assigned_per_bus(self) -> None:
        """Disks without a target get the next free name of their bus."""
        m = Machine(
            name="a",
            disks=[
                Disk(path="a"),
                Disk(path="b", bus="sata"),
                Disk(path="c"),
                Disk(path="d", target="vda"),
            ],
        )
        assert [d.target for d in m.disks] == ["vdb", "sda", "vdc", "vda"]
        m2 = Machine(name="a", cdroms=[CdRom(path="x.iso")], nics=[Nic(), Nic()])
        assert m2.cdroms[0].target == "cdrom0"
        assert [n.name for n in m2.nics] == ["net0", "net1"]

    def test_paths_accept_pathlib(self) -> None:
        """Disk and CD-ROM paths accept pathlib.Path and are stored as strings."""
        from pathlib import Path

        assert Disk(path=Path("/vm/root.qcow2")).path == "/vm/root.qcow2"
        assert CdRom(path=Path("seed.iso")).path == "seed.iso"

    def test_boot_order(self) -> None:
        """Boot order names existing devices."""
        m = Machine(
            name="a", disks=[Disk(path="a")], cdroms=[CdRom(path="s.iso")], boot=["cdrom0", "vda"]
        )
        assert m.boot == ("cdrom0", "vda")


class TestBadInput:
    """Each invalid value raises ConfigError naming the field and the value."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"memory": 0}, "'memory' must be from 1 MiB to 16 TiB (got 0 bytes)"),
            ({"memory": "lots"}, "'memory' must be a size like 512MiB, 2G or 4096 (got 'lots')"),
            ({"memory": -1}, "'memory' must not be negative"),
            ({"memory": "17TiB"}, "'memory' must be from 1 MiB to 16 TiB"),
            ({"cpus": 0}, "'cpus' must be a count from 1 to 288 or a CpuTopology (got 0)"),
            ({"cpus": True}, "'cpus' must be a count"),
            ({"name": ""}, "'name' must be a DNS label"),
            ({"name": "web_1"}, "(got 'web_1')"),
            ({"name": "-web"}, "(got '-web')"),
            ({"name": "a" * 64}, "'name' must be a DNS label"),
            ({"firmware": "coreboot"}, "'firmware' must be one of 'bios', 'uefi' (got 'coreboot')"),
            ({"machine_type": "virt"}, "'machine_type' must be one of"),
            ({"uuid": "not-a-uuid"}, "'uuid' must be a UUID"),
            ({"boot": ["vdz"]}, "'boot[0]' names 'vdz', which is not a device of this machine"),
            ({"boot": "vda"}, "'boot' must be a list of device names"),
            ({"disks": ["root.qcow2"]}, "'disks[0]' must be a Disk (got str 'root.qcow2')"),
            ({"labels": {"": "x"}}, "'labels' keys must be non-empty"),
            ({"labels": {"a": 1}}, "'labels' values must be strings"),
        ],
    )
    def test_machine_fields(self, kwargs: dict[str, object], message: str) -> None:
        """Bad machine fields raise ConfigError with a message naming the field."""
        with _raises(message) as info:
            Machine(**{"name": "ok", **kwargs})  # type: ignore[arg-type]
        assert info.value.field is not None

    def test_duplicate_disk_targets(self) -> None:
        """Two disks with one target are refused, naming both."""
        with _raises("'disks[1].target' is 'vda', already used by disks[0].target"):
            Machine(name="a", disks=[Disk(path="a", target="vda"), Disk(path="b", target="vda")])

    def test_duplicate_macs(self) -> None:
        """Two NICs with one MAC are refused."""
        mac = "52:54:00:00:00:01"
        with _raises("'nics[1].mac' 52:54:00:00:00:01 is already used by nics[0]"):
            Machine(name="a", nics=[Nic(mac=mac), Nic(mac=mac)])

    @pytest.mark.parametrize(
        ("factory", "message"),
        [
            (
                lambda: Disk(path="a", bus="usb"),
                "'bus' must be one of 'ide', 'sata', 'scsi', 'virtio' (got 'usb')",
            ),
            (lambda: Disk(path=""), "'path' must not be empty"),
            (lambda: Disk(path="a\nb"), "'path' must not contain NUL or line breaks"),
            (lambda: Disk(path="a", format="vmdk"), "'format' must be one of 'qcow2', 'raw'"),
            (
                lambda: Disk(path="a", size=1000),
                "'size' must be a positive multiple of 512 bytes (got 1000)",
            ),
            (lambda: Disk(path="a", cache="fast"), "'cache' must be one of"),
            (lambda: Disk(path="a.raw", backing="b.qcow2"), "'backing' needs format 'qcow2'"),
            (lambda: Disk(path="a", target="VDA"), "'target' must be a device name"),
            (lambda: Nic(mac="01:00:5e:00:00:01"), "'mac' must be a unicast address"),
            (lambda: Nic(mac="52:54:00:zz:00:01"), "'mac' must look like 52:54:00:12:34:56"),
            (lambda: Nic(mac="00:00:00:00:00:00"), "'mac' must not be all zeroes"),
            (lambda: Nic(model="ne2k"), "'model' must be one of"),
            (lambda: Nic(network="tap"), "'tap' must name a host interface"),
            (
                lambda: Nic(network="none", forwards=[PortForward(80, 80)]),
                "'forwards' need network='user'",
            ),
            (
                lambda: PortForward(-1, 22),
                "'host_port' must be an integer from 0 to 65535 (got -1)",
            ),
            (lambda: PortForward(22, 0), "'guest_port' must be an integer from 1 to 65535 (got 0)"),
            (lambda: PortForward(22, 22, host_addr="x"), "'host_addr' must be a dotted IPv4"),
            (lambda: PortForward(22, 22, host_addr="::1"), "QEMU's user network refuses IPv6"),
            (lambda: PortForward(22, 22, host_addr=2130706433), "'host_addr' must be a dotted"),  # type: ignore[arg-type]
            (lambda: CpuTopology(sockets=0), "'sockets' must be an integer from 1 to 288"),
            (lambda: Serial(log="../x.log"), "'log' must be a file name inside the guest folder"),
            (
                lambda: CdRom(path="x.iso", bus="virtio"),
                "'bus' must be one of 'ide', 'sata', 'scsi'",
            ),
        ],
    )
    def test_device_fields(self, factory: object, message: str) -> None:
        """Bad device fields raise ConfigError naming the field."""
        with _raises(message):
            factory()  # type: ignore[operator]

    def test_generated_mac_is_stable_and_unicast(self) -> None:
        """A generated MAC is in 52:54:00, unicast, and kept by the value."""
        nic = Nic()
        assert nic.mac.startswith("52:54:00:")
        assert int(nic.mac[:2], 16) & 1 == 0
        assert attrs.evolve(nic, model="e1000").mac == nic.mac

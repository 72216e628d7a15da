"""The issue-9 model contract: disk layers, kernel boot, empty CD-ROMs, port 0, checks."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from virtkit import (
    CdRom,
    ConfigError,
    Disk,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    Snapshot,
)


class TestDiskLayers:
    def test_active_is_top_layer(self) -> None:
        """Disk.active is the top layer, or path without layers; path stays the base."""
        d = Disk(path="root.qcow2")
        assert d.active == "root.qcow2"
        assert d.layers == ()
        d2 = attrs.evolve(d, layers=["root.s1.qcow2", Path("root.s2.qcow2")])
        assert d2.layers == ("root.s1.qcow2", "root.s2.qcow2")
        assert d2.active == "root.s2.qcow2"
        assert d2.path == "root.qcow2"
        assert d2.files() == ("root.qcow2", "root.s1.qcow2", "root.s2.qcow2")

    @pytest.mark.parametrize(
        ("layers", "field"),
        [
            ("root.s1.qcow2", "layers"),
            ([""], "layers[0]"),
            (["a.qcow2", 5], "layers[1]"),
            (["a\nb.qcow2"], "layers[0]"),
            (["root.qcow2"], "layers[0]"),
            (["./root.qcow2"], "layers[0]"),
            (["a.qcow2", "x/../a.qcow2"], "layers[1]"),
        ],
    )
    def test_bad_layers(self, layers: object, field: str) -> None:
        """A layer that is not a path, or repeats the base or another layer, names its index."""
        with pytest.raises(ConfigError) as info:
            Disk(path="root.qcow2", layers=layers)
        assert info.value.field == field

    def test_duplicate_files_across_disks(self) -> None:
        """Two disks on one file, or a disk's layer that is another disk's file, are refused."""
        with pytest.raises(ConfigError, match="already used by disks\\[0\\].path") as info:
            Machine(name="m", disks=[Disk(path="a.qcow2"), Disk(path="./a.qcow2")])
        assert info.value.field == "disks[1].path"
        with pytest.raises(ConfigError, match="already used by disks\\[0\\].layers\\[0\\]") as info:
            Machine(
                name="m",
                disks=[
                    Disk(path="a.qcow2", layers=["o.qcow2"]),
                    Disk(path="b", layers=["o.qcow2"]),
                ],
            )
        assert info.value.field == "disks[1].layers[0]"

    def test_duplicate_targets(self) -> None:
        """Two devices with one target are refused, naming the second."""
        with pytest.raises(ConfigError) as info:
            Machine(name="m", disks=[Disk(path="a", target="vda"), Disk(path="b", target="vda")])
        assert info.value.field == "disks[1].target"


class TestKernelBoot:
    def test_fields(self) -> None:
        """KernelBoot keeps kernel, initrd and append; paths become Path objects."""
        k = KernelBoot("vmlinuz", "initrd.gz", "console=ttyS0")
        assert k.kernel == Path("vmlinuz")
        assert k.initrd == Path("initrd.gz")
        assert k.append == "console=ttyS0"
        assert KernelBoot(kernel=Path("/boot/vmlinuz")).initrd is None
        m = Machine(name="k", kernel=k)
        assert m.kernel == k
        assert Machine(name="k").kernel is None

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"kernel": ""}, "kernel"),
            ({"kernel": 3}, "kernel"),
            ({"kernel": b"/boot/vmlinuz"}, "kernel"),
            ({"kernel": "a\0b"}, "kernel"),
            ({"kernel": "v", "initrd": ""}, "initrd"),
            ({"kernel": "v", "append": 5}, "append"),
            ({"kernel": "v", "append": "a\0"}, "append"),
            ({"kernel": "v", "bogus": 1}, "bogus"),
        ],
    )
    def test_bad(self, kwargs: dict[str, object], field: str) -> None:
        """Bad KernelBoot values are ConfigErrors naming the field."""
        with pytest.raises(ConfigError) as info:
            KernelBoot(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field

    def test_machine_kernel_type(self) -> None:
        """Machine(kernel=...) must be a KernelBoot."""
        with pytest.raises(ConfigError) as info:
            Machine(name="k", kernel="vmlinuz")  # type: ignore[arg-type]
        assert info.value.field == "kernel"

    def test_backend_name_is_the_model_class(self) -> None:
        """virtkit.backends.qemu.KernelBoot is the model's class."""
        from virtkit.backends.qemu import KernelBoot as QemuKernelBoot

        assert QemuKernelBoot is KernelBoot


class TestMediaPortsMemory:
    def test_empty_cdrom(self) -> None:
        """CdRom() and CdRom(path=None) are empty drives; targets are still assigned."""
        m = Machine(name="m", cdroms=[CdRom(), CdRom(path="seed.iso")])
        assert m.cdroms[0].path is None
        assert m.cdroms[0].target == "cdrom0"
        assert m.cdroms[1].path == "seed.iso"
        with pytest.raises(ConfigError) as info:
            CdRom(path="")
        assert info.value.field == "path"

    def test_port_zero_means_pick(self) -> None:
        """host_port=0 is allowed (a free port is picked at start); 0.0.0.0 listens on all."""
        fwd = PortForward(0, 22, host_addr="0.0.0.0")
        assert fwd.host_port == 0
        nic = Nic(forwards=[PortForward(0, 22), PortForward(0, 80)])  # each picks its own
        assert [f.host_port for f in nic.forwards] == [0, 0]
        with pytest.raises(ConfigError, match="twice"):
            Nic(forwards=[PortForward(8080, 22), PortForward(8080, 80)])
        with pytest.raises(ConfigError, match="twice"):  # 0.0.0.0 covers 127.0.0.1
            Nic(forwards=[PortForward(8080, 22, host_addr="0.0.0.0"), PortForward(8080, 80)])
        Nic(forwards=[PortForward(8080, 22), PortForward(8080, 80, protocol="udp")])
        Nic(forwards=[PortForward(8080, 22), PortForward(8080, 80, host_addr="127.0.0.2")])

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            (PortForward(2222, 22), PortForward(2222, 80)),
            (PortForward(2222, 22, host_addr="0.0.0.0"), PortForward(2222, 80)),
            (PortForward(2222, 22), PortForward(2222, 80, host_addr="0.0.0.0")),
        ],
    )
    def test_one_host_port_on_two_nics(self, first: PortForward, second: PortForward) -> None:
        """Two NICs of one machine forwarding one host port (QEMU refused it only at start):
        ConfigError at construction naming the second forward's field."""
        with pytest.raises(ConfigError, match="already forwarded by nics\\[0\\]") as info:
            Machine(name="m", nics=[Nic(forwards=[first]), Nic(forwards=[second])])
        assert info.value.field == "nics[1].forwards[0].host_port"
        other = attrs.evolve(second, host_addr="127.0.0.2", host_port=2223)
        Machine(name="m", nics=[Nic(forwards=[first]), Nic(forwards=[other])])
        zeros = [Nic(forwards=[PortForward(0, 22)]), Nic(forwards=[PortForward(0, 22)])]
        assert len(Machine(name="m", nics=zeros).nics) == 2  # each picks its own at start

    @pytest.mark.parametrize("addr", ["::1", "[::1]", "localhost", "10.0.2.300", "01.2.3.4", ""])
    def test_host_addr_forms_qemu_refuses(self, addr: str) -> None:
        """Forms QEMU 7.2's hostfwd refuses (IPv6, names, bad quads) are refused up front."""
        with pytest.raises(ConfigError) as info:
            PortForward(22, 22, host_addr=addr)
        assert info.value.field == "host_addr"

    @pytest.mark.parametrize("memory", ["512MB", 1024**2 + 1, "1.5MiB", 3 * 1024**2 + 4096])
    def test_memory_whole_mib(self, memory: object) -> None:
        """Memory QEMU would round ('512MB' became 489 MiB) is refused naming 'memory'."""
        with pytest.raises(ConfigError, match="whole number of MiB") as info:
            Machine(name="m", memory=memory)
        assert info.value.field == "memory"
        assert Machine(name="m", memory="1000MiB").memory == 1000 * 1024**2


class TestSnapshotLayers:
    def test_layers(self) -> None:
        """Snapshot.layers maps disk targets to layer files, sorted by target."""
        s = Snapshot(name="s", layers={"vdb": "b.s1.qcow2", "vda": "a.s1.qcow2"})
        assert list(s.layers) == ["vda", "vdb"]
        assert Snapshot(name="t").layers == {}

    @pytest.mark.parametrize(
        ("layers", "field"),
        [
            ("x", "layers"),
            ({"VDA": "a"}, "layers['VDA']"),
            ({"vda": ""}, "layers['vda']"),
            ({"vda": 3}, "layers['vda']"),
        ],
    )
    def test_bad(self, layers: object, field: str) -> None:
        """A bad layers map names the entry."""
        with pytest.raises(ConfigError) as info:
            Snapshot(name="s", layers=layers)
        assert info.value.field == field

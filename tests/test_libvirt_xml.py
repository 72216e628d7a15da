"""virtkit.libvirt: Machine <-> domain XML, checked against the real libvirtd, and import_domain."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import attrs
import pytest

import virtkit
from virtkit import CapabilityWarning, ConfigError
from virtkit.libvirt import DOMAIN_XML_FILE, from_xml, import_domain, parse_report, to_xml
from virtkit.model import (
    CdRom,
    CpuTopology,
    Disk,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    Serial,
    Share,
    State,
)
from virtkit.model.devices import CloudInit
from virtkit.testing import guests

ROOT = Path(__file__).resolve().parents[1]
URI = "qemu:///system"


@pytest.fixture(scope="module")
def libvirtd() -> None:
    """The local daemon (scripts/libvirtd start is idempotent and quick when it runs)."""
    subprocess.run([str(ROOT / "scripts" / "libvirtd"), "start"], check=True, capture_output=True)


def virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def rich_machine() -> Machine:
    return Machine(
        name="rich",
        cpus=CpuTopology(sockets=1, cores=2, threads=1),
        memory="512MiB",
        firmware="uefi",
        disks=(
            Disk(
                "root.qcow2",
                size="1GiB",
                layers=("root.s1.qcow2", "root.s2.qcow2"),
                backing="base.qcow2",
                backing_format="qcow2",
                cache="none",
                discard="unmap",
            ),
            Disk('/srv/data it\'s ]]> "q" <&>.raw', format="raw", read_only=True),
        ),
        cdroms=(CdRom("seed.iso"), CdRom(None, bus="sata")),
        nics=(
            Nic(model="e1000", forwards=(PortForward(2222, 22), PortForward(5353, 53, "udp"))),
            Nic(),
            Nic(network="none"),
        ),
        kernel=KernelBoot(
            kernel="boot/vmlinuz", initrd="boot/initrd.img", append='console=ttyS0 x="]]>"'
        ),
        serial=Serial(log="console.log"),
        boot=("vda", "cdrom0", "net0"),
        labels={"team": "x<y>&'z' ]]>"},
        cloud_init=CloudInit(user_data="#cloud-config\nhostname: rich\n"),
        agent=True,
        shares=(Share("/srv/shared", "data", read_only=False), Share("docs", "docs")),
    )


def other_machine() -> Machine:
    """Every field the rich machine leaves at its default, set: q35, buses and targets, a tap
    NIC with a fixed MAC and names, no serial, a forward on all addresses, cloud-init extras."""
    return Machine(
        name="other",
        cpus=CpuTopology(sockets=2, cores=1, threads=2),
        memory="256MiB",
        firmware="bios",
        machine_type="q35",
        arch="i386",
        disks=(
            Disk("a.qcow2", size="1GiB", bus="sata", target="sdb"),
            Disk("b.raw", format="raw", bus="scsi", cache="writethrough"),
            Disk("c.qcow2", bus="virtio", target="vdc", read_only=True),
        ),
        cdroms=(CdRom("x.iso", bus="sata", target="sdc"),),
        nics=(
            Nic(model="virtio", mac="52:54:00:12:34:56", network="tap", tap="vkttap0", name="wan"),
            Nic(
                model="rtl8139",
                name="lan",
                forwards=(PortForward(8080, 80, host_addr="0.0.0.0"),),
            ),
        ),
        serial=Serial(enabled=False),
        boot=("sdc", "sdb"),
        cloud_init=CloudInit(
            user_data="#cloud-config\n",
            meta_data="instance-id: other\n",
            network_config="version: 2\n",
        ),
        shares=(Share("/srv/x", "x", security_model="mapped-xattr"),),
    )


def _instances(value: object, cls: type) -> list[object]:
    """Every ``cls`` instance inside ``value`` (attrs classes, tuples, dicts)."""
    if isinstance(value, cls):
        return [value]
    if attrs.has(type(value)):
        return [
            found
            for field in attrs.fields(type(value))
            for found in _instances(getattr(value, field.name), cls)
        ]
    if isinstance(value, tuple):
        return [found for item in value for found in _instances(item, cls)]
    return []


def through_libvirtd(machine: Machine, tmp_path: Path) -> Machine:
    """to_xml -> virsh define -> virsh dumpxml --inactive -> from_xml (nothing unmapped)."""
    name = f"vkt-{os.getpid()}-xml-{machine.name}"
    xml_file = tmp_path / f"{machine.name}.xml"
    xml_file.write_text(to_xml(machine, tmp_path / "vm", name=name))
    virsh("define", str(xml_file))
    try:
        dumped = virsh("dumpxml", "--inactive", name)
    finally:
        virsh("undefine", "--nvram", name)
    report = parse_report(dumped)
    assert report.unmapped == ()
    return attrs.evolve(report.machine, name=machine.name)


class TestRoundTrip:
    """Machine -> to_xml -> virsh define -> virsh dumpxml -> from_xml gives the same Machine."""

    def test_rich_machine_through_libvirtd(self, libvirtd: None, tmp_path: Path) -> None:
        """Backing chains, CD-ROMs, forwards, UEFI, kernel boot, serial, hostile strings."""
        machine = rich_machine()
        xml_file = tmp_path / "in.xml"
        xml_file.write_text(to_xml(machine, tmp_path / "vm", name=f"vkt-{os.getpid()}-xml-rich"))
        virsh("define", str(xml_file))
        try:
            dumped = virsh("dumpxml", "--inactive", f"vkt-{os.getpid()}-xml-rich")
        finally:
            virsh("undefine", "--nvram", f"vkt-{os.getpid()}-xml-rich")
        assert "pc-i440fx" in dumped  # libvirt really rewrote it
        report = parse_report(dumped)
        assert report.unmapped == ()
        assert attrs.evolve(report.machine, name="rich") == machine

    def test_every_other_field_through_libvirtd(self, libvirtd: None, tmp_path: Path) -> None:
        """The fields the rich machine leaves at their defaults come back too."""
        machine = other_machine()
        assert through_libvirtd(machine, tmp_path) == machine

    def test_the_two_machines_set_every_field(self) -> None:
        """Every field of every model class differs from its default in one of the two
        machines, so the round trips above cover the whole model."""
        classes = (Machine, Disk, CdRom, Nic, PortForward, Serial, KernelBoot, CpuTopology)
        for cls in (*classes, Share, CloudInit):
            found = _instances((rich_machine(), other_machine()), cls)
            assert found, cls
            for field in attrs.fields(cls):
                default = field.default
                if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                    continue  # generated (uuid, MAC): differs anyway; set explicitly above
                values = [getattr(item, field.name) for item in found]
                assert any(v != default for v in values), f"{cls.__name__}.{field.name}"

    def test_without_libvirt(self, tmp_path: Path) -> None:
        """The pure translation round-trips too, for the simplest and the rich machines."""
        for machine in (Machine(name="tiny"), rich_machine(), other_machine()):
            assert from_xml(to_xml(machine, tmp_path)) == machine

    def test_hostile_values_are_escaped(self, tmp_path: Path) -> None:
        """Quotes, ]]> and markup in paths, labels and the command line stay data."""
        xml = to_xml(rich_machine(), tmp_path)
        assert "]]>" not in xml.replace("]]&gt;", "")
        assert "<&>" not in xml
        assert from_xml(xml).disks[1].path == '/srv/data it\'s ]]> "q" <&>.raw'

    def test_libvirt_canonical_names_map_back(self) -> None:
        """Machine types like pc-q35-7.2 read as q35; a topology reads as CpuTopology."""
        xml = (
            "<domain type='kvm'><name>web</name><memory unit='MiB'>64</memory><vcpu>4</vcpu>"
            "<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>"
            "<cpu><topology sockets='2' dies='1' cores='2' threads='1'/></cpu></domain>"
        )
        report = parse_report(xml)
        assert report.domain_type == "kvm"
        assert report.machine.machine_type == "q35"
        assert report.machine.memory == 64 * 1024**2
        assert report.machine.cpus == CpuTopology(sockets=2, cores=2, threads=1)


FOREIGN = """<domain type='kvm'>
  <name>legacy</name>
  <memory unit='KiB'>1048576</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='cdrom'/></os>
  <features><acpi/><apic/><hyperv mode='custom'><relaxed state='on'/></hyperv></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/legacy.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/install.iso'/>
      <target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='network'><source network='default'/><mac address='52:54:00:aa:bb:cc'/></interface>
    <interface type='user'><mac address='52:54:00:aa:bb:cd'/><model type='e1000'/></interface>
    <graphics type='vnc' port='-1'/>
    <video><model type='vga'/></video>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""


class TestForeignXml:
    """XML written elsewhere: what maps is read, what does not is reported, never dropped silently."""

    def test_unknown_elements_are_reported(self) -> None:
        """graphics, video and a libvirt network NIC are named in one warning; the guest agent
        channel becomes agent=True."""
        with pytest.warns(CapabilityWarning) as caught:
            machine = from_xml(FOREIGN)
        message = str(caught[0].message)
        for what in (
            "graphics[type=vnc]",
            "video",
            "interface[type=network]",
            "hyperv",
        ):
            assert what in message
        assert "channel" not in message
        assert machine.agent is True
        assert machine.memory == 1024**3
        assert machine.disks[0].path == "/var/lib/libvirt/images/legacy.qcow2"
        assert machine.cdroms[0].path == "/iso/install.iso"
        assert machine.boot == ("cdrom0",)
        assert [n.mac for n in machine.nics] == ["52:54:00:aa:bb:cd"]
        assert machine.nics[0].model == "e1000"

    @pytest.mark.parametrize(
        ("xml", "needle"),
        [
            ("<domain><name>x</name>", "malformed"),
            ("<network><name>x</name></network>", "not a domain"),
            ("<domain><memory>1</memory></domain>", "no <name>"),
            (
                "<!DOCTYPE d [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]><domain>&b;</domain>",
                "DTD",
            ),
            ("<domain><name>x</name><memory unit='parsecs'>1</memory></domain>", "unit"),
            ("<domain><name>x</name><memory>lots</memory></domain>", "integer"),
            ("<domain><name>bad name!</name><memory>1024</memory></domain>", "name"),
            (b"\xff\xfe<domain/>", "UTF-8"),
            (42, "must be a str"),
        ],
    )
    def test_bad_xml_is_a_config_error(self, xml: object, needle: str) -> None:
        """Malformed, hostile or invalid XML raises ConfigError saying what is wrong."""
        with pytest.raises(ConfigError) as info:
            from_xml(xml)  # type: ignore[arg-type]
        assert needle in str(info.value)

    def test_to_xml_checks_its_arguments(self, tmp_path: Path) -> None:
        """Wrong types and values are ConfigErrors naming the argument."""
        with pytest.raises(ConfigError):
            to_xml("not a machine", tmp_path)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="domain_type"):
            to_xml(Machine(name="a"), tmp_path, domain_type="xen")
        with pytest.raises(ConfigError, match="folder"):
            to_xml(Machine(name="a"), 3)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="name"):
            to_xml(Machine(name="a"), tmp_path, name="a/b")


class TestImportDomain:
    """A domain defined with virsh becomes a virtkit guest with a VM folder."""

    def _define_foreign(self, tmp_path: Path, name: str) -> Path:
        disk = tmp_path / "foreign.qcow2"
        guests.write_disk(disk, "hello", format="qcow2")
        xml = FOREIGN.replace("legacy", name).replace(
            "/var/lib/libvirt/images/" + name + ".qcow2", str(disk)
        )
        xml = xml.replace("type='kvm'", "type='qemu'").replace("<boot dev='cdrom'/>", "")
        xml = xml.replace("<source file='/iso/install.iso'/>", "")
        xml = xml.replace(
            "<interface type='network'><source network='default'/>"
            "<mac address='52:54:00:aa:bb:cc'/></interface>",
            "",
        )
        xml = xml.replace(
            "</devices>", "<serial type='pty'/><console type='pty'/></devices>"
        ).replace("<memory unit='KiB'>1048576</memory>", "<memory unit='MiB'>32</memory>")
        (tmp_path / "foreign.xml").write_text(xml)
        virsh("undefine", name, check=False)  # a leftover of an interrupted run
        virsh("define", str(tmp_path / "foreign.xml"))
        return disk

    @pytest.mark.parametrize("copy", [False, True])
    def test_import_then_run(self, libvirtd: None, tmp_path: Path, copy: bool) -> None:
        """The imported guest boots its disk; its XML is kept; disks referenced or copied."""
        name = f"vkt-{os.getpid()}-import-{int(copy)}"
        disk = self._define_foreign(tmp_path, name)
        hv = virtkit.connect("libvirt", uri=URI, accel="tcg", root=tmp_path / "guests")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                guest = import_domain(
                    hv,  # type: ignore[arg-type]
                    name,
                    tmp_path / "vm",
                    copy_disks=copy,
                    machine_name="imported",
                )
            assert any("graphics" in str(w.message) for w in caught)
            assert (tmp_path / "vm" / DOMAIN_XML_FILE).read_text().count("<graphics") == 1
            loaded = virtkit.load(tmp_path / "vm", allow=[tmp_path])
            assert loaded.name == "imported"
            if copy:
                assert not Path(loaded.disks[0].path).is_absolute()
                assert (tmp_path / "vm" / "disks" / loaded.disks[0].path).is_file()
            else:
                assert loaded.disks[0].path == str(disk)
            assert guest.state is State.SHUTOFF
            guest.start()
            assert guest.wait(timeout=60) is State.SHUTOFF
            assert guest.console.output == guests.OUTPUT["hello"]
        finally:
            hv.close()
        assert name not in virsh("list", "--all", "--name")

    def test_import_errors(self, libvirtd: None, tmp_path: Path) -> None:
        """No such domain is a BackendError naming the URI; a non-libvirt hv a ConfigError."""
        hv = virtkit.connect("libvirt", uri=URI, accel="tcg", root=tmp_path / "guests")
        try:
            with pytest.raises(virtkit.BackendError, match=URI):
                import_domain(hv, "vkt-no-such-domain", tmp_path / "vm")  # type: ignore[arg-type]
        finally:
            hv.close()
        emu = virtkit.connect("emulator", root=tmp_path / "emu")
        try:
            with pytest.raises(ConfigError):
                import_domain(emu, "x", tmp_path / "vm2")  # type: ignore[arg-type]
        finally:
            emu.close()

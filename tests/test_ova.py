"""OVA/OVF appliances: export -> import round trips, vendor-style imports, hostile archives."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit import ova

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20

VMWARE_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-123" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="Photon_OS-disk1.vmdk" ovf:id="file1" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="24" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1"
      ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
      ovf:populatedSize="3145728"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="Photon OS 4.0">
    <Info>A virtual machine</Info>
    <Name>Photon OS 4.0</Name>
    <OperatingSystemSection ovf:id="36" vmw:osType="other3xLinux64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>Photon OS 4.0</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>2048MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>CD-ROM 1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceSubType>vmware.cdrom.remotepassthrough</rasd:ResourceSubType>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:ElementName>Video card</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""

VBOX_OVF = """<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="debian-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="25165824" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
      vbox:uuid="0bd8f8ad-6b36-4d0c-a4a2-8cd7aa4e1ba9"/>
  </DiskSection>
  <VirtualSystem ovf:id="debian">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>debian</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>1 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
        <rasd:Address>080027AB12CD</rasd:Address>
      </Item>
      <Item>
        <rasd:AddressOnParent>3</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Caption>sound</rasd:Caption>
        <rasd:ElementName>sound</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>ensoniq1371</rasd:ResourceSubType>
        <rasd:ResourceType>35</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.16-linux" uuid="{{d6c1b2e8-7d4f-4c44-9c5c-2c6a0c3e9b11}}" name="debian">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware><Firmware type="BIOS"/></Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"""


def _vmdk(qemu_img: Run, tmp: Path, name: str, size: str, *writes: str) -> tuple[Path, bytes]:
    """A streamOptimized VMDK made by qemu-img from a raw disk with some data; and that data."""
    raw = tmp / f"{name}.raw"
    qemu_img("create", "-q", "-f", "raw", raw, size)
    with raw.open("r+b") as fh:
        for w in writes:
            off, _, text = w.partition(":")
            fh.seek(int(off))
            fh.write(text.encode() * 100)
    out = tmp / name
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, out)
    return out, raw.read_bytes()


def _tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def _mf(files: dict[str, bytes], alg: str = "SHA256") -> bytes:
    return "".join(f"{alg}({n})= {hashlib.new(alg.lower(), d).hexdigest()}\n"
                   for n, d in files.items()).encode()  # fmt: skip


class TestRoundTrip:
    """export_ova then import_ova gives back the machine and identical disks."""

    def test_round_trip(self, tmp_path: Path, qemu_img: Run) -> None:
        """CPUs, memory, firmware, disks (content, bus), NICs survive; the manifest verifies."""
        machine = virtkit.Machine(
            name="web", cpus=virtkit.CpuTopology(sockets=2, cores=2), memory="384MiB",
            firmware="uefi",
            disks=[virtkit.Disk(path="root.qcow2", size="20MiB"),
                   virtkit.Disk(path="data.qcow2", size="9MiB", bus="sata"),
                   virtkit.Disk(path="old.qcow2", size="1MiB", bus="ide")],
            nics=[virtkit.Nic(model="e1000"), virtkit.Nic(model="virtio")],
        )  # fmt: skip
        virtkit.save(machine, tmp_path / "vm")
        with virtkit.images.open(tmp_path / "vm" / "disks" / "root.qcow2", writable=True) as img:
            img.write(MiB + 7, b"root" * 1000)
            img.write(19 * MiB, b"tail" * 100)
        seen: list[tuple[int, int]] = []
        ova.export_ova(
            tmp_path / "vm", tmp_path / "web.ova", progress=lambda d, t: seen.append((d, t))
        )
        assert seen[-1] == (30 * MiB, 30 * MiB)
        with tarfile.open(tmp_path / "web.ova") as tar:
            names = tar.getnames()
            assert names[:2] == ["web.ovf", "web.mf"]
            assert all(m.isreg() for m in tar.getmembers())
            tar.extractall(tmp_path / "x", filter="data")
        lines = (tmp_path / "x" / "web.mf").read_text().splitlines()
        assert len(lines) == 4 and all(line.startswith("SHA256(") for line in lines)
        check = "".join(f"{line.split('= ')[1]}  {line[7 : line.index(')')]}\n" for line in lines)
        proc = subprocess.run(["sha256sum", "-c", "-"], input=check, text=True, cwd=tmp_path / "x",
                              capture_output=True, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for n, src in enumerate(("root", "data", "old"), 1):
            vmdk = tmp_path / "x" / f"web-disk{n}.vmdk"
            info = json.loads(qemu_img("info", "--output=json", vmdk).stdout)
            assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
            qemu_img("check", vmdk)
            qemu_img("compare", "-F", "vmdk", tmp_path / "vm" / "disks" / f"{src}.qcow2", vmdk)
        imported = ova.import_ova(tmp_path / "web.ova", tmp_path / "vm2")
        assert imported == virtkit.load(tmp_path / "vm2")
        assert (imported.name, imported.cpus, imported.memory, imported.firmware) == (
            "web", virtkit.CpuTopology(sockets=2, cores=2), 384 * MiB, "uefi")  # fmt: skip
        assert [d.bus for d in imported.disks] == ["virtio", "sata", "ide"]
        assert [(n.model, n.mac) for n in imported.nics] == [(n.model, n.mac) for n in machine.nics]
        for n, src in enumerate(("root", "data", "old"), 1):
            qemu_img("compare", tmp_path / "vm" / "disks" / f"{src}.qcow2",
                     tmp_path / "vm2" / "disks" / f"web-disk{n}.qcow2")  # fmt: skip
        assert not [p for p in (tmp_path / "vm2").iterdir() if p.name.startswith(".")]

    def test_export_warns_and_is_atomic(self, tmp_path: Path) -> None:
        """What OVF cannot carry is an OvfWarning; a failed export leaves the old file."""
        machine = virtkit.Machine(name="a", labels={"team": "x"}, disks=[
            virtkit.Disk(path="a.qcow2", size="1MiB")])  # fmt: skip
        virtkit.save(machine, tmp_path / "vm")
        with pytest.warns(ova.OvfWarning, match="labels"):
            ova.export_ova(tmp_path / "vm", tmp_path / "a.ova")
        old = (tmp_path / "a.ova").read_bytes()
        (tmp_path / "vm" / "disks" / "a.qcow2").write_bytes(b"QFI\xfb" + b"\xff" * 1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ova.OvfWarning)
            with pytest.raises(virtkit.ImageError):
                ova.export_ova(tmp_path / "vm", tmp_path / "a.ova")
        assert (tmp_path / "a.ova").read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ova", "vm"]


class TestVendorAppliances:
    """Appliances as VMware and VirtualBox write them, with disks qemu-img made."""

    def test_vmware_style(self, tmp_path: Path, qemu_img: Run) -> None:
        """Default namespace, SCSI, EFI, cores per socket, VmxNet3 and a video card (warned)."""
        disk, data = _vmdk(qemu_img, tmp_path, "Photon_OS-disk1.vmdk", "24M", "0:boot", "9000000:x")
        blob = disk.read_bytes()
        ovf = VMWARE_OVF.format(size=len(blob)).encode()
        files = {"photon.ovf": ovf, "Photon_OS-disk1.vmdk": blob}
        _tar(tmp_path / "p.ova", [("photon.ovf", ovf), ("photon.mf", _mf(files, "SHA1")),
                                  ("Photon_OS-disk1.vmdk", blob)])  # fmt: skip
        with pytest.warns(ova.OvfWarning) as record:
            machine = ova.import_ova(tmp_path / "p.ova", tmp_path / "vm")
        items = {w.message.item for w in record if isinstance(w.message, ova.OvfWarning)}
        assert "nic 'Network adapter 1'" in items
        assert "graphics controller 'Video card'" in items
        assert machine.name == "photon-os-4-0"
        assert machine.cpus == virtkit.CpuTopology(sockets=2, cores=2)
        assert (machine.memory, machine.firmware) == (2048 * MiB, "uefi")
        assert [d.bus for d in machine.disks] == ["scsi"]
        assert [n.model for n in machine.nics] == ["e1000"]
        assert len(machine.cdroms) == 1 and machine.cdroms[0].path is None
        assert machine.labels == {"ovf.os": "other3xLinux64Guest"}
        got = tmp_path / "vm" / "disks" / machine.disks[0].path
        with virtkit.images.open(got) as img:
            assert img.format == "qcow2" and img.read(0, img.virtual_size) == data

    def test_virtualbox_style_ovf_folder(self, tmp_path: Path, qemu_img: Run) -> None:
        """An .ovf with its disk beside it; IDE+SATA, MegaBytes, a MAC without colons, no manifest."""
        (tmp_path / "app").mkdir()
        _vmdk(qemu_img, tmp_path / "app", "debian-disk001.vmdk", "24M", "4096:deb")
        (tmp_path / "app" / "debian.ovf").write_text(VBOX_OVF.replace("{{", "{").replace("}}", "}"))
        with pytest.warns(ova.OvfWarning) as record:
            machine = ova.import_ova(tmp_path / "app" / "debian.ovf", tmp_path / "vm")
        items = {w.message.item for w in record if isinstance(w.message, ova.OvfWarning)}
        assert {"manifest", "sound card 'sound'"} <= items
        assert (machine.name, machine.cpus, machine.memory) == ("debian", 1, 1024 * MiB)
        assert [d.bus for d in machine.disks] == ["sata"]
        assert [(n.model, n.mac) for n in machine.nics] == [("e1000", "08:00:27:ab:12:cd")]
        assert machine.labels == {"ovf.os": "Debian_64"}
        qemu_img("compare", tmp_path / "app" / "debian-disk001.vmdk",
                 tmp_path / "vm" / "disks" / machine.disks[0].path)  # fmt: skip


class TestHostile:
    """Hostile archives are refused with clear errors, leaving nothing behind."""

    @pytest.fixture
    def parts(self, tmp_path: Path, qemu_img: Run) -> dict[str, bytes]:
        """A valid small appliance: descriptor, disk and manifest."""
        disk, _ = _vmdk(qemu_img, tmp_path, "d.vmdk", "1M", "0:x")
        blob = disk.read_bytes()
        ovf = (VMWARE_OVF.format(size=len(blob)).replace("Photon_OS-disk1.vmdk", "d.vmdk")
               .replace('ovf:capacity="24"', 'ovf:capacity="1"'))  # fmt: skip
        return {"a.ovf": ovf.encode(), "d.vmdk": blob}

    def _refused(self, tmp_path: Path, ova_path: Path, error: type[Exception], match: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ova.OvfWarning)
            with pytest.raises(error, match=match):
                ova.import_ova(ova_path, tmp_path / "vm")
        assert not (tmp_path / "vm").exists()
        assert not (tmp_path / "etc").exists() and not (tmp_path.parent / "evil").exists()

    def test_valid_baseline(self, tmp_path: Path, parts: dict[str, bytes]) -> None:
        """The fixture appliance itself imports (so each refusal below is about its damage)."""
        _tar(tmp_path / "a.ova", [("a.ovf", parts["a.ovf"]), ("a.mf", _mf(parts)),
                                  ("d.vmdk", parts["d.vmdk"])])  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ova.OvfWarning)
            assert ova.import_ova(tmp_path / "a.ova", tmp_path / "vm").disks

    @pytest.mark.parametrize(
        ("name", "kind"),
        [("../evil", None), ("/etc/evil", None), ("sub/dir.vmdk", None), ("link", tarfile.SYMTYPE),
         ("hard", tarfile.LNKTYPE), ("dev", tarfile.CHRTYPE), ("fifo", tarfile.FIFOTYPE),
         ("dir", tarfile.DIRTYPE)],
        ids=["dotdot", "absolute", "subdir", "symlink", "hardlink", "device", "fifo", "directory"],
    )  # fmt: skip
    def test_bad_members(
        self, tmp_path: Path, parts: dict[str, bytes], name: str, kind: bytes | None
    ) -> None:
        """Traversal names, links, devices, FIFOs and directories are refused before any write."""
        bad: tuple[str, bytes] | tarfile.TarInfo
        if kind is None:
            bad = (name, b"pwned")
        else:
            bad = tarfile.TarInfo(name)
            bad.type = kind
            bad.linkname = "/etc/passwd"
        _tar(tmp_path / "a.ova", [("a.ovf", parts["a.ovf"]), bad, ("d.vmdk", parts["d.vmdk"])])
        self._refused(tmp_path, tmp_path / "a.ova", virtkit.CorruptImageError,
                      "plain file names|regular files")  # fmt: skip

    def test_truncated_member(self, tmp_path: Path, parts: dict[str, bytes]) -> None:
        """A member declaring more bytes than the archive holds is refused."""
        path = _tar(tmp_path / "a.ova", [("a.ovf", parts["a.ovf"]), ("d.vmdk", parts["d.vmdk"])])
        with tarfile.open(path) as tar:
            member = tar.getmember("d.vmdk")
        with path.open("r+b") as fh:
            fh.truncate(member.offset_data + member.size // 2)
        self._refused(tmp_path, path, virtkit.CorruptImageError, "past the end|damaged")

    @pytest.mark.parametrize(
        ("manifest", "match"),
        [
            (lambda p: _mf({**p, "d.vmdk": b"other"}), "does not match the manifest"),
            (lambda p: b"SHA256(a.ovf) = nothex\n", "line 1"),
            (lambda p: _mf({**p, "ghost.vmdk": b""}), "does not contain"),
            (lambda p: _mf({"d.vmdk": p["d.vmdk"]}), "does not cover 'a.ovf'"),
            (lambda p: _mf({"../a.ovf": p["a.ovf"]}), "plain file names"),
        ],
        ids=["wrong-digest", "malformed", "missing-file", "ovf-not-covered", "traversal"],
    )
    def test_bad_manifest(
        self,
        tmp_path: Path,
        parts: dict[str, bytes],
        manifest: Callable[[dict[str, bytes]], bytes],
        match: str,
    ) -> None:
        """A manifest that does not verify, or is malformed, stops the import."""
        _tar(tmp_path / "a.ova", [("a.ovf", parts["a.ovf"]), ("a.mf", manifest(parts)),
                                  ("d.vmdk", parts["d.vmdk"])])  # fmt: skip
        self._refused(tmp_path, tmp_path / "a.ova", virtkit.CorruptImageError, match)

    @pytest.mark.parametrize(
        ("edit", "error", "match"),
        [
            (lambda o: o.replace(b"?>", b'?><!DOCTYPE e [<!ENTITY a "aaaaaaaaaa"><!ENTITY b '
                                 b'"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>', 1),
             virtkit.CorruptImageError, "document type"),
            (lambda o: o.replace(b'ovf:capacity="1"', b'ovf:capacity="1099511627776000"'),
             virtkit.CorruptImageError, "out of range"),
            (lambda o: o.replace(b'ovf:href="d.vmdk"', b'ovf:href="../../etc/passwd"'),
             virtkit.CorruptImageError, "plain file names"),
            (lambda o: o.replace(b'ovf:size="', b'ovf:size="1'), virtkit.CorruptImageError,
             "declares"),
            (lambda o: o.replace(b'ovf:size="', b'ovf:chunkSize="1000" ovf:size="'),
             virtkit.UnsupportedFeatureError, "chunks"),
            (lambda o: o.replace(b"<rasd:VirtualQuantity>2048<", b"<rasd:VirtualQuantity>2e9<"),
             virtkit.CorruptImageError, "whole number"),
            (lambda o: o.replace(b"<Envelope", b"<Envelop").replace(b"</Envelope", b"</Envelop"),
             virtkit.UnsupportedFeatureError, "not an OVF 1.x envelope"),
            (lambda o: o[:200], virtkit.CorruptImageError, "well-formed"),
        ],
        ids=["entity-bomb", "huge-capacity", "href-traversal", "size-mismatch", "chunked",
             "bad-number", "not-ovf", "truncated-xml"],
    )  # fmt: skip
    def test_bad_descriptor(
        self,
        tmp_path: Path,
        parts: dict[str, bytes],
        edit: Callable[[bytes], bytes],
        error: type[Exception],
        match: str,
    ) -> None:
        """Entity bombs, huge sizes, traversal hrefs and bad numbers in the XML are refused."""
        ovf = edit(parts["a.ovf"])
        _tar(tmp_path / "a.ova", [("a.ovf", ovf), ("d.vmdk", parts["d.vmdk"])])
        self._refused(tmp_path, tmp_path / "a.ova", error, match)

    def test_gzip_bomb(self, tmp_path: Path, parts: dict[str, bytes]) -> None:
        """A gzip-compressed file unpacking far past its disk's capacity is cut off and refused."""
        import gzip

        bomb = gzip.compress(bytes(64 * MiB + 2 * MiB), compresslevel=9)
        ovf = parts["a.ovf"].replace(b'ovf:size="', b'ovf:compression="gzip" ovf:size="')
        ovf = ovf.replace(
            f'ovf:size="{len(parts["d.vmdk"])}"'.encode(), f'ovf:size="{len(bomb)}"'.encode()
        )
        _tar(tmp_path / "a.ova", [("a.ovf", ovf), ("d.vmdk", bomb)])
        self._refused(tmp_path, tmp_path / "a.ova", virtkit.CorruptImageError, "unpacks to more")

    def test_disk_not_what_descriptor_says(self, tmp_path: Path, parts: dict[str, bytes]) -> None:
        """A 'VMDK' that is something else is a CorruptImageError from the VMDK reader."""
        fake = b"KDMV" + b"\xff" * 4092
        ovf = parts["a.ovf"].replace(
            f'ovf:size="{len(parts["d.vmdk"])}"'.encode(), b'ovf:size="4096"'
        )
        _tar(tmp_path / "a.ova", [("a.ovf", ovf), ("d.vmdk", fake)])
        self._refused(tmp_path, tmp_path / "a.ova", virtkit.ImageError, ".")

    def test_not_an_appliance_and_busy_folder(
        self, tmp_path: Path, parts: dict[str, bytes]
    ) -> None:
        """A file that is neither tar nor .ovf, and a non-empty target folder, are refused."""
        (tmp_path / "x.ova").write_bytes(b"just text")
        self._refused(tmp_path, tmp_path / "x.ova", virtkit.CorruptImageError, "neither")
        _tar(tmp_path / "a.ova", [("a.ovf", parts["a.ovf"]), ("d.vmdk", parts["d.vmdk"])])
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "keep").write_text("mine")
        with pytest.raises(virtkit.ConfigError, match="not an empty directory"):
            ova.import_ova(tmp_path / "a.ova", tmp_path / "busy")
        assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep"]

    def test_bad_arguments(self, tmp_path: Path) -> None:
        """Wrong argument types are ConfigErrors naming the argument."""
        for call, field in (
            (lambda: ova.import_ova(1, tmp_path / "vm"), "path"),  # type: ignore[arg-type]
            (lambda: ova.import_ova(tmp_path / "a.ova", None), "folder"),  # type: ignore[arg-type]
            (lambda: ova.import_ova(tmp_path / "a.ova", tmp_path, progress=3), "progress"),  # type: ignore[arg-type]
            (lambda: ova.export_ova(tmp_path, b"x"), "path"),  # type: ignore[arg-type]
        ):
            with pytest.raises(virtkit.ConfigError) as err:
                call()
            assert err.value.field == field
        shutil.rmtree(tmp_path, ignore_errors=True)


class TestSignature:
    """A signed appliance's ``.cert`` is checked with openssl: a tampered manifest is refused."""

    @pytest.fixture
    def signed(self, tmp_path: Path, qemu_img: Run) -> dict[str, bytes]:
        """Descriptor, disk, manifest and a ``.cert`` signed as ``ovftool`` signs (RSA, SHA256)."""
        disk, _ = _vmdk(qemu_img, tmp_path, "d.vmdk", "1M", "0:x")
        blob = disk.read_bytes()
        ovf = (VMWARE_OVF.format(size=len(blob)).replace("Photon_OS-disk1.vmdk", "d.vmdk")
               .replace('ovf:capacity="24"', 'ovf:capacity="1"')).encode()  # fmt: skip
        mf = _mf({"a.ovf": ovf, "d.vmdk": blob})
        key, pem, mf_file = tmp_path / "k.pem", tmp_path / "c.pem", tmp_path / "a.mf"
        mf_file.write_bytes(mf)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(key), "-out", str(pem), "-days", "2", "-subj", "/CN=appliance-vendor"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key), str(mf_file)],
                             check=True, capture_output=True, timeout=60).stdout  # fmt: skip
        cert = f"SHA256(a.mf)= {sig.hex()}\n".encode() + pem.read_bytes()
        return {"a.ovf": ovf, "a.mf": mf, "a.cert": cert, "d.vmdk": blob}

    def _ova(self, path: Path, parts: dict[str, bytes]) -> Path:
        order = ["a.ovf", "a.mf", "a.cert", "d.vmdk"]
        return _tar(path, [(n, parts[n]) for n in order if n in parts])

    def test_valid_signature_names_the_signer(
        self, tmp_path: Path, signed: dict[str, bytes]
    ) -> None:
        """A good signature imports, with a warning naming the signer and the unchecked trust."""
        with pytest.warns(ova.OvfWarning, match="signed by CN=appliance-vendor.*verifies.*trust"):
            machine = ova.import_ova(self._ova(tmp_path / "a.ova", signed), tmp_path / "vm")
        assert machine.disks

    @pytest.mark.parametrize("damage", ["manifest", "signature", "other_key", "names_other"])
    def test_bad_signature_refused(
        self, tmp_path: Path, signed: dict[str, bytes], damage: str
    ) -> None:
        """A changed manifest, signature or certificate is refused, leaving nothing behind."""
        parts = dict(signed)
        if damage == "manifest":  # a digest changed after signing (its file swapped too)
            parts["d.vmdk"] = parts["d.vmdk"][:-1] + b"\x01"
            parts["a.mf"] = _mf({"a.ovf": parts["a.ovf"], "d.vmdk": parts["d.vmdk"]})
        elif damage == "signature":
            line, _, pem = parts["a.cert"].partition(b"\n")
            parts["a.cert"] = line[:-2] + (b"00" if line[-2:] != b"00" else b"11") + b"\n" + pem
        elif damage == "other_key":
            key, pem = tmp_path / "k2.pem", tmp_path / "c2.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                            str(key), "-out", str(pem), "-days", "2", "-subj", "/CN=someone"],
                           check=True, capture_output=True, timeout=120)  # fmt: skip
            line = parts["a.cert"].partition(b"\n")[0]
            parts["a.cert"] = line + b"\n" + pem.read_bytes()
        else:
            parts["a.cert"] = parts["a.cert"].replace(b"SHA256(a.mf)", b"SHA256(b.mf)", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ova.OvfWarning)
            with pytest.raises(virtkit.CorruptImageError, match="does not verify|not the manifest"):
                ova.import_ova(self._ova(tmp_path / "a.ova", parts), tmp_path / "vm")
        assert not (tmp_path / "vm").exists()

    def test_malformed_cert_refused(self, tmp_path: Path, signed: dict[str, bytes]) -> None:
        """A certificate file without a signature line or a PEM certificate is refused."""
        for junk in (b"", b"SHA256(a.mf)= zz\n", signed["a.cert"].partition(b"\n")[0]):
            parts = dict(signed, **{"a.cert": junk})
            with pytest.raises(virtkit.CorruptImageError, match="must hold one"):
                ova.import_ova(self._ova(tmp_path / "a.ova", parts), tmp_path / "vm")

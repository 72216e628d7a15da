"""Live device changes on the libvirt backend, seen from inside a real Linux guest.

One booted guest carries every check (Linux boots under TCG are the suite's
expensive part): a virtio disk hot-plugged as vdb whose bytes the guest reads
and writes, a CD-ROM medium inserted and ejected, a NIC plugged and
unplugged, then the refusals. A second, cheap test shows the bounded wait
when a guest never releases a device.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path

import pycdlib
import pytest

import virtkit
from virtkit import CdRom, Disk, Machine, Nic, PortForward, State
from virtkit.backends.libvirt import LibvirtGuest
from virtkit.libvirt import import_domain
from virtkit.model import KernelBoot
from virtkit.testing import guests
from virtkit.testing.linux import (
    LINUX_CMDLINE,
    PROMPT,
    READY_MARKER,
    build_initramfs,
    fetch_kernel,
)

PREFIX = f"vkt-{os.getpid()}-hot-"
PATTERN = b"bytes-the-host-wrote-before-the-hot-plug"
# the first read after a medium change gets the drive's UNIT ATTENTION: retry the mount
_MOUNT = (
    "mkdir -p /m; for i in 1 2 3 4 5 6 7 8 9 10; do "
    "mount -t iso9660 -o ro /dev/sr0 /m 2>/dev/null && break; sleep 0.5; done"
)
_VIRTIO_NETS = "grep -l 0x1000 /sys/bus/pci/devices/*/device | wc -l"


@pytest.fixture(scope="module")
def linux_boot(tmp_path_factory: pytest.TempPathFactory) -> KernelBoot:
    """Debian's cloud kernel (cached download) with a freshly built busybox initramfs."""
    kernel = fetch_kernel()
    initrd = build_initramfs(kernel, tmp_path_factory.mktemp("lv-hot") / "initrd.gz")
    return KernelBoot(str(kernel.vmlinuz), str(initrd), LINUX_CMDLINE)


def _run(guest: virtkit.Guest, command: str, marker: str, timeout: float = 60) -> bytes:
    """Run a shell command in the guest; its output up to ``marker``."""
    guest.console.write(f"{command}; echo {marker[:3]}''{marker[3:]}\n")
    match = guest.console.expect(
        re.compile(rb"\n(.*?)" + re.escape(marker.encode()), re.S), timeout
    )
    return bytes(match.group(1))


def _iso(path: Path, text: bytes) -> Path:
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="VKMEDIA")
    iso.add_fp(io.BytesIO(text), len(text), "/HELLO.TXT;1")
    iso.write(str(path))
    iso.close()
    return path


def _stored(guest: virtkit.Guest) -> Machine:
    return virtkit.load(guest.folder, allow=["/tmp", "/var", "/root"])


def _inactive_xml(guest: LibvirtGuest) -> str:
    """libvirt's persistent definition of the domain (what a restart of it would use)."""
    return str(guest.domain.XMLDesc(guest.hypervisor.connection.lv.VIR_DOMAIN_XML_INACTIVE))


def test_linux_guest_sees_hot_plugged_disk_media_and_nic(
    libvirtd: str, linux_boot: KernelBoot, tmp_path: Path
) -> None:
    """On a running Linux guest under libvirt: a raw image the host wrote is hot-plugged as
    vdb (the guest reads the host's bytes and writes its own), a medium goes into the empty
    drive (mounted, read) and out again, a NIC is plugged and unplugged; detach waits for the
    guest; the folder and libvirt's own definition follow every step; bad input changes
    nothing."""
    hot = tmp_path / "hot.raw"
    hot.write_bytes(b"\0" * 4096 + PATTERN + b"\0" * (4 * 1024**2 - 4096 - len(PATTERN)))
    iso = _iso(tmp_path / "media.iso", b"hello-from-the-libvirt-iso\n")
    with virtkit.connect("libvirt", root=tmp_path / "root", name_prefix=PREFIX) as hv:
        machine = Machine(
            name="hot",
            memory="256MiB",
            kernel=linux_boot,
            disks=[Disk(path="first.qcow2", size="4MiB")],
            cdroms=[CdRom()],
        )
        guest = hv.define(machine)
        assert isinstance(guest, LibvirtGuest)
        guest.start()
        guest.console.expect(READY_MARKER, timeout=120)
        guest.console.expect(PROMPT, timeout=30)
        assert b"vdb" not in _run(guest, "cat /proc/partitions", "ENDP")

        # -- a virtio disk ---------------------------------------------------------------
        disk = guest.attach(Disk(path=str(hot), format="raw"))
        assert isinstance(disk, Disk) and disk.target == "vdb"
        assert _stored(guest).disks[-1] == disk
        assert str(hot) in _inactive_xml(guest)
        out = _run(
            guest, "for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] && break; sleep 0.5; done; "
            "cat /sys/block/vdb/size; dd if=/dev/vdb bs=4096 skip=1 count=1 2>/dev/null | "
            "head -c 40", "ENDS",
        )  # fmt: skip
        assert b"8192" in out  # 4 MiB in 512-byte sectors
        assert PATTERN in out
        _run(
            guest,
            "printf written-by-the-guest | dd of=/dev/vdb bs=512 seek=3 conv=notrunc "
            "2>/dev/null; sync",
            "ENDW",
        )
        assert guest.detach("vdb") == disk
        assert b"vdb" not in _run(guest, "cat /proc/partitions", "ENDQ")
        assert "vdb" not in guest.xml()
        assert _stored(guest).disks == machine.disks
        assert str(hot) not in _inactive_xml(guest)
        with hot.open("rb") as f:
            f.seek(3 * 512)
            assert f.read(20) == b"written-by-the-guest"

        # -- a CD-ROM medium --------------------------------------------------------------
        guest.change_media("cdrom0", iso)
        assert _stored(guest).cdroms[0].path == str(iso)
        assert str(iso) in guest.xml() and str(iso) in _inactive_xml(guest)
        out = _run(guest, f"{_MOUNT}; cat /m/hello.txt; umount /m", "ENDM")
        assert b"hello-from-the-libvirt-iso" in out
        guest.change_media("cdrom0", None)
        assert _stored(guest).cdroms[0].path is None
        assert str(iso) not in guest.xml() and str(iso) not in _inactive_xml(guest)
        out = _run(guest, "sleep 1; mount -t iso9660 -o ro /dev/sr0 /m; echo rc=$?", "ENDE")
        assert b"rc=0" not in out

        # -- a NIC (virtio-net: PCI vendor 0x1af4, device 0x1000) -------------------------
        assert _run(guest, _VIRTIO_NETS, "ENDN").strip().endswith(b"0")
        nic = guest.attach(Nic())
        assert isinstance(nic, Nic) and nic.name == "net0"
        assert _stored(guest).nics == (nic,)
        assert _run(guest, f"sleep 2; {_VIRTIO_NETS}", "ENDO").strip().endswith(b"1")
        assert guest.detach("net0") == nic
        assert _run(guest, _VIRTIO_NETS, "ENDX").strip().endswith(b"0")
        assert _stored(guest).nics == ()
        assert nic.mac not in guest.xml()

        # -- bad input: refused before libvirt is asked, nothing recorded -----------------
        before = _stored(guest)
        with pytest.raises(virtkit.ConfigError, match="no CD-ROM drive 'cdrom9'"):
            guest.change_media("cdrom9", iso)
        with pytest.raises(virtkit.ImageError, match="no such file"):
            guest.change_media("cdrom0", tmp_path / "missing.iso")
        with pytest.raises(virtkit.ConfigError, match="no disk or NIC 'vdz'"):
            guest.detach("vdz")
        with pytest.raises(virtkit.ConfigError, match="does not exist") as info:
            guest.attach(Disk(path=str(tmp_path / "missing.qcow2")))
        assert info.value.field == "path"
        with pytest.raises(virtkit.ConfigError, match="virtio") as info:
            guest.attach(Disk(path="ide.qcow2", size="1MiB", bus="ide"))
        assert info.value.field == "bus"
        assert not (guest.folder / "disks" / "ide.qcow2").exists()
        with pytest.raises(virtkit.ConfigError, match="port forwards") as info:
            guest.attach(Nic(forwards=[PortForward(host_port=0, guest_port=22)]))
        assert info.value.field == "forwards"
        held = tmp_path / "held.qcow2"
        guests.write_disk(held, "counter", format="qcow2")
        hv.define(Machine(name="holder", memory="32MiB", disks=[Disk(str(held))]))
        with pytest.raises(virtkit.ResourceError, match="held"):
            guest.attach(Disk(path=str(held)))
        assert _stored(guest) == before
        assert "vdb" not in guest.xml()
        assert guest.state is State.RUNNING
        guest.kill()


def test_detach_of_a_device_the_guest_never_releases_times_out(
    libvirtd: str, tmp_path: Path
) -> None:
    """A guest without ACPI hot-unplug (the boot-sector counter) keeps the disk: detach()
    raises TimeoutError naming the device after the bounded wait, and the disk stays in the
    domain and in the folder."""
    boot = tmp_path / "counter.qcow2"
    guests.write_disk(boot, "counter", format="qcow2")
    with virtkit.connect("libvirt", root=tmp_path / "root", name_prefix=PREFIX) as hv:
        guest = hv.define(Machine(name="stubborn", memory="32MiB", disks=[Disk(str(boot))]))
        assert isinstance(guest, LibvirtGuest)
        guest.start()
        guest.console.expect("count 0", timeout=30)
        disk = guest.attach(Disk(path="extra.qcow2", size="1MiB"))
        guest.detach_timeout = 1.0
        with pytest.raises(virtkit.TimeoutError, match="did not release disk vdb") as info:
            guest.detach("vdb")
        assert info.value.timeout == 1.0
        assert "vdb" in guest.xml()
        with pytest.raises(virtkit.TimeoutError, match="vdb"):  # asking again waits again
            guest.detach("vdb")
        assert _stored(guest).disks[-1] == disk
        assert guest.state is State.RUNNING
        guest.kill()


def _foreign_xml(name: str, disk: Path) -> str:
    """A domain virtkit did not write: its CD-ROM is ``hdc`` (the writer would say ``hda``)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <serial type='pty'/><console type='pty'/>
  </devices>
</domain>"""


def test_imported_domain_changes_live_and_in_its_own_definition(
    libvirtd: str, tmp_path: Path
) -> None:
    """An imported domain (virtkit does not rewrite its definition) gets the medium in its own
    drive ``hdc``, live and in libvirt's persistent definition, and a hot-plugged disk both
    places too."""
    disk = tmp_path / "counter.qcow2"
    guests.write_disk(disk, "counter", format="qcow2")
    iso = _iso(tmp_path / "media.iso", b"imported\n")
    name = f"{PREFIX}foreign"
    with virtkit.connect("libvirt", root=tmp_path / "root", name_prefix=PREFIX) as hv:
        conn = hv.connection.raw
        with contextlib.suppress(hv.connection.lv.libvirtError):
            conn.lookupByName(name).undefine()  # a leftover of an interrupted run
        conn.defineXML(_foreign_xml(name, disk))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", virtkit.CapabilityWarning)
            guest = import_domain(hv, name, tmp_path / "vm", machine_name="foreign")  # type: ignore[arg-type]
        assert isinstance(guest, LibvirtGuest) and not guest.owns_definition
        try:
            guest.start()
            guest.console.expect("count 0", timeout=30)
            guest.change_media("cdrom0", iso)
            for xml in (guest.xml(), _inactive_xml(guest)):
                drive = re.search(r"<disk[^>]*device='cdrom'.*?</disk>", xml, re.S)
                assert drive is not None
                assert str(iso) in drive.group(0) and "dev='hdc'" in drive.group(0)
            assert _stored(guest).cdroms[0].path == str(iso)
            extra = guest.attach(Disk(path="extra.qcow2", size="1MiB"))
            assert extra.target == "vdb"
            assert "dev='vdb'" in guest.xml() and "dev='vdb'" in _inactive_xml(guest)
            guest.change_media("cdrom0", None)
            assert str(iso) not in guest.xml() and str(iso) not in _inactive_xml(guest)
            guest.kill()
        finally:
            hv.undefine(guest)


def test_host_without_shared_storage_refuses_new_files(libvirtd: str, tmp_path: Path) -> None:
    """On a host that does not share this machine's files (a pushed folder), a new disk image
    or medium cannot be plugged live: ConfigError, nothing recorded, the created image gone;
    a NIC is plugged as anywhere."""
    folder = tmp_path / "pushed"
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "root.qcow2", "counter", format="qcow2")
    (folder / "disks" / "media.iso").write_bytes(_iso(tmp_path / "m.iso", b"x\n").read_bytes())
    virtkit.save(
        Machine(name="pushed", memory="32MiB", disks=[Disk("root.qcow2")], cdroms=[CdRom()]),
        folder,
    )
    with virtkit.connect(
        "libvirt", root=tmp_path / "root", name_prefix=PREFIX, shared_storage=False
    ) as hv:
        guest = hv.push(folder)  # type: ignore[attr-defined]
        try:
            guest.start()
            guest.console.expect("count 0", timeout=30)
            before = _stored(guest)
            with pytest.raises(virtkit.ConfigError, match="does not share storage"):
                guest.attach(Disk(path="new.qcow2", size="1MiB"))
            assert not (folder / "disks" / "new.qcow2").exists()
            with pytest.raises(virtkit.ConfigError, match="does not share storage"):
                guest.change_media("cdrom0", "media.iso")
            assert _stored(guest) == before
            nic = guest.attach(Nic())
            assert nic.mac in guest.xml()
            guest.kill()
            guest.pull(remove=True)
        finally:
            hv.undefine(guest)

"""Live device changes on the qemu backend, seen from inside a real Linux guest:
disk hot-plug (PCI hot-plug on the pc machine), CD-ROM media insert/eject, NIC hot-plug;
every change recorded in the folder."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pycdlib
import pytest

import virtkit
from virtkit import CdRom, Disk, Machine, Nic, State
from virtkit.backends.qemu import KernelBoot, QemuHypervisor
from virtkit.testing.linux import PROMPT, READY_MARKER


def _boot(guest) -> None:  # type: ignore[no-untyped-def]
    guest.start()
    guest.console.expect(READY_MARKER, timeout=120)
    guest.console.expect(PROMPT, timeout=30)


def _run(guest, command: str, marker: str, timeout: float = 60) -> bytes:  # type: ignore[no-untyped-def]
    """Run a shell command in the guest and return its output up to ``marker``."""
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


def _load(guest) -> Machine:  # type: ignore[no-untyped-def]
    return virtkit.load(guest.folder, allow=[guest.machine.kernel.kernel.parent, "/tmp"])


# the first read after a medium change gets the drive's UNIT ATTENTION: retry the mount
_MOUNT = (
    "mkdir -p /m; for i in 1 2 3 4 5 6 7 8 9 10; do "
    "mount -t iso9660 -o ro /dev/sr0 /m 2>/dev/null && break; sleep 0.5; done"
)


class TestHotplug:
    def test_hot_plugged_disk_and_nic_are_seen_by_the_guest_then_unplugged(
        self, hv: QemuHypervisor, linux_boot: KernelBoot
    ) -> None:
        """attach(Disk(size=...)) on a running guest: the image is created in the folder, the
        Linux guest sees a new virtio disk and writes it; detach() waits for the guest to release
        it; then a NIC is plugged and unplugged the same way. machine.toml records every step;
        the host reads the guest's bytes back."""
        guest = hv.define(Machine(name="hot", memory="256MiB", kernel=linux_boot))
        _boot(guest)
        assert b"vda" not in _run(guest, "cat /proc/partitions", "ENDP")
        disk = guest.attach(Disk(path="hot.qcow2", size="8MiB"))
        assert isinstance(disk, Disk) and disk.target == "vda"
        assert _load(guest).disks == (disk,)
        out = _run(
            guest, "for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done; "
            "cat /sys/block/vda/size", "ENDS",
        )  # fmt: skip
        assert b"16384" in out  # 8 MiB in 512-byte sectors
        _run(
            guest,
            "printf hot-plugged-and-written | dd of=/dev/vda bs=512 seek=7 conv=notrunc "
            "2>/dev/null; sync",
            "ENDW",
        )
        guest.detach("vda")
        assert b"vda" not in _run(guest, "cat /proc/partitions", "ENDQ")
        assert _load(guest).disks == ()
        # a NIC the same way: a virtio-net PCI device (vendor 0x1af4, device 0x1000) appears
        count = "grep -l 0x1000 /sys/bus/pci/devices/*/device | wc -l"
        assert _run(guest, count, "ENDN").strip().endswith(b"0")
        nic = guest.attach(Nic())
        assert isinstance(nic, Nic)
        assert nic.name == "net0"
        assert _load(guest).nics == (nic,)
        assert _run(guest, f"sleep 2; {count}", "ENDO").strip().endswith(b"1")
        guest.detach("net0")
        assert _run(guest, count, "ENDX").strip().endswith(b"0")
        assert _load(guest).nics == ()
        assert guest.state is State.RUNNING
        guest.kill()
        with virtkit.images.open(guest.folder / "disks" / "hot.qcow2") as img:
            assert img.read(7 * 512, 23) == b"hot-plugged-and-written"

    def test_media_change_is_seen_by_the_guest_and_kept_by_the_folder(
        self, hv: QemuHypervisor, linux_boot: KernelBoot, tmp_path: Path
    ) -> None:
        """An empty drive gets a medium live (the guest mounts it and reads the file), then is
        ejected (the guest finds no medium); a restart keeps what the folder recorded."""
        first = _iso(tmp_path / "first.iso", b"hello-from-the-first-iso\n")
        guest = hv.define(
            Machine(name="media", memory="256MiB", kernel=linux_boot, cdroms=[CdRom()])
        )
        _boot(guest)
        guest.change_media("cdrom0", first)
        assert _load(guest).cdroms[0].path == str(first)
        out = _run(guest, f"{_MOUNT}; cat /m/hello.txt; umount /m", "ENDM")
        assert b"hello-from-the-first-iso" in out
        guest.change_media("cdrom0", None)
        assert _load(guest).cdroms[0].path is None
        out = _run(guest, "sleep 1; mount -t iso9660 -o ro /dev/sr0 /m; echo rc=$?", "ENDE")
        assert b"rc=0" not in out
        guest.change_media("cdrom0", first)
        guest.kill()
        _boot(guest)  # the medium recorded in the folder is in the drive after a restart
        out = _run(guest, f"{_MOUNT}; cat /m/hello.txt", "ENDR")
        assert b"hello-from-the-first-iso" in out
        guest.kill()

    def test_ide_disks_cannot_be_hot_plugged(self, hv: QemuHypervisor, tmp_path: Path) -> None:
        """Only virtio disks are hot-pluggable: an IDE disk on a running guest is a ConfigError
        naming 'bus', and nothing is recorded or left behind."""
        guest = hv.define(Machine(name="ide", memory="16MiB"))
        guest.start()
        with pytest.raises(virtkit.ConfigError, match="virtio") as info:
            guest.attach(Disk(path="x.qcow2", size="1MiB", bus="ide"))
        assert info.value.field == "bus"
        assert virtkit.load(guest.folder).disks == ()
        assert not (guest.folder / "disks" / "x.qcow2").exists()
        guest.kill()

"""A real Linux guest (Debian cloud kernel + busybox initramfs) under the qemu backend."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import attrs

import virtkit.images
from virtkit.backends.qemu import KernelBoot, QemuHypervisor
from virtkit.model import CloudInit, Disk, Machine, SnapshotKind, State
from virtkit.testing.linux import PROMPT, READY_MARKER

USER_DATA = "#cloud-config\nvirtkit-test: user-data, with commas = and equals\n"


def _boot(guest) -> None:  # type: ignore[no-untyped-def]
    guest.start()
    guest.console.expect(READY_MARKER, timeout=90)
    guest.console.expect(PROMPT, timeout=30)


def _run(guest, command: str, marker: str, timeout: float = 60) -> bytes:  # type: ignore[no-untyped-def]
    """Run a shell command in the guest and return its output up to ``marker``."""
    guest.console.write(f"{command}; echo {marker[:3]}''{marker[3:]}\n")
    match = guest.console.expect(
        re.compile(rb"\n(.*?)" + re.escape(marker.encode()), re.S), timeout
    )
    return bytes(match.group(1))


class TestLinuxGuest:
    def test_virtio_disk_and_cloud_init_seed_then_acpi_shutdown(
        self, hv: QemuHypervisor, linux_boot: KernelBoot, tmp_path: Path
    ) -> None:
        """The guest reads the seed ISO's user-data, writes a virtio qcow2 disk, shuts down by ACPI;
        the host reads the written bytes back with virtkit.images."""
        disk = tmp_path / "data.qcow2"
        with virtkit.images.create(disk, size="16MiB", format="qcow2") as img:
            img.write(4096, b"host-wrote-this!")
        machine = Machine(
            name="linux-io",
            memory="256MiB",
            disks=[Disk(path=str(disk), bus="virtio")],
            cloud_init=CloudInit(user_data=USER_DATA),
        )
        guest = hv.define(attrs.evolve(machine, kernel=linux_boot))
        _boot(guest)
        out = _run(guest, "dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | head -c 16", "END1")
        assert b"host-wrote-this!" in out
        out = _run(
            guest,
            "mkdir -p /mnt/seed; for i in 1 2 3 4 5 6 7 8 9 10; do "
            "mount -t iso9660 -o ro /dev/sr0 /mnt/seed 2>/dev/null && break; sleep 0.5; done; "
            "ls /mnt/seed; cat /mnt/seed/user-data; cat /mnt/seed/meta-data",
            "END2",
        )
        assert b"virtkit-test: user-data, with commas = and equals" in out
        assert b"network-config" not in out and b"user-data" in out and b"meta-data" in out
        assert f"local-hostname: {machine.name}".encode() in out
        _run(
            guest,
            "printf 'guest-wrote-this-sector' | dd of=/dev/vda bs=512 seek=100 conv=notrunc "
            "2>/dev/null; sync",
            "END3",
        )
        guest.shutdown(timeout=60)
        assert guest.state is State.SHUTOFF
        with virtkit.images.open(disk) as img:
            assert img.read(100 * 512, 23) == b"guest-wrote-this-sector"
            assert img.check().ok

    def test_full_snapshot_of_a_running_guest_reverts_and_keeps_running(
        self, hv: QemuHypervisor, linux_boot: KernelBoot, tmp_path: Path
    ) -> None:
        """snapshot(memory=True) then revert: the shell's state (a variable) is back, it keeps running,
        and the internal snapshot is listed by virtkit.images on the same qcow2 file."""
        disk = tmp_path / "state.qcow2"
        virtkit.images.create(disk, size="8MiB", format="qcow2").close()
        machine = Machine(name="linux-snap", memory="256MiB", disks=[Disk(path=str(disk))])
        guest = hv.define(attrs.evolve(machine, kernel=linux_boot))
        _boot(guest)
        _run(guest, "export PHASE=before-snapshot", "ENDA")
        snap = guest.snapshot("booted", memory=True)
        assert snap.kind is SnapshotKind.FULL and snap.state is State.RUNNING
        assert guest.state is State.RUNNING
        _run(guest, "export PHASE=after-snapshot", "ENDB")
        guest.revert("booted")
        assert guest.state is State.RUNNING
        guest.console.write("\n")
        out = _run(guest, "echo phase=$PHASE", "ENDC")
        assert b"phase=before-snapshot" in out
        guest.kill()
        with virtkit.images.open(disk) as img:
            names = {s.name: s for s in img.snapshots}
        assert "booted" in names
        assert names["booted"].vm_state_size > 0


class TestKernelBootFolder:
    def test_a_kernel_booted_folder_is_saved_loaded_and_run_again(
        self, hv: QemuHypervisor, linux_boot: KernelBoot, tmp_path: Path
    ) -> None:
        """Machine.kernel with paths relative to the folder: save, load in a fresh connection
        (what `virtkit vm run` does), and the Linux guest boots from the folder's own files."""
        folder = tmp_path / "kvm"
        folder.mkdir()
        shutil.copyfile(linux_boot.kernel, folder / "vmlinuz")
        assert linux_boot.initrd is not None
        shutil.copyfile(linux_boot.initrd, folder / "initrd.gz")
        boot = KernelBoot(kernel="vmlinuz", initrd="initrd.gz", append=linux_boot.append)
        virtkit.save(Machine(name="kboot", memory="256MiB", kernel=boot), folder)
        moved = tmp_path / "moved"
        folder.rename(moved)  # relocatable: nothing names the old place
        loaded = virtkit.load(moved)
        assert loaded.kernel == boot
        guest = hv.define(loaded, folder=moved)
        assert str(moved / "vmlinuz") in guest.qemu_argv()
        _boot(guest)
        out = _run(guest, "echo kernel=$(uname -r)", "ENDK")
        assert b"kernel=" in out
        guest.shutdown(timeout=60)
        assert guest.state is State.SHUTOFF

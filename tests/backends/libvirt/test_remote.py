"""A remote host over qemu+ssh:// (an sshd on 127.0.0.1 with a throwaway key).

The "remote" is the local daemon reached through ssh; connecting with
``shared_storage=False`` makes virtkit treat its files as out of reach, so a
VM folder is pushed through storage volumes and pulled back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from libvirt_hosts import PREFIX, run

import virtkit
from virtkit import BackendError, ConfigError, StateError
from virtkit.backends.libvirt import LibvirtGuest, LibvirtHypervisor
from virtkit.images import open as open_image
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests
from virtkit.testing.conformance import counts

TIMEOUT = 60


def connect(uri: str, root: Path, **options: object) -> LibvirtHypervisor:
    hv = virtkit.connect("libvirt", uri=uri, accel="tcg", root=root, name_prefix=PREFIX, **options)
    assert isinstance(hv, LibvirtHypervisor)
    return hv


def disk_folder(tmp_path: Path, guest: str, name: str) -> Path:
    """A VM folder whose disk (in disks/) is the boot sector guest ``guest``."""
    folder = tmp_path / name
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "root.qcow2", guest, format="qcow2")
    virtkit.save(Machine(name=name, memory="32MiB", disks=(Disk("root.qcow2"),)), folder)
    return folder


class TestSsh:
    """The whole API over qemu+ssh://."""

    def test_lifecycle_console_snapshot_over_ssh(self, ssh_uri: str, tmp_path: Path) -> None:
        """Start, console, pause/resume, a full snapshot and revert work through ssh."""
        hv = connect(ssh_uri, tmp_path / "guests", shared_storage=True)
        try:
            assert hv.uri.startswith("qemu+ssh://")
            disk = tmp_path / "counter.qcow2"
            guests.write_disk(disk, "counter", format="qcow2")
            guest = hv.define(Machine(name="sshc", memory="32MiB", disks=(Disk(str(disk)),)))
            guest.start()
            guest.console.expect("count 1\r\n", timeout=TIMEOUT)
            guest.pause()
            # the guest may have printed more lines before the pause landed (a loaded host):
            # the snapshot holds a counter past every line seen now
            at_pause = counts(guest.console.output)[-1]
            guest.snapshot("one")
            guest.resume()
            guest.console.expect(f"count {at_pause + 10}\r\n", timeout=TIMEOUT)
            guest.revert("one")
            assert guest.state is State.PAUSED
            mark = len(guest.console.output)
            guest.resume()
            guest.console.expect(re.compile(rb"count \d+\r\n"), timeout=TIMEOUT)
            while not counts(guest.console.output[mark:]):  # expect() may match older lines
                guest.console.expect(re.compile(rb"count \d+\r\n"), timeout=TIMEOUT)
            after = counts(guest.console.output[mark:])[0]
            assert at_pause < after < at_pause + 10  # back to the snapshot's count
            guest.kill()
            assert hv.host.cpus >= 1
            assert hv.free_memory > 0
        finally:
            hv.close()

    def test_ssh_refuses_a_key_it_does_not_know(self, ssh_uri: str, tmp_path: Path) -> None:
        """sshd refuses the client's key: a BackendError naming the URI, no password prompt
        waited on."""
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger"))
        uri = re.sub(r"keyfile=[^&]*", f"keyfile={tmp_path / 'stranger'}", ssh_uri)
        assert uri != ssh_uri
        with pytest.raises(BackendError) as info:
            connect(uri, tmp_path / "guests", timeout=TIMEOUT)
        assert uri in str(info.value)


class TestPushPull:
    """A VM folder goes to a host without shared storage and comes back."""

    def test_push_run_pull(self, ssh_uri: str, tmp_path: Path) -> None:
        """Disks are uploaded with progress, the guest writes to them there, pull brings it home."""
        folder = disk_folder(tmp_path, "disk", "pushed")
        original = (folder / "disks" / "root.qcow2").read_bytes()
        hv = connect(ssh_uri, tmp_path / "guests", shared_storage=False)
        seen: list[tuple[int, int]] = []
        try:
            guest = hv.push(folder, progress=lambda done, total: seen.append((done, total)))
            assert isinstance(guest, LibvirtGuest)
            assert seen and seen[-1][0] == seen[-1][1] == len(original)
            remote = hv.remote_folder("pushed") + "/disks/root.qcow2"
            assert remote in guest.xml()
            guest.start()
            assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
            assert guest.console.output == guests.OUTPUT["disk"]
            # the guest wrote to the host's copy; the local folder is untouched so far
            assert (folder / "disks" / "root.qcow2").read_bytes() == original
            pulled: list[tuple[int, int]] = []
            guest.pull(progress=lambda done, total: pulled.append((done, total)), remove=True)
            assert pulled[-1][0] == pulled[-1][1]
            with open_image(folder / "disks" / "root.qcow2") as image:
                assert image.read(1024, 27) == b"written by the disk guest: "
            assert not Path(hv.remote_folder("pushed")).exists()  # the "remote" is this host
            assert (
                f"virtkit-{PREFIX}pushed"
                not in run("virsh", "-c", ssh_uri, "pool-list", "--all").stdout
            )
        finally:
            hv.close()

    def test_push_refuses_what_it_cannot_carry(self, ssh_uri: str, tmp_path: Path) -> None:
        """Absolute disk paths, define without push, pull of a running guest: clear errors."""
        hv = connect(ssh_uri, tmp_path / "guests", shared_storage=False)
        try:
            outside = tmp_path / "outside.qcow2"
            guests.write_disk(outside, "hello", format="qcow2")
            folder = tmp_path / "abs"
            virtkit.save(
                Machine(name="abs", memory="32MiB", disks=(Disk(str(outside)),)),
                folder,
                allow=[tmp_path],
            )
            with pytest.raises(ConfigError, match="outside"):
                hv.push(folder)
            with pytest.raises(ConfigError, match="disks/"):
                hv.push(folder, allow=[tmp_path])
            with pytest.raises(ConfigError, match="push"):
                hv.define(Machine(name="nopush", memory="32MiB", disks=(Disk(str(outside)),)))
            pushed = hv.push(disk_folder(tmp_path, "counter", "busy"))
            assert isinstance(pushed, LibvirtGuest)
            pushed.start()
            with pytest.raises(StateError):
                pushed.pull()
            pushed.kill()
            pushed.pull(remove=True)
        finally:
            hv.close()

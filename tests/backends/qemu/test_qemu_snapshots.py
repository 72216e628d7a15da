"""Snapshots under the qemu backend: full (internal qcow2, snapshot-save/load jobs) and
disk-only (external qcow2 overlays) with revert and delete."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import virtkit
import virtkit.images
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import Disk, Machine, SnapshotKind, State
from virtkit.testing import guests

COUNT = re.compile(rb"count (\d+)\r\n")


def _machine(name: str, disk: Path, bus: str = "ide") -> Machine:
    return Machine(name=name, memory="16MiB", disks=[Disk(path=str(disk), bus=bus)])


def _count(guest) -> int:  # type: ignore[no-untyped-def]
    return int(guest.console.expect(COUNT, timeout=30).group(1))


def _chain(path: Path) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [Path(i["filename"]).name for i in json.loads(out)]


class TestFullSnapshots:
    def test_revert_restores_the_counter_and_keeps_running(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """After revert the counting guest continues from the snapshot's count, still RUNNING."""
        guest = hv.define(_machine("count", boot_disk("counter")))
        guest.start()
        while _count(guest) < 5:
            pass
        guest.snapshot("five", memory=True)
        at_snapshot = _count(guest)
        while _count(guest) < at_snapshot + 10:
            pass
        before_revert = _count(guest)
        guest.revert("five")
        assert guest.state is State.RUNNING
        # lines printed between the last read and the revert are still unread: skip them
        # (they go on from before_revert); the reverted guest counts on from the snapshot
        seen = [_count(guest)]
        while seen[-1] > at_snapshot + 2 and len(seen) < 1000:
            assert seen[-1] > before_revert, f"count went back, but not to the snapshot: {seen}"
            seen.append(_count(guest))
        assert seen[-1] <= at_snapshot + 2, seen
        assert _count(guest) == seen[-1] + 1  # and it keeps running
        guest.kill()

    def test_snapshot_taken_paused_reverts_to_paused_even_from_shutoff(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """A full snapshot of a paused guest, reverted after a kill, restarts QEMU and comes back PAUSED."""
        guest = hv.define(_machine("paused", boot_disk("counter")))
        guest.start()
        _count(guest)
        guest.pause()
        snap = guest.snapshot("frozen")
        assert snap.state is State.PAUSED
        guest.kill()
        guest.revert("frozen")
        assert guest.state is State.PAUSED
        assert guest.qmp("query-status")["running"] is False
        guest.resume()
        _count(guest)
        guest.kill()

    def test_snapshots_are_shared_with_virtkit_images_both_ways(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """QEMU's internal snapshot is listed by virtkit.images; one made by virtkit.images is seen by QEMU."""
        disk = boot_disk("counter")
        with virtkit.images.open(disk, writable=True) as img:
            img.create_snapshot("made-by-virtkit")
        guest = hv.define(_machine("interop", disk))
        guest.start()
        _count(guest)
        guest.snapshot("made-by-qemu")
        nodes = guest.qmp("query-named-block-nodes", {"flat": True})
        seen = {
            s["name"]
            for n in nodes
            if n["node-name"] == "drive-hda"
            for s in n["image"].get("snapshots", [])
        }
        assert {"made-by-virtkit", "made-by-qemu"} <= seen
        guest.delete_snapshot("made-by-qemu")
        guest.kill()
        with virtkit.images.open(disk) as img:
            assert {s.name for s in img.snapshots} == {"made-by-virtkit"}
            assert img.check().ok

    def test_failed_revert_of_a_stopped_guest_leaves_no_qemu(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """A full snapshot deleted from the image behind virtkit's back: revert raises BackendError,
        the guest stays SHUTOFF and the QEMU started to restore it is gone."""
        disk = boot_disk("counter")
        guest = hv.define(_machine("gone-snap", disk))
        guest.start()
        _count(guest)
        guest.snapshot("s")
        guest.kill()
        subprocess.run(["qemu-img", "snapshot", "-d", "s", str(disk)], check=True)
        with pytest.raises(virtkit.BackendError, match="snapshot-load"):
            guest.revert("s")
        assert guest.state is State.SHUTOFF and guest.pid is None

    def test_full_snapshot_of_a_stopped_guest_is_refused(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """memory=True on a shut-off guest is a StateError (nothing to capture)."""
        guest = hv.define(_machine("off", boot_disk("counter")))
        with pytest.raises(virtkit.StateError, match="memory=False"):
            guest.snapshot("nope", memory=True)

    def test_full_snapshot_needs_a_qcow2_disk(
        self, hv: QemuHypervisor, tmp_path: Path, sectors
    ) -> None:  # type: ignore[no-untyped-def]
        """A guest whose only writable disk is raw cannot hold RAM state: a clear ConfigError."""
        raw = tmp_path / "boot.raw"
        raw.write_bytes(sectors["counter"] + b"\0" * (1024**2 - 512))
        guest = hv.define(_machine("raw", raw))
        guest.start()
        with pytest.raises(virtkit.ConfigError, match="raw"):
            guest.snapshot("x")
        assert guest.state is State.RUNNING
        guest.kill()


class TestDiskSnapshots:
    def test_offline_disk_snapshot_revert_and_delete(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """Disk snapshots of a shut-off guest: overlays are created, revert discards later writes,
        delete merges the layers and leaves a valid chain."""
        disk = boot_disk("disk", extra=b"original\r\n\0")
        guest = hv.define(_machine("offline", disk))
        snap = guest.snapshot("clean", memory=False)
        assert snap.kind is SnapshotKind.DISK and snap.state is State.SHUTOFF
        active = guest.active_disk_path(guest.machine.disks[0])
        assert active != disk and _chain(active) == [active.name, disk.name]
        guest.start()  # the guest writes its marker into the overlay
        guest.console.expect("disk done", timeout=30)
        guest.wait(timeout=30)
        with guest.open_disk(0) as img:
            assert img.read(1024, 27) == b"written by the disk guest: "
        with virtkit.images.open(disk) as img:
            assert img.read(1024, 16) == b"\0" * 16  # the frozen base is untouched
        guest.revert("clean")
        assert guest.state is State.SHUTOFF
        with guest.open_disk(0) as img:
            assert img.read(1024, 16) == b"\0" * 16
        guest.delete_snapshot("clean")
        top = guest.active_disk_path(guest.machine.disks[0])
        assert _chain(top) == [top.name]  # the base was streamed into the overlay
        with guest.open_disk(0) as img:
            assert img.read(512, 8) == b"original"
            assert img.check().ok

    def test_live_disk_snapshots_deleted_commit_back_into_the_original_file(
        self,
        hv: QemuHypervisor,
        boot_disk,  # type: ignore[no-untyped-def]
    ) -> None:
        """Two blockdev-snapshot overlays on a running guest; deleting the older one commits the
        intermediate layer, deleting the newer one active-commits and pivots: the guest keeps
        running on its original file, which holds everything."""
        disk = boot_disk("counter")
        guest = hv.define(_machine("live", disk))
        guest.start()
        _count(guest)
        guest.snapshot("a", memory=False)
        first = guest.disk_path(guest.machine.disks[0])
        guest.snapshot("b", memory=False)
        second = guest.disk_path(guest.machine.disks[0])
        assert _chain(second) == [second.name, first.name, disk.name]
        hda = next(b for b in guest.qmp("query-block") if b["qdev"] == "hda")
        assert second.name in hda["inserted"]["file"]
        guest.delete_snapshot("a")  # intermediate commit of `first` into the original
        assert not first.exists()
        assert _chain(second) == [second.name, disk.name]
        guest.delete_snapshot("b")  # active commit, then pivot onto the original
        assert not second.exists()
        assert guest.disk_path(guest.machine.disks[0]) == disk
        assert guest.state is State.RUNNING
        _count(guest)  # still running after both jobs
        hda = next(b for b in guest.qmp("query-block") if b["qdev"] == "hda")
        assert hda["inserted"]["node-name"] == "drive-hda"
        guest.kill()
        assert _chain(disk) == [disk.name]
        with virtkit.images.open(disk) as img:
            assert img.read(510, 2) == b"\x55\xaa"
            assert img.check().ok

    def test_deleting_a_snapshot_with_two_branches_streams_it_into_both(
        self,
        hv: QemuHypervisor,
        boot_disk,  # type: ignore[no-untyped-def]
    ) -> None:
        """A frozen layer two overlays depend on (after a revert) is merged into both and removed;
        the disk's own file, frozen with two children, stays the bottom of both chains."""
        disk = boot_disk("disk", extra=b"original\r\n\0")
        guest = hv.define(_machine("branches", disk))
        guest.snapshot("base", memory=False)
        mid_layer = guest.disk_path(guest.machine.disks[0])  # overlay 1, frozen by "mid"
        guest.snapshot("mid", memory=False)
        guest.start()
        guest.console.expect("disk done", timeout=30)
        guest.wait(timeout=30)
        guest.revert("base")  # new overlay on the original: the original has two children
        guest.delete_snapshot("base")
        assert disk.exists()  # the machine's own file is never removed
        with guest.open_disk(0) as img:
            assert img.read(512, 8) == b"original"
        guest.revert("mid")
        top = guest.disk_path(guest.machine.disks[0])
        assert _chain(top) == [top.name, mid_layer.name, disk.name]
        with guest.open_disk(0) as img:
            assert img.read(512, 8) == b"original" and img.check().ok

    def test_revert_of_a_live_disk_snapshot_leaves_the_guest_shut_off(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """Reverting a disk-only snapshot stops the running guest (disks only were captured)."""
        guest = hv.define(_machine("stopme", boot_disk("counter")))
        guest.start()
        _count(guest)
        guest.snapshot("d", memory=False)
        guest.revert("d")
        assert guest.state is State.SHUTOFF and guest.pid is None
        guest.start()
        _count(guest)
        guest.kill()

    def test_disk_snapshot_delete_that_would_lose_a_full_snapshot_is_refused(
        self,
        hv: QemuHypervisor,
        boot_disk,  # type: ignore[no-untyped-def]
    ) -> None:
        """A full snapshot stored in an overlay blocks deleting the disk snapshot that would
        merge that overlay away: StateError naming it, and nothing changes."""
        guest = hv.define(_machine("mixed", boot_disk("counter")))
        guest.start()
        _count(guest)
        guest.snapshot("disk-a", memory=False)
        guest.snapshot("full-b", memory=True)  # lives in the overlay of disk-a
        overlay = guest.disk_path(guest.machine.disks[0])
        with pytest.raises(virtkit.StateError, match="full-b"):
            guest.delete_snapshot("disk-a")
        assert overlay.exists() and {s.name for s in guest.snapshots} == {"disk-a", "full-b"}
        guest.delete_snapshot("full-b")
        guest.delete_snapshot("disk-a")
        assert not overlay.exists()
        guest.kill()


class TestUefiNvram:
    def test_full_snapshot_keeps_the_nvram_and_revert_restores_it(
        self, hv: QemuHypervisor, tmp_path: Path
    ) -> None:
        """A UEFI guest's full snapshot copies OVMF_VARS.fd into the snapshot's folder; after the
        variables changed, reverting puts the snapshot's copy back before QEMU reopens it."""
        disk = tmp_path / "uefi.qcow2"
        virtkit.images.create(disk, size="8MiB", format="qcow2").close()
        guest = hv.define(
            Machine(name="uefi", memory="64MiB", firmware="uefi", disks=[Disk(path=str(disk))])
        )
        guest.start()
        nvram = guest.folder / "OVMF_VARS.fd"
        snap = guest.snapshot("fw", memory=True)
        saved = guest.snapshot_dir("fw") / "OVMF_VARS.fd"
        assert saved.read_bytes() == nvram.read_bytes()
        assert snap.layers == {"vda": str(disk)}
        guest.kill()
        at_snapshot = saved.read_bytes()
        changed = bytearray(at_snapshot)
        changed[-16:] = b"changed-after-it"  # as if the firmware stored a variable since
        nvram.write_bytes(bytes(changed))
        guest.revert("fw")
        assert guest.state is State.RUNNING
        assert nvram.read_bytes() == at_snapshot
        guest.kill()
        guest.delete_snapshot("fw")
        assert not saved.exists()


class TestRawDiskLayers:
    def test_a_raw_disk_boots_through_its_qcow2_overlay(
        self, hv: QemuHypervisor, tmp_path: Path
    ) -> None:
        """After a disk snapshot of a raw disk the active layer is a qcow2 overlay: QEMU opens it
        as qcow2 (it used to open it as raw and boot the qcow2 header), the guest's write lands in
        the overlay and the raw file keeps its old bytes."""
        raw = tmp_path / "boot.raw"
        guests.write_disk(raw, "disk", format="raw")
        guest = hv.define(_machine("rawlayer", raw))
        guest.snapshot("s", memory=False)
        guest.start()
        assert guest.wait(timeout=30) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["disk"]
        with guest.open_disk(0) as img:
            assert img.format == "qcow2"
            assert img.read(1024, 27) == b"written by the disk guest: "
        assert raw.read_bytes()[1024:1040] == bytes(16)

"""Live migration between two libvirt daemons (the second in its own network + mount namespaces)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from libvirt_hosts import LOCAL, PREFIX, SecondHost

import virtkit
from virtkit import ConfigError, StateError
from virtkit.backends.libvirt import LOCATION_FILE, LibvirtGuest, LibvirtHypervisor
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests
from virtkit.testing.conformance import counts

TIMEOUT = 60


def connect(uri: str, root: Path, **options: object) -> LibvirtHypervisor:
    hv = virtkit.connect("libvirt", uri=uri, accel="tcg", root=root, name_prefix=PREFIX, **options)
    assert isinstance(hv, LibvirtHypervisor)
    return hv


class TestLiveMigration:
    """guest.migrate(dest) moves a running guest; its counter continues; the folder says where."""

    def test_counter_continues_on_the_second_host(
        self, second_host: SecondHost, tmp_path: Path
    ) -> None:
        """A -> B live, then B -> A: the console keeps counting up, location.toml follows."""
        a = connect(LOCAL, tmp_path / "a", migration_uri=second_host.local_migration_uri)
        b = connect(second_host.uri, tmp_path / "b", migration_uri=second_host.migration_uri)
        try:
            disk = tmp_path / "counter.qcow2"
            guests.write_disk(disk, "counter", format="qcow2")
            guest = a.define(Machine(name="mig", memory="32MiB", disks=(Disk(str(disk)),)))
            assert isinstance(guest, LibvirtGuest)
            guest.start()
            guest.console.expect("count 2\r\n", timeout=TIMEOUT)
            moved = guest.migrate(b)
            assert moved.hypervisor is b
            assert moved.state is State.RUNNING
            assert [g.name for g in a.guests] == []
            assert [g.name for g in b.guests] == ["mig"]
            with pytest.raises(StateError):
                guest.pause()  # the old handle is dead
            last = counts(moved.console.output)[-1]
            moved.console.expect(f"count {last + 2}\r\n", timeout=TIMEOUT)
            seen = counts(moved.console.output)
            assert seen == list(range(len(seen)))  # no restart, no gap: the same run
            where = tomllib.loads((moved.folder / LOCATION_FILE).read_text())
            assert where["uri"] == second_host.uri
            assert where["domain"] == PREFIX + "mig"
            back = moved.migrate(a)
            last = counts(back.console.output)[-1]
            back.console.expect(f"count {last + 1}\r\n", timeout=TIMEOUT)
            assert tomllib.loads((back.folder / LOCATION_FILE).read_text())["uri"] == LOCAL
            back.kill()
            assert back.state is State.SHUTOFF
        finally:
            b.close()
            a.close()

    def test_a_paused_guest_arrives_paused(self, second_host: SecondHost, tmp_path: Path) -> None:
        """migrate() of a paused guest leaves it paused on the destination; resume continues."""
        a = connect(LOCAL, tmp_path / "a")
        b = connect(second_host.uri, tmp_path / "b", migration_uri=second_host.migration_uri)
        try:
            disk = tmp_path / "counter.qcow2"
            guests.write_disk(disk, "counter", format="qcow2")
            guest = a.define(Machine(name="migp", memory="32MiB", disks=(Disk(str(disk)),)))
            assert isinstance(guest, LibvirtGuest)
            guest.start()
            guest.console.expect("count 1\r\n", timeout=TIMEOUT)
            guest.pause()
            moved = guest.migrate(b, live=False)
            assert moved.state is State.PAUSED
            last = counts(moved.console.output)[-1]
            moved.resume()
            moved.console.expect(f"count {last + 1}\r\n", timeout=TIMEOUT)
        finally:
            b.close()
            a.close()

    def test_bad_migrations(self, second_host: SecondHost, tmp_path: Path) -> None:
        """A stopped guest, the same host, a non-libvirt destination: clear errors, nothing moves."""
        a = connect(LOCAL, tmp_path / "a")
        b = connect(second_host.uri, tmp_path / "b", migration_uri=second_host.migration_uri)
        emu = virtkit.connect("emulator", root=tmp_path / "emu")
        try:
            disk = tmp_path / "counter.qcow2"
            guests.write_disk(disk, "counter", format="qcow2")
            guest = a.define(Machine(name="migx", memory="32MiB", disks=(Disk(str(disk)),)))
            assert isinstance(guest, LibvirtGuest)
            with pytest.raises(StateError, match="shutoff"):
                guest.migrate(b)
            guest.start()
            with pytest.raises(ConfigError):
                guest.migrate(a)
            with pytest.raises(ConfigError):
                guest.migrate(emu)  # type: ignore[arg-type]
            with pytest.raises(ConfigError):
                guest.migrate(b, live="yes")  # type: ignore[arg-type]
            assert guest.state is State.RUNNING
            assert [g.name for g in a.guests] == ["migx"]
        finally:
            emu.close()
            b.close()
            a.close()


class TestWithoutSharedStorage:
    """copy_storage=True: the second host does not see the disk; libvirt copies it over."""

    def test_copy_storage(self, second_host: SecondHost, tmp_path: Path) -> None:
        """The disk lives where only the first host sees it (the second host's
        /var/lib/libvirt is private); after migrate(copy_storage=True) the guest runs
        on the second host from its own copy and keeps counting."""
        here = Path("/var/lib/libvirt") / f"{PREFIX}nonshared"
        here.mkdir(parents=True, exist_ok=True)
        a = connect(LOCAL, tmp_path / "a", migration_uri=second_host.local_migration_uri)
        b = connect(
            second_host.uri,
            tmp_path / "b",
            migration_uri=second_host.migration_uri,
            shared_storage=False,
        )
        pool = None
        try:
            disk = here / "counter.qcow2"
            guests.write_disk(disk, "counter", format="qcow2")
            # a directory pool at the same path on the second host: libvirt creates the
            # destination image in it before copying
            pool_xml = (
                f"<pool type='dir'><name>{PREFIX}nonshared</name>"
                f"<target><path>{here}</path></target></pool>"
            )
            pool = b.connection.raw.storagePoolDefineXML(pool_xml, 0)
            pool.build(0)
            pool.create(0)
            assert pool.listAllVolumes(0) == []  # it really does not see the first host's file
            guest = a.define(Machine(name="copy", memory="32MiB", disks=(Disk(str(disk)),)))
            assert isinstance(guest, LibvirtGuest)
            guest.start()
            guest.console.expect("count 1\r\n", timeout=TIMEOUT)
            moved = guest.migrate(b, copy_storage=True)
            last = counts(moved.console.output)[-1]
            moved.console.expect(f"count {last + 2}\r\n", timeout=TIMEOUT)
            pool.refresh(0)
            assert [v.name() for v in pool.listAllVolumes(0)] == ["counter.qcow2"]
            moved.kill()
        finally:
            b.close()
            a.close()
            if pool is not None:
                for vol in pool.listAllVolumes(0):
                    vol.delete(0)
                pool.destroy()
                pool.undefine()
            shutil.rmtree(here, ignore_errors=True)

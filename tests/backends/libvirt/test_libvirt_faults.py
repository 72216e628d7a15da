"""Faults: refused and unreachable hosts, a daemon killed mid-call, domains changed behind our back.

Each ends in a clear virtkit error naming the URI, within the call's timeout,
and leaves no libvirt client connection or console stream behind.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from libvirt_hosts import LOCAL, PREFIX, SecondHost, run

import virtkit
from virtkit import BackendError, ConfigError, StateError
from virtkit.backends.libvirt import LibvirtGuest, LibvirtHypervisor
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests

TIMEOUT = 60


def connect(uri: str, root: Path, **options: object) -> LibvirtHypervisor:
    hv = virtkit.connect("libvirt", uri=uri, accel="tcg", root=root, name_prefix=PREFIX, **options)
    assert isinstance(hv, LibvirtHypervisor)
    return hv


def clients() -> int:
    """Client connections this test process has open to the local daemon now (virt-admin)."""
    admin = ("virt-admin", "-c", "libvirtd:///system")
    out = run(*admin, "client-list", "libvirtd").stdout
    ids = [line.split()[0] for line in out.splitlines() if re.match(r"^\s*\d+\s", line)]
    mine = 0
    for ident in ids:
        info = run(*admin, "client-info", "libvirtd", ident, check=False).stdout
        if re.search(rf"unix_process_id\s*:\s*{os.getpid()}\b", info):
            mine += 1
    return mine


def counter_guest(
    hv: LibvirtHypervisor, tmp_path: Path, name: str, kind: str = "counter"
) -> LibvirtGuest:
    disk = tmp_path / f"{name}.qcow2"
    guests.write_disk(disk, kind, format="qcow2")
    guest = hv.define(Machine(name=name, memory="32MiB", disks=(Disk(str(disk)),)))
    assert isinstance(guest, LibvirtGuest)
    return guest


class TestConnecting:
    """Hosts that refuse or do not answer."""

    def test_refused(self, libvirtd: str, tmp_path: Path) -> None:
        """Nothing listens on the port: BackendError naming the URI."""
        uri = "qemu+tcp://127.0.0.1:1/system"
        with pytest.raises(BackendError) as info:
            connect(uri, tmp_path)
        assert uri in str(info.value)

    def test_unreachable_within_the_timeout(self, libvirtd: str, tmp_path: Path) -> None:
        """A host that never answers (a transport that connects, then says nothing) fails
        after ``timeout`` seconds."""
        silent = tmp_path / "silent"
        silent.write_text("#!/bin/sh\nexec sleep 5\n")
        silent.chmod(0o755)
        uri = f"qemu+ext:///system?command={silent}"
        with pytest.raises(BackendError, match="within 1.0 s") as info:
            connect(uri, tmp_path, timeout=1.0)
        assert uri in str(info.value)

    def test_bad_options(self, libvirtd: str, tmp_path: Path) -> None:
        """Wrong option values are ConfigErrors naming the option."""
        for options in (
            {"uri": 3},
            {"accel": "hvf"},
            {"timeout": 0},
            {"timeout": True},
            {"shared_storage": "yes"},
            {"name_prefix": "a/b"},
            {"remote_root": "relative"},
            {"migration_uri": 5},
        ):
            with pytest.raises(ConfigError, match=next(iter(options))):
                virtkit.connect("libvirt", root=tmp_path, **options)

    def test_no_connection_leaks(self, libvirtd: str, tmp_path: Path) -> None:
        """A closed hypervisor holds no client connection; a console stream ends with the guest."""
        before = clients()
        hv = connect(LOCAL, tmp_path)
        assert clients() == before + 1
        guest = counter_guest(hv, tmp_path, "leak")
        guest.start()
        guest.console.expect("count 0", timeout=TIMEOUT)
        assert guest._stream is not None
        guest.kill()
        assert guest._stream is None
        hv.close()
        deadline = time.monotonic() + TIMEOUT  # the daemon notices the hang-up asynchronously
        while clients() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clients() <= before
        assert PREFIX + "leak" not in run("virsh", "-c", LOCAL, "list", "--all", "--name").stdout


class TestBehindOurBack:
    """virsh changes a domain virtkit manages."""

    def test_virsh_destroy_is_a_crash(self, libvirtd: str, tmp_path: Path) -> None:
        """A domain destroyed with virsh is CRASHED with the reason; it starts again."""
        hv = connect(LOCAL, tmp_path)
        try:
            guest = counter_guest(hv, tmp_path, "victim")
            guest.start()
            guest.console.expect("count 1", timeout=TIMEOUT)
            run("virsh", "-c", LOCAL, "destroy", PREFIX + "victim")
            assert guest.wait(timeout=TIMEOUT) is State.CRASHED
            assert guest.crash_reason is not None
            assert "destroyed outside virtkit" in guest.crash_reason
            with pytest.raises(StateError):
                guest.console.expect("count 1000", timeout=TIMEOUT)
            guest.start()
            guest.console.expect("counter starts", timeout=TIMEOUT)
            guest.kill()
        finally:
            hv.close()

    def test_virsh_pause_and_resume_are_seen(self, libvirtd: str, tmp_path: Path) -> None:
        """virsh suspend/resume move the guest's state through the events."""
        hv = connect(LOCAL, tmp_path)
        try:
            guest = counter_guest(hv, tmp_path, "puppet")
            guest.start()
            guest.console.expect("count 0", timeout=TIMEOUT)
            run("virsh", "-c", LOCAL, "suspend", PREFIX + "puppet")
            guest._lifecycle.wait_for(lambda s: s is State.PAUSED, TIMEOUT, "pause")
            run("virsh", "-c", LOCAL, "resume", PREFIX + "puppet")
            guest._lifecycle.wait_for(lambda s: s is State.RUNNING, TIMEOUT, "resume")
            guest.kill()
        finally:
            hv.close()

    def test_virsh_undefine(self, libvirtd: str, tmp_path: Path) -> None:
        """A domain undefined behind our back: reading it is a BackendError saying it is
        gone; start() defines it again from the VM folder (the folder is the truth)."""
        hv = connect(LOCAL, tmp_path)
        try:
            guest = counter_guest(hv, tmp_path, "ghost", kind="hello")
            run("virsh", "-c", LOCAL, "undefine", PREFIX + "ghost")
            with pytest.raises(BackendError, match="no longer exists") as info:
                guest.xml()
            assert LOCAL in str(info.value)
            assert guest.state is State.SHUTOFF
            guest.start()
            assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
            assert guest.console.output == guests.OUTPUT["hello"]
            assert PREFIX + "ghost" in run("virsh", "-c", LOCAL, "list", "--all", "--name").stdout
        finally:
            hv.close()

    def test_a_name_taken_on_the_host(self, libvirtd: str, tmp_path: Path) -> None:
        """define() refuses a name a foreign domain already has, and leaves it alone."""
        xml = tmp_path / "taken.xml"
        xml.write_text(
            f"<domain type='qemu'><name>{PREFIX}taken</name><memory unit='MiB'>32</memory>"
            "<os><type>hvm</type></os></domain>"
        )
        run("virsh", "-c", LOCAL, "undefine", PREFIX + "taken", check=False)
        run("virsh", "-c", LOCAL, "define", str(xml))
        hv = connect(LOCAL, tmp_path)
        try:
            with pytest.raises(ConfigError, match="import_domain"):
                hv.define(Machine(name="taken", memory="32MiB"))
        finally:
            hv.close()
            run("virsh", "-c", LOCAL, "undefine", PREFIX + "taken")


class TestHostileValues:
    """Quotes, ``]]>`` and markup in domain names and paths stay data all the way to QEMU."""

    def test_hostile_domain_name_and_folder_path(self, libvirtd: str, tmp_path: Path) -> None:
        """A guest whose domain name (through name_prefix) and VM folder path hold quotes,
        ``]]>``, ``&``, ``<`` and a space boots, snapshots and is undefined."""
        hostile = tmp_path / "h'q\"]]>&<x y"
        hostile.mkdir()
        prefix = PREFIX + "q'\"]]>&< "
        hv = virtkit.connect(
            "libvirt", uri=LOCAL, accel="tcg", root=hostile / "guests", name_prefix=prefix
        )
        try:
            disk = hostile / "disk ]]>.qcow2"
            guests.write_disk(disk, "hello", format="qcow2")
            guest = hv.define(
                Machine(
                    name="hostile",
                    memory="32MiB",
                    disks=(Disk(str(disk)),),
                    labels={"x": "]]><!--"},
                )
            )
            assert isinstance(guest, LibvirtGuest)
            assert guest.domain_name == prefix + "hostile"
            sources = [e.get("file") for e in ET.fromstring(guest.xml()).iter("source")]
            assert str(disk) in sources
            guest.start()
            assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
            assert guest.console.output == guests.OUTPUT["hello"]
            guest.snapshot("s1", memory=False)
            assert [s.name for s in guest.snapshots] == ["s1"]
            listed = run("virsh", "-c", LOCAL, "list", "--all", "--name").stdout.splitlines()
            assert prefix + "hostile" in listed
        finally:
            hv.close()
        listed = run("virsh", "-c", LOCAL, "list", "--all", "--name").stdout.splitlines()
        assert prefix + "hostile" not in listed


class TestDaemonDies:
    """The daemon of a host is killed while virtkit uses it."""

    def test_killed_mid_shutdown(self, second_host: SecondHost, tmp_path: Path) -> None:
        """shutdown() waiting on a guest that ignores ACPI fails with BackendError, not a hang."""
        hv = connect(second_host.uri, tmp_path, shared_storage=True)
        try:
            guest = counter_guest(hv, tmp_path, "orphan", kind="ignore-acpi")
            guest.start()
            guest.console.expect("halting", timeout=TIMEOUT)
            killer = threading.Timer(0.5, second_host.kill_daemon)
            killer.start()
            with pytest.raises(BackendError) as info:
                guest.shutdown(timeout=TIMEOUT)
            killer.join()
            assert second_host.uri in str(info.value)
            with pytest.raises(BackendError):
                guest.pause()
        finally:
            hv.close()

    @pytest.mark.parametrize("transport", ["tcp", "unix"])
    def test_frozen_daemon_is_noticed(
        self, second_host: SecondHost, tmp_path: Path, transport: str
    ) -> None:
        """A daemon that stops answering (SIGSTOP) while a call waits on it: libvirt's
        keep-alive drops the connection and the call fails with a BackendError naming the
        URI instead of hanging, and the process survives (libvirt 9.0's client crashed it when
        the console stream shared the connection)."""
        uri = second_host.uri
        if transport == "unix":  # a local URI: its socket, as qemu:///system's
            uri = f"qemu:///system?socket={second_host.work}/run/libvirt-sock"
        hv = connect(uri, tmp_path, shared_storage=True)
        try:
            guest = counter_guest(hv, tmp_path, "frozen")
            guest.start()
            guest.console.expect("count 0", timeout=TIMEOUT)
            pids = second_host._pids("run/libvirtd.pid")
            assert pids
            outcome: list[BaseException | None] = []

            def call() -> None:
                try:
                    guest.pause()
                except BaseException as exc:  # handed to the test's thread
                    outcome.append(exc)
                else:
                    outcome.append(None)

            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                caller = threading.Thread(target=call, daemon=True)
                caller.start()
                caller.join(TIMEOUT)  # keep-alive: 2 s x 3 probes, so far below this
                assert not caller.is_alive(), "pause() hung on a frozen daemon"
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            assert len(outcome) == 1
            assert isinstance(outcome[0], BackendError)
            assert uri in str(outcome[0])
            with pytest.raises(BackendError):
                guest.pause()  # the connection is gone: every call says so at once
        finally:
            hv.close()

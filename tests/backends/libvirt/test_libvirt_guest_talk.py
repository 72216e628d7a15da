"""Talking to the real Linux guest under libvirt: addresses from libvirt's agent and ARP
sources, quiesced snapshots, 9p shares and an agent file transfer.

One guest for the module (Debian's generic kernel, for 9p): the guest agent, a user-mode
NIC (eth0, DHCP: 10.0.2.15), a NIC on a host tap made here (eth1, a static address set
in the guest), a qcow2 data disk, a read-only and a writable share. The tests run in file
order on it: snapshots first (QEMU refuses to save the state of a guest that has a 9p
share mounted), the agent fault last. Commands run through the agent, not the serial
console: libvirt's pty console loses bytes now and then under load (see
test_libvirt_console_readiness.py), which is not what these tests are about.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtkit
from virtkit.agent import AgentError, ExecResult
from virtkit.backends.libvirt.guest import LibvirtGuest
from virtkit.model import Disk, KernelBoot, Machine, Nic, Share
from virtkit.testing.linux import (
    DEFAULT_MODULES,
    GENERIC_KERNEL_PACKAGE,
    LINUX_CMDLINE,
    build_initramfs,
    fetch_guest_agent,
    fetch_kernel,
)

PID = os.getpid()
PREFIX = f"vkt-{PID}-talk-"
TAP = f"vkt{PID % 100000}t"
#: a /24 of the host tap, per test process (parallel workers do not share one)
NET = f"172.31.{PID % 250}"
HOST_IP, GUEST_IP = f"{NET}.1", f"{NET}.2"
MOUNT = "-t 9p -o trans=virtio,version=9p2000.L"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tap() -> Iterator[str]:
    """A host tap interface with an address (the host end of the guest's eth1)."""
    subprocess.run(["ip", "link", "del", TAP], check=False, capture_output=True, timeout=30)
    _ip("tuntap", "add", "dev", TAP, "mode", "tap")
    try:
        _ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        _ip("link", "set", TAP, "up")
        yield TAP
    finally:
        subprocess.run(["ip", "link", "del", TAP], check=False, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The host folders behind the read-only and the writable share."""
    top = tmp_path_factory.mktemp("lv-shares")
    ro, rw = top / "ro", top / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "hello.txt").write_text("from the host\n")
    return ro, rw


@pytest.fixture(scope="module")
def guest(
    libvirtd: str,
    tap: str,
    shared: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LibvirtGuest]:
    """The running guest, its agent answering."""
    kernel = fetch_kernel(package=GENERIC_KERNEL_PACKAGE)
    work = tmp_path_factory.mktemp("lv-talk")
    initrd = build_initramfs(
        kernel,
        work / "initrd-talk.gz",
        modules=(*DEFAULT_MODULES, "9p", "9pnet_virtio", "ext4", "crc32c_generic"),
        agent=fetch_guest_agent(),
        network=True,
    )
    data = work / "data.qcow2"
    virtkit.images.create(data, size="32MiB").close()
    ro, rw = shared
    machine = Machine(
        name="talk",
        memory="256MiB",
        agent=True,
        kernel=KernelBoot(str(kernel.vmlinuz), str(initrd), LINUX_CMDLINE),
        disks=[Disk(str(data))],
        nics=[Nic(), Nic(network="tap", tap=tap)],
        shares=[Share(str(ro), "hostro"), Share(str(rw), "hostrw", read_only=False)],
    )
    with virtkit.connect("libvirt", root=work / "root", name_prefix=PREFIX) as hv:
        handle = hv.define(machine)
        assert isinstance(handle, LibvirtGuest)
        handle.start()
        try:
            handle.wait_ready(via="agent", timeout=240)
            yield handle
        finally:
            handle.kill()


def sh(guest: LibvirtGuest, command: str, timeout: float = 60) -> ExecResult:
    """A shell command in the guest, through the agent."""
    return guest.agent.exec(["/bin/sh", "-c", command], timeout=timeout)


def run(guest: LibvirtGuest, command: str, timeout: float = 60) -> str:
    """A shell command in the guest; its standard output, its exit status checked."""
    result = sh(guest, command, timeout)
    assert result.exit_code == 0, (command, result)
    return result.stdout.decode()


def test_addresses_from_the_agent_and_from_arp(guest: LibvirtGuest) -> None:
    """The agent source lists eth0's user-mode address; after the guest pinged the host
    over the tap, libvirt's ARP source finds the guest's eth1 address by its MAC."""
    found = guest.addresses()
    assert ("10.0.2.15", "ipv4", "eth0", 24) in [
        (a.address, a.family, a.interface, a.prefix) for a in found
    ]
    assert all(a.interface != "lo" for a in found)

    arp_before = {a.address for a in guest.addresses(source="arp")}
    assert GUEST_IP not in arp_before  # nothing has reached the host's ARP table yet
    run(guest, f"ip link set eth1 up && ip addr add {GUEST_IP}/24 dev eth1")
    run(guest, f"ping -c 2 -W 5 {HOST_IP}", timeout=60)
    arp = guest.addresses(source="arp")
    assert GUEST_IP in {a.address for a in arp}, arp
    assert "10.0.2.15" not in {a.address for a in arp}  # user-mode never reaches the host
    by_agent = {a.address: a.interface for a in guest.addresses(source="agent")}
    assert by_agent[GUEST_IP] == "eth1"
    assert guest.addresses(source="lease") == []  # no libvirt network, no dnsmasq lease

    with pytest.raises(virtkit.ConfigError, match="source"):
        guest.addresses(source="dhcp")  # type: ignore[arg-type]


def test_disk_snapshot_is_quiesced(guest: LibvirtGuest) -> None:
    """A file written but not synced in the guest is in the disk-only snapshot's frozen
    layer (the external snapshot's backing file): the agent froze the file system around
    the libvirt snapshot; thawed and writable after."""
    run(guest, "mke2fs -q /dev/vda && mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d")
    marker = "vk-lv-quiesce-" + os.urandom(6).hex()
    run(guest, f"echo {marker} > /mnt/d/note")  # in the page cache, not on the disk yet
    snap = guest.snapshot("quiet", memory=False)
    frozen = Path(guest.folder, "disks", snap.layers["vda"])
    with virtkit.images.open(frozen) as image:
        assert image.check().ok
        assert marker.encode() in image.read(0, image.virtual_size)
    assert not Path(guest.snapshot_dir(snap.name), "quiesced").exists()  # disk-only
    assert guest.agent.fsfreeze_status() == "thawed"
    assert run(guest, "echo after >> /mnt/d/note && sync && cat /mnt/d/note") == (
        f"{marker}\nafter\n"
    )


def test_full_snapshot_is_quiesced_and_revert_thaws(guest: LibvirtGuest) -> None:
    """A full (internal) snapshot is taken frozen, the guest thawed after; reverting to
    it restores a guest whose file systems were frozen, which virtkit thaws."""
    run(guest, "echo in-full > /mnt/d/full")
    full = guest.snapshot("full-quiet")
    assert Path(guest.snapshot_dir(full.name), "quiesced").read_text() == "1\n"
    assert guest.agent.fsfreeze_status() == "thawed"
    run(guest, "echo later > /mnt/d/later")
    guest.revert(full.name)
    assert guest.agent.fsfreeze_status(timeout=30) == "thawed"
    assert sh(guest, "cat /mnt/d/full; ls -1 /mnt/d").stdout == (
        b"in-full\nfull\nlost+found\nnote\n"
    )
    run(guest, "echo writable > /mnt/d/again && sync")


def test_shares(guest: LibvirtGuest, shared: tuple[Path, Path]) -> None:
    """The guest reads the read-only share and cannot write it; what it writes to the
    writable share reaches the host folder."""
    ro, rw = shared
    run(guest, f"mkdir -p /mnt/ro /mnt/rw && mount {MOUNT} hostro /mnt/ro")
    run(guest, f"mount {MOUNT} hostrw /mnt/rw")
    assert run(guest, "cat /mnt/ro/hello.txt") == "from the host\n"
    refused = sh(guest, "echo no > /mnt/ro/new")
    assert refused.exit_code != 0 and b"Read-only" in refused.stderr, refused
    assert not (ro / "new").exists()
    run(guest, "echo from the guest > /mnt/rw/out.txt && sync")
    assert (rw / "out.txt").read_text() == "from the guest\n"
    (rw / "back.txt").write_text("host again\n")
    assert run(guest, "cat /mnt/rw/back.txt") == "host again\n"


def test_agent_file_transfer(guest: LibvirtGuest) -> None:
    """8 MiB + 3 bytes written through libvirt's agent command, checked in the guest,
    read back bit-identical."""
    payload = os.urandom(8 * 1024 * 1024 + 3)
    guest.agent.write_file("/tmp/big", payload, timeout=300)
    digest = run(guest, "sha256sum /tmp/big", timeout=120).split()[0]
    assert digest == hashlib.sha256(payload).hexdigest()
    assert guest.agent.read_file("/tmp/big", timeout=300) == payload


def test_addresses_fall_back_to_arp_when_the_agent_is_gone(guest: LibvirtGuest) -> None:
    """With qemu-ga killed, addresses() (source "auto") answers from the host's ARP
    table; source "agent" is a TimeoutError naming the guest, not a hang."""
    run(guest, f"(ping -c 1 -W 5 {HOST_IP}; sleep 1; kill $(cat /tmp/qga.pid)) >/dev/null 2>&1 &")
    deadline = time.monotonic() + 60
    while True:  # until the agent is gone
        try:
            guest.agent.ping(timeout=2)
        except (AgentError, virtkit.TimeoutError):
            break
        assert time.monotonic() < deadline, "qemu-ga was not killed"
        time.sleep(0.5)
    found = guest.addresses(timeout=3)
    assert GUEST_IP in {a.address for a in found}, found
    assert "10.0.2.15" not in {a.address for a in found}
    with pytest.raises(virtkit.TimeoutError, match="talk"):
        guest.addresses(source="agent", timeout=2)

"""The guest agent inside the real Linux test guest, over the qemu backend's virtio-serial channel."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtkit
import virtkit.images
from virtkit.agent import AgentError
from virtkit.backends.qemu import QemuGuest, QemuHypervisor
from virtkit.model import Disk, KernelBoot, Machine, Nic, PortForward, State
from virtkit.testing.linux import (
    LINUX_CMDLINE,
    PROMPT,
    READY_MARKER,
    build_initramfs,
    fetch_guest_agent,
    fetch_kernel,
)


@pytest.fixture(scope="module")
def agent_boot(tmp_path_factory: pytest.TempPathFactory) -> KernelBoot:
    """The Linux test guest with qemu-ga and DHCP networking in its initramfs."""
    kernel = fetch_kernel()
    initrd = build_initramfs(
        kernel,
        tmp_path_factory.mktemp("agent") / "initrd-agent.gz",
        agent=fetch_guest_agent(),
        network=True,
    )
    return KernelBoot(str(kernel.vmlinuz), str(initrd), LINUX_CMDLINE)


@pytest.fixture
def guest(hv: QemuHypervisor, agent_boot: KernelBoot) -> Iterator[QemuGuest]:
    """A booted guest with an agent channel and a user-mode NIC, at its prompt."""
    machine = Machine(
        name="agent",
        memory="256MiB",
        agent=True,
        kernel=agent_boot,
        nics=[Nic(forwards=[PortForward(host_port=0, guest_port=8080)])],
    )
    booted = hv.define(machine)
    assert isinstance(booted, QemuGuest)
    booted.start()
    booted.wait_ready(via="console", pattern=READY_MARKER, timeout=120)
    booted.console.expect(PROMPT, timeout=30)
    booted.wait_ready(via="agent", timeout=30)  # qemu-ga starts just before the prompt
    yield booted
    if booted.state is not State.SHUTOFF:
        booted.kill()


def round_trip(guest: QemuGuest, size: int) -> None:
    """Write ``size`` random bytes into the guest, check its sha256 there, read them back."""
    data = os.urandom(size)
    guest.agent.write_file("/tmp/big", data, timeout=600)
    digest = guest.agent.exec(["/bin/sh", "-c", "sha256sum /tmp/big"], timeout=120)
    assert digest.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert guest.agent.read_file("/tmp/big", timeout=600) == data


class TestAgentInLinux:
    """guest.agent against qemu-ga running in the guest."""

    def test_exec_files_and_interfaces(self, guest: QemuGuest) -> None:
        """exec with stdin and a failing status, a 6 MiB file both ways, the DHCP address,
        and the agent killed mid-transfer."""
        result = guest.agent.exec(["/bin/sh", "-c", "tr a-z A-Z; exit 5"], input=b"guest\n")
        assert (result.exit_code, result.stdout) == (5, b"GUEST\n")

        round_trip(guest, 6 * 1024**2 + 7)

        names = {i.name: i for i in guest.agent.interfaces()}
        assert any(a.address == "10.0.2.15" for a in names["eth0"].addresses)
        assert names["eth0"].mac == guest.machine.nics[0].mac

        # last: qemu-ga killed inside the guest during a transfer is an error within the deadline
        killer = threading.Timer(0.5, lambda: guest.console.write("kill -9 $(cat /tmp/qga.pid)\n"))
        killer.start()
        began = time.monotonic()
        with pytest.raises((AgentError, virtkit.TimeoutError)):
            guest.agent.write_file("/tmp/cut", os.urandom(64 * 1024**2), timeout=20)
        assert time.monotonic() - began < 25
        killer.join()

    def test_tcp_readiness_sees_the_guest_not_slirp(self, guest: QemuGuest) -> None:
        """A forwarded port with nothing listening in the guest is not ready (slirp accepts
        anyway); once busybox httpd answers, wait_ready returns its reply; addresses() lists
        the DHCP address and the forward."""
        request = b"GET / HTTP/1.0\r\n\r\n"
        host_port = guest.host_port(8080)
        with socket.create_connection(("127.0.0.1", host_port), timeout=5):
            pass  # the false positive: the host side accepts a connection
        with pytest.raises(virtkit.TimeoutError, match="not ready via tcp"):
            guest.wait_ready(via="tcp", port=8080, send=request, timeout=3)
        guest.console.run("mkdir -p /www && echo vk-page > /www/index.html", prompt=PROMPT)
        guest.console.run("httpd -p 8080 -h /www", prompt=PROMPT)
        reply = guest.wait_ready(via="tcp", port=8080, send=request, expect=b"vk-page", timeout=60)
        assert reply is not None and reply.startswith(b"HTTP/1.")
        found = guest.addresses()
        assert any(a.address == "10.0.2.15" and a.interface == "eth0" for a in found)
        assert any(a.host_port == host_port and a.guest_port == 8080 for a in found)

    def test_disk_snapshot_is_quiesced(
        self, hv: QemuHypervisor, agent_boot: KernelBoot, tmp_path: Path
    ) -> None:
        """A file written but not synced in the guest is in the disk snapshot's frozen layer:
        the agent froze (flushed) the file system around the snapshot, and thawed it after."""
        data = tmp_path / "data.qcow2"
        virtkit.images.create(data, size="32MiB").close()
        machine = Machine(
            name="quiesce", memory="256MiB", agent=True, kernel=agent_boot, disks=[Disk(str(data))]
        )
        guest = hv.define(machine)
        guest.start()
        guest.wait_ready(via="console", pattern=READY_MARKER, timeout=120)
        guest.console.expect(PROMPT, timeout=30)
        guest.wait_ready(via="agent", timeout=30)
        run = guest.console.run
        run("mke2fs -q /dev/vda && mkdir -p /mnt/d && mount /dev/vda /mnt/d", prompt=PROMPT)
        assert guest.console.exit_status == 0
        marker = "vk-quiesce-" + os.urandom(6).hex()
        run(f"echo {marker} > /mnt/d/note", prompt=PROMPT)  # in the page cache, not on disk yet
        snap = guest.snapshot("quiet", memory=False)
        frozen = Path(guest.folder, "disks", snap.layers["vda"])
        with virtkit.images.open(frozen) as image:
            assert image.check().ok
            assert marker.encode() in image.read(0, image.virtual_size)
        assert guest.agent.fsfreeze_status() == "thawed"
        run("echo after >> /mnt/d/note && cat /mnt/d/note", prompt=PROMPT)
        guest.kill()

    @pytest.mark.slow
    def test_50_mib_file(self, guest: QemuGuest) -> None:
        """A 50 MiB file written into the guest and read back bit-identical (about 2 min on TCG)."""
        round_trip(guest, 50 * 1024**2)

    def test_shutdown_through_the_agent(self, guest: QemuGuest) -> None:
        """guest-shutdown powers the guest off."""
        guest.agent.shutdown()
        assert guest.wait(timeout=60) is State.SHUTOFF

    def test_no_agent_channel_is_a_config_error(self, hv: QemuHypervisor, tmp_path: Path) -> None:
        """A machine without agent=True has no guest.agent."""
        other = hv.define(Machine(name="no-agent", memory="32MiB"))
        assert isinstance(other, QemuGuest)
        with pytest.raises(virtkit.ConfigError, match="agent=True"):
            other.agent.ping()

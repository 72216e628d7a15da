"""The guest agent inside the real Linux test guest, over the qemu backend's virtio-serial channel."""

from __future__ import annotations

import hashlib
import os
import socket
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
    """Write ``size`` random bytes into the guest, check the file's size and its first
    MiB's sha256 there, read the whole file back."""
    data = os.urandom(size)
    guest.agent.write_file("/tmp/big", data, timeout=600)
    seen = guest.agent.exec(
        ["/bin/sh", "-c", "stat -c %s /tmp/big; head -c 1048576 /tmp/big | sha256sum"]
    )
    size_line, digest = seen.stdout.decode().split("\n")[:2]
    assert int(size_line) == size
    assert digest.split()[0] == hashlib.sha256(data[: 1024**2]).hexdigest()
    assert guest.agent.read_file("/tmp/big", timeout=600) == data
    guest.agent.exec(["/bin/rm", "/tmp/big"])  # /tmp is RAM: leave the guest its memory


class TestAgentInLinux:
    """guest.agent against qemu-ga running in the guest."""

    def test_exec_files_and_interfaces(self, guest: QemuGuest) -> None:
        """exec with stdin and a failing status, a 50 MiB file written and read back
        bit-identical (about 40 s on TCG), the DHCP address, and the agent killed
        mid-transfer."""
        result = guest.agent.exec(
            ["/bin/sh", "-c", "tr a-z A-Z; echo oops >&2; exit 5"], input=b"guest\n"
        )
        assert (result.exit_code, result.stdout, result.stderr) == (5, b"GUEST\n", b"oops\n")

        round_trip(guest, 50 * 1024**2 + 7)

        names = {i.name: i for i in guest.agent.interfaces()}
        assert any(a.address == "10.0.2.15" for a in names["eth0"].addresses)
        assert names["eth0"].mac == guest.machine.nics[0].mac

        # last: qemu-ga killed inside the guest during a transfer is an AgentError at once;
        # the guest's shell kills it once 4 MiB of the 64 have arrived
        size = "$(stat -c %s /tmp/cut 2>/dev/null || echo 0)"
        guest.console.sendline(
            f"while [ {size} -lt 4194304 ]; do sleep 0.1; done; kill -9 $(cat /tmp/qga.pid)"
        )
        began = time.monotonic()
        # the guest closes the agent's port: the call ends then (QMP VSERPORT_CHANGE), not
        # at its deadline
        with pytest.raises(AgentError, match="closed the agent's port"):
            guest.agent.write_file("/tmp/cut", os.urandom(64 * 1024**2), timeout=120)
        assert time.monotonic() - began < 120
        guest.console.expect(PROMPT, timeout=30)  # the loop ended
        # the write was cut by the kill: the agent is gone and the file is short
        pid = "/proc/$(cat /tmp/qga.pid)"
        dead = f"! [ -d {pid} ] || grep -q '^State:.*Z' {pid}/status"  # gone, or a zombie
        guest.console.run(dead, prompt=PROMPT)
        assert guest.console.exit_status == 0
        written = int(guest.console.run("stat -c %s /tmp/cut", prompt=PROMPT))
        assert written < 64 * 1024**2

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
        the agent froze (flushed) the file system around the snapshot, and thawed it after;
        a full snapshot is taken frozen too, and reverting to it thaws the guest."""
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

        # a full snapshot is frozen too; the revert thaws the restored guest
        run("echo in-full > /mnt/d/full", prompt=PROMPT)
        full = guest.snapshot("full-quiet")
        assert Path(guest.snapshot_dir(full.name), "quiesced").read_text() == "1\n"
        assert guest.agent.fsfreeze_status() == "thawed"
        run("echo later > /mnt/d/later", prompt=PROMPT)
        guest.revert(full.name)
        assert guest.agent.fsfreeze_status(timeout=30) == "thawed"
        assert (
            run("cat /mnt/d/full; ls -1 /mnt/d", prompt=PROMPT)
            == "in-full\nfull\nlost+found\nnote\n"
        )
        run("echo writable > /mnt/d/again && sync", prompt=PROMPT, timeout=30)
        assert guest.console.exit_status == 0
        guest.kill()

    def test_silent_and_babbling_agent_in_the_guest(self, guest: QemuGuest) -> None:
        """qemu-ga killed in the guest: calls end in TimeoutError at their deadline; a guest
        process writing garbage on the agent's port: a TimeoutError quoting it; qemu-ga
        started again: the same client works."""
        run = guest.console.run
        port = "/dev/virtio-ports/org.qemu.guest_agent.0"
        run("kill -9 $(cat /tmp/qga.pid); sleep 1", prompt=PROMPT)
        began = time.monotonic()
        with pytest.raises(virtkit.TimeoutError, match="did not answer"):
            guest.agent.ping(timeout=2)
        assert time.monotonic() - began < 10
        with pytest.raises(virtkit.TimeoutError, match="not ready via agent"):
            guest.wait_ready(via="agent", timeout=3)
        with pytest.raises(virtkit.TimeoutError):
            guest.agent.exec(["/bin/true"], timeout=2)

        babble = r"while :; do printf 'not json \377 {broken\n'; sleep 0.05; done"
        run(f"({babble}) > {port} & echo $! > /tmp/babble.pid", prompt=PROMPT)
        began = time.monotonic()
        with pytest.raises(virtkit.TimeoutError, match="garbage.*broken"):
            guest.agent.ping(timeout=3)
        assert time.monotonic() - began < 10
        run("kill $(cat /tmp/babble.pid)", prompt=PROMPT)

        run(f"qemu-ga -m virtio-serial -p {port} -t /tmp & echo $! > /tmp/qga.pid", prompt=PROMPT)
        guest.wait_ready(via="agent", timeout=60)
        assert guest.agent.exec(["/bin/echo", "back"]).stdout == b"back\n"

    def test_set_time_and_shutdown_through_the_agent(self, guest: QemuGuest) -> None:
        """guest-set-time sets the clock (and the RTC: set_time() reads it back from there);
        guest-shutdown powers the guest off."""
        guest.agent.set_time(2_000_000_000 * 10**9)
        now = int(guest.agent.exec(["/bin/date", "+%s"]).stdout)
        assert 2_000_000_000 <= now < 2_000_000_000 + 600
        guest.console.run("date -s @1000000000", prompt=PROMPT)  # the system clock only
        guest.agent.set_time()  # from the RTC, which the first call wrote
        now = int(guest.agent.exec(["/bin/date", "+%s"]).stdout)
        assert 2_000_000_000 <= now < 2_000_000_000 + 600
        with pytest.raises(virtkit.ConfigError, match="ns"):
            guest.agent.set_time(-1)
        guest.agent.shutdown()
        assert guest.wait(timeout=60) is State.SHUTOFF

    def test_no_agent_channel_is_a_config_error(self, hv: QemuHypervisor, tmp_path: Path) -> None:
        """A machine without agent=True has no guest.agent."""
        other = hv.define(Machine(name="no-agent", memory="32MiB"))
        assert isinstance(other, QemuGuest)
        with pytest.raises(virtkit.ConfigError, match="agent=True"):
            other.agent.ping()

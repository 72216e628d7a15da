"""The guest agent inside the real Linux test guest, over the qemu backend's virtio-serial channel."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
from agent_guest import agent_boot, guest

import virtkit
import virtkit.images
from virtkit.agent import AgentError
from virtkit.backends.qemu import QemuGuest, QemuHypervisor
from virtkit.model import Machine
from virtkit.testing.linux import PROMPT

#: the shared agent-guest fixtures, found by pytest under these names
FIXTURES = (agent_boot, guest)


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
        # the guest closes the agent's port: the call ends then (QMP VSERPORT_CHANGE), not
        # at its deadline
        with pytest.raises(AgentError, match="closed the agent's port"):
            guest.agent.write_file("/tmp/cut", os.urandom(64 * 1024**2), timeout=120)
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

    def test_no_agent_channel_is_a_config_error(self, hv: QemuHypervisor, tmp_path: Path) -> None:
        """A machine without agent=True has no guest.agent."""
        other = hv.define(Machine(name="no-agent", memory="32MiB"))
        assert isinstance(other, QemuGuest)
        with pytest.raises(virtkit.ConfigError, match="agent=True"):
            other.agent.ping()

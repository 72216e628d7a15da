"""wait_ready over TCP rejects user-mode networking's accepted-but-empty connections."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import Disk, Machine, Nic, PortForward


class TestTcpReadiness:
    """A guest with no network stack at all: the host side still accepts connections."""

    def test_slirp_accept_is_not_readiness(
        self, hv: QemuHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """connect() succeeds, yet wait_ready(via='tcp') times out naming why."""
        machine = Machine(
            name="nostack",
            memory="32MiB",
            disks=[Disk(str(boot_disk("counter")))],
            nics=[Nic(forwards=[PortForward(host_port=0, guest_port=22)])],
        )
        guest = hv.define(machine)
        guest.start()
        port = guest.host_port(22)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # accepted by QEMU on the host side
        with pytest.raises(virtkit.TimeoutError, match="not ready via tcp"):
            guest.wait_ready(via="tcp", port=22, timeout=2)
        found = guest.addresses()
        assert [(a.address, a.host_port, a.guest_port) for a in found] == [("127.0.0.1", port, 22)]
        guest.kill()

    def test_bad_arguments(self, hv: QemuHypervisor, boot_disk: Callable[..., Path]) -> None:
        """via='console' needs a pattern, via='tcp' a port; an unknown via is refused."""
        guest = hv.define(
            Machine(name="args", memory="32MiB", disks=[Disk(str(boot_disk("counter")))])
        )
        with pytest.raises(virtkit.ConfigError, match="pattern"):
            guest.wait_ready(via="console")
        with pytest.raises(virtkit.ConfigError, match="port"):
            guest.wait_ready(via="tcp")
        with pytest.raises(virtkit.ConfigError, match="via"):
            guest.wait_ready(via="carrier-pigeon")  # type: ignore[arg-type]
        with pytest.raises(virtkit.ConfigError, match="'send'"):
            guest.wait_ready(via="tcp", port=22, send="GET /")  # type: ignore[arg-type]
        with pytest.raises(virtkit.ConfigError, match="'expect'"):
            guest.wait_ready(via="tcp", port=22, expect=b"")
        with pytest.raises(virtkit.ConfigError, match="timeout"):
            guest.wait_ready(via="agent", timeout="soon")  # type: ignore[arg-type]
        with pytest.raises(virtkit.StateError, match="not running"):
            guest.wait_ready(via="console", pattern="x", timeout=1)
        guest.start()
        # the counter guest keeps running (hello powers off at once, sometimes before the wait)
        guest.wait_ready(via="console", pattern="counter starts", timeout=30)
        guest.kill()

"""The Linux test guest with the QEMU guest agent, shared by the agent test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from virtkit.backends.qemu import QemuGuest, QemuHypervisor
from virtkit.model import KernelBoot, Machine, Nic, PortForward, State
from virtkit.testing.linux import (
    LINUX_CMDLINE,
    PROMPT,
    READY_MARKER,
    build_initramfs,
    fetch_guest_agent,
    fetch_kernel,
)

__all__ = ["agent_boot", "guest"]


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

"""The guest agent of a libvirt domain, through virDomainQemuAgentCommand, in the Linux guest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import virtkit
from virtkit.agent import AgentError
from virtkit.model import KernelBoot, Machine, State
from virtkit.testing.linux import (
    LINUX_CMDLINE,
    READY_MARKER,
    build_initramfs,
    fetch_guest_agent,
    fetch_kernel,
)

PREFIX = f"vkt-{os.getpid()}-agent-"


@pytest.fixture(scope="module")
def agent_boot(tmp_path_factory: pytest.TempPathFactory) -> KernelBoot:
    """The Linux test guest with qemu-ga in its initramfs (in a folder libvirt's QEMU can read)."""
    kernel = fetch_kernel()
    folder = tmp_path_factory.mktemp("lv-agent")
    initrd = build_initramfs(kernel, folder / "initrd-agent.gz", agent=fetch_guest_agent())
    return KernelBoot(str(kernel.vmlinuz), str(initrd), LINUX_CMDLINE)


def test_agent_through_libvirt(libvirtd: str, agent_boot: KernelBoot, tmp_path: Path) -> None:
    """ping, exec with stdin and status, a guest file read, then shutdown through the agent."""
    with virtkit.connect("libvirt", root=tmp_path / "root", name_prefix=PREFIX) as hv:
        guest = hv.define(Machine(name="agent", memory="256MiB", agent=True, kernel=agent_boot))
        guest.start()
        guest.wait_ready(via="console", pattern=READY_MARKER, timeout=120)
        guest.wait_ready(via="agent", timeout=60)
        result = guest.agent.exec(["/bin/sh", "-c", "tr a-z A-Z; exit 4"], input=b"lv\n")
        assert (result.exit_code, result.stdout) == (4, b"LV\n")
        # files go through the same call(); bulk transfers are tested on the qemu backend
        # (through libvirt a large guest-file-write was seen to stall the agent under load)
        assert guest.agent.read_file("/proc/version", timeout=30).startswith(b"Linux version")
        with pytest.raises(AgentError, match="guest-no-such"):
            guest.agent.call("guest-no-such-command")
        guest.agent.shutdown()
        assert guest.wait(timeout=60) is State.SHUTOFF
        other = hv.define(Machine(name="plain", memory="32MiB"))
        with pytest.raises(virtkit.ConfigError, match="agent=True"):
            other.agent.ping()

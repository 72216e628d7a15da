"""The libvirt backend runs the shared conformance suite on qemu:///system (real libvirtd, TCG)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest

from virtkit.backends import Hypervisor
from virtkit.backends.libvirt import LibvirtGuest, LibvirtHypervisor
from virtkit.model import HostResources
from virtkit.testing.conformance import ConformanceSuite, GuestFactory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def libvirtd() -> None:
    """The local daemon, started by scripts/libvirtd when the test command did not."""
    subprocess.run([str(ROOT / "scripts" / "libvirtd"), "start"], check=True, capture_output=True)


class TestLibvirt(ConformanceSuite):
    """Every conformance test against ``virtkit.connect("libvirt", uri="qemu:///system")``."""

    backend = "libvirt"
    connect_options: ClassVar[dict[str, Any]] = {
        "uri": "qemu:///system",
        "accel": "tcg",
        "name_prefix": f"vkt-{os.getpid()}-",  # other test runs may share the daemon
    }
    # SeaBIOS retries booting (RUNNING), and QEMU resets on a triple fault, as on the qemu backend.
    reports_boot_failure = False
    crashes_on_triple_fault = False
    # media changes and hot-plug on a running domain: updateDeviceFlags/attachDeviceFlags
    live_media = True
    hot_plug = True
    # libvirt 9.0: "reverting to external snapshots is not supported yet"
    reverts_live_disk_snapshots = False

    def test_running_guests_hold_host_resources(
        self, make_guest: GuestFactory, hypervisor: Hypervisor
    ) -> None:
        """A running guest's memory and vCPUs count as allocated until it stops.

        libvirt's host figures count every domain running on the host, and this daemon is
        shared with other test runs (and the other workers of this one), whose domains come
        and go: each figure is read between two looks at the other domains, retried until
        they held still, and compared with theirs plus the guest's.
        """
        assert isinstance(hypervisor, LibvirtHypervisor)
        guest = make_guest("counter")
        assert isinstance(guest, LibvirtGuest)

        def others() -> tuple[int, int]:
            lv = hypervisor.connection.lv
            cpus = memory = 0
            for dom in hypervisor.connection.raw.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if dom.name() == guest.domain_name:
                    continue
                try:
                    info = dom.info()
                except lv.libvirtError:
                    return -1, -1  # stopped while we looked: not still
                cpus, memory = cpus + int(info[3]), memory + int(info[1]) * 1024
            return cpus, memory

        def steady() -> tuple[HostResources, tuple[int, int]]:
            for _ in range(100):
                before, host, after = others(), hypervisor.host, others()
                if before == after != (-1, -1):
                    return host, before
            raise AssertionError("the other domains on the daemon never held still")

        host, (cpus, memory) = steady()
        assert (host.allocated_cpus, host.allocated_memory) == (cpus, memory)
        guest.start()
        host, (cpus, memory) = steady()
        assert host.allocated_memory == memory + guest.machine.memory
        assert host.allocated_cpus == cpus + guest.machine.vcpus
        guest.kill()
        host, (cpus, memory) = steady()
        assert host.allocated_memory == memory

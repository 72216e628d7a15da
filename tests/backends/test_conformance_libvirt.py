"""The libvirt backend runs the shared conformance suite on qemu:///system (real libvirtd, TCG)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest

from virtkit.testing.conformance import ConformanceSuite

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

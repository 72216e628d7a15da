"""`virtkit vm migrate` between two real libvirt hosts (the second in its own namespaces).

Each step is its own `virtkit` process, as a shell user would run them: the
domain lives in libvirtd between commands and moves to the second host
running (the backend's own tests check the guest's run continues there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from libvirt_hosts import LOCAL, SecondHost

import virtkit
from virtkit.model import Disk, Machine
from virtkit.testing import guests


def _virsh(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60, check=False
    )


def _vk(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "virtkit.cli", "vm", "--connect", LOCAL, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_migrate_a_running_vm_to_the_second_host(second_host: SecondHost, tmp_path: Path) -> None:
    """start, migrate: the domain runs on the second host and is gone here; exit 0."""
    name = f"vkcli-mig-{os.getpid()}-{time.monotonic_ns() % 100000}"
    folder = tmp_path / name
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / "boot.qcow2", "counter", format="qcow2")
    virtkit.save(Machine(name=name, memory="32MiB", disks=(Disk("boot.qcow2"),)), folder)
    try:
        started = _vk("start", str(folder), cwd=tmp_path)
        assert started.returncode == 0, started.stderr
        assert _virsh(LOCAL, "domstate", name).stdout.strip() == "running"
        moved = _vk(
            "migrate",
            str(folder),
            second_host.uri,
            "--migration-uri",
            second_host.migration_uri,
            cwd=tmp_path,
        )
        assert moved.returncode == 0, moved.stderr
        assert f"migrated to {second_host.uri} (running)" in moved.stdout
        assert _virsh(second_host.uri, "domstate", name).stdout.strip() == "running"
        assert _virsh(LOCAL, "domstate", name).returncode != 0  # no such domain here any more
        bad = _vk("migrate", str(folder), "not-a-uri", cwd=tmp_path)
        assert bad.returncode == 1 and "DEST_URI" in bad.stderr
    finally:
        for uri in (second_host.uri, LOCAL):
            _virsh(uri, "destroy", name)
            _virsh(uri, "undefine", name)

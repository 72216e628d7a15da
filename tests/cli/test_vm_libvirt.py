"""`virtkit vm` against a real libvirtd (qemu:///system): guests outlive each command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtkit
from virtkit.testing import guests

ROOT = Path(__file__).resolve().parents[2]
URI = "qemu:///system"


@pytest.fixture(scope="module", autouse=True)
def libvirtd() -> None:
    """The local daemon, started by scripts/libvirtd when the test command did not."""
    subprocess.run([str(ROOT / "scripts" / "libvirtd"), "start"], check=True, capture_output=True)


def vk(*args: str, stdin: bytes = b"", cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "virtkit.cli", "vm", "--connect", URI, *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=cwd,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A counter guest's VM folder named uniquely; its domain is removed afterwards."""
    name = f"vkcli-{os.getpid()}-{time.monotonic_ns() % 100000}"
    path = tmp_path / name
    (path / "disks").mkdir(parents=True)
    guests.write_disk(path / "disks" / "boot.qcow2", "counter", format="qcow2")
    machine = virtkit.Machine(
        name=name, memory="16MiB", disks=[virtkit.Disk("boot.qcow2", format="qcow2")]
    )
    virtkit.save(machine, path)
    try:
        yield path
    finally:
        for verb in ("destroy", "undefine"):
            subprocess.run(["virsh", "-c", URI, verb, name], capture_output=True, check=False)


def _state(folder: Path) -> str:
    rows = json.loads(vk("list", "--json", cwd=folder.parent).stdout)
    return next((r["state"] for r in rows if r["name"] == folder.name), "absent")


class TestPersistentVerbs:
    def test_start_pause_resume_console_stop_undefine(self, folder: Path) -> None:
        """Each verb is its own process; the domain keeps running in libvirtd between them."""
        cwd = folder.parent
        assert vk("start", folder.name, cwd=cwd).returncode == 0
        assert _state(folder) == "running"
        assert vk("pause", folder.name, cwd=cwd).returncode == 0
        assert _state(folder) == "paused"
        assert vk("resume", folder.name, cwd=cwd).returncode == 0
        assert _state(folder) == "running"
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtkit.cli", "vm", "-c", URI, "console", folder.name],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        seen = b""
        while b"count" not in seen:
            chunk = proc.stdout.read1(4096)
            assert chunk, "the console ended before the guest printed"
            seen += chunk
        proc.stdin.write(b"\x1d")  # Ctrl-]: detach, the guest keeps running
        proc.stdin.flush()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert b"Connected to domain" in err
        assert _state(folder) == "running"
        assert vk("stop", folder.name, cwd=cwd).returncode == 0
        assert _state(folder) == "shut off"
        out = vk("undefine", folder.name, cwd=cwd)
        assert out.returncode == 0 and "undefined" in out.stdout
        assert _state(folder) == "absent"

    def test_define_list_reset_kill(self, folder: Path) -> None:
        """define makes the domain (shut off), reset keeps it running, kill pulls the plug."""
        cwd = folder.parent
        out = vk("define", folder.name, cwd=cwd)
        assert out.returncode == 0 and f"Domain '{folder.name}' defined" in out.stdout
        assert _state(folder) == "shut off"
        assert vk("start", folder.name, cwd=cwd).returncode == 0
        assert _state(folder) == "running"
        out = vk("reset", folder.name, cwd=cwd)
        assert out.returncode == 0, out.stderr
        assert _state(folder) == "running"
        out = vk("kill", folder.name, cwd=cwd)
        assert out.returncode == 0, out.stderr
        assert _state(folder) == "shut off"
        again = vk("kill", folder.name, cwd=cwd)  # not running: one clear error line
        assert again.returncode == 1 and again.stderr.startswith("virtkit: error: ")

    def test_list_skips_a_domain_undefined_meanwhile(self, folder: Path) -> None:
        """A domain another process undefines between the listing and its state query is left
        out (it used to escape as a raw libvirtError traceback under parallel use)."""
        import libvirt

        from virtkit.cli.vm import _domains

        assert vk("define", folder.name, cwd=folder.parent).returncode == 0
        conn = libvirt.open(URI)
        try:
            stale = [d for d in conn.listAllDomains() if d.name() == folder.name]
            assert len(stale) == 1
            subprocess.run(["virsh", "-c", URI, "undefine", folder.name],
                           check=True, capture_output=True)  # fmt: skip

            class Listing:  # the real connection, answering with the listing taken before
                lv = libvirt
                raw = type("Raw", (), {"listAllDomains": staticmethod(lambda: stale)})()

            hv = type("Hv", (), {"connection": Listing()})()
            assert _domains(hv) == []  # type: ignore[arg-type]
        finally:
            conn.close()

"""Helpers for the libvirt backend tests: running tools, a second libvirt host."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[3]
LOCAL = "qemu:///system"
#: domain-name prefix of this test process (other test runs may share the daemon)
PREFIX = f"vkt-{os.getpid()}-"


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool; fail the test with its stderr when ``check`` and it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def answers(uri: str) -> bool:
    """Whether a libvirt daemon answers at ``uri``."""
    return run("virsh", "-q", "-c", uri, "uri", check=False, timeout=15).returncode == 0


@attrs.define
class SecondHost:
    """A libvirtd in its own network and mount namespaces."""

    uri: str
    migration_uri: str
    #: where this host reaches the local daemon's QEMU for migrations back
    local_migration_uri: str
    netns: str
    veth: str
    work: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the daemon and wait until it answers."""
        inner = (
            f"mount --bind {self.work}/etc /etc/libvirt && "
            f"mount --bind {self.work}/run /run/libvirt && "
            f"mount --bind {self.work}/lib /var/lib/libvirt && "
            f"mount --bind {self.work}/cache /var/cache/libvirt && "
            f"mount --bind {self.work}/log /var/log/libvirt && "
            "exec tini -s -- taskset -c 0 libvirtd --listen -f /etc/libvirt/libvirtd.conf "
            "-p /run/libvirt/libvirtd.pid"
        )
        log = (self.work / "stdout").open("ab")
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                inner,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not answers(self.uri):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                out = (self.work / "stdout").read_text()
                raise AssertionError(f"second libvirtd did not come up: {out}")
            time.sleep(0.1)

    def _pids(self, pattern: str) -> list[int]:
        pids = []
        for file in self.work.glob(pattern):
            try:
                pids.append(int(file.read_text().strip()))
            except (OSError, ValueError):
                continue
        return pids

    def kill_daemon(self) -> None:
        """SIGKILL libvirtd only (its guests' QEMU processes live on), as a crash would."""
        for pid in self._pids("run/libvirtd.pid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the daemon, its QEMU processes and the tini above it."""
        self.kill_daemon()
        for pid in self._pids("run/qemu/*.pid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """Destroy its domains and stop it."""
        if self.proc is not None and self.proc.poll() is None and answers(self.uri):
            names = run("virsh", "-q", "-c", self.uri, "list", "--name", check=False).stdout
            for name in names.split():
                run("virsh", "-q", "-c", self.uri, "destroy", name, check=False)
        for pid in self._pids("run/libvirtd.pid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        self.kill()

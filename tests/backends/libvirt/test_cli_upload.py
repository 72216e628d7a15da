"""`virtkit vm define -p` to a host without shared storage: the disks are uploaded with a bar.

The "remote" is the local daemon reached through qemu+ssh:// (see conftest's
``ssh_uri``), so the CLI treats its files as out of reach and pushes them.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import virtkit
from virtkit.backends.libvirt import storage
from virtkit.backends.libvirt.connection import Connection
from virtkit.model import Disk, Machine
from virtkit.testing import guests


def _run_with_tty_stderr(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with stderr on a pseudo-terminal; return (status, stdout, terminal bytes)."""
    master, slave = pty.openpty()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave) as proc:
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.stdout is not None
        out = proc.stdout.read()
        status = proc.wait(timeout=180)
    os.close(master)
    return status, out, seen


def test_define_uploads_with_a_progress_bar(ssh_uri: str, tmp_path: Path) -> None:
    """The disk reaches the host's pool (its bytes intact); the bar has label, sizes, rate."""
    name = f"vkcli-up-{os.getpid()}-{time.monotonic_ns() % 100000}"
    folder = tmp_path / name
    (folder / "disks").mkdir(parents=True)
    disk = folder / "disks" / "root.qcow2"
    guests.write_disk(disk, "counter", format="qcow2")
    with virtkit.images.open(disk, writable=True) as image:  # enough bytes for a visible bar
        image.resize(8 << 20)
        image.write(1 << 20, os.urandom(4 << 20))
    virtkit.save(Machine(name=name, memory="16MiB", disks=(Disk("root.qcow2"),)), folder)
    remote = f"/var/lib/libvirt/virtkit/{name}"
    argv = [sys.executable, "-m", "virtkit.cli", "vm", "--connect", ssh_uri, "define", "-p",
            str(folder)]  # fmt: skip
    try:
        status, out, err = _run_with_tty_stderr(argv)
        assert status == 0, err
        assert f"Domain '{name}' defined".encode() in out
        assert b"upload" in err and b"100%" in err
        assert b"MiB" in err and b"/s" in err  # sizes and the transfer rate
        assert b"Traceback" not in err
        uploaded = Path(remote) / "disks" / "root.qcow2"  # the "remote" host is this one
        assert uploaded.read_bytes() == disk.read_bytes()
        # undefine adopts the domain the define left with the daemon
        proc = subprocess.run(
            [*argv[:6], "undefine", str(folder)], capture_output=True, timeout=180, check=False
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name],
                       capture_output=True, check=False)  # fmt: skip
        conn = Connection("qemu:///system")
        try:
            storage.delete_pool(conn, name, remote)
        finally:
            conn.close()

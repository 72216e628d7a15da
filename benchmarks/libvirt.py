"""The libvirt backend next to virsh doing the same work.

Run: ``.venv/bin/python benchmarks/libvirt.py`` as root, with the daemon up
(``scripts/libvirtd start``; needs nasm for the boot sectors). Prints, for
virtkit's libvirt backend and for ``virsh`` commands doing the same steps on
the same daemon (``qemu:///system``, TCG), the median of several runs and the
ratio virtkit / virsh:

1. define -> first serial line: virtkit ``hv.define()`` + ``guest.start()``
   until ``console.expect`` sees the hello guest's first line; virsh
   ``define`` + ``start --paused`` + ``console`` (in a pty) + ``resume``
   until the same line appears;
2. a full snapshot of the running counter guest (``snapshot-create-as``);
3. a revert to it until the guest runs again (``snapshot-revert --running``).

virsh pays a process start and a connection per command; virtkit keeps one
connection. The numbers are for this machine and its load; they are printed,
never asserted.
"""

from __future__ import annotations

import functools
import os
import pty
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# benchmarks/libvirt.py must not shadow the libvirt binding it measures
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import virtkit  # noqa: E402 - after the path fix above
from virtkit.libvirt import to_xml  # noqa: E402
from virtkit.model import Disk, Machine  # noqa: E402
from virtkit.testing import guests  # noqa: E402

URI = "qemu:///system"
RUNS = 5
PREFIX = f"vkbench-{os.getpid()}-"
FIRST_LINE = guests.OUTPUT["hello"].split(b"\r\n")[0]


def virsh(*args: str) -> str:
    proc = subprocess.run(
        ["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def resume(name: str) -> None:
    virsh("resume", name)


def destroy(name: str) -> None:
    subprocess.run(["virsh", "-q", "-c", URI, "destroy", name], capture_output=True, check=False)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def virsh_console_until(name: str, marker: bytes, before_read: Callable[[], None]) -> None:
    """Attach ``virsh console`` in a pty, run ``before_read`` (resume), read until ``marker``."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the console client
        os.execvp("virsh", ["virsh", "-c", URI, "console", "--force", name])
    try:
        seen = b""
        deadline = time.monotonic() + 60
        started = False
        while marker not in seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"virsh console never showed {marker!r}: {seen[-200:]!r}")
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                seen += chunk
                if not started and b"Escape character" in seen:
                    started = True
                    before_read()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)


def bench_first_line(work: Path) -> tuple[float, float]:
    hv = virtkit.connect("libvirt", uri=URI, accel="tcg", name_prefix=PREFIX, root=work / "vk")
    ours, theirs = [], []
    try:
        for i in range(RUNS):
            disk = work / f"hello-{i}.qcow2"
            guests.write_disk(disk, "hello", format="qcow2")
            machine = Machine(name=f"first-{i}", memory="32MiB", disks=(Disk(str(disk)),))
            start = time.perf_counter()
            guest = hv.define(machine)
            guest.start()
            guest.console.expect(FIRST_LINE, timeout=60)
            ours.append(time.perf_counter() - start)
            guest.wait(timeout=60)
            hv.undefine(guest)

            disk2 = work / f"hello-virsh-{i}.qcow2"
            guests.write_disk(disk2, "hello", format="qcow2")
            name = f"{PREFIX}virsh-{i}"
            xml = work / f"virsh-{i}.xml"
            xml.write_text(
                to_xml(
                    Machine(name="virsh", memory="32MiB", disks=(Disk(str(disk2)),)),
                    work,
                    name=name,
                )
            )
            start = time.perf_counter()
            virsh("define", str(xml))
            virsh("start", "--paused", name)
            virsh_console_until(name, FIRST_LINE, functools.partial(resume, name))
            theirs.append(time.perf_counter() - start)
            destroy(name)
            virsh("undefine", name)
    finally:
        hv.close()
    return median_ms(ours), median_ms(theirs)


def bench_snapshots(work: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    hv = virtkit.connect("libvirt", uri=URI, accel="tcg", name_prefix=PREFIX, root=work / "vks")
    snap_ours, snap_theirs, rev_ours, rev_theirs = [], [], [], []
    try:
        disk = work / "counter.qcow2"
        guests.write_disk(disk, "counter", format="qcow2")
        guest = hv.define(Machine(name="snap", memory="32MiB", disks=(Disk(str(disk)),)))
        guest.start()
        guest.console.expect("count 1\r\n", timeout=60)
        for i in range(RUNS):
            start = time.perf_counter()
            guest.snapshot(f"s{i}")
            snap_ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            guest.revert(f"s{i}")
            rev_ours.append(time.perf_counter() - start)
        guest.kill()
        hv.undefine(guest)

        disk2 = work / "counter-virsh.qcow2"
        guests.write_disk(disk2, "counter", format="qcow2")
        name = f"{PREFIX}snap-virsh"
        xml = work / "snap-virsh.xml"
        xml.write_text(
            to_xml(Machine(name="sv", memory="32MiB", disks=(Disk(str(disk2)),)), work, name=name)
        )
        virsh("define", str(xml))
        virsh("start", name)
        try:
            for i in range(RUNS):
                start = time.perf_counter()
                virsh("snapshot-create-as", name, f"s{i}")
                snap_theirs.append(time.perf_counter() - start)
                start = time.perf_counter()
                virsh("snapshot-revert", name, f"s{i}", "--running")
                rev_theirs.append(time.perf_counter() - start)
        finally:
            destroy(name)
            virsh("undefine", "--snapshots-metadata", name)
    finally:
        hv.close()
    return (median_ms(snap_ours), median_ms(snap_theirs)), (
        median_ms(rev_ours),
        median_ms(rev_theirs),
    )


def main() -> None:
    if shutil.which("virsh") is None:
        sys.exit("virsh is not installed: run scripts/libvirtd start")
    work = Path(tempfile.mkdtemp(prefix="vkbench-libvirt-"))
    os.chmod(work, 0o755)
    try:
        first = bench_first_line(work)
        snap, revert = bench_snapshots(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"libvirt backend vs virsh on {URI} (TCG), median of {RUNS} runs")
    print(f"{'step':<34}{'virtkit ms':>12}{'virsh ms':>12}{'ratio':>8}")
    for label, (ours, theirs) in (
        ("define -> first serial line", first),
        ("full snapshot (running guest)", snap),
        ("revert to it (running again)", revert),
    ):
        print(f"{label:<34}{ours:>12.1f}{theirs:>12.1f}{ours / theirs:>8.2f}")


if __name__ == "__main__":
    main()

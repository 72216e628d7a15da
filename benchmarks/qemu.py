#!/usr/bin/env python3
"""qemu backend benchmark: what virtkit adds on top of QEMU itself.

Measures, in one run (medians over repeats; TCG unless ``--accel`` says otherwise):

* start-to-first-serial-line: ``guest.start()`` until the ``hello`` boot
  sector's first line arrives in ``guest.console``, vs the same QEMU
  command (``guest.qemu_argv()`` with the serial port on stdio and no QMP)
  launched bare with ``subprocess`` reading stdout; plus virtkit's exact
  command (socket chardevs and the QMP handshake) driven by blocking
  Python, which separates QEMU's own cost of that set-up from virtkit's;
* QMP ``query-status`` round trip through ``guest.qmp()`` (the sync channel:
  a second monitor on a blocking socket) vs a raw ``qemu.qmp.QMPClient``
  awaited directly, interleaved; plus the same command through the private
  event loop and the cost of the loop's two thread wake-ups alone;
* guest agent: ``guest.agent.exec(["/bin/true"])`` round trip, and an 8 MiB
  ``write_file`` and ``read_file``, vs the same ``guest-exec``/``guest-file-*``
  commands through a raw ``qemu.qmp.QMPClient`` on the agent's socket
  (greeting and negotiation off: qemu-ga sends no greeting);
* full snapshot save (``guest.snapshot``) and load (``guest.revert``) of a
  256 MiB guest: the Linux test guest (booted, so its RAM is really used)
  when the kernel is in the test cache, else the ``counter`` boot sector.

It is a script, not a test; nothing asserts on time.

Usage::

    .venv/bin/python benchmarks/qemu.py [--repeats 10] [--accel tcg]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# this file is named qemu.py: keep its folder off sys.path so ``qemu.qmp`` is the package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from qemu.qmp import QMPClient  # noqa: E402

from virtkit.backends.qemu import KernelBoot, QemuGuest, QemuHypervisor  # noqa: E402
from virtkit.model import Disk, Machine  # noqa: E402
from virtkit.testing import guests  # noqa: E402


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bare_argv(argv: list[str]) -> list[str]:
    """``argv`` with the serial port on stdio and without the QMP monitor or -S."""
    out: list[str] = []
    skip = 0
    for i, arg in enumerate(argv):
        if skip:
            skip -= 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "-chardev" and nxt.startswith("socket,id=qmp,"):
            skip = 1
            continue
        if arg == "-mon":
            skip = 1
            continue
        if arg == "-chardev" and nxt.startswith("socket,id=serial0,"):
            out += ["-chardev", "stdio,id=serial0,signal=off"]
            skip = 1
            continue
        if arg == "-S":
            continue
        out.append(arg)
    return out


def bench_first_line(
    hv: QemuHypervisor, work: Path, repeats: int
) -> dict[str, tuple[float, float, float]]:
    """Start -> first serial line: (median ms, best ms, median of paired ratios to bare).

    Rounds are interleaved and each round's order shuffled, so load swings on
    the host hit every side alike; the paired ratio (this round's time over
    this round's bare time) is steadier than a ratio of medians.
    ``setpriv``: the bare command behind ``setpriv --pdeathsig KILL`` (what
    virtkit adds to the exec); ``same``: virtkit's exact command (socket
    chardevs, both QMP monitors) served by blocking Python, i.e. QEMU's own
    cost of that set-up.
    """
    disk = guests.write_disk(work / "hello.qcow2", "hello", format="qcow2")
    machine = Machine(name="bench-hello", memory="32MiB", disks=[Disk(str(disk))])
    guest = hv.define(machine)
    argv = bare_argv(guest.qemu_argv())
    setpriv = shutil.which("setpriv")

    def ours() -> float:
        t0 = time.perf_counter()
        guest.start()
        guest.console.expect(b"\n", timeout=30)
        elapsed = time.perf_counter() - t0
        guest.wait(timeout=30)
        return elapsed

    def bare(prefix: list[str]) -> float:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()
        elapsed = time.perf_counter() - t0
        proc.wait(timeout=30)
        proc.stdout.close()
        return elapsed

    sides: dict[str, Callable[[], float]] = {
        "virtkit": ours,
        "bare": lambda: bare([]),
        "same": lambda: _same_command_plain(guest, work),
    }
    if setpriv is not None:
        sides["setpriv"] = lambda: bare([setpriv, "--pdeathsig", "KILL", "--"])
    samples: dict[str, list[float]] = {key: [] for key in sides}
    shuffle = random.Random(14)
    for _ in range(repeats):
        order = list(sides)
        shuffle.shuffle(order)
        for key in order:
            samples[key].append(sides[key]())
    hv.undefine(guest)
    out = {}
    for key, values in samples.items():
        paired = [a / b for a, b in zip(values, samples["bare"], strict=True)]
        out[key] = (_median_ms(values), min(values) * 1000, statistics.median(paired))
    return out


def _same_command_plain(guest: QemuGuest, work: Path) -> float:
    """Start-to-first-line of ``guest.qemu_argv()`` itself, served by blocking sockets."""
    run = work / "plain"
    run.mkdir(exist_ok=True)
    for name in ("qmp.sock", "console.sock"):
        (run / name).unlink(missing_ok=True)
    sync = run / "qmp-sync.sock"  # the second monitor virtkit's launch adds (QEMU listens)
    sync.unlink(missing_ok=True)
    argv = [
        *guest.qemu_argv(runtime_dir=run),
        "-chardev", f"socket,id=qmp-sync,path={sync},server=on,wait=off",
        "-mon", "chardev=qmp-sync,mode=control",
    ]  # fmt: skip
    with socket.socket(socket.AF_UNIX) as con, socket.socket(socket.AF_UNIX) as mon:
        con.bind(str(run / "console.sock"))
        con.listen(1)
        mon.bind(str(run / "qmp.sock"))
        mon.listen(1)
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        serial, _ = con.accept()
        qmp, _ = mon.accept()
        qmp.recv(65536)  # greeting
        qmp.sendall(b'{"execute": "qmp_capabilities"}\n')
        qmp.recv(65536)
        data = b""
        while b"\n" not in data:
            data += serial.recv(65536)
        elapsed = time.perf_counter() - t0
        proc.wait(timeout=30)
        serial.close()
        qmp.close()
    return elapsed


def bench_qmp(hv: QemuHypervisor, work: Path, calls: int) -> dict[str, float]:
    """Median ``query-status`` round trips (ms), interleaved in batches of 50.

    ``virtkit``: ``guest.qmp()`` (the sync channel: a second monitor on a
    blocking socket, no thread hop); ``aio``: ``await guest.aio.qmp()`` on
    the raw client's loop (the same channel driven by that loop); ``loop``:
    the same command through the private event loop (``run_sync(session.execute(...))``, two thread
    wake-ups); ``raw``: a ``qemu.qmp.QMPClient`` awaited directly on the
    caller's own loop; ``hop``: ``run_sync`` of an empty coroutine (the two
    wake-ups alone).
    """
    from virtkit.backends.qemu.qmp import run_sync  # noqa: PLC0415

    disk = guests.write_disk(work / "idle.qcow2", "ignore-acpi", format="qcow2")
    guest = hv.define(Machine(name="bench-qmp", memory="32MiB", disks=[Disk(str(disk))]))
    guest.start()
    proc = guest._proc
    assert proc is not None
    sock = work / "raw-qmp.sock"
    argv = [
        hv.binary, "-nodefaults", "-no-user-config", "-display", "none", "-accel",
        hv.accelerator.accel, "-m", "32M", "-qmp", f"unix:{sock},server=on,wait=off",
    ]  # fmt: skip
    bare_proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    raw_loop = asyncio.new_event_loop()
    client = QMPClient("raw")

    async def connect() -> None:
        for _ in range(200):
            try:
                await client.connect(str(sock))
                return
            except Exception:  # socket not there yet
                await asyncio.sleep(0.02)

    async def raw_batch(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.execute("query-status")
            samples.append(time.perf_counter() - t0)
        return samples

    async def aio_batch(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await guest.aio.qmp("query-status")
            samples.append(time.perf_counter() - t0)
        return samples

    async def nothing() -> None:
        return None

    out: dict[str, list[float]] = {"virtkit": [], "aio": [], "loop": [], "raw": [], "hop": []}
    try:
        raw_loop.run_until_complete(connect())
        raw_loop.run_until_complete(raw_batch(20))
        for _ in range(20):
            guest.qmp("query-status")
        batch = 50
        for _ in range(max(1, calls // batch)):  # interleaved: load swings hit all sides alike
            out["raw"] += raw_loop.run_until_complete(raw_batch(batch))
            out["aio"] += raw_loop.run_until_complete(aio_batch(batch))
            for _ in range(batch):
                t0 = time.perf_counter()
                guest.qmp("query-status")
                out["virtkit"].append(time.perf_counter() - t0)
            for _ in range(batch):
                t0 = time.perf_counter()
                run_sync(proc.qmp.execute("query-status"))
                out["loop"].append(time.perf_counter() - t0)
            for _ in range(batch):
                t0 = time.perf_counter()
                run_sync(nothing())
                out["hop"].append(time.perf_counter() - t0)
        # then kill QEMU: a "quit" races the disconnect (EOFError)
        raw_loop.run_until_complete(client.disconnect())
    finally:
        raw_loop.close()
        bare_proc.kill()
        bare_proc.wait()
        guest.kill()
        hv.undefine(guest)
    return {key: _median_ms(samples) for key, samples in out.items()}


def _fill_command() -> str:
    # touch ~96 MiB so the snapshot carries real RAM contents
    return "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=96 2>/dev/null; echo fil''led\n"


def bench_snapshot(
    hv: QemuHypervisor, work: Path, repeats: int
) -> tuple[str, float, float, int, tuple[float, float] | None]:
    """virtkit's full snapshot save/load vs a bare QEMU's savevm/loadvm on the same guest.

    Returns (what, save ms, load ms, vm-state bytes, (bare savevm ms, bare loadvm ms)).
    """
    disk = work / "snap.qcow2"
    kernel: KernelBoot | None = None
    try:
        from virtkit.testing.linux import (  # noqa: PLC0415
            LINUX_CMDLINE,
            READY_MARKER,
            build_initramfs,
            fetch_kernel,
        )

        k = fetch_kernel()
        kernel = KernelBoot(k.vmlinuz, build_initramfs(k, work / "initrd.gz"), LINUX_CMDLINE)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        what = "Linux guest, 256 MiB"
    except Exception:  # fall back to the boot sector
        guests.write_disk(disk, "counter", format="qcow2")
        what = "boot-sector guest, 256 MiB"
    guest: QemuGuest = hv.define(
        Machine(name="bench-snap", memory="256MiB", disks=[Disk(str(disk))], kernel=kernel)
    )
    argv = bare_argv(guest.qemu_argv())
    guest.start()
    if kernel is not None:
        guest.console.expect(READY_MARKER, timeout=120)
        guest.console.write(_fill_command())
        guest.console.expect("filled\r\n", timeout=120)
    save: list[float] = []
    load: list[float] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        guest.snapshot(f"s{i}")
        save.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        guest.revert(f"s{i}")
        load.append(time.perf_counter() - t0)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    vmstate = max(s.get("vm-state-size", 0) for s in info.get("snapshots", [{}]))
    guest.kill()
    bare = None
    if kernel is not None:
        bare = _bare_savevm(argv, guest.active_disk_path(guest.machine.disks[0]), work, repeats)
    return what, _median_ms(save), _median_ms(load), vmstate, bare


def _bare_savevm(argv: list[str], disk: Path, work: Path, repeats: int) -> tuple[float, float]:
    """The same guest in a bare QEMU: HMP savevm/loadvm through a raw QMP client."""
    from virtkit.testing.linux import READY_MARKER  # noqa: PLC0415

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    sock = work / "bare-snap.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [*argv, "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    seen = b""
    while READY_MARKER.encode() not in seen:
        seen += proc.stdout.read1(65536)
    proc.stdin.write(_fill_command().encode())
    proc.stdin.flush()
    while b"filled\r\n" not in seen:
        seen += proc.stdout.read1(65536)

    async def run() -> tuple[list[float], list[float]]:
        client = QMPClient("bare-snap")
        for _ in range(200):
            try:
                await client.connect(str(sock))
                break
            except Exception:
                await asyncio.sleep(0.02)
        saves, loads = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            await client.execute("human-monitor-command", {"command-line": f"savevm b{i}"})
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await client.execute("human-monitor-command", {"command-line": f"loadvm b{i}"})
            loads.append(time.perf_counter() - t0)
        await client.disconnect()
        return saves, loads

    try:
        saves, loads = asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()
    return _median_ms(saves), _median_ms(loads)


async def _qga_exec(client: QMPClient, path: str) -> None:
    """guest-exec + guest-exec-status polling, as virtkit's client polls."""
    started: Any = await client.execute("guest-exec", {"path": path})
    pause = 0.005
    while True:
        status: Any = await client.execute("guest-exec-status", {"pid": started["pid"]})
        if status["exited"]:
            return
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)


async def _qga_write(client: QMPClient, path: str, payload: bytes) -> None:
    handle = await client.execute("guest-file-open", {"path": path, "mode": "w"})
    for start in range(0, len(payload), _AGENT_CHUNK):
        chunk = base64.b64encode(payload[start : start + _AGENT_CHUNK]).decode()
        await client.execute("guest-file-write", {"handle": handle, "buf-b64": chunk})
    await client.execute("guest-file-flush", {"handle": handle})
    await client.execute("guest-file-close", {"handle": handle})


async def _qga_read(client: QMPClient, path: str) -> bytes:
    handle = await client.execute("guest-file-open", {"path": path, "mode": "r"})
    out = bytearray()
    while True:
        got: Any = await client.execute(
            "guest-file-read", {"handle": handle, "count": _AGENT_CHUNK}
        )
        out += base64.b64decode(got["buf-b64"])
        if got["eof"] or not got["count"]:
            break
    await client.execute("guest-file-close", {"handle": handle})
    return bytes(out)


#: the chunk both clients move per guest-file-read/-write (virtkit.agent.FILE_CHUNK)
_AGENT_CHUNK = 1024**2


def bench_agent(
    hv: QemuHypervisor, work: Path, calls: int, size: int = 8 * 1024**2
) -> dict[str, float] | None:
    """guest-exec round trip, file write and file read: virtkit's GuestAgent vs qemu.qmp.

    qemu-ga sends no QMP greeting: the raw ``QMPClient`` connects with
    ``await_greeting`` and ``negotiate`` off (as ``qmp-shell`` does for the
    agent) and a read buffer large enough for a 1 MiB chunk's reply. The two
    clients take turns on the agent's socket (QEMU's chardev takes one client
    at a time), exec rounds interleaved in blocks of ten.
    """
    try:
        from virtkit.testing.linux import (  # noqa: PLC0415
            LINUX_CMDLINE,
            READY_MARKER,
            build_initramfs,
            fetch_guest_agent,
            fetch_kernel,
        )

        k = fetch_kernel()
        initrd = build_initramfs(k, work / "initrd-agent.gz", agent=fetch_guest_agent())
    except Exception as exc:  # no kernel cache / no network: skip the row
        print(f"agent rows skipped: {exc}")
        return None
    boot = KernelBoot(str(k.vmlinuz), str(initrd), LINUX_CMDLINE)
    guest = hv.define(Machine(name="bench-agent", memory="256MiB", agent=True, kernel=boot))
    assert isinstance(guest, QemuGuest)
    guest.start()
    guest.wait_ready(via="console", pattern=READY_MARKER, timeout=120)
    guest.wait_ready(via="agent", timeout=60)
    proc = guest._proc
    assert proc is not None
    sock = str(proc.runtime_dir / "agent.sock")
    payload = os.urandom(size)
    ours: list[float] = []
    bare: list[float] = []
    timed: dict[str, float] = {}

    async def raw_block(n: int, files: bool) -> None:
        client = QMPClient("bench-qga", readbuflen=8 * _AGENT_CHUNK)
        client.await_greeting = False
        client.negotiate = False
        await client.connect(sock)
        try:
            await client.execute("guest-sync", {"id": 7})
            for _ in range(n):
                t0 = time.perf_counter()
                await _qga_exec(client, "/bin/true")
                bare.append(time.perf_counter() - t0)
            if files:
                t0 = time.perf_counter()
                await _qga_write(client, "/tmp/raw", payload)
                timed["write_raw"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                back = await _qga_read(client, "/tmp/raw")
                timed["read_raw"] = time.perf_counter() - t0
                assert back == payload
        finally:
            await client.disconnect()

    blocks = max(calls // 10, 1)
    for block in range(blocks):
        for _ in range(10):
            t0 = time.perf_counter()
            guest.agent.exec(["/bin/true"])
            ours.append(time.perf_counter() - t0)
        guest.agent.close()
        asyncio.run(raw_block(10, files=block == blocks - 1))
    t0 = time.perf_counter()
    guest.agent.write_file("/tmp/bench", payload, timeout=600)
    timed["write_ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert guest.agent.read_file("/tmp/bench", timeout=600) == payload
    timed["read_ours"] = time.perf_counter() - t0
    guest.agent.close()
    guest.kill()
    mib = size / 2**20
    out = {"exec_ours": _median_ms(ours), "exec_raw": _median_ms(bare), "mib": mib}
    out.update({key: mib / seconds for key, seconds in timed.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm", "auto"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="virtkit-bench-") as tmp:
        work = Path(tmp)
        with QemuHypervisor(accel=args.accel, root=work / "guests") as hv:
            first = bench_first_line(hv, work, args.repeats)
            print(f"QEMU {hv.binary}, accel {hv.accelerator.accel} ({hv.accelerator.reason})")
            bare_med, bare_best, _ = first["bare"]
            print(
                f"start -> first serial line ({args.repeats} interleaved rounds)   "
                f"bare QEMU {bare_med:7.1f} ms median, {bare_best:7.1f} ms best"
            )
            labels = {
                "virtkit": "virtkit guest.start()",
                "setpriv": "bare behind setpriv --pdeathsig",
                "same": "virtkit's argv, blocking Python",
            }
            for key, label in labels.items():
                if key not in first:
                    continue
                med, best, paired = first[key]
                print(
                    f"  {label:34s} {med:7.1f} ms ({(med / bare_med - 1) * 100:+5.1f} %)   "
                    f"best {best:7.1f} ms ({(best / bare_best - 1) * 100:+5.1f} %)   "
                    f"paired median ratio {paired:.3f}"
                )
            q = bench_qmp(hv, work, args.calls)
            print(
                f"QMP query-status round trip  virtkit {q['virtkit']:8.3f} ms   raw qemu.qmp "
                f"{q['raw']:6.3f} ms   ratio {q['virtkit'] / q['raw']:.2f}"
            )
            print(
                f"  guest.aio.qmp() on the same loop as the raw client: {q['aio']:.3f} ms "
                f"(ratio {q['aio'] / q['raw']:.2f})"
            )
            print(
                f"  through the private loop instead: {q['loop']:.3f} ms "
                f"(ratio {q['loop'] / q['raw']:.2f}); the two thread wake-ups alone "
                f"{q['hop']:.3f} ms"
            )
            agent = bench_agent(hv, work, max(20, args.calls // 20))
            if agent is not None:
                print(
                    f"agent exec /bin/true round trip  virtkit {agent['exec_ours']:7.1f} ms   "
                    f"raw qemu.qmp {agent['exec_raw']:7.1f} ms   "
                    f"ratio {agent['exec_ours'] / agent['exec_raw']:.2f}"
                )
                for way in ("write", "read"):
                    ours, raw = agent[f"{way}_ours"], agent[f"{way}_raw"]
                    print(
                        f"agent file {way:5s} ({agent['mib']:.0f} MiB)  "
                        f"virtkit {ours:6.2f} MiB/s   raw qemu.qmp {raw:6.2f} MiB/s   "
                        f"time ratio {raw / ours:.2f}"
                    )
            what, save, load, vmstate, bare_snap = bench_snapshot(
                hv, work, max(3, args.repeats // 3)
            )
            print(
                f"full snapshot ({what}, vm state {vmstate / 2**20:.1f} MiB)   "
                f"save {save:8.1f} ms   load (revert) {load:8.1f} ms"
            )
            if bare_snap is not None:
                print(
                    f"  bare QEMU savevm/loadvm (same guest)   save {bare_snap[0]:8.1f} ms   "
                    f"load {bare_snap[1]:8.1f} ms   ratio save {save / bare_snap[0]:.2f}, "
                    f"load {load / bare_snap[1]:.2f}"
                )
    os.sync()


if __name__ == "__main__":
    main()

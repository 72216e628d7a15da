"""A real ``kill -9``: a process writing an image dies at random moments.

A child process opens the image and makes a seeded random stream of writes,
zeroings and discards (with snapshots now and then), flushing every few
operations and printing ``ACK <n>`` after each flush returns. The parent
reads the acknowledgements, SIGKILLs the child at a random moment (a seeded
number of acknowledgements plus a random few milliseconds, so the signal lands
mid-write), then checks: the image opens, real ``qemu-img check`` finds no
corruption, every acknowledged byte no later operation touched reads back,
``check(repair=True)`` leaves ``qemu-img check`` clean. The next child
carries on from what the last one left, so damage would accumulate.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from image_workloads import CS, SIZE, Model, copied_flag_window, qemu_check

import virtkit
from virtkit import images
from virtkit.testing import faults

#: Kills per image format variant in the default run.
KILLS = 10

CHILD = textwrap.dedent(
    """
    import sys
    from virtkit import images
    sys.path.insert(0, sys.argv[3])
    from test_image_kill9 import data, operations

    with images.open(sys.argv[1], writable=True) as img:
        for n, op in enumerate(operations(int(sys.argv[2]))):
            kind, off, length, seed = op
            if kind == "write":
                img.write(off, data(seed, length))
            elif kind == "zero":
                img.write_zeroes(off, length)
            elif kind == "discard":
                img.discard(off, length)
            elif kind == "snap":
                img.create_snapshot(f"s{seed}")
            elif kind == "unsnap":
                names = [s.name for s in img.snapshots]
                if names:
                    img.delete_snapshot(names[0])
            elif kind == "flush":
                img.flush()
                print(f"ACK {n}", flush=True)
    """
)


def data(seed: int, length: int) -> bytes:
    """Deterministic non-zero bytes for write number ``seed``."""
    block = random.Random(seed).randbytes(512).replace(b"\0", b"\x01")
    return (block * (length // 512 + 1))[:length]


def operations(seed: int, count: int = 100_000) -> Any:
    """The child's seeded stream of ``(kind, offset, length, seed)`` operations."""
    rnd = random.Random(seed)
    for i in range(count):
        r = rnd.random()
        off = rnd.randrange(0, SIZE - 1)
        length = min(rnd.choice([1, 512, 3000, CS, 3 * CS + 7, 16 * CS]), SIZE - off)
        if i % 4 == 3:
            yield ("flush", 0, 0, 0)
        elif r < 0.7:
            yield ("write", off, length, seed * 1_000_000 + i)
        elif r < 0.82:
            yield ("zero", off, length, 0)
        elif r < 0.92:
            yield ("discard", off, length, 0)
        elif r < 0.96:
            yield ("snap", 0, 0, seed * 1_000_000 + i)
        else:
            yield ("unsnap", 0, 0, 0)


class _Null:
    """Stands for the image while the model replays what the child did."""

    def write(self, offset: int, data: bytes) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...


def model_after(start: bytes, seed: int, acked: int, ran: int) -> Model:
    """The model after ops up to ``acked`` are acknowledged and ops up to ``ran`` may have run."""
    m = Model(start)
    m.check_snapshots = False  # snapshots are taken and deleted, but not modelled
    null: Any = _Null()
    for n, (kind, off, length, s) in enumerate(operations(seed, ran + 1)):
        if n <= acked:
            if kind == "write":
                m.write(null, off, data(s, length))
            elif kind == "zero":
                m.write_zeroes(null, off, length)
            elif kind == "discard":
                m.discard(null, off, length)
            elif kind == "flush":
                m.ack()
        elif kind in ("write", "zero", "discard"):
            m._touch(off, off + length)
    return m


def kill_rounds(path: Path, rounds: int, seed: int) -> dict[str, int]:
    """Run ``rounds`` children on ``path``, SIGKILL each at a random moment, check after each."""
    rnd = random.Random(seed)
    here = str(Path(__file__).parent)
    figures = {"kills": 0, "survived": 0, "leaked": 0, "acks": 0}
    for r in range(rounds):
        with images.open(path) as img:
            start = img.read(0, img.virtual_size)
            cluster = img.cluster_size
        child_seed = seed * 100 + r
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(child_seed), here],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        want = rnd.randint(1, 25)
        acked = -1
        got = 0
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked = int(line.split()[1])
                got += 1
                if got >= want:
                    break
        time.sleep(rnd.random() * 0.02)  # land somewhere inside the next operations
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"child ended on its own:\n{err}"
        for line in rest.splitlines():
            if line.startswith("ACK "):
                acked = int(line.split()[1])
                got += 1
        figures["kills"] += 1
        figures["acks"] += got
        # The child may have run ahead of its last ACK by up to a flush interval.
        model = model_after(start, child_seed, acked, acked + 8)
        report = qemu_check(path)
        _window, harmful = copied_flag_window(report, cluster)
        where = f"kill {r} (seed {child_seed}, last ACK at op {acked})"
        assert report["rc"] in (0, 2, 3) and not harmful, (
            f"{where}: " + "\n".join(harmful) + f"\n{report['stderr'][:2000]}"
        )
        with images.open(path) as img:
            model.verify(img)
        with images.open(path, writable=True) as img:
            res = img.check(repair=True)
            assert res.ok, f"{where}: {res}"
            model.verify(img)
        after = qemu_check(path)
        assert after["rc"] == 0, f"{where}: after repair\n{after['stderr']}"
        figures["survived"] += 1
        figures["leaked"] += int(report["leaks"] > 0)
    return figures


class TestKill9:
    """SIGKILL a real writer process; the image only ever leaks."""

    def test_random_kills_v3(self, tmp_path: Path) -> None:
        """A v3 image with 4 KiB clusters survives repeated kill -9 of its writer."""
        path = tmp_path / "disk.qcow2"
        with images.create(path, SIZE, cluster_size=CS):
            pass
        figures = kill_rounds(path, KILLS, seed=1)
        print(f"kill -9 qcow2 v3: {figures}")
        assert figures["survived"] == figures["kills"] == KILLS

    def test_random_kills_v2_small_refcounts(self, tmp_path: Path) -> None:
        """A v2 image with 512 B clusters (many refcount and L2 updates) survives kill -9."""
        path = tmp_path / "disk.qcow2"
        with images.create(path, SIZE, cluster_size=512, compat="0.10"):
            pass
        figures = kill_rounds(path, KILLS, seed=2)
        print(f"kill -9 qcow2 v2: {figures}")
        assert figures["survived"] == figures["kills"] == KILLS


def die_at(n: int, work: Callable[[], object], only: Path) -> int:
    """Run ``work`` in a forked child that ends with ``os._exit(137)`` at write ``n``.

    No ``finally`` or clean-up handler runs after write ``n - 1``: what a
    ``kill -9`` landing exactly there leaves. Returns the child's exit code.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            with faults.inject(faults.CrashAfter(n, hard=True), only=only):
                work()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class TestKilledAtExactWrite:
    """kill -9 landing exactly before write N (a forked child ends with os._exit)."""

    def test_create_killed_at_each_write(self, tmp_path: Path) -> None:
        """A create cut anywhere leaves no file, a good image, or one refused with a clear error."""
        path = tmp_path / "new.qcow2"
        with faults.inject(faults.Recorder(), only=tmp_path) as rec:
            images.create(path, SIZE, cluster_size=CS).close()
        counts = {"absent": 0, "opens": 0, "refused": 0}
        for n in range(1, rec.writes + 1):
            path.unlink(missing_ok=True)
            code = die_at(n, lambda: images.create(path, SIZE, cluster_size=CS).close(), tmp_path)
            assert code == 137, f"create finished before write {n}"
            if not path.exists():
                counts["absent"] += 1
                continue
            refused: virtkit.ImageError | None = None
            try:
                with images.open(path, format="qcow2") as img:
                    img.read(0, img.virtual_size)
            except virtkit.ImageError as exc:
                refused = exc
            if refused is not None:
                assert refused.path == str(path), refused
                counts["refused"] += 1
                continue
            report = qemu_check(path)
            assert report["rc"] == 0, report["stderr"]
            counts["opens"] += 1
        print(f"create killed at each of {rec.writes} writes: {counts}")
        assert sum(counts.values()) == rec.writes

    def test_convert_killed_at_sampled_writes(self, tmp_path: Path) -> None:
        """A convert cut anywhere leaves the old destination intact (a hidden temp file may stay)."""
        src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
        with images.create(src, SIZE, cluster_size=CS) as img:
            img.write(0, data(5, 60 * CS))
        with images.create(dst, SIZE, cluster_size=CS) as old:
            old.write(0, b"old" * 3000)
        before = dst.read_bytes()
        with faults.inject(faults.Recorder(), only=tmp_path) as rec:
            images.convert(src, dst, compress=True, cluster_size=CS)
        dst.write_bytes(before)  # back to the old destination
        step = max(1, rec.writes // 20)
        tried = 0
        for n in range(1, rec.writes + 1, step):
            work = lambda: images.convert(src, dst, compress=True, cluster_size=CS)  # noqa: E731
            assert die_at(n, work, tmp_path) == 137
            assert dst.read_bytes() == before, f"destination changed by a convert killed at {n}"
            for stray in tmp_path.glob(".dst.qcow2.*.tmp"):
                stray.unlink()  # what a killed convert leaves behind
            tried += 1
        print(f"convert killed at {tried} of {rec.writes} writes: destination intact each time")
        images.convert(src, dst, compress=True, cluster_size=CS)
        with images.open(src) as a, images.open(dst) as b:
            assert a.read(0, SIZE) == b.read(0, SIZE)

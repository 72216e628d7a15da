"""Image workloads, a model of acknowledged data, and the after-crash checks.

Shared by the crash, power-loss and kill -9 tests and by
``scripts/crash_campaign.py``. Every workload goes through the public API only
(``virtkit.images.create/open/convert`` and :class:`virtkit.images.Image`
methods) and is deterministic, so its N-th write is the same operation on
every run.

The :class:`Model` follows what the guest should see. A range becomes
*acknowledged* when a ``flush()`` (or ``close()``) that follows its write
returns; after a crash, an acknowledged byte that no later operation touched
must read back exactly. Bytes an operation touched after the last
acknowledgement (the operation may have been cut halfway) are not checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtkit import images
from virtkit.images import Image
from virtkit.testing import faults

KIB = 1024
MIB = 1024 * 1024
SIZE = 2 * MIB
CS = 4096
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"


def _pattern(seed: int, length: int) -> bytes:
    block = random.Random(seed).randbytes(4096).replace(b"\0", b"\x5a")
    return (block * (length // 4096 + 1))[:length]


class Model:
    """The guest content a workload expects, and which part of it is acknowledged."""

    def __init__(self, content: bytes, *, known: bool = True) -> None:
        self.cur = bytearray(content)
        self.cur_known = bytearray(b"\1" * len(content) if known else bytes(len(content)))
        self.acked = bytes(self.cur)
        self.acked_known = bytes(self.cur_known)
        self.dirty = bytearray(len(content))
        self.acked_size = len(content)
        self.pending_sizes: set[int] = set()
        self.snaps: dict[str, tuple[bytes, bytes]] = {}
        self.acked_snaps: set[str] = set()
        self.touched_snaps: set[str] = set()
        self.failed_sizes: set[int] = set()
        self.failed_snaps: set[str] = set()
        #: Whether verify() compares the snapshot list (off when snapshots are not modelled).
        self.check_snapshots = True
        self.acks = 0
        #: Writers opened with cache="writethrough": a write is durable once it returns.
        self.auto_ack = OPEN.get("cache") == "writethrough"

    # -- recording: mark the range touched, do the operation, then update the model --
    @contextlib.contextmanager
    def _failing(self, offset: int, length: int) -> Iterator[None]:
        """An operation that raises may have done part of its work: its range is unknown."""
        try:
            yield
        except BaseException:
            stop = min(offset + length, len(self.cur_known))
            if offset < stop:
                self.cur_known[offset:stop] = bytes(stop - offset)
            raise

    def _touch(self, start: int, stop: int) -> None:
        stop = min(stop, len(self.dirty))
        if start < stop:
            self.dirty[start:stop] = b"\1" * (stop - start)

    def write(self, img: Image, offset: int, data: bytes) -> None:
        """Write through ``img`` and record it."""
        self._touch(offset, offset + len(data))
        with self._failing(offset, len(data)):
            img.write(offset, data)
        self.cur[offset : offset + len(data)] = data
        self.cur_known[offset : offset + len(data)] = b"\1" * len(data)
        self._durable()

    def _durable(self) -> None:
        """In writethrough mode a completed write is acknowledged on return."""
        if self.auto_ack:
            self.ack()

    def write_zeroes(self, img: Image, offset: int, length: int) -> None:
        """Zero a range through ``img`` and record it."""
        self._touch(offset, offset + length)
        with self._failing(offset, length):
            img.write_zeroes(offset, length)
        self.cur[offset : offset + length] = bytes(length)
        self.cur_known[offset : offset + length] = b"\1" * length
        self._durable()

    def discard(self, img: Image, offset: int, length: int) -> None:
        """Discard a range (its content becomes unknown: zeroes or backing data)."""
        self._touch(offset, offset + length)
        with self._failing(offset, length):
            img.discard(offset, length)
        self.cur_known[offset : offset + length] = bytes(length)
        self._durable()

    def create_snapshot(self, img: Image, name: str) -> None:
        """Take a snapshot and remember its content."""
        self.touched_snaps.add(name)
        try:
            img.create_snapshot(name)
        except BaseException:
            self.failed_snaps.add(name)
            raise
        self.snaps[name] = (bytes(self.cur), bytes(self.cur_known))

    def revert_snapshot(self, img: Image, name: str) -> None:
        """Revert to a snapshot: the whole disk changes."""
        self._touch(0, len(self.dirty))
        with self._failing(0, len(self.cur)):
            img.revert_snapshot(name)
        content, known = self.snaps[name]
        self.cur[:] = content
        self.cur_known[:] = known

    def delete_snapshot(self, img: Image, name: str) -> None:
        """Delete a snapshot."""
        self.touched_snaps.add(name)
        try:
            img.delete_snapshot(name)
        except BaseException:
            self.failed_snaps.add(name)
            raise
        del self.snaps[name]

    def resize(self, img: Image, size: int, *, shrink: bool = False) -> None:
        """Resize; the content is cut or zero-extended."""
        self.pending_sizes.add(size)
        self._touch(min(size, len(self.cur)), len(self.dirty))
        try:
            img.resize(size, shrink=shrink)
        except BaseException:
            self.failed_sizes.add(size)
            cut = min(size, len(self.cur))
            self.cur_known[cut:] = bytes(len(self.cur) - cut)
            raise
        old = len(self.cur)
        if size < old:
            del self.cur[size:]
            del self.cur_known[size:]
        else:
            self.cur.extend(bytes(size - old))
            self.cur_known.extend(b"\1" * (size - old))

    def flush(self, img: Image) -> None:
        """Flush ``img``; once it returns, everything so far is acknowledged."""
        img.flush()
        self.ack(img)

    def ack(self, img: Image | None = None) -> None:
        """Mark the current state acknowledged (after a completed flush or close)."""
        self.acked = bytes(self.cur)
        self.acked_known = bytes(self.cur_known)
        self.acked_size = len(self.cur)
        self.pending_sizes.clear()
        self.dirty = bytearray(len(self.cur))
        self.acked_snaps = set(self.snaps)
        self.touched_snaps.clear()
        self.acks += 1

    # -- checking --
    def verify(self, img: Image) -> None:
        """Assert that every acknowledged, untouched byte of ``img`` reads back exactly."""
        size = img.virtual_size
        assert size == self.acked_size or size in self.pending_sizes | self.failed_sizes, (
            f"{img.path}: virtual size {size}, acknowledged {self.acked_size}"
            f" (pending {sorted(self.pending_sizes)})"
        )
        n = min(size, self.acked_size)
        got = img.read(0, n)
        step = 4096
        for pos in range(0, n, step):
            want = self.acked[pos : pos + step]
            have = got[pos : pos + step]
            if want == have:
                continue
            for i in range(len(want)):
                j = pos + i
                if want[i] != have[i] and self.acked_known[j] and not self.dirty[j]:
                    raise AssertionError(
                        f"{img.path}: acknowledged byte at guest offset {j:#x} reads "
                        f"{have[i]:#04x}, expected {want[i]:#04x} (after {self.acks} acks)"
                    )
        if not self.check_snapshots:
            return
        names = {s.name for s in img.snapshots}
        must = self.acked_snaps - self.touched_snaps - self.failed_snaps
        may = self.acked_snaps | self.touched_snaps | self.failed_snaps
        assert must <= names <= may, (
            f"{img.path}: snapshots {sorted(names)}; acknowledged {sorted(self.acked_snaps)},"
            f" in flight {sorted(self.touched_snaps)}"
        )


@dataclass
class Workload:
    """A deterministic public-API workload on files in one directory.

    ``setup(dir)`` makes the starting files (not fault-injected); ``run(dir,
    state)`` is the workload, recording into ``state`` what it expects;
    ``target`` is the image checked afterwards; ``check(dir, state)`` (if any)
    replaces the model check for workloads whose result is all-or-nothing.
    """

    name: str
    target: str
    setup: Callable[[Path], None]
    run: Callable[[Path, dict[str, Any]], None]
    check: Callable[[Path, dict[str, Any]], None] | None = None
    long: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


#: Extra qcow2 creation options for every image the workloads make (the campaign's
#: ``--variant``): e.g. ``{"compat": "0.10"}`` or ``{"refcount_bits": 1}``.
VARIANT: dict[str, Any] = {}

#: Extra ``images.open`` options of the workloads' writers (the campaign's ``--cache``):
#: ``{"cache": "writethrough"}`` makes every completed write acknowledged (see Model).
OPEN: dict[str, Any] = {}


def opts(**more: Any) -> dict[str, Any]:
    """qcow2 creation options: 4 KiB clusters, the current variant, then ``more``."""
    return {"cluster_size": CS, **VARIANT, **more}


def _qcow2(path: Path) -> None:
    with images.create(path, SIZE, **opts()):
        pass


# ---------------------------------------------------------------- create
def _create_setup(d: Path) -> None:
    pass


def _create_run(d: Path, st: dict[str, Any]) -> None:
    path = d / "disk.qcow2"
    if OPEN:  # create() writes in its own mode: reopen the new image in the campaign's
        images.create(path, SIZE, **opts()).close()
        made = images.open(path, writable=True, **OPEN)
    else:
        made = images.create(path, SIZE, **opts())
    with made as img:
        m = st["model"] = Model(bytes(SIZE))
        m.write(img, 5 * CS + 100, _pattern(1, 3 * CS))
        m.flush(img)
        m.write(img, SIZE - 700, _pattern(2, 700))
    m.ack()


# ---------------------------------------------------------------- scattered writes
def _scattered_setup(d: Path) -> None:
    _qcow2(d / "disk.qcow2")


def _scattered_ops(img: Image, m: Model, seed: int, count: int) -> None:
    rnd = random.Random(seed)
    for i in range(count):
        r = rnd.random()
        off = rnd.randrange(0, SIZE - 1)
        length = min(rnd.choice([1, 512, 3000, CS, 3 * CS + 5, 9 * CS]), SIZE - off)
        if r < 0.75:
            m.write(img, off, _pattern(seed * 1000 + i, length))
        elif r < 0.88:
            m.write_zeroes(img, off, length)
        else:
            m.discard(img, off, length)
        if i % 5 == 4:
            m.flush(img)


def _scattered_run(d: Path, st: dict[str, Any]) -> None:
    m = st["model"] = Model(bytes(SIZE))
    with images.open(d / "disk.qcow2", writable=True, **OPEN) as img:
        _scattered_ops(img, m, seed=7, count=40)
    m.ack()


# ---------------------------------------------------------------- backing chain
def _chain_setup(d: Path) -> None:
    with images.create(d / "base.raw", SIZE, format="raw") as base:
        base.write(0, _pattern(11, SIZE))
    with images.create(d / "mid.qcow2", **opts(backing="base.raw", backing_format="raw")) as mid:
        mid.write(3 * CS, _pattern(12, 40 * CS))
        mid.write_zeroes(100 * CS, 10 * CS)
    with images.create(d / "top.qcow2", **opts(backing="mid.qcow2", backing_format="qcow2")):
        pass


def _chain_run(d: Path, st: dict[str, Any]) -> None:
    with images.open(d / "top.qcow2", writable=True, **OPEN) as img:
        m = st["model"] = Model(img.read(0, img.virtual_size))
        rnd = random.Random(21)
        for i in range(24):
            off = rnd.randrange(0, SIZE - 1)
            length = min(rnd.choice([200, CS - 1, 2 * CS + 9, 5 * CS]), SIZE - off)
            if i % 7 == 6:
                m.write_zeroes(img, off, length)
            else:
                m.write(img, off, _pattern(300 + i, length))
            if i % 4 == 3:
                m.flush(img)
    m.ack()


# ---------------------------------------------------------------- snapshots
def _snap_setup(d: Path) -> None:
    _qcow2(d / "disk.qcow2")
    with images.open(d / "disk.qcow2", writable=True) as img:
        img.write(0, _pattern(40, 64 * CS))


def _snap_run(d: Path, st: dict[str, Any]) -> None:
    with images.open(d / "disk.qcow2", writable=True, **OPEN) as img:
        m = st["model"] = Model(img.read(0, img.virtual_size))
        m.create_snapshot(img, "s1")
        m.flush(img)
        m.write(img, 10 * CS + 3, _pattern(41, 6 * CS))
        m.write(img, 200 * CS, _pattern(42, 2 * CS))
        m.flush(img)
        m.create_snapshot(img, "s2")
        m.write(img, 12 * CS, _pattern(43, 30 * CS))
        m.flush(img)
        m.revert_snapshot(img, "s1")
        m.flush(img)
        m.write(img, 5 * CS, _pattern(44, 3 * CS))
        m.delete_snapshot(img, "s1")
        m.flush(img)
        m.revert_snapshot(img, "s2")
        m.delete_snapshot(img, "s2")
        m.flush(img)
        m.write(img, 7, _pattern(45, 100))
    m.ack()


# ---------------------------------------------------------------- resize
def _resize_setup(d: Path) -> None:
    _qcow2(d / "disk.qcow2")
    with images.open(d / "disk.qcow2", writable=True) as img:
        img.write(SIZE - 8 * CS, _pattern(50, 8 * CS))


def _resize_run(d: Path, st: dict[str, Any]) -> None:
    with images.open(d / "disk.qcow2", writable=True, **OPEN) as img:
        m = st["model"] = Model(img.read(0, img.virtual_size))
        m.resize(img, 3 * SIZE)
        m.flush(img)
        m.write(img, 3 * SIZE - 5 * CS, _pattern(51, 5 * CS))
        m.write(img, SIZE + 17, _pattern(52, 2 * CS))
        m.flush(img)
        m.resize(img, SIZE + 4 * CS, shrink=True)
        m.flush(img)
        m.resize(img, 2 * SIZE)
        m.write(img, 2 * SIZE - 300, _pattern(53, 300))
    m.ack()


# ---------------------------------------------------------------- convert (compressed)
def _convert_setup(d: Path) -> None:
    _qcow2(d / "src.qcow2")
    with images.open(d / "src.qcow2", writable=True) as img:
        half = bytes(CS // 2)
        for i in range(0, 120, 3):  # compressible and incompressible clusters
            data = _pattern(60 + i, CS) if i % 2 else _pattern(60 + i, CS // 2) + half
            img.write(i * CS, data)
    with images.create(d / "dst.qcow2", SIZE, **opts()) as old:
        old.write(0, _pattern(99, 10 * CS))


def _convert_run(d: Path, st: dict[str, Any]) -> None:
    images.convert(d / "src.qcow2", d / "dst.qcow2", compress=True, **opts())


def _convert_check(d: Path, st: dict[str, Any]) -> None:
    # A crash leaves convert's hidden temporary file (as it would qemu-img's): allowed.
    stray = [p.name for p in d.iterdir() if p.name not in {"src.qcow2", "dst.qcow2"}]
    assert all(n.startswith(".dst.qcow2.") and n.endswith(".tmp") for n in stray), stray
    with images.open(d / "dst.qcow2") as dst:
        got = dst.read(0, dst.virtual_size)
    with images.open(d / "src.qcow2") as src:
        new = src.read(0, src.virtual_size)
    old = _pattern(99, 10 * CS) + bytes(SIZE - 10 * CS)
    assert got in (old, new), "convert destination is neither the old image nor the new one"
    st["result"] = "new" if got == new else "old"


# ---------------------------------------------------------------- check(repair=True)
#: The leaky image spans four L2 tables (and, with 64-bit refcounts, four refcount blocks).
_SPOTS = [i * SIZE + 5 * CS for i in range(4)]


def _leaky_workload(path: Path) -> None:
    with images.open(path, writable=True) as img:
        img.create_snapshot("gone")
        for i, at in enumerate(_SPOTS):
            img.write(at, _pattern(71 + i, 8 * CS))
        img.delete_snapshot("gone")


def _repair_setup(d: Path) -> None:
    with images.create(d / "disk.qcow2", 4 * SIZE, **opts()) as img:
        for i, at in enumerate(_SPOTS):
            img.write(at, _pattern(60 + i, 8 * CS))
    keep = d / "disk.qcow2.orig"
    shutil.copy(d / "disk.qcow2", keep)
    with faults.inject(faults.Recorder(), only=d) as rec:
        _leaky_workload(d / "disk.qcow2")
    # Damage the image the way a crash does: of the points that cut the snapshot
    # workload, take the one that leaves the most leaks (and COPIED-flag window)
    # while qemu-img finds nothing worse, so repair has refcounts and flags to fix.
    best = (0, 0)
    for n in range(1, rec.writes + 1):
        shutil.copy(keep, d / "disk.qcow2")
        with (
            faults.inject(faults.CrashAfter(n), only=d),
            contextlib.suppress(faults.SimulatedCrash),
        ):
            _leaky_workload(d / "disk.qcow2")
        report = qemu_check(d / "disk.qcow2")
        window, harmful = copied_flag_window(report)
        if not harmful and report["leaks"] + window > best[0]:
            best = (report["leaks"] + window, n)
    assert best[0] > 0, "no crash point of the set-up workload leaks"
    shutil.copy(keep, d / "disk.qcow2")
    with (
        faults.inject(faults.CrashAfter(best[1]), only=d),
        contextlib.suppress(faults.SimulatedCrash),
    ):
        _leaky_workload(d / "disk.qcow2")
    keep.unlink()


def _repair_run(d: Path, st: dict[str, Any]) -> None:
    with images.open(d / "disk.qcow2", writable=True, **OPEN) as img:
        m = st["model"] = Model(img.read(0, img.virtual_size))
        m.ack()
        res = img.check(repair=True)
        assert res.leaks_fixed > 0 and res.ok, res
        m.write(img, 3 * CS, _pattern(72, 2 * CS))
        m.flush(img)
    m.ack()


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("create", "disk.qcow2", _create_setup, _create_run),
        Workload("scattered", "disk.qcow2", _scattered_setup, _scattered_run),
        Workload("chain", "top.qcow2", _chain_setup, _chain_run),
        Workload("snapshots", "disk.qcow2", _snap_setup, _snap_run),
        Workload("resize", "disk.qcow2", _resize_setup, _resize_run),
        Workload("convert", "dst.qcow2", _convert_setup, _convert_run, _convert_check),
        Workload("repair", "disk.qcow2", _repair_setup, _repair_run),
    ]
}


# ---------------------------------------------------------------- checks
def qemu_check(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json``: the report plus ``rc`` and the ``errors`` text."""
    proc = subprocess.run(
        [QEMU_IMG, "check", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"check-errors": -1}
    report.setdefault("leaks", 0)
    report.setdefault("corruptions", 0)
    report["rc"] = proc.returncode
    report["errors"] = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    report["stderr"] = proc.stderr
    with open(path, "rb") as fh:  # cluster_bits: big-endian u32 at offset 20 of the header
        header = fh.read(24)
    if len(header) == 24 and header[:4] == b"QFI\xfb":
        report["cluster-size"] = 1 << int.from_bytes(header[20:24], "big")
    return report


_COPIED = re.compile(r"ERROR OFLAG_COPIED (?:data|L2) cluster: .*_entry=([0-9a-f]+) refcount=(\d+)")
_LEAK = re.compile(r"Leaked cluster (\d+) refcount=(\d+) reference=(\d+)")


def copied_flag_window(
    report: dict[str, Any], cluster_size: int | None = None
) -> tuple[int, list[str]]:
    """Split qemu-img's errors into the harmless COPIED-flag window and real corruption.

    A cluster's refcount and the COPIED flag in the L2 (or L1) entry pointing to it
    live in different clusters, so no single write changes both; QEMU has the same
    window. Harmless: refcount 1 without the flag (a write copies needlessly), or
    the flag with a refcount above 1 that is *leaked* down to one reference (so no
    snapshot shares the cluster). Anything else (the flag on a cluster a snapshot
    really shares, a refcount below its references, a bad offset) is corruption.

    Returns ``(harmless count, harmful error lines)``.
    """
    if cluster_size is None:
        cluster_size = int(report.get("cluster-size", CS))
    leaked = {}
    for line in report["stderr"].splitlines():
        m = _LEAK.match(line)
        if m:
            leaked[int(m.group(1))] = int(m.group(3))
    harmless = 0
    harmful: list[str] = []
    for line in report["errors"]:
        m = _COPIED.match(line)
        if m is None:
            harmful.append(line)
            continue
        entry, refcount = int(m.group(1), 16), int(m.group(2))
        flag = bool(entry >> 63)
        cluster = (entry & 0x00FF_FFFF_FFFF_FE00) // cluster_size
        if (refcount == 1 and not flag) or (flag and refcount > 1 and leaked.get(cluster) == 1):
            harmless += 1
        else:
            harmful.append(line)
    if harmless + len(harmful) != report["corruptions"]:
        harmful.append(
            f"{report['corruptions']} corruptions but {len(report['errors'])} ERROR lines"
        )
    return harmless, harmful


def check_consistent(d: Path, w: Workload, st: dict[str, Any], where: str) -> dict[str, int]:
    """After a crash: the image opens, qemu-img finds no corruption, data, repair, clean.

    Returns counters for the figures (``leaks``: 1 if qemu-img saw leaks before
    repair; ``window``: 1 if it saw only the harmless COPIED-flag window; ``absent``:
    1 when a create never completed). Raises AssertionError with the details otherwise.
    """
    path = d / w.target
    if not path.exists():
        assert w.name == "create" and "model" not in st, f"{where}: {w.target} is missing"
        assert not list(d.iterdir()), f"{where}: create left {sorted(os.listdir(d))}"
        return {"leaks": 0, "window": 0, "absent": 1}
    report = qemu_check(path)
    window, harmful = copied_flag_window(report)
    assert report["rc"] in (0, 2, 3) and report.get("check-errors") == 0 and not harmful, (
        f"{where}: qemu-img check rc={report['rc']} corruptions={report['corruptions']}"
        f" leaks={report['leaks']} check-errors={report.get('check-errors')}\n"
        + "\n".join(harmful[:20])
        + f"\n{report['stderr'][:3000]}"
    )
    model: Model | None = st.get("model")
    if w.check is not None:
        w.check(d, st)
    elif model is not None:
        with images.open(path) as img:
            model.verify(img)
    else:  # cut before the workload learnt the content: it must still read
        with images.open(path) as img:
            img.read(0, img.virtual_size)
    with images.open(path, writable=True) as img:
        res = img.check(repair=True)
        assert res.ok, f"{where}: check(repair=True) left {res}"
        if model is not None:
            model.verify(img)
    after = qemu_check(path)
    assert after["rc"] == 0 and after["leaks"] == 0 and after["corruptions"] == 0, (
        f"{where}: after repair qemu-img check rc={after['rc']}\n{after['stderr']}"
    )
    return {"leaks": int(report["leaks"] > 0), "window": int(window > 0), "absent": 0}


def reset(pristine: Path, work: Path) -> None:
    """Make ``work`` a fresh copy of ``pristine``."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)


def prepare(w: Workload, base: Path) -> tuple[Path, int]:
    """Set up the pristine files and count the workload's writes (one full run, checked)."""
    base.mkdir(parents=True, exist_ok=True)
    pristine = base / f"{w.name}-pristine"
    pristine.mkdir()
    w.setup(pristine)
    full = base / f"{w.name}-full"
    reset(pristine, full)
    st: dict[str, Any] = {}
    with faults.inject(faults.Recorder(), only=full) as rec:
        w.run(full, st)
    check_consistent(full, w, st, f"{w.name} full run")
    if w.check is not None:
        assert st["result"] == "new"
    return pristine, rec.writes


def sample(total: int, limit: int | None) -> list[int]:
    """Crash indexes 1..total: all of them, or ``limit`` spread evenly (ends included)."""
    if limit is None or total <= limit:
        return list(range(1, total + 1))
    picks = {1, 2, 3, total - 1, total}
    picks.update(1 + (i * (total - 1)) // (limit - 1) for i in range(limit))
    return sorted(p for p in picks if 1 <= p <= total)


@dataclass
class Figures:
    """Crash points tried and survived for one workload and one fault kind."""

    workload: str
    kind: str
    writes: int
    tried: int = 0
    survived: int = 0
    leaked: int = 0
    window: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One row of the printed table."""
        return (
            f"{self.workload:<10} {self.kind:<10} writes={self.writes:<5} tried={self.tried:<5}"
            f" survived={self.survived:<5} leaked={self.leaked:<4} copied-flag-window={self.window}"
        )


KINDS = ("crash", "power", "reorder")


def make_plan(kind: str, n: int) -> faults.CrashAfter:
    """``crash``: die at write n; ``power``: also lose every unflushed write;
    ``reorder``: lose a random half of them (seeded by n), keeping the rest."""
    if kind == "crash":
        return faults.CrashAfter(n)
    if kind == "power":
        return faults.PowerLoss(n)
    if kind == "reorder":
        return faults.PowerLoss(n, keep=0.5, seed=n)
    raise ValueError(kind)


def sweep(
    w: Workload,
    base: Path,
    kind: str,
    limit: int | None,
    *,
    stop_on_failure: bool = True,
) -> Figures:
    """Crash ``w`` at each sampled write index (``kind``: ``crash`` or ``power``) and check."""
    pristine, total = prepare(w, base)
    figs = Figures(w.name, kind, total)
    work = base / f"{w.name}-{kind}-work"
    for n in sample(total, limit):
        reset(pristine, work)
        st: dict[str, Any] = {}
        figs.tried += 1
        crashed = False
        with faults.inject(make_plan(kind, n), only=work):
            try:
                w.run(work, st)
            except faults.SimulatedCrash:
                crashed = True
        where = f"{w.name} {kind} at write {n}/{total}"
        try:
            assert crashed, f"{where}: the workload did not reach write {n}"
            got = check_consistent(work, w, st, where)
        except AssertionError as exc:
            figs.failures.append(str(exc))
            if stop_on_failure:
                raise
            continue
        figs.survived += 1
        figs.leaked += got["leaks"]
        figs.window += got["window"]
    shutil.rmtree(work, ignore_errors=True)
    return figs


#: Crash points tried per workload in the default run (all of them with -m slow).
DEFAULT_POINTS = 60


def report(figs: Figures) -> None:
    """Print the figures (``-s`` shows them) and append them to $VIRTKIT_FIGURES, if set."""
    print(figs.line())
    out = os.environ.get("VIRTKIT_FIGURES")
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            row = {k: v for k, v in vars(figs).items() if k != "failures"}
            fh.write(json.dumps(row) + "\n")


def run_sweep(name: str, kind: str, tmp_path: Path, limit: int | None) -> Figures:
    """Sweep one workload and fail with every broken crash point listed."""
    figs = sweep(WORKLOADS[name], tmp_path, kind, limit, stop_on_failure=False)
    report(figs)
    assert figs.tried > 0
    assert not figs.failures, (
        f"{len(figs.failures)} of {figs.tried} crash points broke {name} ({kind}):\n"
        + "\n---\n".join(f[:1500] for f in figs.failures[:5])
    )
    assert figs.survived == figs.tried
    return figs

#!/usr/bin/env python3
"""Image engine benchmark: virtkit side by side with qemu-img on the same files.

Measures, in one run:

* raw -> qcow2 convert of a 1 GiB half-allocated raw image;
* qcow2 -> raw convert of the resulting image;
* compressed convert (raw -> qcow2 with zlib compression);
* VMDK and VHD: streamOptimized VMDK and fixed VHD written from raw, and
  monolithicSparse/streamOptimized VMDK and dynamic VHD read into raw;
* VHDX and VDI: dynamic VHDX written from raw, and dynamic/fixed VHDX and
  dynamic/static VDI read into raw;
* 4 KiB random reads and writes on a qcow2 image through the virtkit API vs
  the same offsets through ``qemu-io`` (commands fed on stdin, process start-up
  subtracted).

Each line prints the virtkit figure, the qemu-img/qemu-io figure and the ratio
virtkit/qemu (time ratio: above 1 means virtkit is slower). It is a script,
not a test; nothing asserts on time.

The rows of the performance table (docs/performance.rst) are measured the
way the table states them: every convert against ``qemu-img convert -t
writeback`` (plain ``qemu-img convert`` never flushes its output, virtkit's
convert always does), both sides timed as whole operations including their
final flush; 4 KiB allocating writes (one per new cluster) against
``qemu-img bench -w`` (process start-up subtracted), 4 KiB random writes
against ``qemu-io``. ``--runs N`` repeats everything and ends with the
median ratio of each row.

Usage::

    .venv/bin/python benchmarks/images.py [--size 1G] [--ops 20000] [--dir /var/tmp]
    .venv/bin/python benchmarks/images.py --runs 5 --only-table
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import virtkit.images
from virtkit.images.sizes import format_size, parse_size

MiB = 1 << 20


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpu() -> float:
    """CPU seconds used so far by this process (all threads) and its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds): CPU time does not depend on how busy the machine is."""
    c0 = _cpu()
    wall = _timed(fn)
    return wall, _cpu() - c0


def _run(*argv: str | Path, stdin: bytes | None = None) -> None:
    subprocess.run([str(a) for a in argv], input=stdin, check=True, capture_output=True)


def make_source(path: Path, size: int) -> None:
    """A raw image whose every other 1 MiB is filled with semi-compressible data."""
    rng = random.Random(42)
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(512)]
    with virtkit.images.create(path, size, format="raw") as img:
        for i, pos in enumerate(range(0, size, 2 * MiB)):
            rng.seed(i)
            text = b" ".join(rng.choice(words) for _ in range(MiB // 6))
            img.write(pos, (text + rng.randbytes(64 * 1024))[:MiB])


#: Row name -> the ratio of each run (for the medians of ``--runs``).
RATIOS: dict[str, list[float]] = {}


def _report(
    name: str, ours: float, theirs: float, unit: str = "s", cpu: tuple[float, float] | None = None
) -> None:
    """Print a row; ``cpu``: the CPU seconds of each side, printed as a second ratio."""
    ratio = ours / theirs if theirs else float("inf")
    RATIOS.setdefault(name, []).append(ratio)
    extra = ""
    if cpu is not None:
        cpu_ratio = cpu[0] / cpu[1] if cpu[1] else float("inf")
        RATIOS.setdefault(f"{name} (cpu s)", []).append(cpu_ratio)
        extra = f"   cpu {cpu[0]:.2f}/{cpu[1]:.2f} s = {cpu_ratio:.2f}"
    print(f"{name:<38} virtkit {ours:9.3f} {unit}   qemu {theirs:9.3f} {unit}   "
          f"ratio {ratio:6.2f}{extra}", flush=True)  # fmt: skip


def bench_convert(work: Path, src: Path) -> None:
    """The three convert figures."""
    ours_q = work / "ours.qcow2"
    theirs_q = work / "theirs.qcow2"
    t_ours, c_ours = _cpu_timed(lambda: virtkit.images.convert(src, ours_q, format="qcow2"))
    t_theirs, c_theirs = _cpu_timed(
        lambda: _run("qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", src,
                     theirs_q)
    )  # fmt: skip
    _report("convert raw -> qcow2", t_ours, t_theirs, cpu=(c_ours, c_theirs))
    _run("qemu-img", "compare", src, ours_q)
    _run("qemu-img", "check", ours_q)  # the output is a valid image, every run

    ours_r = work / "ours.raw"
    theirs_r = work / "theirs.raw"
    t_ours = _timed(lambda: virtkit.images.convert(ours_q, ours_r, format="raw"))
    t_theirs = _timed(
        lambda: _run("qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "raw",
                     theirs_q, theirs_r)
    )  # fmt: skip
    _report("convert qcow2 -> raw", t_ours, t_theirs)
    _run("qemu-img", "compare", src, ours_r)
    for p in (ours_r, theirs_r):
        p.unlink()

    ours_c = work / "ours-c.qcow2"
    theirs_c = work / "theirs-c.qcow2"
    t_ours, c_ours = _cpu_timed(
        lambda: virtkit.images.convert(src, ours_c, format="qcow2", compress=True)
    )
    t_theirs, c_theirs = _cpu_timed(
        lambda: _run("qemu-img", "convert", "-t", "writeback", "-c", "-f", "raw", "-O", "qcow2",
                     src, theirs_c)
    )  # fmt: skip
    _report("convert raw -> qcow2 compressed", t_ours, t_theirs, cpu=(c_ours, c_theirs))
    size_ours, size_theirs = os.path.getsize(ours_c), os.path.getsize(theirs_c)
    RATIOS.setdefault("  compressed size", []).append(size_ours / size_theirs)
    ratio = size_ours / size_theirs
    print(f"{'  compressed sizes':<38} virtkit {format_size(size_ours):>11}   "
          f"qemu {format_size(size_theirs):>11}   ratio {ratio:6.3f}")  # fmt: skip
    _run("qemu-img", "compare", src, ours_c)
    _run("qemu-img", "check", ours_c)
    for p in (ours_c, theirs_c, theirs_q):
        p.unlink()


def bench_allocating_writes(work: Path, ops: int) -> None:
    """4 KiB writes each allocating a new 64 KiB cluster: virtkit vs ``qemu-img bench -w``.

    Both start from an empty qcow2 image (``qemu-img create``, 64 KiB
    clusters) whose size gives every request a cluster of its own (``-S
    64k``); both sides are whole runs including open and the final flush
    (qemu-img bench's start-up, timed with one request, is subtracted).
    """
    cluster = 64 * 1024
    size = ops * cluster
    block = b"\xa5" * 4096
    a, b = work / "alloc-a.qcow2", work / "alloc-b.qcow2"
    for p in (a, b):
        _run("qemu-img", "create", "-f", "qcow2", p, str(size))

    def ours() -> None:
        with virtkit.images.open(a, writable=True) as img:
            for i in range(ops):
                img.write(i * cluster, block)

    argv: list[str | Path] = ["qemu-img", "bench", "-f", "qcow2", "-w", "--pattern=165", "-d",
                              "1", "-s", "4k", "-S", str(cluster)]  # fmt: skip
    base = work / "alloc-base.qcow2"
    _run("qemu-img", "create", "-f", "qcow2", base, str(size))
    t_base, c_base = _cpu_timed(lambda: _run(*argv, "-c", "1", base))
    t_ours, c_ours = _cpu_timed(ours)
    t_theirs, c_theirs = _cpu_timed(lambda: _run(*argv, "-c", str(ops), b))
    _report(
        "4k allocating writes vs qemu-img bench",
        ops / t_ours,
        ops / (t_theirs - t_base),
        "op/s",
        cpu=(c_ours, c_theirs - c_base),
    )
    _run("qemu-img", "check", a)
    _run("qemu-img", "compare", a, b)
    for p in (a, b, base):
        p.unlink()


def bench_random_io(work: Path, image: Path, ops: int) -> None:
    """4 KiB I/O on a qcow2 image: virtkit API vs qemu-io and qemu-img bench, same offsets.

    Random offsets are compared with ``qemu-io`` fed the same commands on stdin
    (its per-command parsing and printing is part of its figure); strided
    offsets (``qemu-img bench -S``: step 1 MiB + 4 KiB, wrapping modulo the
    size, so every request lands in a different cluster) are compared with
    ``qemu-img bench``, which has no per-request overhead beyond QEMU's own.
    Writes start from identical copies of the image.
    """
    with virtkit.images.open(image) as img:
        size = img.virtual_size
    rng = random.Random(7)
    random_offsets = [rng.randrange(size // 4096) * 4096 for _ in range(ops)]
    step = MiB + 4096
    strided = [(i * step) % size for i in range(ops)]
    block = b"\xa5" * 4096  # the pattern qemu-io -P / qemu-img bench --pattern write

    def ours(path: Path, offsets: list[int], write: bool) -> tuple[float, float]:
        def run() -> None:
            with virtkit.images.open(path, writable=write) as img:
                if write:
                    for off in offsets:
                        img.write(off, block)
                else:
                    for off in offsets:
                        img.read(off, 4096)

        return _cpu_timed(run)

    def minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        return a[0] - b[0], a[1] - b[1]

    def qemu_io(path: Path, offsets: list[int], write: bool) -> tuple[float, float]:
        cmd = "write -P 0xa5" if write else "read"
        script = "".join(f"{cmd} {off} 4k\n" for off in offsets).encode()
        argv: list[str | Path] = ["qemu-io", "-f", "qcow2"]
        if not write:
            argv.append("-r")
        base = _cpu_timed(lambda: _run(*argv, path, stdin=b""))
        return minus(_cpu_timed(lambda: _run(*argv, path, stdin=script)), base)

    def qemu_bench(path: Path, write: bool) -> tuple[float, float]:
        argv: list[str | Path] = ["qemu-img", "bench", "-f", "qcow2", "-c", str(ops), "-d", "1",
                                  "-s", "4k", "-S", str(step)]  # fmt: skip
        if write:
            argv += ["-w", "--pattern=165"]
        base = _cpu_timed(lambda: _run(*argv[:4], "-c", "1", *argv[6:], path))
        return minus(_cpu_timed(lambda: _run(*argv, path)), base)

    for write in (False, True):
        kind = "writes" if write else "reads"
        a, b = work / "a.qcow2", work / "b.qcow2"
        shutil.copy(image, a)
        shutil.copy(image, b)
        (t_ours, c_ours), (t_theirs, c_theirs) = (
            ours(a, random_offsets, write),
            qemu_io(b, random_offsets, write),
        )
        _report(f"4k random {kind} vs qemu-io", ops / t_ours, ops / t_theirs, "op/s",
                cpu=(c_ours, c_theirs))  # fmt: skip
        if write:
            _run("qemu-img", "compare", a, b)
        shutil.copy(image, a)
        shutil.copy(image, b)
        (t_ours, c_ours), (t_theirs, c_theirs) = ours(a, strided, write), qemu_bench(b, write)
        _report(f"4k strided {kind} vs qemu-img bench", ops / t_ours, ops / t_theirs, "op/s",
                cpu=(c_ours, c_theirs))  # fmt: skip
        _run("qemu-img", "check", a)
        if write:
            _run("qemu-img", "compare", a, b)
        a.unlink()
        b.unlink()


def bench_vmdk_vpc(work: Path, src: Path) -> None:
    """VMDK and VHD: write (convert from raw) and read (convert to raw), virtkit vs qemu-img."""
    convert = virtkit.images.convert
    writes: list[tuple[str, str, list[str], dict[str, Any]]] = [
        ("vmdk", "streamOptimized", ["-o", "subformat=streamOptimized"], {}),
        ("vpc", "fixed", ["-o", "subformat=fixed,force_size=on"],
         {"subformat": "fixed", "force_size": True}),
    ]  # fmt: skip
    for fmt, sub, qopts, vopts in writes:
        ours, theirs = work / f"ours.{fmt}", work / f"theirs.{fmt}"
        t_ours = _timed(partial(convert, src, ours, format=fmt, **vopts))
        t_theirs = _timed(partial(_run, "qemu-img", "convert", "-f", "raw", "-O", fmt, *qopts,
                                  src, theirs))  # fmt: skip
        _report(f"convert raw -> {fmt} {sub}", t_ours, t_theirs)
        _run("qemu-img", "compare", "-F", fmt, src, ours)
        for p in (ours, theirs):
            p.unlink()
    reads = [("vmdk", "monolithicSparse"), ("vmdk", "streamOptimized"), ("vpc", "dynamic")]
    for fmt, sub in reads:
        image = work / f"in.{fmt}"
        _run("qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", f"subformat={sub}", src, image)
        ours_r, theirs_r = work / "ours.raw", work / "theirs.raw"
        t_ours = _timed(partial(convert, image, ours_r, format="raw", src_format=fmt))
        t_theirs = _timed(partial(_run, "qemu-img", "convert", "-f", fmt, "-O", "raw", image,
                                  theirs_r))  # fmt: skip
        _report(f"convert {fmt} {sub} -> raw", t_ours, t_theirs)
        _run("qemu-img", "compare", "-f", "raw", "-F", "raw", theirs_r, ours_r)
        for p in (image, ours_r, theirs_r):
            p.unlink()


def bench_vhdx_vdi(work: Path, src: Path) -> None:
    """VHDX and VDI: dynamic VHDX written from raw; VHDX and VDI read into raw; vs qemu-img."""
    convert = virtkit.images.convert
    ours, theirs = work / "ours.vhdx", work / "theirs.vhdx"
    t_ours = _timed(partial(convert, src, ours, format="vhdx"))
    t_theirs = _timed(partial(_run, "qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o",
                              "subformat=dynamic", src, theirs))  # fmt: skip
    _report("convert raw -> vhdx dynamic", t_ours, t_theirs)
    _run("qemu-img", "compare", "-F", "vhdx", src, ours)
    for p in (ours, theirs):
        p.unlink()
    reads = [("vhdx", "subformat=dynamic"), ("vhdx", "subformat=fixed"), ("vdi", "static=off"),
             ("vdi", "static=on")]  # fmt: skip
    for fmt, opt in reads:
        image = work / f"in.{fmt}"
        _run("qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", opt, src, image)
        ours_r, theirs_r = work / "ours.raw", work / "theirs.raw"
        t_ours = _timed(partial(convert, image, ours_r, format="raw", src_format=fmt))
        t_theirs = _timed(partial(_run, "qemu-img", "convert", "-f", fmt, "-O", "raw", image,
                                  theirs_r))  # fmt: skip
        _report(f"convert {fmt} {opt.split('=')[1]} -> raw".replace("on ->", "static ->")
                .replace("off ->", "dynamic ->"), t_ours, t_theirs)  # fmt: skip
        _run("qemu-img", "compare", "-f", "raw", "-F", "raw", theirs_r, ours_r)
        for p in (image, ours_r, theirs_r):
            p.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description="virtkit vs qemu-img image benchmark")
    parser.add_argument("--size", default="1G", help="virtual size of the source image")
    parser.add_argument("--ops", type=int, default=20000, help="random 4 KiB operations")
    parser.add_argument("--dir", default=None, help="where to put the scratch images")
    parser.add_argument("--runs", type=int, default=1, help="repeat and print median ratios")
    parser.add_argument(
        "--only-table", action="store_true", help="only the rows of the performance table (qcow2)"
    )
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="vk-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        src = work / "src.raw"
        print(f"making a {format_size(size)} half-allocated raw image ...", flush=True)
        make_source(src, size)
        for run in range(args.runs):
            print(f"--- run {run + 1} of {args.runs}")
            print(f"{'':<38} ratio = virtkit/qemu: for seconds lower is better, for op/s higher")
            bench_convert(work, src)
            if not args.only_table:
                bench_vmdk_vpc(work, src)
                bench_vhdx_vdi(work, src)
            bench_allocating_writes(work, min(args.ops, 16384))
            bench_random_io(work, work / "ours.qcow2", args.ops)
            (work / "ours.qcow2").unlink()
    if args.runs > 1:
        print(f"--- median ratio (virtkit/qemu) of {args.runs} runs")
        for name, ratios in RATIOS.items():
            listed = " ".join(f"{r:.2f}" for r in ratios)
            print(f"{name:<38} median {statistics.median(ratios):6.2f}   ({listed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

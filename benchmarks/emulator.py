"""Emulator speed, next to QEMU.

Run: ``.venv/bin/python benchmarks/emulator.py`` (needs nasm; QEMU for the
comparisons). Prints, in one run:

1. time from ``guest.start()`` to the first serial line of the hello boot
   sector: the emulator, the qemu backend (TCG), and a bare
   ``qemu-system-x86_64 -accel tcg -display none -serial stdio`` process;
2. guest instructions per second on a tight loop (``dec ecx; jnz``), on the
   emulator with the wall clock and with the virtual clock, and on bare QEMU
   TCG;
2b. whether a later unicorn engine in the same process runs slower than
   the first (virtkit guests one after another, and bare unicorn), as
   ratios over several fresh processes;
3. full snapshot and revert times of a 64 MiB guest, with its RAM mostly
   zero and with all of it written: a first snapshot, a second after a
   little guest activity (incremental), and reverts to each, medians of
   several fresh processes; and what the copy-on-write dirty tracking costs
   the guest: rewriting all 64 MiB right after a snapshot vs before one;
4. time from ``start()`` to ``/init``'s ready line and to the busybox
   shell prompt (the same kernel, initramfs and command line, the tests'
   ``LINUX_CMDLINE``) on the
   emulator (wall and virtual clock) and on the qemu backend (TCG), as
   ratios, and the emulator's guest MIPS over the boot; ``wall`` and
   ``virtual`` decompress the kernel on the host (the default), and
   ``decompressor`` runs the bzImage's own decompressor in the emulator
   (wall clock) for comparison; plus the host's cold unpack time.

Each emulator measurement runs in a fresh process, so one measurement's
unicorn engine cannot slow the next.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# benchmarks/qemu.py would shadow the qemu package (qemu.qmp) for the qemu backend
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import virtkit  # noqa: E402 - after the path fix above
from virtkit import images  # noqa: E402
from virtkit.model import Disk, Machine  # noqa: E402
from virtkit.testing import guests  # noqa: E402

RUNS = 5
ENGINE_ROUNDS = 5
LOOP_ITERATIONS = 300_000_000  # two instructions each
SPIN = f"""
    mov ecx, {LOOP_ITERATIONS}
.spin:
    dec ecx
    jnz .spin
    PRINT done
    POWER_OFF
done: db "done", 13, 10, 0
"""
# enter protected mode and write a pattern over all RAM above 1 MiB, then idle
DIRTY = """
    cli
    in al, 0x92
    or al, 2
    and al, 0xFE
    out 0x92, al
    lgdt [gdtr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:pm
bits 32
pm:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov edi, 0x100000
    mov ecx, (64 * 1024 * 1024 - 0x100000) / 4
    mov eax, 0x5A5AA5A5
.fill:
    stosd
    inc eax
    dec ecx
    jnz .fill
    mov dx, 0x3F8
    mov al, '!'
    out dx, al
.idle:
    hlt
    jmp .idle
bits 16
align 8
gdt: dq 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
gdtr: dw 23
      dd gdt
"""


# like DIRTY, but each pass fills RAM above 1 MiB with one value (rep stosd: the
# pass costs little besides the page faults), prints '!', waits for a serial
# byte, and starts the next pass with the next value
REFILL = DIRTY.replace(
    """    mov edi, 0x100000
    mov ecx, (64 * 1024 * 1024 - 0x100000) / 4
    mov eax, 0x5A5AA5A5
.fill:
    stosd
    inc eax
    dec ecx
    jnz .fill""",
    """    mov eax, 0x5A5AA5A5
.pass:
    mov edi, 0x100000
    mov ecx, (64 * 1024 * 1024 - 0x100000) / 4
    rep stosd
    inc eax
    mov ebx, eax""",
).replace(
    """    out dx, al
.idle:
    hlt
    jmp .idle""",
    """    out dx, al
    mov dx, 0x3FD
.wait:
    in al, dx
    test al, 1
    jz .wait
    mov dx, 0x3F8
    in al, dx
    mov eax, ebx
    jmp .pass""",
)
SNAPSHOT_RUNS = 5


def sector_disk(folder: Path, name: str, body: str | None = None) -> Path:
    """A raw disk with a named test guest, or an ad-hoc one from ``body``."""
    path = folder / f"{name}.raw"
    if body is None:
        return guests.write_disk(path, name)
    text = (
        'bits 16\norg 0x7C00\n    jmp start\n%include "common.inc"\nstart:\n    GUEST_START\n'
        + body
        + "\nBOOT_SIGNATURE\n"
    )
    with images.create(path, size="1MiB", format="raw") as image:
        image.write(0, guests.assemble(text, stem=name))
    return path


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def first_line_backend(backend: str, disk: Path, root: Path, **options: object) -> list[float]:
    """start() -> first serial line, RUNS times, on a virtkit backend."""
    times = []
    with virtkit.connect(backend, root=root, **options) as hv:
        for i in range(RUNS):
            copy = root / f"{backend}-{i}.raw"
            shutil.copyfile(disk, copy)
            guest = hv.define(Machine(name=f"b{i}", memory="32MiB", disks=(Disk(str(copy)),)))
            begin = time.perf_counter()
            guest.start()
            guest.console.expect("\r\n", timeout=60)
            times.append(time.perf_counter() - begin)
            guest.wait(timeout=60)
            hv.undefine(guest)
    return times


def qemu_argv(disk: Path) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-m",
        "32M",
        "-serial",
        "stdio",
        "-drive",
        f"file={disk},format=raw",
    ]


def first_line_bare_qemu(disk: Path) -> list[float]:
    """Popen -> first serial line of a bare QEMU TCG process, RUNS times."""
    times = []
    for _ in range(RUNS):
        begin = time.perf_counter()
        proc = subprocess.Popen(qemu_argv(disk), stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()
        times.append(time.perf_counter() - begin)
        proc.wait(timeout=60)
        proc.stdout.close()
    return times


def loop_emulator(disk: Path, root: Path, clock: str) -> float:
    """Seconds the emulator takes for the spin loop (boot excluded via the hello time)."""
    with virtkit.connect("emulator", root=root, clock=clock) as hv:
        guest = hv.define(Machine(name=f"spin-{clock}", memory="32MiB", disks=(Disk(str(disk)),)))
        begin = time.perf_counter()
        guest.start()
        guest.wait(timeout=600)
        return time.perf_counter() - begin


def loop_bare_qemu(disk: Path) -> float:
    begin = time.perf_counter()
    subprocess.run(qemu_argv(disk), stdout=subprocess.DEVNULL, check=True, timeout=600)
    return time.perf_counter() - begin


def snapshot_times(disk: Path, root: Path, dirty: bool) -> dict[str, float]:
    """Full snapshot and revert times (seconds) and state size (bytes) of a 64 MiB guest.

    ``first``: the first snapshot (all non-zero RAM stored); ``second``: another
    one after a little guest activity (only changed chunks stored);
    ``revert_recent``: back to the second after a little more activity (only
    what changed is copied back); ``revert_older``: back to the first.
    """
    with virtkit.connect("emulator", root=root) as hv:
        copy = root / f"snap-{dirty}.raw"
        shutil.copyfile(disk, copy)
        guest = hv.define(
            Machine(name=f"snap-{int(dirty)}", memory="64MiB", disks=(Disk(str(copy)),))
        )
        guest.start()
        guest.console.expect("!" if dirty else "count 1", timeout=600)
        out: dict[str, float] = {}
        begin = time.perf_counter()
        guest.snapshot("first")
        out["first"] = time.perf_counter() - begin
        if not dirty:
            guest.console.expect("count 2", timeout=600)
        begin = time.perf_counter()
        guest.snapshot("second")
        out["second"] = time.perf_counter() - begin
        if not dirty:
            guest.console.expect("count 3", timeout=600)
        begin = time.perf_counter()
        guest.revert("second")
        out["revert_recent"] = time.perf_counter() - begin
        begin = time.perf_counter()
        guest.revert("first")
        out["revert_older"] = time.perf_counter() - begin
        state = guest.snapshot_dir("first").parent.parent
        out["size"] = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
        guest.kill()
        return out


def refill_times(disk: Path, root: Path) -> dict[str, float]:
    """Seconds the REFILL guest takes to write all 64 MiB again: ``plain`` (median of
    passes before any snapshot and after the pages were already copied) and ``cow``
    (the pass right after a snapshot, where each page's first write is a
    copy-on-write fault)."""
    with virtkit.connect("emulator", root=root) as hv:
        copy = root / "refill.raw"
        shutil.copyfile(disk, copy)
        guest = hv.define(Machine(name="refill", memory="64MiB", disks=(Disk(str(copy)),)))
        guest.start()
        guest.console.expect("!", timeout=600)

        def one_pass() -> float:
            begin = time.perf_counter()
            guest.console.write(b"x")
            guest.console.expect("!", timeout=600)
            return time.perf_counter() - begin

        plain = [one_pass(), one_pass()]
        guest.snapshot("tracked")
        cow = one_pass()
        plain.append(one_pass())
        # the kernel's share alone: one byte per page written from here, right
        # after a snapshot (a copy-on-write fault each) and again (no fault)
        guest.pause()
        guest.snapshot("touch")
        pc = guest._pc  # type: ignore[attr-defined]
        base = pc.cpu._ram_ptr
        touch = []
        for _ in range(2):
            begin = time.perf_counter()
            for page in range(256, 16384):
                ctypes.memset(base + page * 4096, 1, 1)
            touch.append(time.perf_counter() - begin)
        guest.kill()
        return {
            "plain": statistics.median(plain),
            "cow": cow,
            "touch_cow": touch[0],
            "touch_again": touch[1],
        }


def linux_boot(backend: str, initrd: Path, root: Path, **options: object) -> dict[str, float]:
    """start() -> /init's ready line (``banner``) -> the shell prompt, in seconds, with the
    tests' command line (quiet: the kernel prints no banner); on the emulator also the
    guest instructions executed up to the prompt (``instructions``)."""
    from virtkit import KernelBoot  # noqa: PLC0415 - only this measurement needs it
    from virtkit.testing.linux import (  # noqa: PLC0415
        LINUX_CMDLINE,
        PROMPT,
        READY_MARKER,
        fetch_kernel,
    )

    kernel = fetch_kernel()
    boot = KernelBoot(kernel=kernel.vmlinuz, initrd=initrd, append=LINUX_CMDLINE)
    with virtkit.connect(backend, root=root, **options) as hv:
        guest = hv.define(Machine(name="linux", memory="256MiB", kernel=boot))
        begin = time.perf_counter()
        guest.start()
        guest.console.expect(READY_MARKER, timeout=900)
        banner = time.perf_counter() - begin
        guest.console.expect(PROMPT, timeout=1800)
        prompt = time.perf_counter() - begin
        pc = getattr(guest, "_pc", None)
        executed = float(pc.executed) if pc is not None else 0.0
        guest.kill()
    return {"banner": banner, "prompt": prompt, "instructions": executed}


def engines_in_one_process(disk: Path, root: Path, engines: int = 3) -> list[float]:
    """Seconds of the spin guest on ``engines`` emulator guests run one after another
    in this one process (each a new unicorn engine; the previous one is gone)."""
    return [loop_emulator(disk, root / f"e{i}", "wall") for i in range(engines)]


def bare_unicorn_engines(instructions: int) -> list[float]:
    """The same question without virtkit: a ``dec ecx; jnz`` loop on a fresh bare
    ``unicorn.Uc`` (32-bit, 64 MiB mapped), then a second engine while the first
    is alive, then the first again (seconds each)."""
    from unicorn import x86_const as x86  # noqa: PLC0415 - only this measurement needs it

    from virtkit.backends.emulator.cpu import unicorn  # noqa: PLC0415 - Any-typed module

    code = b"\xff\xc9\x75\xfc\xf4"  # dec ecx; jnz .-2; hlt

    def engine() -> Any:
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
        uc.mem_map(0, 64 * 1024 * 1024)
        uc.mem_write(0x1000, code)
        return uc

    def run(uc: Any) -> float:
        uc.reg_write(x86.UC_X86_REG_ECX, instructions // 2)
        begin = time.perf_counter()
        uc.emu_start(0x1000, 0x1004)
        return time.perf_counter() - begin

    first = engine()
    times = [run(first)]
    second = engine()
    times += [run(second), run(first)]
    return times


def in_fresh_process(measure: str, *args: str) -> object:
    """Run one measurement in a new Python process (one unicorn engine per process) -> result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", measure, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_one(measure: str, args: list[str]) -> object:
    """The body of one fresh-process measurement (see :func:`in_fresh_process`)."""
    disk, root = Path(args[0]), Path(args[1])
    if measure == "first-line":
        return first_line_backend("emulator", disk, root)
    if measure in ("loop-wall", "loop-virtual"):
        return loop_emulator(disk, root, measure.removeprefix("loop-"))
    if measure in ("snapshot-counter", "snapshot-dirty"):
        return snapshot_times(disk, root, measure == "snapshot-dirty")
    if measure == "refill":
        return refill_times(disk, root)
    if measure == "engines":
        return engines_in_one_process(disk, root)
    if measure == "bare-unicorn":
        return bare_unicorn_engines(int(args[2]))
    if measure in ("linux-wall", "linux-virtual"):
        return linux_boot("emulator", disk, root, clock=measure.removeprefix("linux-"))
    if measure == "linux-decompressor":  # the bzImage's own decompressor (wall clock)
        from virtkit.backends.emulator import machine  # noqa: PLC0415

        machine.UNPACK_KERNEL = False
        return linux_boot("emulator", disk, root, clock="wall")
    if measure == "unpack":  # the host's share: decompress + parse the kernel, cold
        from virtkit.backends.emulator.bootparams import BzImage  # noqa: PLC0415
        from virtkit.testing.linux import fetch_kernel  # noqa: PLC0415

        data = fetch_kernel().vmlinuz.read_bytes()
        begin = time.perf_counter()
        BzImage.parse(data).unpacked()
        return time.perf_counter() - begin
    raise SystemExit(f"unknown measurement {measure!r}")


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>14}  {note}")


def main() -> int:
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    with tempfile.TemporaryDirectory(prefix="virtkit-bench-") as tmp:
        work = Path(tmp)
        hello = sector_disk(work, "hello")
        spin = sector_disk(work, "spin", SPIN)
        dirty = sector_disk(work, "dirty", DIRTY)
        counter = sector_disk(work, "counter")
        refill = sector_disk(work, "refill", REFILL)
        print("every emulator measurement runs in a fresh process (one unicorn engine each)")

        print(f"1. start() to first serial line (hello guest, median of {RUNS})")
        samples = in_fresh_process("first-line", str(hello), str(work / "e"))
        assert isinstance(samples, list)
        emu = median_ms(samples)
        row("emulator", f"{emu:.1f} ms")
        if have_qemu:
            bare = median_ms(first_line_bare_qemu(hello))
            row("bare qemu-system-x86_64 -accel tcg", f"{bare:.1f} ms", f"{bare / emu:.0f}x emu")
            try:
                qb = median_ms(first_line_backend("qemu", hello, work / "q", accel="tcg"))
                row("qemu backend (TCG, QMP)", f"{qb:.1f} ms", f"{qb / emu:.0f}x emu")
            except virtkit.VirtkitError as exc:
                row("qemu backend", "unavailable", str(exc).splitlines()[0])

        print(f"2. tight loop: {2 * LOOP_ITERATIONS / 1e6:.0f}M guest instructions")
        instructions = 2 * LOOP_ITERATIONS
        results: dict[str, float] = {}
        runners: list[tuple[str, Callable[[], float]]] = [
            (
                "emulator, wall clock",
                lambda: float(in_fresh_process("loop-wall", str(spin), str(work / "lw"))),  # type: ignore[arg-type]
            ),
            (
                "emulator, virtual clock",
                lambda: float(in_fresh_process("loop-virtual", str(spin), str(work / "lv"))),  # type: ignore[arg-type]
            ),
        ]
        if have_qemu:
            runners.append(("bare qemu-system-x86_64 -accel tcg", lambda: loop_bare_qemu(spin)))
        for label, run in runners:
            seconds = run()
            results[label] = seconds
            mips = instructions / seconds / 1e6
            row(label, f"{mips:,.0f} MIPS", f"({seconds:.2f} s incl. boot)")
        base = results["emulator, wall clock"]
        for label, seconds in results.items():
            if label != "emulator, wall clock":
                row(f"  {label}", f"{seconds / base:.2f}x", "the wall-clock emulator's time")

        print(f"2b. later unicorn engines in one process ({ENGINE_ROUNDS} fresh processes each)")
        # the issue saw a second engine in one process run ~2x slower than the first;
        # measured here: the same within noise (see docs/performance.rst)
        small = sector_disk(work, "spin-small", SPIN.replace(str(LOOP_ITERATIONS), "30000000"))
        for label, measure, args in (
            ("virtkit guests, engine k / engine 1", "engines", [str(small), str(work / "en")]),
            ("bare unicorn: 2nd engine, 1st again", "bare-unicorn", ["-", "-", "40000000"]),
        ):
            ratios: list[list[float]] = []
            for _ in range(ENGINE_ROUNDS):
                got = in_fresh_process(measure, *args)
                assert isinstance(got, list)
                ratios.append([t / got[0] for t in got[1:]])
            medians = [statistics.median(r[i] for r in ratios) for i in range(len(ratios[0]))]
            lows = [min(r[i] for r in ratios) for i in range(len(ratios[0]))]
            highs = [max(r[i] for r in ratios) for i in range(len(ratios[0]))]
            row(
                label,
                " ".join(f"{m:.2f}" for m in medians),
                "range " + ", ".join(f"{a:.2f}-{b:.2f}" for a, b in zip(lows, highs, strict=True)),
            )

        print(
            "3. full snapshots and reverts, 64 MiB guest (RAM stored incrementally; "
            f"median of {SNAPSHOT_RUNS} fresh processes, range)"
        )
        for label, disk, kind in (
            ("mostly-zero RAM (counter guest)", counter, "counter"),
            ("all RAM written", dirty, "dirty"),
        ):
            runs: list[dict[str, float]] = []
            for i in range(SNAPSHOT_RUNS):
                got = in_fresh_process(f"snapshot-{kind}", str(disk), str(work / f"s-{kind}-{i}"))
                assert isinstance(got, dict)
                runs.append(got)

            def ms(key: str, runs: list[dict[str, float]] = runs) -> tuple[str, str]:
                values = [r[key] * 1000 for r in runs]
                spread = f"{min(values):.1f}-{max(values):.1f}"
                return f"{statistics.median(values):.1f} ms", spread

            size = statistics.median(r["size"] for r in runs)
            print(f"  {label}: {size / 2**20:.1f} MiB of state for two snapshots")
            first, first_range = ms("first")
            second, second_range = ms("second")
            row("  first snapshot", first, first_range)
            row("  second snapshot, little changed", second, f"{second_range}; goal <= 15 ms")
            row("  revert to the second", *ms("revert_recent"))
            row("  revert to the first", *ms("revert_older"))
        passes = [in_fresh_process("refill", str(refill), str(work / f"r-{i}")) for i in range(3)]
        plain = statistics.median(float(p["plain"]) for p in passes if isinstance(p, dict))
        cow = statistics.median(float(p["cow"]) for p in passes if isinstance(p, dict))
        pages = (64 * 1024 * 1024 - 0x100000) // 4096
        fault = statistics.median(
            (float(p["touch_cow"]) - float(p["touch_again"])) / pages
            for p in passes
            if isinstance(p, dict)
        )
        row("  guest rewrites 63 MiB, untracked pages", f"{plain * 1000:.0f} ms")
        row("  the same right after a snapshot", f"{cow * 1000:.0f} ms", "copy-on-write faults")
        row("  first write to a page after a snapshot", f"{fault * 1e6:.1f} us", "kernel's share")

        linux_section(work, have_qemu)
    return 0


LINUX_ROUNDS = 3


def linux_section(work: Path, have_qemu: bool, rounds: int = LINUX_ROUNDS) -> None:
    """Section 4: the Linux boot on both emulator clocks and on the qemu backend (TCG),
    interleaved round by round (each emulator boot in a fresh process), so that a busy
    host slows all of them alike; the ratios are per round, then their median."""
    print(
        "4. Linux (Debian cloud kernel + test initramfs): start() to /init ready / prompt, "
        f"{rounds} interleaved rounds"
    )
    from virtkit.testing.linux import build_initramfs, fetch_kernel  # noqa: PLC0415

    initrd = build_initramfs(fetch_kernel(), work / "initrd.gz")
    runs: dict[str, list[dict[str, float]]] = {
        "wall": [],
        "virtual": [],
        "decompressor": [],
        "qemu": [],
    }
    for i in range(rounds):
        for name in ("wall", "qemu", "virtual", "decompressor"):
            if name == "qemu":
                if not have_qemu:
                    continue
                result: object = linux_boot("qemu", initrd, work / f"lq{i}", accel="tcg")
            else:
                result = in_fresh_process(f"linux-{name}", str(initrd), str(work / f"l{name}{i}"))
            assert isinstance(result, dict)
            runs[name].append({k: float(v) for k, v in result.items()})
            got = runs[name][-1]
            times = f"ready {got['banner']:6.1f} s  prompt {got['prompt']:6.1f} s"
            print(f"  round {i + 1}: {name:<8} {times}")
    # the virtual clock's count is exact and repeats; an uncounted wall-clock boot runs
    # about the same instructions (its timer interrupts land elsewhere)
    instructions = statistics.median(r["instructions"] for r in runs["virtual"])
    row("guest instructions to the prompt (virtual clock)", f"{instructions / 1e9:.2f} G")
    unpack = in_fresh_process("unpack", str(initrd), str(work / "unpack"))
    assert isinstance(unpack, float)
    row("host: decompress + parse the kernel (cold, in start())", f"{unpack:.2f} s")
    for name in ("wall", "virtual", "decompressor"):
        prompt = statistics.median(r["prompt"] for r in runs[name])
        ready = statistics.median(r["banner"] for r in runs[name])
        row(f"emulator ({name} clock): /init ready", f"{ready:.1f} s")
        note = "" if name == "virtual" else "(instructions from the virtual clock)"
        row(f"emulator ({name} clock): shell prompt", f"{prompt:.1f} s")
        if name != "decompressor":  # it runs more instructions than the count used here
            row(
                f"emulator ({name} clock): guest MIPS to the prompt",
                f"{instructions / prompt / 1e6:.0f}",
                note,
            )
        if runs["qemu"]:
            ratios = [
                e["prompt"] / q["prompt"] for e, q in zip(runs[name], runs["qemu"], strict=True)
            ]
            spread = ", ".join(f"{r:.1f}" for r in ratios)
            row(
                f"  emulator ({name}) / qemu, per round",
                f"{statistics.median(ratios):.2f}x",
                spread,
            )
    if runs["qemu"]:
        row(
            "qemu backend (TCG): /init ready",
            f"{statistics.median(r['banner'] for r in runs['qemu']):.1f} s",
        )
        row(
            "qemu backend (TCG): shell prompt",
            f"{statistics.median(r['prompt'] for r in runs['qemu']):.1f} s",
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        print(json.dumps(measure_one(sys.argv[2], sys.argv[3:])))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--linux":  # section 4 alone
        rounds = int(sys.argv[2]) if len(sys.argv) > 2 else LINUX_ROUNDS
        with tempfile.TemporaryDirectory(prefix="virtkit-bench-") as tmp:
            linux_section(Path(tmp), shutil.which("qemu-system-x86_64") is not None, rounds)
        sys.exit(0)
    sys.exit(main())

"""Ending a slice from another thread: what unicorn's emu_stop breaks, and what slicestop.py does.

A hand-written 64-bit guest runs on a bare engine with the emulator's kind
of hooks (IN, OUT and SYSCALL first, then CPUID, RDTSC and RDTSCP, in the
machine's order). Each turn of its loop executes every hooked instruction;
the hooks answer with the guest's own turn counter (R12), so the guest sees
a wrong value exactly when a hook was skipped, and it counts those in R14.
It also increments a memory counter with ``inc`` and takes and releases a
lock with ``cmpxchg``: an instruction run twice after a stop shows as a
counter ahead of the turn count, or as a lock found taken. A second thread
ends slices at random times while it runs; the device side (the OUT hook)
records every value written, which must be the turn numbers in order.
"""

from __future__ import annotations

import ctypes
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from unicorn import x86_const as x86

from virtkit.backends.emulator.cpu import UcError, unicorn
from virtkit.backends.emulator.instructions import _INSN_CFUNC
from virtkit.backends.emulator.slicestop import SliceStopper, StopFields, stop_fields
from virtkit.testing import guests

TURNS = 20_000
DATA = 0x3000  # the memory counter; the lock word at DATA + 8

GUEST = f"""
bits 64
org 0x1000
    xor r12d, r12d              ; turn
    xor r14d, r14d              ; answers that were not the hook's
    mov r13d, {TURNS}
turn:
    rdtsc
    cmp eax, r12d
    je .a
    inc r14
.a: rdtscp
    cmp eax, r12d
    je .b
    inc r14
.b: mov eax, 0x4000
    cpuid
    cmp eax, r12d
    je .c
    inc r14
.c: syscall
    cmp eax, r12d
    je .d
    inc r14
.d: in al, 0x81
    cmp al, r12b
    je .e
    inc r14
.e: inc qword [{DATA}]          ; must end equal to the turns
    xor eax, eax
    mov ecx, 1
    lock cmpxchg [{DATA + 8}], ecx ; take the lock: it must be free
    je .f
    add r14, 1000
.f: mov dword [{DATA + 8}], 0   ; release it
    mov eax, r12d
    out 0x80, al
    inc r12d
    dec r13d
    jnz turn
    hlt
    times 512-($-$$) db 0
"""


class _Bench:
    """A bare engine running GUEST with answering hooks."""

    def __init__(self) -> None:
        self.uc: Any = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc.mem_map(0, 0x10000)
        self.uc.mem_write(0x1000, guests.assemble(GUEST, stem="slicestop"))
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self.calls = dict.fromkeys(("in", "out", "syscall", "cpuid", "rdtsc", "rdtscp"), 0)
        self.written: list[int] = []
        uc = self.uc

        def turn() -> int:
            return int(uc.reg_read(x86.UC_X86_REG_R12)) & 0xFFFF_FFFF

        def on_in(_uc: Any, _port: int, _size: int, _data: Any) -> int:
            self.calls["in"] += 1
            return turn() & 0xFF

        def on_out(_uc: Any, _port: int, _size: int, value: int, _data: Any) -> None:
            self.calls["out"] += 1
            self.written.append(value)

        def on_syscall(_uc: Any, _data: Any) -> None:
            self.calls["syscall"] += 1
            uc.reg_write(x86.UC_X86_REG_RAX, turn())

        uc.hook_add(unicorn.UC_HOOK_INSN, on_in, None, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        uc.hook_add(unicorn.UC_HOOK_INSN, on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        self._keep: list[Any] = []
        for name, insn in (
            ("cpuid", x86.UC_X86_INS_CPUID),
            ("rdtsc", x86.UC_X86_INS_RDTSC),
            ("rdtscp", x86.UC_X86_INS_RDTSCP),
        ):
            callback = _INSN_CFUNC(self._answer(name, turn))
            self._keep.append(callback)
            uc._Uc__do_hook_add(unicorn.UC_HOOK_INSN, callback, 1, 0, ctypes.c_int(insn))

    def _answer(self, name: str, turn: Callable[[], int]) -> Callable[[Any, Any], int]:
        def callback(_handle: Any, _data: Any) -> int:
            self.calls[name] += 1
            self.uc.reg_write(x86.UC_X86_REG_RAX, turn())
            self.uc.reg_write(x86.UC_X86_REG_RDX, 0)
            return 1

        return callback

    def run(self, stop: Callable[[], None] | None) -> int:
        """Run to the hlt, ``stop`` called at random times from a thread; return the stops."""
        done = threading.Event()
        stops = 0

        def stopper() -> None:
            nonlocal stops
            rnd = random.Random(7)
            while not done.wait(rnd.random() * 0.0005):
                assert stop is not None
                stop()
                stops += 1

        thread = threading.Thread(target=stopper, daemon=True)
        if stop is not None:
            thread.start()
        rip = 0x1000
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline:
                try:
                    self.uc.emu_start(rip, 0)
                except UcError as exc:
                    if not SliceStopper.ran_out(exc):
                        raise
                rip = int(self.uc.reg_read(x86.UC_X86_REG_RIP))
                if int(self.uc.reg_read(x86.UC_X86_REG_R13)) == 0:
                    break
        finally:
            done.set()
            if stop is not None:
                thread.join()
        return stops

    def lost(self) -> dict[str, int]:
        """Hooks not called, by kind."""
        return {name: TURNS - calls for name, calls in self.calls.items() if calls != TURNS}

    def memory_counter(self) -> int:
        return int.from_bytes(self.uc.mem_read(DATA, 8), "little")


@pytest.fixture(scope="module")
def fields() -> StopFields:
    found = stop_fields()
    assert found is not None, "slicestop could not find unicorn's fields on this build"
    return found


def test_the_guest_is_exact_without_stops() -> None:
    bench = _Bench()
    assert bench.run(None) == 0
    assert bench.lost() == {}
    assert int(bench.uc.reg_read(x86.UC_X86_REG_R14)) == 0
    assert bench.memory_counter() == TURNS
    assert bench.written == [turn & 0xFF for turn in range(TURNS)]


def test_slicestop_stops_lose_no_hook_and_repeat_no_instruction(fields: StopFields) -> None:
    # How many stops land in one run depends on how often the stopping thread gets a
    # core (a loaded 2-core machine gave it 2 in a whole run): rounds go on, each one
    # checked exactly, until enough stops have been tried.
    stops = rounds = 0
    while stops < 100 and rounds < 200:
        bench = _Bench()
        stopper = SliceStopper(bench.uc, fields)
        stops += bench.run(stopper.post)
        rounds += 1
        assert bench.lost() == {}, f"round {rounds}"
        assert int(bench.uc.reg_read(x86.UC_X86_REG_R14)) == 0, f"round {rounds}"
        assert bench.memory_counter() == TURNS, f"round {rounds}"
        assert bench.written == [turn & 0xFF for turn in range(TURNS)], f"round {rounds}"
    assert stops >= 100, f"only {stops} stops landed in {rounds} rounds: nothing was shown"


@pytest.mark.slow
def test_unicorn_emu_stop_from_a_thread_loses_hooks_and_repeats_stores() -> None:
    """Why the machine does not use emu_stop from another thread (unicorn 2.1): over
    a few runs, stops make it skip hooks and run stores twice. Slow: it is about
    unicorn, and statistical (about one stop in 200 shows it)."""
    damage = 0
    for _ in range(5):
        bench = _Bench()
        stops = bench.run(bench.uc.emu_stop)
        assert stops >= 100
        damage += sum(bench.lost().values()) + abs(bench.memory_counter() - TURNS)
        damage += int(bench.uc.reg_read(x86.UC_X86_REG_R14))
    assert damage > 0


JUMP_TARGET = 0x1100
JUMPER = f"""
bits 64
org 0x1000
    int3                        ; the hook moves RIP to JUMP_TARGET (as delivering it does)
    times {JUMP_TARGET - 0x1001} db 0x90
    xor ecx, ecx                ; here once: a stop that went back here restarts the count
spin:
    inc qword [{DATA}]
    inc ecx
    cmp ecx, 3000000
    jne spin
    hlt
    times 512-($-$$) db 0
"""


def test_a_stop_after_a_hook_moved_rip_resumes_where_the_guest_is(fields: StopFields) -> None:
    """An exception hook's RIP write leaves unicorn's skip_sync_pc_on_exit set, and a
    later stop from outside must still resume where the guest is (a stale RIP would
    reset the loop's counter: the memory counter would run past the loop count).
    slicestop clears the flag with each stop; on this small loop unicorn happens to
    keep RIP current anyway (the test passes without the clearing too), in the Linux
    boots it did not: there the flag made uncounted boots derail (see slicestop.py)."""
    uc: Any = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, guests.assemble(JUMPER, stem="slicestop-jump"))
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])

    def jump(engine: Any, _vector: int, _data: Any) -> None:
        engine.reg_write(x86.UC_X86_REG_RIP, JUMP_TARGET)

    uc.hook_add(unicorn.UC_HOOK_INTR, jump)
    stopper = SliceStopper(uc, fields)
    done = threading.Event()
    stops = 0

    def post() -> None:
        nonlocal stops
        while not done.wait(0.0003):
            stopper.post()
            stops += 1

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    rip, slices = 0x1000, 0
    try:
        while slices < 100_000:
            try:
                uc.emu_start(rip, 0)
            except UcError as exc:
                if not SliceStopper.ran_out(exc):
                    raise
            slices += 1
            rip = int(uc.reg_read(x86.UC_X86_REG_RIP))
            if uc.mem_read(rip - 1, 1) == b"\xf4":
                break
    finally:
        done.set()
        thread.join()
    assert slices >= 20, f"only {slices} slices: no stop landed in the loop"
    assert int.from_bytes(uc.mem_read(DATA, 8), "little") == 3_000_000

"""Ending a wall-clock slice from another thread, between translation blocks.

With the wall clock, a slice runs uncounted (unicorn's instruction count is
a code hook on every instruction: ten times slower) and a timer thread ends
it. Unicorn's own ``emu_stop`` cannot be that timer, whatever the locking:
it sets ``uc->stop_request`` at once, and the translation block then running
goes on to its end with the flag set. Unicorn's instruction helpers for
``SYSCALL``, ``CPUID``, ``RDTSC`` and ``RDTSCP`` walk the list of *all*
instruction hooks and give up at the first one (of any kind) after which
the flag is set, so the hook of an instruction that comes later in that list
is skipped: ``RDTSC`` returns the host's time-stamp counter instead of guest
time, ``SYSCALL`` does nothing, ``CPUID`` answers unicorn's own model
(``helper_rdtsc`` and friends in unicorn's ``target/i386/misc_helper.c``;
``tests/backends/emulator/test_slice_stop.py`` shows it: about one stop in
200 loses a hook). In a Linux boot that is the clock jumping by hours and
back, which is what derailed it.

There is a second trap: unicorn's translator checks for an exit request
after every guest memory access too (``check_exit_request`` in unicorn's
``tcg/tcg-op.c``), and leaves with the CPU state rolled back to the start of
the instruction, whose stores have already been done: an ``incl`` of the
preempt count or the ``cmpxchg`` taking a spinlock then runs twice when the
slice resumes (the leaked preempt counts and stuck spinlocks seen before).
A stop requested from the CPU thread itself (an instruction budget's code
hook, a device hook) arrives before the instruction's first access, so
counted slices never hit it. For uncounted slices the engine's
``uc->no_exit_request`` is set, which unicorn otherwise uses for ARM's IT
blocks: translated code then checks only at the start of each block.

And a third: a hook that writes RIP (the emulator's exception delivery and
``SYSCALL`` entry do) sets ``uc->skip_sync_pc_on_exit``, which tells the next
exit not to take the guest's address from the translation block it leaves;
unicorn clears it only at that exit, and the exit after an exception
delivery happens without it, so the flag stays set. The next stop from
outside then left RIP where it was last written, not where the guest was:
the CPU went back in time (re-running code with newer registers: the page
allocator's corruption and user-space segfaults seen in uncounted boots).
Counted slices never see it, as unicorn writes RIP before every instruction
when a code hook exists. A stop here clears the flag first: with exits only
at block starts, the block's own address is always the right one.

The stop here does what ``emu_stop`` does minus the ``stop_request`` flag,
from the timer thread:

* ``uc->skip_sync_pc_on_exit = 0`` (above);
* ``cpu->exit_request = 1`` and ``icount_decr.u16.high = -1``: the next
  translation block exits before its first instruction, at a block
  boundary, with every hook of the current block already run normally;
* ``uc->invalid_error`` set to :data:`STOP_ERROR`: unicorn's loop ends a
  run whose error is set, so ``emu_start`` returns with that code (raised
  as ``UcError``), which :meth:`SliceStopper.ran_out` recognises.

Nothing reads the error while a block runs except unicorn's path for an
access to unmapped memory (then reported with this code; the access faults
again on the next slice and is reported properly). The three fields are
found once by a probe on a scratch engine (like the other engine fields in
``cpu.py``) and the mechanism is tried there before it is trusted: without
it, wall-clock slices stay counted as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from unicorn import x86_const as x86

from virtkit.backends.emulator.cpu import UcError, counter_offset, unicorn

__all__ = ["STOP_ERROR", "SliceStopper", "SliceTimer", "StopFields", "stop_fields"]

log = logging.getLogger("virtkit.emulator")

#: the error code a timer stop makes ``emu_start`` return: one execution never produces
STOP_ERROR: int = unicorn.UC_ERR_HOOK_EXIST
#: how often an unanswered stop is posted again (one posted just before a slice began is lost)
_REPOST_NS = 1_000_000


@dataclass(frozen=True)
class StopFields:
    """Offsets of the engine fields a stop writes (bytes)."""

    cpu_pointer: int  #: ``uc_struct.cpu``
    invalid_error: int  #: ``uc_struct.invalid_error``
    no_exit_request: int  #: ``uc_struct.no_exit_request``
    skip_sync: int  #: ``uc_struct.skip_sync_pc_on_exit``
    exit_request: int  #: ``CPUState.exit_request``, from the CPU state
    icount_high: int  #: ``icount_decr.u16.high``, from the CPU state


class SliceStopper:
    """Ends the engine's running slice at the next translation block.

    Making one sets the engine's ``no_exit_request`` (see above) and drops
    the code it had translated: make it before the engine runs anything.

    Args:
        uc: the engine.
        fields: where its fields are (:func:`stop_fields`).
    """

    def __init__(self, uc: Any, fields: StopFields) -> None:
        handle = int(uc._uch.value)
        ctypes.c_uint8.from_address(handle + fields.no_exit_request).value = 1
        uc.ctl_flush_tb()
        cpu = ctypes.c_uint64.from_address(handle + fields.cpu_pointer).value
        self._error = ctypes.c_int32.from_address(handle + fields.invalid_error)
        self._skip_sync = ctypes.c_uint8.from_address(handle + fields.skip_sync)
        self._exit = ctypes.c_uint8.from_address(cpu + fields.exit_request)
        self._high = ctypes.c_uint16.from_address(cpu + fields.icount_high)

    def post(self) -> None:
        """Ask the running slice to end (any thread; ignored between slices)."""
        self._error.value = STOP_ERROR  # first: read when the loop returns
        self._skip_sync.value = 0  # leave with the block's own address (see the module)
        self._exit.value = 1
        self._high.value = 0xFFFF

    def clear(self) -> None:
        """Forget a stop posted after the slice had ended (CPU thread, between slices)."""
        self._high.value = 0
        self._exit.value = 0
        self._error.value = 0

    @staticmethod
    def ran_out(exc: Exception) -> bool:
        """Whether ``emu_start`` raised ``exc`` because of :meth:`post`."""
        return getattr(exc, "errno", None) == STOP_ERROR


class SliceTimer:
    """A thread that ends each wall-clock slice at its deadline.

    The CPU thread calls :meth:`begin` before a slice and :meth:`end` after
    it; any thread may call :meth:`stop_now`. Stops are posted only while a
    slice runs (under one lock with :meth:`end`), and a stop that a slice
    did not answer is posted again every millisecond.
    """

    def __init__(self, stopper: SliceStopper) -> None:
        self._stopper = stopper
        self._cv = threading.Condition()
        self._running = False
        self._deadline = 0
        self._posted_at: int | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="virtkit-emulator-timer", daemon=True
        )
        self._thread.start()

    def begin(self, deadline_ns: int) -> None:
        """A slice starts; end it at ``time.monotonic_ns()`` ``deadline_ns``."""
        with self._cv:
            self._running = True
            self._deadline = deadline_ns
            self._posted_at = None
            self._cv.notify()

    def end(self) -> bool:
        """The slice is over; return whether a stop was posted for it."""
        with self._cv:
            self._running = False
            posted = self._posted_at is not None
            if posted:
                self._stopper.clear()
            return posted

    def stop_now(self) -> None:
        """End the running slice as soon as possible (any thread)."""
        with self._cv:
            if self._running and self._posted_at is None:
                self._stopper.post()
                self._posted_at = time.monotonic_ns()

    def close(self) -> None:
        """Stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                if not self._running:
                    self._cv.wait()
                    continue
                now = time.monotonic_ns()
                due = self._deadline if self._posted_at is None else self._posted_at + _REPOST_NS
                if now < due:
                    self._cv.wait((due - now) / 1e9)
                    continue
                self._stopper.post()
                self._posted_at = now


@functools.cache
def stop_fields() -> StopFields | None:
    """Find the fields a stop writes, and check that a stop through them works.

    A scratch engine runs ``in al, 0x80; hlt``; inside the IN hook, unicorn's
    own ``emu_stop`` is called and the engine's memory compared before and
    after: the one byte of ``uc_struct`` that changes is ``stop_request``
    (``invalid_error`` follows it at the offset unicorn 2's layout gives,
    checked: 0 then, with ``use_exits`` after it 1); the CPU state is the
    block ``uc_struct`` points to whose changes are the byte ``exit_request``
    and the 16-bit ``icount_decr.u16.high`` (0 -> 0xFFFF). ``no_exit_request``
    sits where unicorn 2's layout puts it, checked by what it does: a stop
    asked for by an IN hook right before a store must end the slice at the
    next block, not roll the store back for a second run. Then an engine
    spins on ``jmp $`` and another thread posts a stop: it must end with
    :data:`STOP_ERROR`, at the loop, within a second. None if anything
    differs (not Linux, another unicorn layout): the caller then counts.
    """
    counter = counter_offset()
    if counter is None:
        return None
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        for attempt in range(3):  # a busy host can make one try time out: a few more
            try:
                fields = _probe_fields(fd, counter)
            except (OSError, UcError, struct.error, ValueError) as exc:
                log.debug("slicestop probe %d failed: %s", attempt, exc)
                continue
            if fields is not None and _stop_works(fields):
                return fields
            log.debug("slicestop probe %d: fields %s did not work", attempt, fields)
    finally:
        os.close(fd)
    return None


def _probe_fields(fd: int, counter: int) -> StopFields | None:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, b"\xe4\x80\xf4")  # in al, 0x80; hlt
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    handle = int(uc._uch.value)
    head = os.pread(fd, counter + 64, handle)
    span = 0x10000  # CPUState (its 32 KiB jump cache) and the icount decrementer after it
    blocks: dict[int, int] = {}
    for offset in range(0, counter, 8):
        (value,) = struct.unpack_from("<Q", head, offset)
        if value >= 0x10000 and not value & 7:
            blocks[offset] = value
    seen: dict[str, Any] = {}

    def hook(engine: Any, _port: int, _size: int, _data: Any) -> int:
        before_uc = os.pread(fd, counter + 64, handle)
        before = {offset: _read(fd, address, span) for offset, address in blocks.items()}
        engine.emu_stop()
        seen["uc"] = (before_uc, os.pread(fd, counter + 64, handle))
        seen["blocks"] = {
            offset: (blob, _read(fd, blocks[offset], len(blob))) for offset, blob in before.items()
        }
        return 0

    uc.hook_add(unicorn.UC_HOOK_INSN, hook, None, 1, 0, x86.UC_X86_INS_IN)
    uc.emu_start(0x1000, 0)
    if "uc" not in seen:
        return None
    before_uc, after_uc = seen["uc"]
    changed = [i for i in range(len(after_uc)) if before_uc[i] != after_uc[i]]
    stop_request = counter + 21  # emu_counter, emu_count, size_recur_mem, init_tcg: then it
    # ... exits[64], ctl_exits, thumb, mapped blocks, page sizes, the context's kind and
    # size, next_pc, hook_insert, first_tb: then it
    no_exit = counter + 666
    skip = _skip_sync_offset(fd, counter)
    if skip is None:
        return None
    if changed != [stop_request] or after_uc[stop_request] != 1:
        return None
    invalid_error = counter + 56  # ... timer (pthread_t), timeout, invalid_addr: then it
    error, use_exits = struct.unpack_from("<ii", after_uc, invalid_error)
    if (error, use_exits) != (0, 1):
        return None
    found = []
    for offset, (before, after) in seen["blocks"].items():
        # exit_request is among CPUState's first fields; the decrementer follows its
        # 32 KiB jump cache. Other bytes may change: the blocks take in heap around them.
        if len(before) < 64 or len(after) != len(before):
            continue
        exits = [i for i in range(64) if (before[i], after[i]) == (0, 1)]
        # CPUState ends with its back pointer to the engine, the decrementer soon after
        backs = [
            i
            for i in range(0x8000, len(before) - 7, 8)
            if struct.unpack_from("<Q", before, i)[0] == handle
        ]
        if not backs:
            continue
        highs = [
            i
            for i in range(backs[0] + 2, min(backs[0] + 0x1000, len(before) - 1), 4)
            if (before[i : i + 2], after[i : i + 2]) == (b"\0\0", b"\xff\xff")
        ]
        if len(exits) == 1 and len(highs) == 1:
            found.append(StopFields(offset, invalid_error, no_exit, skip, exits[0], highs[0]))
    if len(found) != 1 or not _no_exit_works(counter, None) or _no_exit_works(counter, no_exit):
        return None
    return found[0]


def _skip_sync_offset(fd: int, counter: int) -> int | None:
    """``skip_sync_pc_on_exit``: besides ``quit_request``, the one byte a RIP write sets."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, b"\xf4")
    uc.emu_start(0x1000, 0)
    handle = int(uc._uch.value)
    span = counter + 0x8000  # the handle holds 64 jump buffers: the flag is its last field
    before = _read(fd, handle, span)
    uc.reg_write(x86.UC_X86_REG_RIP, 0x1000)
    after = _read(fd, handle, len(before))
    changed = [i for i in range(len(after)) if before[i] != after[i]]
    quit_request = counter + 22
    if len(changed) != 2 or changed[0] != quit_request or after[changed[1]] != 1:
        return None
    return changed[1]


#: ``in al, 0x80; mov byte [rbx], 1; inc ecx; jmp +0; hlt``
_STORE_AFTER_STOP = b"\xe4\x80\xc6\x03\x01\xff\xc1\xeb\x00\xf4"


def _no_exit_works(counter: int, no_exit: int | None) -> bool:
    """Whether a stop from the IN hook rolls the next store back (False: it ends at the hlt).

    ``no_exit`` is the offset to set first (None: leave the engine as it is).
    """
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x4000)
    uc.mem_write(0x1000, _STORE_AFTER_STOP)
    uc.reg_write(x86.UC_X86_REG_RBX, 0x3000)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    if no_exit is not None:
        head = ctypes.string_at(int(uc._uch.value), counter + 1024)
        # hook_insert 0, first_tb (either), it 0, init_done 1
        if (head[no_exit - 2], head[no_exit], head[no_exit + 1]) != (0, 0, 1):
            return True
        ctypes.c_uint8.from_address(int(uc._uch.value) + no_exit).value = 1

    def stop(engine: Any, _port: int, _size: int, _data: Any) -> int:
        engine.emu_stop()
        return 0

    uc.hook_add(unicorn.UC_HOOK_INSN, stop, None, 1, 0, x86.UC_X86_INS_IN)
    uc.emu_start(0x1000, 0)
    rip = int(uc.reg_read(x86.UC_X86_REG_RIP))
    ecx = int(uc.reg_read(x86.UC_X86_REG_RCX))
    if (rip, ecx) == (0x1002, 0):
        return True  # rolled back to the store, which had been done
    return not ((rip, ecx) == (0x1009, 1) and uc.mem_read(0x3000, 1) == b"\x01")


def _read(fd: int, address: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``address``: as many whole pages as are mapped."""
    out = bytearray()
    while len(out) < size:
        chunk = min(0x1000 - (address + len(out)) % 0x1000, size - len(out))
        try:
            out += os.pread(fd, chunk, address + len(out))
        except OSError:
            break
    return bytes(out)


def _stop_works(fields: StopFields) -> bool:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, b"\x48\xff\xc0\xeb\xfb")  # inc rax; jmp back
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    stopper = SliceStopper(uc, fields)
    ended = threading.Event()

    def post() -> None:
        while not ended.wait(0.02):
            stopper.post()

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    result = None
    try:
        uc.emu_start(0x1000, 0, timeout=2_000_000)  # the safety net: unicorn's own timer
    except UcError as exc:
        result = getattr(exc, "errno", None)
    finally:
        ended.set()
        poster.join()
    rip = int(uc.reg_read(x86.UC_X86_REG_RIP))
    return (
        result == STOP_ERROR
        and rip in (0x1000, 0x1003)
        and int(uc.reg_read(x86.UC_X86_REG_RAX)) > 0
    )

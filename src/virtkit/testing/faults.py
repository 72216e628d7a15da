"""Fault injection under the image engine: crashes, power losses and full disks.

Every byte virtkit's image drivers write goes through
:class:`virtkit.images.storage.FileStorage`, which consults one module-level
hook before each ``pwrite``, ``truncate``, ``flush`` and ``punch_hole``. This
module installs a *plan* in that hook for the length of a ``with`` block::

    from virtkit.testing import faults

    with faults.inject(faults.Recorder()) as rec:      # learn the workload
        my_workload()
    for n in range(1, rec.writes + 1):                 # then cut it at every write
        reset_files()
        with faults.inject(faults.CrashAfter(n)):
            try:
                my_workload()
            except faults.SimulatedCrash:
                pass
        verify_files()

Plans:

* :class:`Recorder` counts writes, flushes and bytes (and can keep a log).
* :class:`CrashAfter` kills the "process" instead of performing the n-th write
  (a ``pwrite``, ``truncate`` or ``punch_hole``): the operation raises
  :class:`SimulatedCrash`, a :class:`BaseException` so that no ``except
  Exception`` or ``except VirtkitError`` in virtkit (or in the caller) can
  swallow it, and every later operation raises it too (the process is dead).
* :class:`PowerLoss` does the same, but first undoes, file by file, every
  write made since that file's last ``flush()``: what a power cut does to a
  volatile disk cache. The old bytes are kept in an undo log and restored in
  reverse order; with ``keep`` a random subset of the unflushed writes
  survives instead (a cache that wrote back out of order). Linux only: the
  log reopens files through ``/proc/self/fd``.
* :class:`NoSpace` makes writes fail with ``OSError(ENOSPC)`` exactly where the
  operating system would (a write that only partly fits stores its first part
  first), until :meth:`NoSpace.release` gives the space back. The error enters
  ``FileStorage`` as a real one would, so the engine's own translation to
  :class:`virtkit.ImageError` is what the caller sees.

When the ``with`` block of a crashed plan ends, every file descriptor the plan
saw is closed (dropping its locks), as the kernel does when a process dies; the
:class:`virtkit.images.Image` objects that were open are dead and must not be
used again. Directory operations (create, rename, unlink) are not simulated:
they happen or not as the real calls do.

The hook is process-wide: plans are for tests, one at a time (nesting raises
:class:`virtkit.StateError`). ``only`` limits a plan to some files.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from virtkit.errors import ConfigError, StateError
from virtkit.images import storage as _storage

__all__ = [
    "WRITE_OPS",
    "CrashAfter",
    "FaultPlan",
    "NoSpace",
    "PowerLoss",
    "Recorder",
    "SimulatedCrash",
    "inject",
]

#: The storage operations that count as writes (``flush`` does not).
WRITE_OPS = frozenset({"pwrite", "truncate", "punch_hole"})

PathFilter = str | os.PathLike[str] | Callable[[str], bool] | None
P = TypeVar("P", bound="FaultPlan")

_install_lock = threading.Lock()


class SimulatedCrash(BaseException):
    """The simulated death of the process at a storage operation.

    A :class:`BaseException`, like ``KeyboardInterrupt``, so that nothing in
    virtkit can catch it and carry on as if the write had happened.

    Attributes:
        op: the operation that was cut (``"pwrite"``, ``"truncate"``, ...).
        path: the file it was aimed at.
        index: which write (1-based, counted over all matched files) it was.
        power_loss: whether unflushed writes were undone first.
    """

    def __init__(self, op: str, path: str, index: int, *, power_loss: bool = False) -> None:
        kind = "power loss" if power_loss else "crash"
        super().__init__(f"simulated {kind} at write {index} ({op} on {path})")
        self.op = op
        self.path = path
        self.index = index
        self.power_loss = power_loss


class FaultPlan:
    """Base of the plans :func:`inject` installs; subclasses override :meth:`before`.

    Attributes:
        writes: write operations seen so far (``pwrite``/``truncate``/``punch_hole``).
        flushes: ``flush`` calls seen so far.
        bytes_written: bytes passed to ``pwrite`` so far.
        crashed: the :class:`SimulatedCrash` raised, once the plan has crashed.
    """

    def __init__(self) -> None:
        self.writes = 0
        self.flushes = 0
        self.bytes_written = 0
        self.crashed: SimulatedCrash | None = None
        self._seen: dict[int, Any] = {}
        self._lock = threading.RLock()

    def _hook(self, st: Any, op: str, offset: int, length: int, data: memoryview | None) -> None:
        with self._lock:
            if self.crashed is not None:  # the process is dead: nothing more reaches a file
                dead = self.crashed
                raise SimulatedCrash(op, st.path, dead.index, power_loss=dead.power_loss)
            if id(st) not in self._seen:
                self._seen[id(st)] = st
                self.track(st)
            if op in WRITE_OPS:
                self.writes += 1
                if op == "pwrite":
                    self.bytes_written += length
            elif op == "flush":
                self.flushes += 1
            self.before(st, op, offset, length, data)

    def track(self, st: Any) -> None:
        """Called once for each storage the plan sees, before its first operation."""

    def before(self, st: Any, op: str, offset: int, length: int, data: memoryview | None) -> None:
        """Called before each operation (counters already updated); may raise.

        Args:
            st: the :class:`~virtkit.images.storage.FileStorage`.
            op: ``"pwrite"``, ``"truncate"``, ``"flush"`` or ``"punch_hole"``.
            offset: the write offset, the new length for ``truncate``, 0 for ``flush``.
            length: bytes written or punched; 0 for ``truncate`` and ``flush``.
            data: the bytes of a ``pwrite``, else None.
        """

    def _crash(self, st: Any, op: str, *, power_loss: bool = False) -> None:
        self.crashed = SimulatedCrash(op, st.path, self.writes, power_loss=power_loss)
        raise self.crashed

    def _die(self) -> None:
        """Close every descriptor the plan saw, as the kernel does for a dead process."""
        for st in self._seen.values():
            st.close()


class Recorder(FaultPlan):
    """Count (and optionally log) the storage operations of a workload; inject nothing.

    Args:
        keep_log: keep ``(path, op, offset, length)`` for every operation in ``log``.
    """

    def __init__(self, *, keep_log: bool = False) -> None:
        super().__init__()
        self.keep_log = keep_log
        self.log: list[tuple[str, str, int, int]] = []
        self.paths: dict[str, int] = {}

    def before(self, st: Any, op: str, offset: int, length: int, data: memoryview | None) -> None:
        """Log the operation and count writes per file path."""
        if op in WRITE_OPS:
            self.paths[st.path] = self.paths.get(st.path, 0) + 1
        if self.keep_log:
            self.log.append((st.path, op, offset, length))


class CrashAfter(FaultPlan):
    """Die instead of performing the ``n``-th write (1-based); writes before it complete.

    By default the death is a :class:`SimulatedCrash`, which unwinds the stack:
    ``finally`` blocks and ``except BaseException`` clean-ups in virtkit still
    run (with every further write refused). With ``hard=True`` the process
    ends on the spot with ``os._exit(137)``, as under ``kill -9``: nothing runs
    after write ``n - 1``. Use that only in a child process (``os.fork()``).

    Args:
        n: the write that never happens. A workload with fewer writes completes.
        hard: end the whole process instead of raising.

    Raises:
        ConfigError: ``n`` is below 1.
    """

    power_loss = False

    def __init__(self, n: int, *, hard: bool = False) -> None:
        super().__init__()
        if n < 1:
            raise ConfigError(f"the crash index must be at least 1 (got {n})", field="n")
        self.n = n
        self.hard = hard

    def before(self, st: Any, op: str, offset: int, length: int, data: memoryview | None) -> None:
        """Raise :class:`SimulatedCrash` (or end the process) at the n-th write."""
        if op in WRITE_OPS and self.writes == self.n:
            if self.hard:
                os._exit(137)
            self._crash(st, op)


class _Undo:
    """One file's writes since its last flush: the bytes they replaced and wrote."""

    def __init__(self, fd: int) -> None:
        # A second open file description of the same inode: it survives the
        # storage's close and a rename, and holds none of the storage's locks.
        self.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        # (start, old bytes, old size, op, new bytes or None, new length, write offset)
        self.entries: list[tuple[int, bytes, int, str, bytes | None, int, int]] = []

    def record(self, op: str, offset: int, length: int, data: memoryview | None) -> None:
        size = os.fstat(self.fd).st_size
        if op == "truncate":
            start, stop = min(offset, size), size
        else:
            start, stop = offset, offset + length
        old = os.pread(self.fd, max(0, min(stop, size) - start), start) if start < size else b""
        new = bytes(data) if data is not None else None
        self.entries.append(
            (min(start, size), old, size, op, new, offset if op == "truncate" else length, offset)
        )

    def restore(self, survive: Callable[[], bool]) -> int:
        """Undo every entry (newest first), then redo the survivors in order; count undone."""
        for start, old, size, *_ in reversed(self.entries):
            _write_all(self.fd, old, start)
            os.ftruncate(self.fd, size)
        lost = 0
        for start, _old, _size, op, new, length, offset in self.entries:
            if not survive():
                lost += 1
                continue
            if op == "pwrite" and new is not None:
                _write_all(self.fd, new, offset)  # past the end of the file too: a hole first
            elif op == "truncate":
                os.ftruncate(self.fd, length)
            elif op == "punch_hole":
                size = os.fstat(self.fd).st_size
                _write_all(self.fd, bytes(max(0, min(length, size - start))), start)
        self.entries.clear()
        return lost


def _write_all(fd: int, data: bytes, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class PowerLoss(CrashAfter):
    """At the ``n``-th write, drop writes not yet flushed (per file), then die.

    A file's writes become durable when ``flush()`` is called on it: a
    write acknowledged by a completed flush survives, nothing else is promised.
    By default every unflushed write is lost (a volatile cache that never wrote
    back). With ``keep`` between 0 and 1 each unflushed write independently
    survives with that probability, in any combination: a disk cache that wrote
    some later writes back before earlier ones. Only a ``flush()`` between two
    writes orders them.

    Args:
        n: the write at which the power goes. A workload with fewer writes
            completes and nothing is undone.
        keep: probability that an unflushed write survives (0: none does).
        seed: seed of the survivors' draw.

    Raises:
        ConfigError: ``n`` below 1 or ``keep`` outside [0, 1].
    """

    power_loss = True

    def __init__(self, n: int, *, keep: float = 0.0, seed: int = 0) -> None:
        super().__init__(n)
        if not 0.0 <= keep <= 1.0:
            raise ConfigError(f"'keep' must be between 0 and 1 (got {keep})", field="keep")
        self.keep = keep
        self._rng = random.Random(seed)
        self._undo: dict[tuple[int, int], _Undo] = {}
        self._file_of: dict[int, tuple[int, int]] = {}
        #: How many unflushed writes were lost when the power went.
        self.lost = 0

    def track(self, st: Any) -> None:
        """Open the file a second time, to restore it after close or rename."""
        if st.fd is None:
            return
        info = os.fstat(st.fd)
        key = (info.st_dev, info.st_ino)
        self._file_of[id(st)] = key
        if key not in self._undo:
            self._undo[key] = _Undo(st.fd)

    def before(self, st: Any, op: str, offset: int, length: int, data: memoryview | None) -> None:
        """Log each write; forget a file's log at its flush; drop the unflushed at write n."""
        key = self._file_of.get(id(st))
        if key is None:
            return
        undo = self._undo[key]
        if op in WRITE_OPS and self.writes == self.n:
            survive = lambda: self.keep > 0 and self._rng.random() < self.keep  # noqa: E731
            self.lost = sum(each.restore(survive) for each in self._undo.values())
            self._release()
            self._crash(st, op, power_loss=True)
        if op == "flush":
            undo.entries.clear()
        elif op in WRITE_OPS:
            undo.record(op, offset, length, data)

    def _release(self) -> None:
        for undo in self._undo.values():
            os.close(undo.fd)
        self._undo.clear()

    def _die(self) -> None:
        self._release()
        super()._die()


class NoSpace(FaultPlan):
    """Make the file system full: writes fail with ``ENOSPC`` until :meth:`release`.

    Give exactly one of ``after_bytes`` (the disk fills once this many more
    bytes have been allocated; the write that crosses the line stores what
    fits, then fails) or ``at_write`` (the disk is full from that write on,
    1-based). As on ext4 or XFS, only a write that needs new space fails: one
    that extends the file or fills a hole. Overwriting allocated bytes still
    works unless ``cow`` (a copy-on-write or thin-provisioned store, such as
    btrfs, ZFS or a thin LVM volume, where every write needs new space).
    Truncating and punching holes need no space and still work.

    Args:
        after_bytes: bytes that still fit.
        at_write: the first write that finds the disk full.
        cow: overwrites need space too.

    Attributes:
        failures: writes refused so far.

    Raises:
        ConfigError: neither or both given, or a negative value.
    """

    def __init__(
        self, *, after_bytes: int | None = None, at_write: int | None = None, cow: bool = False
    ) -> None:
        super().__init__()
        if (after_bytes is None) == (at_write is None):
            raise ConfigError("NoSpace needs exactly one of after_bytes or at_write")
        if (after_bytes is not None and after_bytes < 0) or (at_write is not None and at_write < 1):
            raise ConfigError(
                f"NoSpace limits must be positive (after_bytes={after_bytes}, at_write={at_write})"
            )
        self.after_bytes = after_bytes
        self.at_write = at_write
        self.cow = cow
        self.failures = 0
        self.released = False
        self._stored = 0

    def release(self) -> None:
        """Give the space back: later writes succeed."""
        self.released = True

    def _needs_space(self, st: Any, offset: int, length: int) -> bool:
        if self.cow:
            return True
        fd = st.fd
        if fd is None or offset + length > os.fstat(fd).st_size:
            return True
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError:
            return True
        return hole < offset + length

    def before(self, st: Any, op: str, offset: int, length: int, data: memoryview | None) -> None:
        """Fail a write that needs space the disk does not have, after storing what fits."""
        if op != "pwrite" or self.released or not self._needs_space(st, offset, length):
            return
        if self.at_write is not None:
            if self.writes >= self.at_write:
                self._full()
            return
        assert self.after_bytes is not None
        room = self.after_bytes - self._stored
        if length <= room:
            self._stored += length
            return
        if room > 0 and data is not None and st.fd is not None:
            # The OS stores what fits and returns a short count; the retry of the
            # rest is what gets ENOSPC. Store the prefix the same way.
            self._stored += os.pwrite(st.fd, data[:room], offset)
        self._full()

    def _full(self) -> None:
        self.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _matcher(only: PathFilter) -> Callable[[str], bool]:
    if only is None:
        return lambda _path: True
    if callable(only):
        return only
    root = os.path.abspath(os.fspath(only))
    prefix = root.rstrip(os.sep) + os.sep

    def match(path: str) -> bool:
        full = os.path.abspath(path)
        return full == root or full.startswith(prefix)

    return match


@contextmanager
def inject(plan: P, *, only: PathFilter = None) -> Iterator[P]:
    """Install ``plan`` under every ``FileStorage`` for the ``with`` block; yield it.

    Args:
        plan: a :class:`FaultPlan` (:class:`Recorder`, :class:`CrashAfter`,
            :class:`PowerLoss`, :class:`NoSpace`).
        only: limit the plan to one file, the files under one directory, or
            the paths a predicate accepts; other files are left alone.

    Raises:
        StateError: another plan is already installed.

    The :class:`SimulatedCrash` of a crashing plan propagates out of the block
    (catch it there); when the block ends after a crash, every descriptor the
    plan saw is closed.
    """
    match = _matcher(only)

    def hook(st: Any, op: str, offset: int, length: int, data: memoryview | None) -> None:
        if match(st.path):
            plan._hook(st, op, offset, length, data)

    with _install_lock:
        if _storage._fault_hook is not None:
            raise StateError("a fault plan is already installed; plans do not nest")
        _storage._fault_hook = hook
    try:
        yield plan
    finally:
        with _install_lock:
            _storage._fault_hook = None
        if plan.crashed is not None:
            plan._die()
        elif isinstance(plan, PowerLoss):
            plan._release()

"""Incremental storage of guest RAM for full snapshots.

Every full snapshot of a guest stores its RAM as an *index* (inside the
snapshot's state file, ``state.bin``) into a *pack* shared by all of that
guest's snapshots (``snapshots/emulator-ram-<generation>.pack``). The pack
holds 64 KiB chunks, appended once and never overwritten; an index maps each
chunk of guest RAM to a chunk in the pack, to zero, or to a copy inside the
state file itself (the formats: :mod:`~virtkit.backends.emulator.ramformat`).

A running machine keeps a *baseline*: RAM as it was at the last snapshot or
revert (the *base*, see :mod:`~virtkit.backends.emulator.dirtytrack`) and
that snapshot's index. RAM is mapped copy-on-write over the base, so the
kernel tells which pages the guest (or a device, or the loader) wrote since:
a new snapshot looks only at the chunks holding such pages, appends those
that really differ from the base and reuses the baseline's pack entries for
the rest. Its cost follows what changed, not the memory size. A revert to the
baseline's snapshot drops the written pages; a revert to another snapshot
also reads the chunks whose entries differ. Where the kernel cannot report
written pages, RAM is compared with the base instead (``memcmp``).

Crash safety: a state file is written under a temporary name, ``fsync``-ed
and renamed; it carries a checksum, so a torn file is refused, never loaded.
Every pack chunk it names is durable before it is written. Chunks appended
to the pack are synced by a helper thread; a state file that would name a
chunk not synced yet (its own new ones, or a recent snapshot's) carries a
copy of it inline instead, so its one ``fsync`` covers it. When such chunks
pass 4 MiB, the pack is synced first and the state names them there. A
crash leaves at most unreferenced bytes at the pack's end and a temporary
file. The new folder and its rename become durable with the journal commit
of the snapshot list's ``fsync``, which follows.

Deleted snapshots leave garbage in the pack; when garbage outweighs live
data the next snapshot writes a new pack generation, rewrites every index to
it (each index names its own pack, so a crash part-way leaves every index
valid; each rewrite is synced with its folder), and removes the old pack.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from virtkit.backends.emulator import dirtytrack
from virtkit.backends.emulator.ramformat import (
    CHUNK,
    INDEX_MAGIC,
    INLINE,
    LEGACY_INDEX_FILE,
    PACK_MAGIC,
    PACK_NAME,
    STATE_FILE,
    STATE_MAGIC,
    Pack,
    RamIndex,
    SavedState,
    atomic_write,
    chunk_count,
    chunk_length,
    fsync_dir,
    read_state,
)
from virtkit.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from virtkit.backends.emulator.cpu import Cpu

__all__ = [
    "CHUNK",
    "INDEX_MAGIC",
    "STATE_FILE",
    "STATE_MAGIC",
    "SavedState",
    "forget",
    "load_ram",
    "read_state",
    "save_ram",
]

#: compact when the pack is this much bigger than what indexes still use
_GARBAGE_RATIO = 2
_GARBAGE_FLOOR = 64 * 1024**2
#: a snapshot adding at most this much carries it inline (one fsync, no pack sync)
_INLINE_LIMIT = 4 * 1024**2
#: chunks compared with one memcmp before looking at each of them (untracked RAM)
_BLOCK = 16
_PAGES_PER_CHUNK = CHUNK // dirtytrack.PAGE
#: a baseline entry with no pack copy known: the next snapshot stores the chunk again
_UNKNOWN = -1

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_ZERO = (ctypes.c_char * CHUNK)()
_ZERO_PTR = ctypes.addressof(_ZERO)


class _Baseline:
    """A machine's RAM as of its last snapshot or revert, and that snapshot's index.

    The base is a :class:`~virtkit.backends.emulator.dirtytrack.Tracker`'s
    memory file; when the kernel tracks writes (``tracked``), RAM is mapped
    copy-on-write over it once the base is filled. The index's entries are
    pack offsets, zero, or :data:`_UNKNOWN` (never an inline entry).
    """

    def __init__(self, cpu: Cpu, packs_dir: Path) -> None:
        self.tracker = dirtytrack.Tracker(cpu._ram_ptr, cpu.memory_size)
        self.tracked = self.tracker.can_attach and dirtytrack.supported()
        self.ptr = self.tracker.base_ptr
        self.base = memoryview(self.tracker.base)
        self.index: RamIndex | None = None
        self.packs_dir = packs_dir

    def close(self) -> None:
        self.base.release()
        self.tracker.close()


#: one baseline per live CPU; dropped with the CPU
_baselines: weakref.WeakKeyDictionary[Cpu, _Baseline] = weakref.WeakKeyDictionary()


def _in_pack(entry: int) -> bool:
    return entry > 0 and not entry & INLINE


def _current_pack(packs_dir: Path) -> str:
    """The newest pack generation's file name (a new one when there is none)."""
    generations = [
        int(match.group(1))
        for entry in (os.listdir(packs_dir) if packs_dir.is_dir() else ())
        if (match := PACK_NAME.match(entry))
    ]
    return f"emulator-ram-{max(generations, default=1)}.pack"


def _states(packs_dir: Path) -> Iterable[SavedState]:
    """Every readable state of this guest's snapshots (damaged ones are skipped)."""
    state = packs_dir / "state"
    if not state.is_dir():
        return
    for folder in sorted(state.iterdir()):
        if not (folder / STATE_FILE).exists():
            try:
                with open(folder / LEGACY_INDEX_FILE, "rb") as fh:
                    if fh.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                        continue  # a whole-RAM state (VKRAM001): no pack entries
            except OSError:
                continue
        try:
            yield read_state(folder)
        except BackendError:
            continue


def _compact_if_worth_it(packs_dir: Path, pack_name: str, baseline: _Baseline | None) -> str:
    """Rewrite the live chunks into a new pack generation when garbage dominates.

    Returns the pack name new chunks go to.
    """
    pack_path = packs_dir / pack_name
    try:
        pack_size = pack_path.stat().st_size
    except FileNotFoundError:
        return pack_name
    if pack_size < _GARBAGE_FLOOR:
        return pack_name  # not worth reading every index for
    users = [saved for saved in _states(packs_dir) if saved.index.pack == pack_name]
    live_offsets = {off for saved in users for off in saved.index.entries if _in_pack(off)}
    if baseline is not None and baseline.index is not None and baseline.index.pack == pack_name:
        live_offsets.update(off for off in baseline.index.entries if _in_pack(off))
    live = len(live_offsets) * CHUNK
    if pack_size < _GARBAGE_RATIO * live:
        return pack_name
    generation = int(pack_name.removeprefix("emulator-ram-").removesuffix(".pack"))
    new_name = f"emulator-ram-{generation + 1}.pack"
    new_pack = Pack(packs_dir / new_name)
    moved: dict[int, int] = {}
    try:
        old_fd = os.open(pack_path, os.O_RDONLY)
        try:
            for offset in sorted(live_offsets):
                moved[offset] = new_pack.append(os.pread(old_fd, CHUNK, offset))
        finally:
            os.close(old_fd)
        new_pack.sync()
    finally:
        new_pack.close()
    fsync_dir(packs_dir)
    for saved in users:
        saved.index.pack = new_name
        saved.index.entries = [
            moved.get(off, 0) if _in_pack(off) else off for off in saved.index.entries
        ]
        atomic_write(saved.path, saved.encode())
    if baseline is not None and baseline.index is not None and baseline.index.pack == pack_name:
        baseline.index.pack = new_name
        baseline.index.entries = [
            moved[off] if _in_pack(off) else off for off in baseline.index.entries
        ]
    pack_path.unlink()
    return new_name


def forget(cpu: Cpu) -> None:
    """Drop the CPU's baseline before its RAM is replaced by other means.

    RAM mapped copy-on-write over the base gets a fresh anonymous mapping,
    so its contents are zero afterwards (``MADV_DONTNEED`` on such a mapping
    would bring back the base, not zeros); an untracked RAM is left as is.
    """
    baseline = _baselines.pop(cpu, None)
    if baseline is None:
        return
    try:
        if baseline.tracker.attached and cpu.uc is not None and not cpu.ram.closed:
            baseline.tracker.detach_to_zero()
    finally:
        baseline.close()


def _store(pack: Pack, ram: memoryview, ram_ptr: int, start: int, length: int) -> int:
    """The index entry for one changed chunk: 0 when it is zero, else where it was appended."""
    if _memcmp(ram_ptr + start, _ZERO_PTR, length) == 0:
        return 0
    return pack.append(ram[start : start + length])


def _chunks_of(runs: list[tuple[int, int]]) -> list[int]:
    """The chunk numbers that hold the pages of ``runs``, ascending."""
    chunks: set[int] = set()
    for first, count in runs:
        chunks.update(range(first // _PAGES_PER_CHUNK, (first + count - 1) // _PAGES_PER_CHUNK + 1))
    return sorted(chunks)


def _pages_of(chunks: list[int], size: int) -> list[tuple[int, int]]:
    """The page runs covering ``chunks``."""
    return [(n * _PAGES_PER_CHUNK, chunk_length(size, n) // dirtytrack.PAGE) for n in chunks]


def _differing(cpu: Cpu, baseline: _Baseline) -> list[int]:
    """Chunks of untracked RAM that differ from the base (a full ``memcmp``)."""
    size, count = cpu.memory_size, chunk_count(cpu.memory_size)
    out: list[int] = []
    for first in range(0, count, _BLOCK):
        start = first * CHUNK
        length = min(_BLOCK * CHUNK, size - start)
        if _memcmp(cpu._ram_ptr + start, baseline.ptr + start, length) == 0:
            continue  # most of RAM is unchanged: one call for a block of chunks
        for number in range(first, min(first + _BLOCK, count)):
            start = number * CHUNK
            if _memcmp(cpu._ram_ptr + start, baseline.ptr + start, chunk_length(size, number)):
                out.append(number)
    return out


def _save_changes(
    cpu: Cpu, baseline: _Baseline, base_index: RamIndex, pack: Pack
) -> tuple[list[int], Callable[[], None]]:
    """Entries of a snapshot made from the baseline's plus the changed chunks.

    Returns the entries and what makes RAM's contents the new base (run once
    the snapshot is durable).
    """
    size = cpu.memory_size
    ram = memoryview(cpu.ram)
    if baseline.tracked:
        runs = baseline.tracker.runs(baseline.tracker.dirty())
        candidates = _chunks_of(runs)
    else:
        runs = []
        candidates = _differing(cpu, baseline)
    entries = list(base_index.entries)
    unknown = {n for n, entry in enumerate(entries) if entry == _UNKNOWN}
    changed: list[int] = []
    for number in sorted(unknown.union(candidates)):
        start, length = number * CHUNK, chunk_length(size, number)
        same = _memcmp(cpu._ram_ptr + start, baseline.ptr + start, length) == 0
        if same and number not in unknown:
            continue  # written with what it held: the baseline's entry still holds
        entries[number] = _store(pack, ram, cpu._ram_ptr, start, length)
        if not same:
            changed.append(number)

    def settle() -> None:
        if baseline.tracked:
            baseline.tracker.settle(runs)
        else:
            for number in changed:
                start = number * CHUNK
                length = chunk_length(size, number)
                ctypes.memmove(baseline.ptr + start, cpu._ram_ptr + start, length)

    return entries, settle


def _save_all(cpu: Cpu, packs_dir: Path, pack: Pack) -> tuple[list[int], _Baseline]:
    """Entries storing every non-zero chunk, and a new baseline holding them as its base."""
    size = cpu.memory_size
    ram = memoryview(cpu.ram)
    baseline = _Baseline(cpu, packs_dir)
    try:
        entries: list[int] = []
        for number in range(chunk_count(size)):
            start, length = number * CHUNK, chunk_length(size, number)
            entry = _store(pack, ram, cpu._ram_ptr, start, length)
            if entry:
                ctypes.memmove(baseline.ptr + start, cpu._ram_ptr + start, length)
            entries.append(entry)
    except BaseException:
        baseline.close()
        raise
    return entries, baseline


def _durable_index(cpu: Cpu, pack: Pack, entries: list[int], pack_name: str) -> RamIndex:
    """The index to write, once every pack chunk it names is durable.

    The chunks whose pack copies are not known durable yet (this snapshot's
    appends, and earlier ones the helper thread has not synced) go inline,
    copied from RAM, when they are few; otherwise the pack is synced now.
    RAM holds every chunk's content: the snapshot is RAM as it is.
    """
    size = cpu.memory_size
    below = pack.durable_below()
    pending = [n for n, entry in enumerate(entries) if entry >= below and not entry & INLINE]
    if not pending:
        return RamIndex(size, pack_name, entries)
    if sum(chunk_length(size, n) for n in pending) > _INLINE_LIMIT:
        pack.sync()
        return RamIndex(size, pack_name, entries)
    ram = memoryview(cpu.ram)
    parts: list[bytes] = []
    where = 0
    file_entries = list(entries)
    for number in pending:
        start, length = number * CHUNK, chunk_length(size, number)
        parts.append(bytes(ram[start : start + length]))
        file_entries[number] = INLINE | where
        where += length
    return RamIndex(size, pack_name, file_entries, b"".join(parts))


def save_ram(cpu: Cpu, folder: Path, extra: bytes = b"") -> int:
    """Store the CPU's RAM and ``extra`` as ``folder/state.bin``; returns the bytes
    appended to the pack.

    ``folder`` is a snapshot folder (``snapshots/state/NAME``); the pack lives
    two levels up, in ``snapshots/``. ``extra`` is the caller's machine state,
    given back by :func:`read_state`. The CPU must be parked.

    Raises:
        OSError: the pack or the state file cannot be written (nothing that
            an existing snapshot uses was changed).
    """
    packs_dir = folder.parent.parent
    baseline = _baselines.get(cpu)
    if baseline is not None and baseline.packs_dir != packs_dir:
        baseline = None  # the guest's folder moved: start a fresh chain
    pack_name = _compact_if_worth_it(packs_dir, _current_pack(packs_dir), baseline)
    base_index = baseline.index if baseline is not None else None
    fresh: _Baseline | None = None
    pack = Pack(packs_dir / pack_name)
    try:
        if baseline is not None and base_index is not None and base_index.pack == pack_name:
            entries, settle = _save_changes(cpu, baseline, base_index, pack)
        else:
            entries, fresh = _save_all(cpu, packs_dir, pack)
        written = pack.appended
        index = _durable_index(cpu, pack, entries, pack_name)
        state = SavedState(folder / STATE_FILE, extra, index)
        atomic_write(state.path, state.encode(), sync_dir=False)
        pack.sync_later()
    except BaseException:
        if fresh is not None:
            fresh.close()
        raise
    finally:
        pack.close()
    memory = RamIndex(cpu.memory_size, pack_name, entries)
    if fresh is None:
        assert baseline is not None
        settle()
        baseline.index = memory
        return written
    _adopt(cpu, fresh)
    fresh.index = memory
    return written


def _adopt(cpu: Cpu, fresh: _Baseline) -> None:
    """Make ``fresh`` (its base filled with RAM's contents) the CPU's baseline."""
    old = _baselines.pop(cpu, None)
    try:
        if fresh.tracked:
            fresh.tracker.attach()
    except BaseException:
        fresh.close()
        if old is not None:
            old.close()
        raise
    _baselines[cpu] = fresh
    if old is not None:
        old.close()


def load_ram(cpu: Cpu, folder: Path, saved: SavedState | None = None) -> None:
    """Restore RAM from the snapshot in ``folder`` written by :func:`save_ram`.

    Only what differs from what the machine holds is copied: with a baseline
    of the same guest, the pages written since it and the chunks whose pack
    entries differ. ``saved`` is the folder's :func:`read_state`, when the
    caller already read it. The CPU must be parked.

    Raises:
        ConfigError: the snapshot's RAM size differs from the machine's.
        BackendError: the index or its pack is missing or damaged.
    """
    packs_dir = folder.parent.parent
    if saved is None:
        saved = read_state(folder)
    header, path = saved.index, saved.path
    if header.size != cpu.memory_size:
        raise ConfigError(
            f"the snapshot holds {header.size} bytes of RAM but the machine has "
            f"{cpu.memory_size}; revert needs the memory size the snapshot was taken with",
            field="memory",
        )
    pack_path = packs_dir / header.pack
    try:
        fd = os.open(pack_path, os.O_RDONLY)
    except OSError as exc:
        raise BackendError(f"the RAM pack {pack_path} cannot be opened: {exc.strerror}") from exc
    try:
        header.check_bounds(path, os.fstat(fd).st_size)
        if os.pread(fd, len(PACK_MAGIC), 0) != PACK_MAGIC:
            raise BackendError(f"{pack_path} is not a virtkit RAM pack")
        baseline = _baselines.get(cpu)
        reader = _ChunkReader(fd, pack_path, header)
        if (
            baseline is not None
            and baseline.packs_dir == packs_dir
            and baseline.index is not None
            and baseline.index.pack == header.pack
        ):
            _revert_changes(cpu, baseline, header, reader)
        else:
            _load_all(cpu, packs_dir, header, reader)
    finally:
        os.close(fd)


class _ChunkReader:
    """Copies a snapshot's chunks, from its pack or its inline data, into the base."""

    def __init__(self, fd: int, pack_path: Path, index: RamIndex) -> None:
        self.fd = fd
        self.pack_path = pack_path
        self.inline = memoryview(index.inline)

    def read(self, into: memoryview, entry: int, number: int) -> None:
        if entry & INLINE:
            offset = entry & ~INLINE
            into[:] = self.inline[offset : offset + len(into)]
        elif os.preadv(self.fd, [into], entry) != len(into):
            raise BackendError(f"{self.pack_path} is truncated at chunk {number}")


def _baseline_entries(header: RamIndex) -> list[int]:
    """A loaded snapshot's entries as a baseline keeps them: inline ones unknown.

    An inline chunk's pack copy may never have reached the disk, so the next
    snapshot stores it again rather than naming it.
    """
    return [_UNKNOWN if entry & INLINE else entry for entry in header.entries]


def _revert_changes(cpu: Cpu, baseline: _Baseline, header: RamIndex, reader: _ChunkReader) -> None:
    """Bring RAM from the baseline's snapshot (plus what was written since) to ``header``'s."""
    assert baseline.index is not None
    size = cpu.memory_size
    known = baseline.index.entries
    baseline.index = None  # until every chunk is in place: a failure leaves it unknown
    # an inline or unknown entry never matches: its chunk is always copied
    differ = [
        n
        for n, entry in enumerate(header.entries)
        if known[n] != entry or entry & INLINE or known[n] == _UNKNOWN
    ]
    for number in differ:
        start, length = number * CHUNK, chunk_length(size, number)
        entry = header.entries[number]
        if entry == 0:
            baseline.tracker.zero_base(start, length)
        else:
            reader.read(baseline.base[start : start + length], entry, number)
    if baseline.tracked:
        # the written pages, and the changed chunks for good measure, read the base again
        runs = baseline.tracker.runs(baseline.tracker.dirty())
        baseline.tracker.discard(runs + _pages_of(differ, size))
    else:
        for number in sorted(set(differ).union(_differing(cpu, baseline))):
            start = number * CHUNK
            ctypes.memmove(cpu._ram_ptr + start, baseline.ptr + start, chunk_length(size, number))
    baseline.index = RamIndex(size, header.pack, _baseline_entries(header))


def _load_all(cpu: Cpu, packs_dir: Path, header: RamIndex, reader: _ChunkReader) -> None:
    """Read every non-zero chunk of ``header`` into a new base and make it RAM."""
    size = cpu.memory_size
    fresh = _Baseline(cpu, packs_dir)
    try:
        for number, entry in enumerate(header.entries):
            if entry:
                start, length = number * CHUNK, chunk_length(size, number)
                reader.read(fresh.base[start : start + length], entry, number)
        if not fresh.tracked:
            ctypes.memmove(cpu._ram_ptr, fresh.ptr, size)
    except BaseException:
        fresh.close()
        raise
    _adopt(cpu, fresh)
    fresh.index = RamIndex(size, header.pack, _baseline_entries(header))

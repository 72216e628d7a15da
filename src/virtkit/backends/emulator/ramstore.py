"""Incremental storage of guest RAM for full snapshots.

Every full snapshot of a guest stores its RAM as an *index* (inside the
snapshot's state file, ``state.bin``) into a *pack* shared by all of that
guest's snapshots (``snapshots/emulator-ram-<generation>.pack``). The pack
holds 64 KiB chunks, appended once and never overwritten; an index maps each
chunk of guest RAM to a chunk in the pack, or to zero.

A running machine keeps a *baseline*: RAM as it was at the last snapshot or
revert (the *base*, see :mod:`~virtkit.backends.emulator.dirtytrack`) and
that snapshot's index. RAM is mapped copy-on-write over the base, so the
kernel tells which pages the guest (or a device, or the loader) wrote since:
a new snapshot looks only at the chunks holding such pages, appends those
that really differ from the base and reuses the baseline's pack entries for
the rest. Its cost follows what changed, not the memory size. A revert to the
baseline's snapshot drops the written pages; a revert to another snapshot
also reads the chunks whose pack entries differ. Where the kernel cannot
report written pages, RAM is compared with the base instead (``memcmp``).

Crash safety: chunks are appended and ``fdatasync``-ed before the state file
that names them is written (temporary name, ``fsync``, rename); the state
file carries a checksum, so a torn file is refused, never loaded. A
crash leaves at most unreferenced bytes at the pack's end and a temporary
file. The new folder and its rename become durable with the journal commit
of the snapshot list's ``fsync``, which follows; files rewritten in place
(compaction, below) have their folder synced before the old pack goes.

Deleted snapshots leave garbage in the pack; when garbage outweighs live
data the next snapshot writes a new pack generation, rewrites every index to
it (each index names its own pack, so a crash part-way leaves every index
valid), and removes the old pack.

On-disk formats (little-endian):

* pack: ``VKPACK01``, then chunk data at the offsets the indexes give;
* index: ``VKRAM002``, RAM size (u64), chunk size (u32), pack file name length
  (u16) and name (UTF-8, a plain name in ``snapshots/``), then one u64 per
  chunk: 0 for a zero chunk, else the chunk's byte offset in the pack;
* state file: ``VKSTAT01``, a CRC-32 (u32) of everything after it, the length
  (u32) of the caller's machine state, that state (CPU context and devices,
  see :mod:`~virtkit.backends.emulator.state`), then the index. States saved
  before it held the index alone in ``ram.bin``; they still load.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import weakref
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from virtkit.backends.emulator import dirtytrack
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

CHUNK = 64 * 1024
INDEX_MAGIC = b"VKRAM002"
PACK_MAGIC = b"VKPACK01"
STATE_MAGIC = b"VKSTAT01"
#: a snapshot folder's state file (machine state and RAM index)
STATE_FILE = "state.bin"
#: the index alone, as states saved before the state file hold it
LEGACY_INDEX_FILE = "ram.bin"
_INDEX_HEADER = struct.Struct("<8sQIH")
_STATE_HEADER = struct.Struct("<8sII")
_PACK_NAME = re.compile(r"^emulator-ram-(\d{1,9})\.pack$")
#: compact when the pack is this much bigger than what indexes still use
_GARBAGE_RATIO = 2
_GARBAGE_FLOOR = 64 * 1024**2
#: chunks compared with one memcmp before looking at each of them (untracked RAM)
_BLOCK = 16
_PAGES_PER_CHUNK = CHUNK // dirtytrack.PAGE

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_ZERO = (ctypes.c_char * CHUNK)()
_ZERO_PTR = ctypes.addressof(_ZERO)


class _Index:
    """Where each chunk of one snapshot's RAM lives: a pack name and offsets."""

    def __init__(self, size: int, pack: str, entries: list[int]) -> None:
        self.size = size
        self.pack = pack
        self.entries = entries

    def encode(self) -> bytes:
        name = self.pack.encode()
        header = _INDEX_HEADER.pack(INDEX_MAGIC, self.size, CHUNK, len(name))
        return header + name + struct.pack(f"<{len(self.entries)}Q", *self.entries)

    @classmethod
    def decode(cls, data: bytes | memoryview, where: Path) -> _Index:
        """Parse an index (bounds within the pack are checked by :meth:`check_bounds`).

        Raises:
            BackendError: truncated, not an index, or an invalid pack name.
        """
        if len(data) < _INDEX_HEADER.size:
            raise BackendError(f"{where} is truncated (no RAM index header)")
        magic, size, chunk, name_len = _INDEX_HEADER.unpack_from(data)
        if magic != INDEX_MAGIC or chunk != CHUNK:
            raise BackendError(f"{where} is not a virtkit RAM index")
        start = _INDEX_HEADER.size + name_len
        try:
            pack = bytes(data[_INDEX_HEADER.size : start]).decode()
        except UnicodeDecodeError:
            raise BackendError(f"{where} names a pack that is not UTF-8") from None
        if not _PACK_NAME.match(pack):
            raise BackendError(f"{where} names an invalid pack file {pack!r}")
        count = _chunks(size)
        if len(data) != start + 8 * count:
            raise BackendError(
                f"{where} has {len(data) - start} bytes of RAM index entries, not {8 * count}"
            )
        return cls(size, pack, list(struct.unpack_from(f"<{count}Q", data, start)))

    def check_bounds(self, path: Path, pack_size: int) -> None:
        for number, offset in enumerate(self.entries):
            if offset and (
                offset < len(PACK_MAGIC) or offset + _length(self.size, number) > pack_size
            ):
                raise BackendError(
                    f"{path} is damaged: chunk {number} points at {offset}, outside its pack "
                    f"({pack_size} bytes)"
                )


class SavedState:
    """A snapshot's state file, parsed: the caller's machine state and the RAM index.

    ``extra`` is None for a state saved before the state file existed (its
    machine state lives in separate files); ``path`` is the file the index
    came from.
    """

    def __init__(self, path: Path, extra: bytes | None, index: _Index) -> None:
        self.path = path
        self.extra = extra
        self.index = index

    def encode(self) -> bytes:
        """The file's bytes (the legacy index file for a state without ``extra``)."""
        if self.extra is None:
            return self.index.encode()
        body = struct.pack("<I", len(self.extra)) + self.extra + self.index.encode()
        return STATE_MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def read_state(folder: Path) -> SavedState:
    """Read and check a snapshot folder's state file (or its legacy ``ram.bin`` index).

    Raises:
        BackendError: the file is missing, truncated, fails its checksum or is
            not a virtkit state.
    """
    path = folder / STATE_FILE
    if not path.exists() and (folder / LEGACY_INDEX_FILE).exists():
        legacy = folder / LEGACY_INDEX_FILE
        return SavedState(legacy, None, _Index.decode(_read(legacy), legacy))
    data = _read(path)
    if len(data) < _STATE_HEADER.size:
        raise BackendError(f"{path} is truncated (no header)")
    magic, crc, extra_len = _STATE_HEADER.unpack_from(data)
    if magic != STATE_MAGIC:
        raise BackendError(f"{path} is not a virtkit machine state")
    if zlib.crc32(memoryview(data)[len(STATE_MAGIC) + 4 :]) != crc:
        raise BackendError(f"{path} is damaged (checksum mismatch)")
    start = _STATE_HEADER.size
    if extra_len > len(data) - start:
        raise BackendError(f"{path} is truncated (machine state of {extra_len} bytes)")
    extra = data[start : start + extra_len]
    return SavedState(path, extra, _Index.decode(memoryview(data)[start + extra_len :], path))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BackendError(f"{path} cannot be read: {exc.strerror}") from exc


class _Baseline:
    """A machine's RAM as of its last snapshot or revert, and that snapshot's index.

    The base is a :class:`~virtkit.backends.emulator.dirtytrack.Tracker`'s
    memory file; when the kernel tracks writes (``tracked``), RAM is mapped
    copy-on-write over it once the base is filled.
    """

    def __init__(self, cpu: Cpu, packs_dir: Path) -> None:
        self.tracker = dirtytrack.Tracker(cpu._ram_ptr, cpu.memory_size)
        self.tracked = dirtytrack.supported()
        self.ptr = self.tracker.base_ptr
        self.base = memoryview(self.tracker.base)
        self.index: _Index | None = None
        self.packs_dir = packs_dir

    def close(self) -> None:
        self.base.release()
        self.tracker.close()


#: one baseline per live CPU; dropped with the CPU
_baselines: weakref.WeakKeyDictionary[Cpu, _Baseline] = weakref.WeakKeyDictionary()


def _chunks(size: int) -> int:
    return size // CHUNK + (1 if size % CHUNK else 0)


def _length(size: int, number: int) -> int:
    return min(CHUNK, size - number * CHUNK)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old file or the new one, whole.

    ``sync_dir=False`` leaves the rename to the file system's next journal
    commit: for a new snapshot's state file, whose folder the snapshot list
    (written next, with its own ``fsync`` calls) makes reachable.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


class _Pack:
    """An append-only chunk file, opened for appending."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.end = os.fstat(self.fd).st_size
        if self.end == 0:
            os.pwrite(self.fd, PACK_MAGIC, 0)
            self.end = len(PACK_MAGIC)
        elif os.pread(self.fd, len(PACK_MAGIC), 0) != PACK_MAGIC:
            os.close(self.fd)
            raise BackendError(f"{path} is not a virtkit RAM pack")
        self.appended = 0

    def append(self, data: memoryview | bytes) -> int:
        offset = self.end
        written = os.pwrite(self.fd, data, offset)
        if written != len(data):
            raise BackendError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        self.end += written
        self.appended += written
        return offset

    def sync(self) -> None:
        if self.appended:
            os.fdatasync(self.fd)
            self.appended = 0

    def close(self) -> None:
        os.close(self.fd)


def _current_pack(packs_dir: Path) -> str:
    """The newest pack generation's file name (a new one when there is none)."""
    generations = [
        int(match.group(1))
        for entry in (os.listdir(packs_dir) if packs_dir.is_dir() else ())
        if (match := _PACK_NAME.match(entry))
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
    live_offsets = {off for saved in users for off in saved.index.entries if off}
    if baseline is not None and baseline.index is not None and baseline.index.pack == pack_name:
        live_offsets.update(off for off in baseline.index.entries if off)
    live = len(live_offsets) * CHUNK
    if pack_size < _GARBAGE_FLOOR or pack_size < _GARBAGE_RATIO * live:
        return pack_name
    generation = int(pack_name.removeprefix("emulator-ram-").removesuffix(".pack"))
    new_name = f"emulator-ram-{generation + 1}.pack"
    new_pack = _Pack(packs_dir / new_name)
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
    _fsync_dir(packs_dir)
    for saved in users:
        saved.index.pack = new_name
        saved.index.entries = [moved.get(off, 0) if off else 0 for off in saved.index.entries]
        _atomic_write(saved.path, saved.encode())
    if baseline is not None and baseline.index is not None and baseline.index.pack == pack_name:
        baseline.index.pack = new_name
        baseline.index.entries = [moved[off] if off else 0 for off in baseline.index.entries]
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


def _store(pack: _Pack, ram: memoryview, ram_ptr: int, start: int, length: int) -> int:
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
    return [(n * _PAGES_PER_CHUNK, _length(size, n) // dirtytrack.PAGE) for n in chunks]


def _differing(cpu: Cpu, baseline: _Baseline) -> list[int]:
    """Chunks of untracked RAM that differ from the base (a full ``memcmp``)."""
    size, count = cpu.memory_size, _chunks(cpu.memory_size)
    out: list[int] = []
    for first in range(0, count, _BLOCK):
        start = first * CHUNK
        length = min(_BLOCK * CHUNK, size - start)
        if _memcmp(cpu._ram_ptr + start, baseline.ptr + start, length) == 0:
            continue  # most of RAM is unchanged: one call for a block of chunks
        for number in range(first, min(first + _BLOCK, count)):
            start = number * CHUNK
            if _memcmp(cpu._ram_ptr + start, baseline.ptr + start, _length(size, number)):
                out.append(number)
    return out


def _save_changes(
    cpu: Cpu, baseline: _Baseline, base_index: _Index, pack: _Pack
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
    changed: list[int] = []
    for number in candidates:
        start, length = number * CHUNK, _length(size, number)
        if _memcmp(cpu._ram_ptr + start, baseline.ptr + start, length) == 0:
            continue  # written with what it held: the baseline's entry still holds
        entries[number] = _store(pack, ram, cpu._ram_ptr, start, length)
        changed.append(number)

    def settle() -> None:
        if baseline.tracked:
            baseline.tracker.settle(runs)
        else:
            for number in changed:
                start = number * CHUNK
                ctypes.memmove(baseline.ptr + start, cpu._ram_ptr + start, _length(size, number))

    return entries, settle


def _save_all(cpu: Cpu, packs_dir: Path, pack: _Pack) -> tuple[list[int], _Baseline]:
    """Entries storing every non-zero chunk, and a new baseline holding them as its base."""
    size = cpu.memory_size
    ram = memoryview(cpu.ram)
    baseline = _Baseline(cpu, packs_dir)
    try:
        entries: list[int] = []
        for number in range(_chunks(size)):
            start, length = number * CHUNK, _length(size, number)
            entry = _store(pack, ram, cpu._ram_ptr, start, length)
            if entry:
                ctypes.memmove(baseline.ptr + start, cpu._ram_ptr + start, length)
            entries.append(entry)
    except BaseException:
        baseline.close()
        raise
    return entries, baseline


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
    pack = _Pack(packs_dir / pack_name)
    try:
        if baseline is not None and base_index is not None and base_index.pack == pack_name:
            entries, settle = _save_changes(cpu, baseline, base_index, pack)
        else:
            entries, fresh = _save_all(cpu, packs_dir, pack)
        appended = pack.appended
        pack.sync()
        index = _Index(cpu.memory_size, pack_name, entries)
        state = SavedState(folder / STATE_FILE, extra, index)
        _atomic_write(state.path, state.encode(), sync_dir=False)
    except BaseException:
        if fresh is not None:
            fresh.close()
        raise
    finally:
        pack.close()
    if fresh is None:
        assert baseline is not None
        settle()
        baseline.index = index
        return appended
    _adopt(cpu, fresh)
    fresh.index = index
    return appended


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
        if (
            baseline is not None
            and baseline.packs_dir == packs_dir
            and baseline.index is not None
            and baseline.index.pack == header.pack
        ):
            _revert_changes(cpu, baseline, header, fd, pack_path)
        else:
            _load_all(cpu, packs_dir, header, fd, pack_path)
    finally:
        os.close(fd)


def _read_chunk(fd: int, into: memoryview, offset: int, pack_path: Path, number: int) -> None:
    if os.preadv(fd, [into], offset) != len(into):
        raise BackendError(f"{pack_path} is truncated at chunk {number}")


def _revert_changes(
    cpu: Cpu, baseline: _Baseline, header: _Index, fd: int, pack_path: Path
) -> None:
    """Bring RAM from the baseline's snapshot (plus what was written since) to ``header``'s."""
    assert baseline.index is not None
    size = cpu.memory_size
    known = baseline.index.entries
    baseline.index = None  # until every chunk is in place: a failure leaves it unknown
    differ = [n for n, offset in enumerate(header.entries) if known[n] != offset]
    for number in differ:
        start, length = number * CHUNK, _length(size, number)
        offset = header.entries[number]
        if offset == 0:
            baseline.tracker.zero_base(start, length)
        else:
            _read_chunk(fd, baseline.base[start : start + length], offset, pack_path, number)
    if baseline.tracked:
        # the written pages, and the changed chunks for good measure, read the base again
        runs = baseline.tracker.runs(baseline.tracker.dirty())
        baseline.tracker.discard(runs + _pages_of(differ, size))
    else:
        for number in sorted(set(differ).union(_differing(cpu, baseline))):
            start = number * CHUNK
            ctypes.memmove(cpu._ram_ptr + start, baseline.ptr + start, _length(size, number))
    baseline.index = header


def _load_all(cpu: Cpu, packs_dir: Path, header: _Index, fd: int, pack_path: Path) -> None:
    """Read every non-zero chunk of ``header`` into a new base and make it RAM."""
    size = cpu.memory_size
    fresh = _Baseline(cpu, packs_dir)
    try:
        for number, offset in enumerate(header.entries):
            if offset:
                start, length = number * CHUNK, _length(size, number)
                _read_chunk(fd, fresh.base[start : start + length], offset, pack_path, number)
        if not fresh.tracked:
            ctypes.memmove(cpu._ram_ptr, fresh.ptr, size)
    except BaseException:
        fresh.close()
        raise
    _adopt(cpu, fresh)
    fresh.index = header

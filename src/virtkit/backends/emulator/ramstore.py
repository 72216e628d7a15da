"""Incremental storage of guest RAM for full snapshots.

Every full snapshot of a guest stores its RAM as an *index* (``ram.bin`` in the
snapshot's folder) into a *pack* shared by all of that guest's snapshots
(``snapshots/emulator-ram-<generation>.pack``). The pack holds 64 KiB chunks,
appended once and never overwritten; an index maps each chunk of guest RAM to
a chunk in the pack, or to zero.

A running machine keeps a *baseline*: a private copy of its RAM as it was at
the last snapshot or revert, and that snapshot's index. A new snapshot
compares RAM with the baseline chunk by chunk (``memcmp``), appends only the
chunks that changed, and reuses the baseline's pack entries for the rest, so
its cost follows what the guest changed, not its memory size. A revert to the
baseline's snapshot copies back only the chunks that differ; a revert to
another snapshot reads only the chunks whose pack entries differ.

Crash safety: chunks are appended and ``fdatasync``-ed before the index that
names them is written (temporary name, fsync, rename). A crash leaves at most
unreferenced bytes at the pack's end. Deleted snapshots leave garbage in the
pack; when garbage outweighs live data the next snapshot writes a new pack
generation, rewrites every index to it (each index names its own pack, so a
crash part-way leaves every index valid), and removes the old pack.

On-disk formats (little-endian):

* pack: ``VKPACK01``, then chunk data at the offsets the indexes give;
* index: ``VKRAM002``, RAM size (u64), chunk size (u32), pack file name length
  (u16) and name (UTF-8, a plain name in ``snapshots/``), then one u64 per
  chunk: 0 for a zero chunk, else the chunk's byte offset in the pack.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import struct
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from virtkit.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from virtkit.backends.emulator.cpu import Cpu

__all__ = ["CHUNK", "INDEX_MAGIC", "forget", "load_ram", "save_ram"]

CHUNK = 64 * 1024
INDEX_MAGIC = b"VKRAM002"
PACK_MAGIC = b"VKPACK01"
_INDEX_HEADER = struct.Struct("<8sQIH")
_PACK_NAME = re.compile(r"^emulator-ram-(\d{1,9})\.pack$")
#: compact when the pack is this much bigger than what indexes still use
_GARBAGE_RATIO = 2
_GARBAGE_FLOOR = 64 * 1024**2
#: chunks compared with one memcmp before looking at each of them
_BLOCK = 16

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
    def read(cls, path: Path, pack_size: int | None = None) -> _Index:
        """Parse and bound-check an index file.

        Raises:
            BackendError: the file is missing, truncated or names data outside its pack.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BackendError(f"{path} cannot be read: {exc.strerror}") from exc
        if len(data) < _INDEX_HEADER.size:
            raise BackendError(f"{path} is truncated (no header)")
        magic, size, chunk, name_len = _INDEX_HEADER.unpack_from(data)
        if magic != INDEX_MAGIC or chunk != CHUNK:
            raise BackendError(f"{path} is not a virtkit RAM index")
        start = _INDEX_HEADER.size + name_len
        try:
            pack = data[_INDEX_HEADER.size : start].decode()
        except UnicodeDecodeError:
            raise BackendError(f"{path} names a pack that is not UTF-8") from None
        if not _PACK_NAME.match(pack):
            raise BackendError(f"{path} names an invalid pack file {pack!r}")
        count = _chunks(size)
        if len(data) != start + 8 * count:
            raise BackendError(f"{path} has {len(data) - start} bytes of entries, not {8 * count}")
        entries = list(struct.unpack_from(f"<{count}Q", data, start))
        index = cls(size, pack, entries)
        if pack_size is not None:
            index.check_bounds(path, pack_size)
        return index

    def check_bounds(self, path: Path, pack_size: int) -> None:
        for number, offset in enumerate(self.entries):
            if offset and (
                offset < len(PACK_MAGIC) or offset + _length(self.size, number) > pack_size
            ):
                raise BackendError(
                    f"{path} is damaged: chunk {number} points at {offset}, outside its pack "
                    f"({pack_size} bytes)"
                )


class _Baseline:
    """A machine's RAM as of its last snapshot or revert, and that snapshot's index."""

    def __init__(self, size: int) -> None:
        self.copy = mmap.mmap(-1, size)
        self._c = (ctypes.c_char * size).from_buffer(self.copy)
        self.ptr = ctypes.addressof(self._c)
        self.index: _Index | None = None
        self.packs_dir: Path | None = None

    def close(self) -> None:
        del self._c
        self.copy.close()


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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def _indexes(packs_dir: Path) -> Iterable[tuple[Path, _Index]]:
    """Every readable index of this guest's snapshots (damaged ones are skipped)."""
    state = packs_dir / "state"
    if not state.is_dir():
        return
    for folder in sorted(state.iterdir()):
        path = folder / "ram.bin"
        try:
            with open(path, "rb") as fh:
                if fh.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                    continue
            yield path, _Index.read(path)
        except (OSError, BackendError):
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
    users = [(path, index) for path, index in _indexes(packs_dir) if index.pack == pack_name]
    live_offsets = {off for _, index in users for off in index.entries if off}
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
    for path, index in users:
        index.pack = new_name
        index.entries = [moved.get(off, 0) if off else 0 for off in index.entries]
        _atomic_write(path, index.encode())
    if baseline is not None and baseline.index is not None and baseline.index.pack == pack_name:
        baseline.index.pack = new_name
        baseline.index.entries = [moved[off] if off else 0 for off in baseline.index.entries]
    pack_path.unlink()
    return new_name


def forget(cpu: Cpu) -> None:
    """Drop the CPU's baseline (its RAM was replaced by other means)."""
    baseline = _baselines.pop(cpu, None)
    if baseline is not None:
        baseline.close()


def _store(pack: _Pack, ram: memoryview, ram_ptr: int, start: int, length: int) -> int:
    """The index entry for one changed chunk: 0 when it is zero, else where it was appended."""
    if _memcmp(ram_ptr + start, _ZERO_PTR, length) == 0:
        return 0
    return pack.append(ram[start : start + length])


def save_ram(cpu: Cpu, folder: Path) -> int:
    """Store the CPU's RAM as ``folder/ram.bin``; returns the bytes appended to the pack.

    ``folder`` is a snapshot folder (``snapshots/state/NAME``); the pack lives
    two levels up, in ``snapshots/``.
    """
    packs_dir = folder.parent.parent
    baseline = _baselines.get(cpu)
    if baseline is not None and baseline.packs_dir != packs_dir:
        baseline = None  # the guest's folder moved: start a fresh chain
    pack_name = _compact_if_worth_it(packs_dir, _current_pack(packs_dir), baseline)
    base_index = baseline.index if baseline is not None else None
    reuse = base_index is not None and base_index.pack == pack_name
    size = cpu.memory_size
    ram = memoryview(cpu.ram)
    entries: list[int] = []
    changed: list[int] = []
    count = _chunks(size)
    pack = _Pack(packs_dir / pack_name)
    try:
        number = 0
        while number < count:
            start = number * CHUNK
            if reuse and baseline is not None and base_index is not None:
                # compare a block of chunks at once: most of RAM is unchanged
                block = min(_BLOCK, count - number)
                length = min(block * CHUNK, size - start)
                if _memcmp(cpu._ram_ptr + start, baseline.ptr + start, length) == 0:
                    entries.extend(base_index.entries[number : number + block])
                    number += block
                    continue
                for _ in range(block):
                    start, length = number * CHUNK, min(CHUNK, size - number * CHUNK)
                    if _memcmp(cpu._ram_ptr + start, baseline.ptr + start, length) == 0:
                        entries.append(base_index.entries[number])
                    else:
                        entries.append(_store(pack, ram, cpu._ram_ptr, start, length))
                        changed.append(number)
                    number += 1
                continue
            length = min(CHUNK, size - start)
            entries.append(_store(pack, ram, cpu._ram_ptr, start, length))
            changed.append(number)
            number += 1
        appended = pack.appended
        pack.sync()
    finally:
        pack.close()
    index = _Index(size, pack_name, entries)
    _atomic_write(folder / "ram.bin", index.encode())
    if baseline is None or not reuse:
        if baseline is not None:
            baseline.close()
        baseline = _Baseline(size)
        baseline.packs_dir = packs_dir
        ctypes.memmove(baseline.ptr, cpu._ram_ptr, size)
        _baselines[cpu] = baseline
    else:
        for number in changed:
            start = number * CHUNK
            ctypes.memmove(baseline.ptr + start, cpu._ram_ptr + start, _length(size, number))
    baseline.index = index
    return appended


def load_ram(cpu: Cpu, folder: Path) -> None:
    """Restore RAM from ``folder/ram.bin`` written by :func:`save_ram`.

    Only chunks that differ from what the machine holds are copied.

    Raises:
        ConfigError: the snapshot's RAM size differs from the machine's.
        BackendError: the index or its pack is missing or damaged.
    """
    packs_dir = folder.parent.parent
    path = folder / "ram.bin"
    header = _Index.read(path)
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
        if baseline is None or baseline.packs_dir != packs_dir or baseline.index is None:
            if baseline is not None:
                baseline.close()
            baseline = _Baseline(cpu.memory_size)
            baseline.packs_dir = packs_dir
            _baselines[cpu] = baseline
            known: list[int | None] = [None] * len(header.entries)
        else:
            same_pack = baseline.index.pack == header.pack
            known = [off if same_pack else None for off in baseline.index.entries]
        baseline.index = None  # until every chunk is in place: a failure leaves it unknown
        ram = memoryview(cpu.ram)
        base = memoryview(baseline.copy)
        for number, offset in enumerate(header.entries):
            start, length = number * CHUNK, _length(header.size, number)
            here = cpu._ram_ptr + start
            if known[number] == offset:
                # the baseline holds this snapshot's chunk: undo only what the guest changed
                if _memcmp(here, baseline.ptr + start, length):
                    ctypes.memmove(here, baseline.ptr + start, length)
            elif offset == 0:
                ctypes.memset(here, 0, length)
                ctypes.memset(baseline.ptr + start, 0, length)
            else:
                got = os.preadv(fd, [ram[start : start + length]], offset)
                if got != length:
                    raise BackendError(f"{pack_path} is truncated at chunk {number}")
                base[start : start + length] = ram[start : start + length]
        baseline.index = header
    finally:
        os.close(fd)

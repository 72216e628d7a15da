"""On-disk formats of emulator RAM snapshots: the chunk pack, indexes, state files.

:mod:`~virtkit.backends.emulator.ramstore` decides what to store; this
module reads and writes it, checks everything it reads, and keeps track of
which pack bytes are durable.

Formats (little-endian):

* pack (``snapshots/emulator-ram-<generation>.pack``): ``VKPACK01``, then
  64 KiB chunks at the offsets the indexes give, appended and never
  overwritten;
* index: ``VKRAM002``, RAM size (u64), chunk size (u32), pack file name
  length (u16) and name (UTF-8, a plain name in ``snapshots/``), then one u64
  per chunk: 0 for a zero chunk, the chunk's byte offset in the pack, or
  :data:`INLINE` plus the chunk's offset in the state file's inline data;
* state file (``state.bin`` in a snapshot's folder): ``VKSTAT01``, a CRC-32
  (u32) of everything after it, the length (u32) of the caller's machine
  state and that state, the index, then the inline data: the chunks this
  snapshot added, when they are few. States saved before the state file held
  the index alone in ``ram.bin``.

Inline chunks are what lets a small snapshot cost one ``fsync``: the state
file carries the chunks whose pack copies are not known durable yet itself,
and those copies (which later snapshots refer to) are synced by a helper
thread (:meth:`Pack.sync_later`, :meth:`Pack.durable_below`).
"""

from __future__ import annotations

import os
import queue
import re
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

from virtkit.errors import BackendError

__all__ = [
    "CHUNK",
    "INDEX_MAGIC",
    "INLINE",
    "LEGACY_INDEX_FILE",
    "PACK_MAGIC",
    "PACK_NAME",
    "STATE_FILE",
    "STATE_MAGIC",
    "Pack",
    "RamIndex",
    "SavedState",
    "atomic_write",
    "chunk_count",
    "chunk_length",
    "fsync_dir",
    "read_state",
]

CHUNK = 64 * 1024
INDEX_MAGIC = b"VKRAM002"
PACK_MAGIC = b"VKPACK01"
STATE_MAGIC = b"VKSTAT01"
#: a snapshot folder's state file (machine state and RAM index)
STATE_FILE = "state.bin"
#: the index alone, as states saved before the state file hold it
LEGACY_INDEX_FILE = "ram.bin"
#: an index entry with this bit names a chunk in the state file's inline data
INLINE = 1 << 63
PACK_NAME = re.compile(r"^emulator-ram-(\d{1,9})\.pack$")
_INDEX_HEADER = struct.Struct("<8sQIH")
_STATE_HEADER = struct.Struct("<8sII")


def chunk_count(size: int) -> int:
    """Chunks of a RAM of ``size`` bytes (the last one may be short)."""
    return size // CHUNK + (1 if size % CHUNK else 0)


def chunk_length(size: int, number: int) -> int:
    """Bytes in chunk ``number`` of a RAM of ``size`` bytes."""
    return min(CHUNK, size - number * CHUNK)


class RamIndex:
    """Where each chunk of one snapshot's RAM lives: a pack name and entries.

    ``inline`` holds the chunks the entries with :data:`INLINE` point into.
    """

    def __init__(self, size: int, pack: str, entries: list[int], inline: bytes = b"") -> None:
        self.size = size
        self.pack = pack
        self.entries = entries
        self.inline = inline

    def encode(self) -> bytes:
        """The index's bytes (without the inline data)."""
        name = self.pack.encode()
        header = _INDEX_HEADER.pack(INDEX_MAGIC, self.size, CHUNK, len(name))
        return header + name + struct.pack(f"<{len(self.entries)}Q", *self.entries)

    @classmethod
    def decode(cls, data: bytes, where: Path, *, trailing: bool = False) -> RamIndex:
        """Parse an index; with ``trailing`` the bytes after it are its inline data.

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
            pack = data[_INDEX_HEADER.size : start].decode()
        except UnicodeDecodeError:
            raise BackendError(f"{where} names a pack that is not UTF-8") from None
        if not PACK_NAME.match(pack):
            raise BackendError(f"{where} names an invalid pack file {pack!r}")
        count = chunk_count(size)
        end = start + 8 * count
        if len(data) < end or (len(data) != end and not trailing):
            raise BackendError(
                f"{where} has {len(data) - start} bytes of RAM index entries, not {8 * count}"
            )
        entries = list(struct.unpack_from(f"<{count}Q", data, start))
        return cls(size, pack, entries, data[end:])

    def check_bounds(self, path: Path, pack_size: int) -> None:
        """Every entry inside its pack (``pack_size`` bytes) or the inline data.

        Raises:
            BackendError: an entry points outside, naming the file and chunk.
        """
        for number, entry in enumerate(self.entries):
            if entry == 0:
                continue
            length = chunk_length(self.size, number)
            if entry & INLINE:
                offset, limit, where = entry & ~INLINE, len(self.inline), "its inline data"
                inside = offset + length <= limit
            else:
                offset, limit, where = entry, pack_size, "its pack"
                inside = len(PACK_MAGIC) <= offset and offset + length <= limit
            if not inside:
                raise BackendError(
                    f"{path} is damaged: chunk {number} points at {offset}, outside {where} "
                    f"({limit} bytes)"
                )


class SavedState:
    """A snapshot's state file, parsed: the caller's machine state and the RAM index.

    ``extra`` is None for a state saved before the state file existed (its
    machine state lives in separate files); ``path`` is the file the index
    came from.
    """

    def __init__(self, path: Path, extra: bytes | None, index: RamIndex) -> None:
        self.path = path
        self.extra = extra
        self.index = index

    def encode(self) -> bytes:
        """The file's bytes (the legacy index file for a state without ``extra``)."""
        if self.extra is None:
            return self.index.encode()
        body = b"".join(
            (
                struct.pack("<I", len(self.extra)),
                self.extra,
                self.index.encode(),
                self.index.inline,
            )
        )
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
        return SavedState(legacy, None, RamIndex.decode(_read(legacy), legacy))
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
    index = RamIndex.decode(data[start + extra_len :], path, trailing=True)
    return SavedState(path, extra, index)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BackendError(f"{path} cannot be read: {exc.strerror}") from exc


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
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
        fsync_dir(path.parent)


#: per pack file: (lowest offset appended and not yet known durable, generation)
_unsynced: dict[Path, tuple[int, int]] = {}
_unsynced_lock = threading.Lock()


_work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_worker: threading.Thread | None = None


def _in_background(work: Callable[[], None]) -> None:
    """Run ``work`` on the one helper thread (started once; handing over costs no wake-up
    wait, unlike starting a thread per snapshot)."""
    global _worker  # noqa: PLW0603 - one helper per process
    with _unsynced_lock:
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_serve, name="virtkit-ram-sync", daemon=True)
            _worker.start()
    _work.put(work)


def _serve() -> None:
    while True:
        _work.get()()


class Pack:
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
        self.first = self.end

    def append(self, data: memoryview | bytes) -> int:
        """Write ``data`` at the end; returns its offset."""
        offset = self.end
        written = os.pwrite(self.fd, data, offset)
        if written != len(data):
            raise BackendError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        self.end += written
        self.appended += written
        return offset

    def sync(self) -> None:
        """Make everything appended so far, by this process too, durable."""
        os.fdatasync(self.fd)
        self.appended = 0
        with _unsynced_lock:
            _unsynced.pop(self.path, None)

    def durable_below(self) -> int:
        """Pack offsets below this are known durable (this call's appends are not,
        until :meth:`sync`, nor earlier ones :meth:`sync_later` has not synced yet)."""
        low = self.first if self.appended else self.end
        with _unsynced_lock:
            return min(low, _unsynced.get(self.path, (low, 0))[0])

    def sync_later(self) -> None:
        """Sync this call's appends on the helper thread (:meth:`durable_below` counts
        them as not durable until it has)."""
        if not self.appended:
            return
        with _unsynced_lock:
            low, generation = _unsynced.get(self.path, (self.first, 0))
            generation += 1
            _unsynced[self.path] = (min(low, self.first), generation)
        self.appended = 0
        path = self.path

        def run() -> None:
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError:
                return  # the next snapshot that needs the bytes syncs them itself
            with _unsynced_lock:
                if _unsynced.get(path, (0, -1))[1] == generation:
                    del _unsynced[path]

        _in_background(run)

    def close(self) -> None:
        """Close the file (appends not synced stay where :meth:`sync_later` left them)."""
        os.close(self.fd)

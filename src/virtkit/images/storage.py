"""Byte I/O under the image engine: the one seam between formats and files.

Format drivers never touch file objects directly; they call a
:class:`Storage`. That keeps I/O policy (positional reads, durable flushes,
short-read detection) in one place and lets tests put a fault-injecting
storage underneath (crash after the N-th write, drop unflushed writes, ENOSPC).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from virtkit.errors import CorruptImageError, ImageError
from virtkit.images import locking

__all__ = ["FileStorage", "Storage"]


class Storage(Protocol):
    """Positional byte I/O on one file."""

    path: str

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset`` (short only at end of file)."""
        ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``."""
        ...

    def size(self) -> int:
        """Current file length in bytes."""
        ...

    def truncate(self, length: int) -> None:
        """Set the file length (growing reads as zeroes)."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    def close(self) -> None:
        """Release the file. Idempotent."""
        ...


#: Fault-injection hook (see :mod:`virtkit.testing.faults`), None in normal use. Called as
#: ``hook(storage, op, offset, length, data)`` before ``"pwrite"`` (``data`` is the bytes),
#: ``"truncate"``, ``"flush"`` and ``"punch_hole"`` (``data`` None) touch the file; it may
#: raise (an ``OSError`` is translated like a real one).
_fault_hook: Callable[[Any, str, int, int, memoryview | None], None] | None = None

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_fallocate_cache: list[Callable[[int, int, int, int], int] | None] = []


def _fallocate_fn() -> Callable[[int, int, int, int], int] | None:
    """libc ``fallocate`` through ctypes (os has no PUNCH_HOLE), or None."""
    if not _fallocate_cache:
        fn: Callable[[int, int, int, int], int] | None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            cfn = libc.fallocate
            cfn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            cfn.restype = ctypes.c_int
            fn = cfn
        except (OSError, AttributeError):
            fn = None
        _fallocate_cache.append(fn)
    return _fallocate_cache[0]


class FileStorage:
    """A :class:`Storage` on a real file, with ``os.pread``/``os.pwrite``.

    Opening takes QEMU-compatible image locks (see :mod:`virtkit.images.locking`)
    unless ``lock=False``: a writable open holds the write permission and
    refuses to share it; a read-only open refuses to share write unless
    ``force_share`` (``qemu-img -U``).

    Raises:
        ImageError: the file cannot be opened (or exists, with ``create``).
        ImageLockedError: another open holds a conflicting lock.
        ConfigError: ``force_share`` with ``writable``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool,
        create: bool = False,
        lock: bool = True,
        force_share: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        perm, shared = locking.permissions_for(writable=writable, force_share=force_share)
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd: int | None = os.open(self.path, flags, 0o666)
        except FileExistsError as exc:
            raise ImageError("file already exists", path=self.path) from exc
        except OSError as exc:
            raise ImageError(f"cannot open: {exc.strerror}", path=self.path) from exc
        #: The file length, known while we hold the write lock (None: ask the kernel).
        self._size: int | None = None
        self.locked = False
        if lock:
            try:
                self.locked = locking.acquire(self.fd, self.path, perm=perm, shared=shared)
            except BaseException:
                os.close(self.fd)
                self.fd = None
                if create:
                    os.unlink(self.path)
                raise

    def _fd(self) -> int:
        if self.fd is None:
            raise ImageError("storage is closed", path=self.path)
        return self.fd

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset``; short only at end of file."""
        if offset < 0 or length < 0:
            raise CorruptImageError(
                f"negative read ({length} bytes)", path=self.path, offset=offset
            )
        fd = self._fd()
        chunks: list[bytes] = []
        done = 0
        try:
            while done < length:
                chunk = os.pread(fd, length - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        except OSError as exc:
            raise ImageError(f"read failed: {exc.strerror}", path=self.path, offset=offset) from exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``."""
        fd = self._fd()
        view = memoryview(data).cast("B")
        done = 0
        try:
            if _fault_hook is not None:
                _fault_hook(self, "pwrite", offset, len(view), view)
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            self._size = None  # part may have been written
            raise ImageError(
                f"write failed: {exc.strerror}", path=self.path, offset=offset + done
            ) from exc
        if self._size is not None and offset + done > self._size:
            self._size = offset + done

    def size(self) -> int:
        """Current file length in bytes.

        A writable storage holds the image's write lock, so nobody else changes
        the length: it is remembered after the first ``fstat`` and kept up to
        date by ``pwrite``/``truncate`` (a failed write forgets it).
        """
        if self._size is not None:
            return self._size
        size = os.fstat(self._fd()).st_size
        if self.writable and self.locked:
            self._size = size
        return size

    def truncate(self, length: int) -> None:
        """Set the file length."""
        try:
            self._size = None
            if _fault_hook is not None:
                _fault_hook(self, "truncate", length, 0, None)
            os.ftruncate(self._fd(), length)
        except OSError as exc:
            raise ImageError(f"truncate failed: {exc.strerror}", path=self.path) from exc
        if self.writable and self.locked:
            self._size = length

    def flush(self) -> None:
        """fdatasync the file."""
        try:
            if _fault_hook is not None:
                _fault_hook(self, "flush", 0, 0, None)
            os.fdatasync(self._fd())
        except OSError as exc:
            raise ImageError(f"flush failed: {exc.strerror}", path=self.path) from exc

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on disk (``st_blocks * 512``, as ``du``)."""
        try:
            return os.fstat(self._fd()).st_blocks * 512
        except OSError as exc:
            raise ImageError(f"stat failed: {exc.strerror}", path=self.path) from exc

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate ``[offset, offset+length)`` keeping the size; reads give zeroes.

        Returns False, having done nothing, when the file system cannot punch
        holes (the caller then writes zeroes).
        """
        fn = _fallocate_fn()
        if fn is None or length <= 0:
            return length <= 0
        fd = self._fd()
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fault_hook is not None:
            try:
                _fault_hook(self, "punch_hole", offset, length, None)
            except OSError as exc:
                raise ImageError(
                    f"punching a hole failed: {exc.strerror}", path=self.path, offset=offset
                ) from exc
        while True:
            if fn(fd, mode, offset, length) == 0:
                return True
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise ImageError(
                f"punching a hole failed: {os.strerror(err)}", path=self.path, offset=offset
            )

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(start, length, is_data)`` runs over the range from SEEK_DATA/SEEK_HOLE.

        Holes read as zeroes. Without SEEK_DATA support everything is data.
        """
        fd = self._fd()
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to end of file
                    yield pos, end - pos, False
                    return
                yield pos, end - pos, True
                return
            if data > pos:
                hole_end = min(data, end)
                yield pos, hole_end - pos, False
                pos = hole_end
                continue
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            data_end = min(max(hole, pos + 1), end)
            yield pos, data_end - pos, True
            pos = data_end

    def close(self) -> None:
        """Close the descriptor (dropping its locks). Idempotent."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

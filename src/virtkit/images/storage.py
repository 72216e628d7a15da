"""Byte I/O under the image engine: the one seam between formats and files.

Format drivers never touch file objects directly; they call a
:class:`Storage`. That keeps I/O policy (positional reads, durable flushes,
short-read detection) in one place and lets tests put a fault-injecting
storage underneath (crash after the N-th write, drop unflushed writes, ENOSPC).
"""

from __future__ import annotations

import os
from typing import Protocol

from virtkit.errors import CorruptImageError, ImageError

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


class FileStorage:
    """A :class:`Storage` on a real file, with ``os.pread``/``os.pwrite``."""

    def __init__(
        self, path: str | os.PathLike[str], *, writable: bool, create: bool = False
    ) -> None:
        self.path = os.fspath(path)
        self.writable = writable
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
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise ImageError(
                f"write failed: {exc.strerror}", path=self.path, offset=offset + done
            ) from exc

    def size(self) -> int:
        """Current file length in bytes."""
        return os.fstat(self._fd()).st_size

    def truncate(self, length: int) -> None:
        """Set the file length."""
        try:
            os.ftruncate(self._fd(), length)
        except OSError as exc:
            raise ImageError(f"truncate failed: {exc.strerror}", path=self.path) from exc

    def flush(self) -> None:
        """fdatasync the file."""
        try:
            os.fdatasync(self._fd())
        except OSError as exc:
            raise ImageError(f"flush failed: {exc.strerror}", path=self.path) from exc

    def close(self) -> None:
        """Close the descriptor. Idempotent."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

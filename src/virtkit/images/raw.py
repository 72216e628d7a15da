"""The raw format: the file *is* the disk, byte for byte.

A raw image has no metadata: its virtual size is the file's length, unwritten
ranges are file-system holes (created sparse, as ``qemu-img create -f raw``
does), ``write_zeroes`` and ``discard`` punch holes where the file system can
(else write zeroes), and ``block_status`` reports holes as ``"zero"`` from
``SEEK_DATA``/``SEEK_HOLE``, as ``qemu-img map`` does. Raw images have no
backing files and no internal snapshots.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from virtkit.errors import ConfigError, ImageError
from virtkit.images.args import check_bool, check_bytes, check_choice, check_int
from virtkit.images.base import CheckResult, Extent, ImageInfo
from virtkit.images.plain import SingleFileImage
from virtkit.images.publish import publish, temp_name
from virtkit.images.sizes import parse_size
from virtkit.images.storage import FileStorage, Storage

__all__ = ["RawImage", "create", "open"]

_SECTOR = 512
_ZERO_CHUNK = 1 << 20  # write_zeroes fallback buffer
_MAX_SIZE = (1 << 63) - 1  # the largest file length (off_t)


def _check_size(size: int) -> None:
    if size > _MAX_SIZE:
        raise ConfigError(
            f"'size' must be at most {_MAX_SIZE} bytes (got {size})", field="size", value=size
        )


class RawImage(SingleFileImage):
    """A raw disk image on a :class:`~virtkit.images.storage.Storage`.

    Args:
        storage: the byte I/O underneath (its length is the virtual size).
        writable: whether writes are allowed.
    """

    format_label = "raw"

    format = "raw"

    def __init__(self, storage: Storage, *, writable: bool) -> None:
        self._st: Storage | None = storage
        self.path = storage.path
        self._writable = writable
        self._size = storage.size()

    # -- properties -----------------------------------------------------
    @property
    def cluster_size(self) -> int:
        """512: raw has no clusters; the sector is the natural unit."""
        return _SECTOR

    @property
    def backing_file(self) -> str | None:
        """Always None: raw images have no backing file."""
        return None

    # -- guards ---------------------------------------------------------
    # -- data path ------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``.

        Raises:
            ImageError: the range runs past the end of the disk, or the image is closed.
        """
        storage = self._live()
        self._check_range(offset, length, "read")
        try:
            data = storage.pread(offset, length)
        except MemoryError as exc:
            raise ImageError(
                f"read: not enough memory for {length} bytes; read smaller ranges",
                path=self.path,
                offset=offset,
            ) from exc
        if len(data) < length:  # file shrunk under us: the missing tail reads as zeroes
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``.

        Raises:
            ImageError: read-only, closed, or the range runs past the end.
        """
        storage = self._writable_storage("write")
        view = check_bytes(data)
        self._check_range(offset, len(view), "write")
        if len(view):
            storage.pwrite(offset, view)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeroes, punching a hole where the file system can."""
        storage = self._writable_storage("write zeroes")
        self._check_range(offset, length, "write_zeroes")
        if length == 0:
            return
        punch = getattr(storage, "punch_hole", None)
        if punch is not None and punch(offset, length):
            return
        pos = offset
        zeros = bytes(min(_ZERO_CHUNK, length))
        while pos < offset + length:
            n = min(len(zeros), offset + length - pos)
            storage.pwrite(pos, zeros[:n] if n < len(zeros) else zeros)
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Release a range: punch a hole (reads then give zeroes), or do nothing."""
        storage = self._writable_storage("discard")
        self._check_range(offset, length, "discard")
        punch = getattr(storage, "punch_hole", None)
        if punch is not None and length:
            punch(offset, length)

    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Yield ``"data"`` and ``"zero"`` (hole) extents over the range."""
        storage = self._live()
        if length is None:
            if check_int(offset, "offset") < 0 or offset > self._size:
                raise ImageError(f"block_status: bad offset {offset!r}", path=self.path)
            length = self._size - offset
        self._check_range(offset, length, "block_status")
        extents = getattr(storage, "data_extents", None)
        if extents is None:
            if length:
                yield Extent(offset, length, "data")
            return
        pending: Extent | None = None
        for start, run, is_data in extents(offset, length):
            kind: Any = "data" if is_data else "zero"
            if pending is not None and pending.kind == kind:
                pending = Extent(pending.start, pending.length + run, kind)
                continue
            if pending is not None:
                yield pending
            pending = Extent(start, run, kind)
        if pending is not None:
            yield pending

    def flush(self) -> None:
        """fdatasync the file."""
        self._live().flush()

    def resize(self, size: int | str, *, shrink: bool = False) -> None:
        """Grow (new space reads as zeroes) or, with ``shrink=True``, cut the disk.

        Raises:
            ImageError: shrinking without ``shrink=True`` (as ``qemu-img resize``
                wants ``--shrink``), or read-only.
        """
        check_bool(shrink, "shrink")
        storage = self._writable_storage("resize")
        new = parse_size(size, field="size")
        _check_size(new)
        if new < self._size and not shrink:
            raise ImageError(
                f"shrinking from {self._size} to {new} bytes drops data; pass shrink=True",
                path=self.path,
            )
        storage.truncate(new)
        self._size = new

    # -- metadata -------------------------------------------------------
    def info(self) -> ImageInfo:
        """Format raw, virtual size, and the bytes allocated on disk."""
        storage = self._live()
        allocated = getattr(storage, "allocated_bytes", None)
        actual = allocated() if allocated is not None else storage.size()
        return ImageInfo(
            filename=self.path, format="raw", virtual_size=self._size, actual_size=actual
        )

    def check(self, repair: bool = False) -> CheckResult:
        """Raw has no metadata to damage: always clean."""
        self._live()
        check_bool(repair, "repair")
        return CheckResult()

    def close(self) -> None:
        """Flush (if writable) and release the file. Idempotent."""
        storage, self._st = self._st, None
        if storage is None:
            return
        try:
            if self._writable:
                storage.flush()
        finally:
            storage.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self._writable else "ro")
        return f"<RawImage {self.path!r} {self._size} bytes {state}>"


_PREALLOC = ("off", "falloc", "full")


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> RawImage:
    """Create a sparse raw image of ``size`` bytes and return it open for writing.

    Args:
        path: the file to create; it must not exist.
        size: virtual size in bytes.
        options: ``preallocation`` (``"off"`` default, ``"falloc"``, ``"full"``).

    Raises:
        ConfigError: missing size or an unknown option.
        ImageError: the file exists or cannot be written.
    """
    if size is None:
        raise ConfigError("a raw image needs a size", field="size")
    _check_size(size)
    prealloc = options.pop("preallocation", None) or "off"
    check_choice(prealloc, _PREALLOC, "preallocation")
    for name, value in options.items():
        if value is not None:
            raise ConfigError(f"raw images have no option {name!r}", field=name)
    target = os.fspath(path)
    if os.path.lexists(target):
        raise ImageError("file already exists", path=target)
    # built under a hidden name and published whole, as qcow2 images are: a
    # create killed half-way (a preallocation cut short) leaves nothing at ``path``
    tmp = temp_name(target)
    storage = FileStorage(tmp, writable=True, create=True)
    try:
        storage.truncate(size)
        if prealloc == "falloc" and size:
            os.posix_fallocate(storage._fd(), 0, size)
        elif prealloc == "full":
            zeros = bytes(_ZERO_CHUNK)
            for pos in range(0, size, _ZERO_CHUNK):
                storage.pwrite(pos, zeros[: min(_ZERO_CHUNK, size - pos)])
        storage.flush()
        storage.close()
        publish(tmp, target)
    except OSError as exc:
        storage.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ImageError(f"cannot preallocate: {exc.strerror}", path=target) from exc
    except ImageError as exc:
        storage.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if type(exc) is ImageError and exc.path == tmp:  # name the file the caller asked for
            raise ImageError(exc.message.rsplit(" [", 1)[0], path=target) from exc.__cause__
        raise
    except BaseException:
        storage.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return RawImage(FileStorage(target, writable=True), writable=True)


def open(  # noqa: A001 - the driver protocol's name
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    force_share: bool = False,
) -> RawImage:
    """Open an existing raw image (taking QEMU-compatible locks).

    Raises:
        ImageError: the file cannot be opened.
        ImageLockedError: another process holds a conflicting lock.
    """
    return RawImage(
        FileStorage(path, writable=writable, force_share=force_share), writable=writable
    )

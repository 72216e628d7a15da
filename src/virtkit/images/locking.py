"""Image locking compatible with QEMU's ``file-posix`` OFD byte-range locks.

QEMU (and ``qemu-img``, ``qemu-io``) locks single bytes of every image file it
opens, with open-file-description (OFD) read locks, one byte per block-layer
permission (QEMU ``block/file-posix.c``):

* byte ``100 + i``: "I hold permission ``1 << i``";
* byte ``200 + i``: "I do not let others have permission ``1 << i``".

The permission bits are ``consistent read`` (0x1), ``write`` (0x2),
``write unchanged`` (0x4) and ``resize`` (0x8). A process first takes the read
locks it needs, then tests (``F_OFD_GETLK`` with a write lock) whether anyone
else holds the bytes that conflict: byte ``200 + i`` for every permission it
wants, byte ``100 + i`` for every permission it refuses to share. Because the
locks belong to the open file description, two opens in one process exclude
each other just as two processes do, and closing the descriptor drops them.

virtkit takes exactly the bytes ``qemu-img``/``qemu-io`` take:

======================  ====================  ======================
open                    held (100 + i)        not shared (200 + i)
======================  ====================  ======================
writable                read, write, resize   write, resize
read-only               read                  write, resize
read-only, force-share  read                  (nothing)
backing file            read                  write, resize
======================  ====================  ======================

A backing (or external data) file is opened like a read-only image, as QEMU
opens a backing child (``bdrv_default_perms_for_cow`` in ``block.c``): it holds
consistent read and shares neither write nor resize, whether the overlay is
open writable or not. So nobody may write a base under an open overlay, while
any number of overlays (ours, QEMU's) read it; ``force_share`` on the overlay
is inherited. ``commit`` writes the base by reopening it read-write through the
overlay, as QEMU's commit reopens the backing node.

So a running QEMU makes our writable *and* plain read-only opens fail with
:class:`~virtkit.errors.ImageLockedError`, and our writable open makes QEMU
fail with ``Failed to get "write" lock``; ``force_share`` (``qemu-img -U``)
reads an image someone is writing, at the reader's own risk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import attrs

from virtkit.errors import ConfigError, ImageError, ImageLockedError

__all__ = [
    "PERM_ALL",
    "PERM_CONSISTENT_READ",
    "PERM_RESIZE",
    "PERM_WRITE",
    "PERM_WRITE_UNCHANGED",
    "LockHolders",
    "acquire",
    "perm_names",
    "permissions_for",
    "probe",
    "release",
]

#: Base offset of the "holds permission" bytes.
LOCK_PERM_BASE = 100
#: Base offset of the "does not share permission" bytes.
LOCK_SHARED_BASE = 200

PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_ALL = 0x0F

_PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}
_BITS = tuple(range(PERM_ALL.bit_length()))

# Linux x86_64/aarch64 values, used when the fcntl module predates them.
_F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = struct.Struct("hh4xqqi4x")


def perm_names(perm: int) -> str:
    """Name the permission bits in ``perm`` the way QEMU's messages do."""
    return ", ".join(_PERM_NAMES[1 << i] for i in _BITS if perm & (1 << i))


def permissions_for(*, writable: bool, force_share: bool = False) -> tuple[int, int]:
    """Return ``(perm, shared)``: what an open holds and what it lets others hold.

    Raises:
        ConfigError: ``force_share`` with ``writable`` (QEMU refuses it too).
    """
    if writable:
        if force_share:
            raise ConfigError(
                "force_share can only be used with read-only opens", field="force_share"
            )
        return (
            PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
            PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
        )
    if force_share:
        return PERM_CONSISTENT_READ, PERM_ALL
    return PERM_CONSISTENT_READ, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE)


def _fcntl_lock(fd: int, cmd: int, lock_type: int, start: int) -> int:
    """Run one OFD lock command on one byte; return the resulting ``l_type``."""
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, start, 1, 0)
    result = fcntl.fcntl(fd, cmd, arg)
    l_type: int = _FLOCK.unpack(result)[0]
    return l_type


def _held_by_others(fd: int, byte: int) -> bool:
    """True when another open file description holds a lock on ``byte``."""
    return _fcntl_lock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _lock_bytes(perm: int, shared: int) -> list[int]:
    held = [LOCK_PERM_BASE + i for i in _BITS if perm & (1 << i)]
    unshared = [LOCK_SHARED_BASE + i for i in _BITS if not shared & (1 << i)]
    return held + unshared


def acquire(fd: int, path: str, *, perm: int, shared: int) -> bool:
    """Take QEMU's lock bytes for ``perm``/``shared`` on ``fd``, then check conflicts.

    Returns False (holding nothing) when the file system has no OFD locks,
    as QEMU's ``locking=auto`` then goes without.

    Raises:
        ImageLockedError: another open (QEMU, qemu-img, virtkit, in this or
            another process) holds a conflicting permission; nothing is held.
        ImageError: the lock calls failed for another reason.
    """
    try:
        for byte in _lock_bytes(perm, shared):
            _fcntl_lock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, byte)
        conflict = _first_conflict(fd, perm, shared)
    except OSError as exc:
        release(fd)
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(
                "image is locked by another process (a lock byte is held exclusively); "
                "close the other user or open read-only with force_share=True",
                path=path,
            ) from exc
        raise ImageError(f"cannot lock image: {exc.strerror}", path=path) from exc
    if conflict is not None:
        release(fd)
        raise conflict_error(path, *conflict)
    return True


def conflict_error(path: str, kind: str, bit: int) -> ImageLockedError:
    """Build the error for a conflict found by :func:`acquire`."""
    name = _PERM_NAMES[bit]
    if kind == "unshared":
        detail = (
            f'Failed to get "{name}" lock: another process (QEMU, qemu-img or virtkit) '
            f"has the image open and does not share the {name!r} permission"
        )
    else:
        detail = (
            f'Failed to get shared "{name}" lock: another process (QEMU, qemu-img or '
            f"virtkit) holds the {name!r} permission"
        )
    return ImageLockedError(
        f"{detail}; stop it, or open read-only with force_share=True to read anyway",
        path=path,
        permission=name,
        conflict=kind,
    )


def _first_conflict(fd: int, perm: int, shared: int) -> tuple[str, int] | None:
    for i in _BITS:
        if perm & (1 << i) and _held_by_others(fd, LOCK_SHARED_BASE + i):
            return "unshared", 1 << i
    for i in _BITS:
        if not shared & (1 << i) and _held_by_others(fd, LOCK_PERM_BASE + i):
            return "held", 1 << i
    return None


def release(fd: int) -> None:
    """Drop every lock byte this open file description holds. Never raises."""
    for byte in _lock_bytes(PERM_ALL, 0):
        try:
            _fcntl_lock(fd, _F_OFD_SETLK, fcntl.F_UNLCK, byte)
        except OSError:
            return


@attrs.frozen
class LockHolders:
    """What other opens hold on a file: permissions held and refused to share."""

    held: int
    unshared: int

    @property
    def writer(self) -> bool:
        """True when someone holds the write permission (a running QEMU, a writer)."""
        return bool(self.held & PERM_WRITE)


def probe(path: str | os.PathLike[str]) -> LockHolders:
    """Report the QEMU lock bytes other opens hold on ``path``, taking none.

    Raises:
        ImageError: the file cannot be opened.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror}", path=name) from exc
    try:
        held = sum(1 << i for i in _BITS if _held_by_others(fd, LOCK_PERM_BASE + i))
        unshared = sum(1 << i for i in _BITS if _held_by_others(fd, LOCK_SHARED_BASE + i))
    except OSError as exc:
        raise ImageError(f"cannot test locks: {exc.strerror}", path=name) from exc
    finally:
        os.close(fd)
    return LockHolders(held=held, unshared=unshared)

"""Which pages of guest RAM changed since the last snapshot, told by the kernel.

After a snapshot, guest RAM is re-mapped (same address, ``MAP_FIXED``) as a
*private* mapping of a memory file (``memfd``) that holds RAM as it was at
that snapshot: the *base*. Until something writes a page, the page is the
base's own page-cache page; the first write to it, from any source (unicorn's
translated code, ``uc.mem_write``, a device copying into ``cpu.ram``,
``preadv`` into RAM), makes the kernel give the mapping a private copy. That
copy-on-write is the dirty bit: ``/proc/self/pagemap`` reports a private copy
as an anonymous page and an untouched one as a file page (bit 61). No write
path can bypass it, there is no fault handler in Python, and a first write
costs one kernel copy-on-write fault (a few microseconds); before the first
snapshot RAM stays a plain anonymous mapping and nothing is tracked.

Taking the next snapshot copies the dirty pages into the base and drops the
private copies (``MADV_DONTNEED``), so RAM reads through to the base again,
unchanged. Going back to the base drops the private copies without copying.
Pages the base does not hold read as zero (the memory file has holes).

Everything here needs the guest's CPU parked: nothing may write RAM while it
is re-mapped or settled. The module works on Linux only; :func:`supported`
says whether this kernel reports what the scheme needs (checked once, on a
scratch mapping). Where it does not, callers compare RAM with the base instead.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
import weakref

from virtkit.errors import BackendError

__all__ = ["PAGE", "Tracker", "supported"]

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_REMOVE = 9
_MAP_FIXED = 0x10  # the same on every Linux architecture
_MAP_FAILED = ctypes.c_void_p(-1).value
#: pagemap entry, top byte: present (63), swapped (62), file page or shared anonymous (61)
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
#: one byte per page: 1 where the mapping holds its own copy (written since the base)
_DIRTY = bytes(1 if b & (_PRESENT | _SWAPPED) and not b & _FILE else 0 for b in range(256))
_RUN = re.compile(rb"\x01+")

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _os_error(what: str) -> BackendError:
    errno = ctypes.get_errno()
    return BackendError(f"{what} failed: {os.strerror(errno)}")


def _map_fixed(address: int, length: int, flags: int, fd: int) -> None:
    """Replace ``[address, address + length)`` of this process with a new mapping."""
    got = _mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags | _MAP_FIXED, fd, 0)
    if got in (None, _MAP_FAILED) or got != address:
        raise _os_error(f"re-mapping guest RAM at {address:#x}")


def _advise(address: int, length: int, advice: int) -> None:
    if _madvise(address, length, advice) != 0:
        raise _os_error(f"madvise({advice}) on guest RAM at {address:#x}")


class Tracker:
    """A base copy of guest RAM and the copy-on-write mapping of RAM over it.

    Created empty (a memory file of ``size`` zero bytes, mapped shared at
    :attr:`base_ptr`); the caller fills the base with RAM's contents, then
    :meth:`attach` re-maps RAM over it.

    Args:
        ram_ptr: where guest RAM is mapped in this process (page-aligned).
        size: RAM size in bytes (a multiple of :data:`PAGE`).

    Raises:
        BackendError: the memory file cannot be made or mapped.
    """

    def __init__(self, ram_ptr: int, size: int) -> None:
        if ram_ptr % PAGE or size % PAGE or size <= 0:
            raise BackendError(f"guest RAM at {ram_ptr:#x}, {size} bytes, is not page-aligned")
        self.ram_ptr = ram_ptr
        self.size = size
        self.attached = False
        self._pagemap = -1
        try:
            self._fd = os.memfd_create("virtkit-ram-base", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            self._fd = -1  # no memory files here: a plain copy, compared, never attached
        try:
            if self._fd >= 0:
                os.ftruncate(self._fd, size)
                self.base = mmap.mmap(self._fd, size, mmap.MAP_SHARED)
            else:
                self.base = mmap.mmap(-1, size)
        except OSError as exc:
            if self._fd >= 0:
                os.close(self._fd)
            raise BackendError(f"cannot map a copy of guest RAM ({size} bytes): {exc}") from exc
        self._base_c = (ctypes.c_char * size).from_buffer(self.base)
        self.base_ptr = ctypes.addressof(self._base_c)
        self._closed = False
        # the descriptors go with the tracker even when nobody calls close(): the
        # memory file lives as long as its descriptor, as big as the guest's RAM
        self._fds = [self._fd]
        self._release = weakref.finalize(self, _close_all, self._fds)

    @property
    def can_attach(self) -> bool:
        """Whether the base is a memory file RAM can be mapped over."""
        return self._fd >= 0

    def attach(self) -> None:
        """Map RAM copy-on-write over the base; RAM now reads exactly as the base.

        The base must hold what RAM holds (the caller copied it): RAM's own
        pages are replaced, not copied.

        Raises:
            BackendError: the base is not a memory file, ``/proc/self/pagemap``
                cannot be opened, or the mapping fails.
        """
        if not self.can_attach:
            raise BackendError("guest RAM cannot be tracked: no memory file for its copy")
        if self._pagemap < 0:
            try:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                self._fds.append(self._pagemap)
            except OSError as exc:
                raise BackendError(f"cannot open /proc/self/pagemap: {exc.strerror}") from exc
        _map_fixed(self.ram_ptr, self.size, mmap.MAP_PRIVATE, self._fd)
        self.attached = True

    def dirty(self) -> bytes:
        """One byte per RAM page: 1 where RAM was written since the base, else 0."""
        if not self.attached:
            raise BackendError("guest RAM is not tracked yet")
        count = self.size // PAGE
        try:
            entries = os.pread(self._pagemap, 8 * count, 8 * (self.ram_ptr // PAGE))
        except OSError as exc:
            raise BackendError(f"cannot read /proc/self/pagemap: {exc.strerror}") from exc
        if len(entries) != 8 * count:
            raise BackendError(f"/proc/self/pagemap gave {len(entries)} of {8 * count} bytes")
        return entries[7::8].translate(_DIRTY)

    @staticmethod
    def runs(pages: bytes) -> list[tuple[int, int]]:
        """``(first page, page count)`` of each run of 1s in ``pages`` (from :meth:`dirty`)."""
        return [(m.start(), m.end() - m.start()) for m in _RUN.finditer(pages)]

    def settle(self, runs: list[tuple[int, int]]) -> None:
        """Make RAM's current contents the base: copy the dirty runs into it and
        drop RAM's private copies (RAM reads the same before and after)."""
        for first, count in runs:
            offset, length = first * PAGE, count * PAGE
            ctypes.memmove(self.base_ptr + offset, self.ram_ptr + offset, length)
            _advise(self.ram_ptr + offset, length, _MADV_DONTNEED)

    def discard(self, runs: list[tuple[int, int]]) -> None:
        """Drop RAM's private copies in these runs: RAM reads the base there again."""
        for first, count in runs:
            _advise(self.ram_ptr + first * PAGE, count * PAGE, _MADV_DONTNEED)

    def zero_base(self, offset: int, length: int) -> None:
        """Make ``length`` bytes of the base at ``offset`` zero (given back to the host)."""
        if _madvise(self.base_ptr + offset, length, _MADV_REMOVE) != 0:
            ctypes.memset(self.base_ptr + offset, 0, length)

    def detach_to_zero(self) -> None:
        """Give RAM a fresh anonymous mapping: every byte zero, nothing tracked."""
        _map_fixed(self.ram_ptr, self.size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1)
        self.attached = False

    def close(self) -> None:
        """Release the base (RAM keeps whatever mapping it has)."""
        if self._closed:
            return
        self._closed = True
        del self._base_c
        self.base.close()
        self._release()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)
    fds.clear()


@functools.cache
def supported() -> bool:
    """Whether this kernel tracks RAM the way :class:`Tracker` needs.

    Checked once on a scratch mapping: after :meth:`Tracker.attach`, a read
    page must report clean, a written page dirty, and a settled page clean
    with the written value.
    """
    try:
        scratch = mmap.mmap(-1, 4 * PAGE)
    except OSError:
        return False
    c = (ctypes.c_char * (4 * PAGE)).from_buffer(scratch)
    ptr = ctypes.addressof(c)
    tracker: Tracker | None = None
    try:
        scratch[PAGE] = 7
        tracker = Tracker(ptr, 4 * PAGE)
        ctypes.memmove(tracker.base_ptr, ptr, 4 * PAGE)
        tracker.attach()
        if scratch[PAGE] != 7 or scratch[2 * PAGE] != 0:  # reads map the base
            return False
        scratch[3 * PAGE] = 9
        if tracker.dirty() != b"\0\0\0\1":
            return False
        tracker.settle(tracker.runs(tracker.dirty()))
        if tracker.dirty() != bytes(4) or scratch[3 * PAGE] != 9 or tracker.base[3 * PAGE] != 9:
            return False
        scratch[0] = 1
        tracker.discard(tracker.runs(tracker.dirty()))
        return scratch[0] == 0 and tracker.dirty() == bytes(4)
    except (BackendError, OSError):
        return False
    finally:
        if tracker is not None:
            tracker.close()
        del c
        scratch.close()

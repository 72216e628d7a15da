"""Crash a bundle operation at its N-th file-system call, as kill -9 would.

:mod:`virtkit.testing.faults` cuts the image engine's writes; folder
operations (``save``, ``write_machine``, ``clone``) also create, rename and
remove files. This helper patches the ``os`` functions that change the file
system (and ``open``, which can create). The N-th call raises
:class:`Crash` instead of running, and so does every later one, since a
killed process does nothing more: cleanup handlers (``except BaseException:
unlink the temp file``) get no chance to tidy up, exactly as with SIGKILL. When
the block ends, the descriptors opened inside it are closed, as the kernel
closes a dead process's files (dropping its image locks).

    with FsCrash(None) as probe:       # count the calls of a clean run
        operation()
    for n in range(1, probe.calls + 1):
        reset()
        with FsCrash(n):
            with contextlib.suppress(Crash):
                operation()
        check_old_or_new()
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

#: ``os`` functions that change the file system (or create descriptors that may).
FS_CALLS = (
    "open",
    "write",
    "pwrite",
    "writev",
    "fsync",
    "fdatasync",
    "ftruncate",
    "truncate",
    "posix_fallocate",
    "replace",
    "rename",
    "mkdir",
    "rmdir",
    "unlink",
    "link",
    "symlink",
    "chmod",
    "fchmod",
    "utime",
    "sendfile",
    "copy_file_range",
)


class Crash(BaseException):
    """The process died here: not an Exception, so nothing in virtkit catches it."""


class FsCrash:
    """Patch ``os`` so that call number ``crash_at`` (1-based) and all later ones crash.

    ``crash_at=None`` only counts: :attr:`calls` and :attr:`log` (name of each call).
    """

    def __init__(self, crash_at: int | None) -> None:
        self.crash_at = crash_at
        self.calls = 0
        self.log: list[str] = []
        self.dead = False
        self._saved: dict[str, Any] = {}
        self._fds: list[tuple[int, int, int]] = []

    def _wrap(self, name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise Crash(f"{name} after the crash")
            self.calls += 1
            self.log.append(name)
            if self.crash_at is not None and self.calls >= self.crash_at:
                self.dead = True
                raise Crash(f"crash at call {self.calls} ({name})")
            result = real(*args, **kwargs)
            if name == "open":
                st = os.fstat(result)
                self._fds.append((result, st.st_dev, st.st_ino))
            return result

        return call

    def __enter__(self) -> FsCrash:
        for name in FS_CALLS:
            real = getattr(os, name, None)
            if real is not None:
                self._saved[name] = real
                setattr(os, name, self._wrap(name, real))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for name, real in self._saved.items():
            setattr(os, name, real)
        if self.dead:
            for fd, dev, ino in self._fds:
                try:
                    st = os.fstat(fd)
                except OSError:
                    continue  # closed by the code already
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.close(fd)

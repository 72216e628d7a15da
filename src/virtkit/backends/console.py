"""A guest's serial console as a stream: ``expect`` like pexpect, ``write``, ``output``.

Backends call :meth:`Console.feed` with what the guest prints (from any
thread); users wait for text with :meth:`Console.expect`. The stream is never
rewound: after a snapshot revert, new output is appended.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtkit.backends.aio_guest import refuse_in_loop
from virtkit.errors import ConfigError, StateError, TimeoutError
from virtkit.images.args import check_timeout

__all__ = ["Console"]

Pattern = str | bytes | re.Pattern[str] | re.Pattern[bytes]


class Console:
    """The serial console of one guest.

    Args:
        writer: sends bytes to the guest's serial input; ``None`` when the
            guest has no input path (writes then raise ``StateError``).
        log_path: a file that receives a copy of all output, if given.
    """

    def __init__(
        self,
        writer: Callable[[bytes], None] | None = None,
        *,
        log_path: str | Path | None = None,
    ) -> None:
        self._writer = writer
        self._buf = bytearray()
        self._pos = 0  # where the next expect() starts searching
        self._cond = threading.Condition()
        self._closed: str | None = "the guest is not running"
        self._log = open(log_path, "ab", buffering=0) if log_path is not None else None  # noqa: SIM115

    # -- backend side ---------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Append guest output (called by the backend, from any thread)."""
        if not data:
            return
        with self._cond:
            self._buf += data
            if self._log is not None:
                self._log.write(data)
            self._cond.notify_all()

    def open(self) -> None:
        """Mark the console live (the guest started)."""
        with self._cond:
            self._closed = None
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        """Mark the console dead: pending and later ``expect`` calls that cannot
        match what is already buffered raise ``StateError(reason)``."""
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    def set_writer(self, writer: Callable[[bytes], None] | None) -> None:
        """Replace the input path (backends do this on start/stop)."""
        with self._cond:
            self._writer = writer

    def release(self) -> None:
        """Close the log file, if any."""
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- user side ------------------------------------------------------------
    @property
    def output(self) -> bytes:
        """Everything the guest has printed so far."""
        with self._cond:
            return bytes(self._buf)

    def write(self, data: bytes | str) -> None:
        """Send ``data`` to the guest's serial input (a str is UTF-8 encoded).

        Raises:
            StateError: the guest is not running.
        """
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray)):
            raise ConfigError(
                f"console input 'data' must be bytes or str (got {type(data).__name__})",
                field="data",
            )
        with self._cond:
            writer, closed = self._writer, self._closed
        if writer is None or closed is not None:
            raise StateError(f"cannot write to the console: {closed or 'no input'}")
        writer(bytes(data))

    def expect(self, pattern: Pattern, timeout: float | None = 30.0) -> re.Match[Any]:
        """Wait until ``pattern`` appears in the output after the previous match.

        A ``str`` or ``bytes`` pattern is matched literally; a compiled regex
        as a regex (a ``str`` regex sees the output decoded as UTF-8). Returns
        the match; the next ``expect`` searches after its end.

        Raises:
            TimeoutError: the pattern did not appear within ``timeout`` seconds.
            StateError: the guest stopped before the pattern appeared.
            ConfigError: ``pattern`` or ``timeout`` has the wrong type or value.
        """
        search = _compile(pattern)
        timeout = check_timeout(timeout)
        if timeout != 0:  # a zero timeout only looks (the coroutine twins poll that way)
            refuse_in_loop("expect")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                found = search(self._buf, self._pos)
                if found is not None:
                    match, end = found
                    self._pos = end
                    return match
                if self._closed is not None:
                    raise StateError(
                        f"console pattern {_show(pattern)} did not appear: {self._closed}",
                        action="expect",
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    tail = bytes(self._buf[max(self._pos, len(self._buf) - 200) :])
                    raise TimeoutError(
                        f"console pattern {_show(pattern)} did not appear within {timeout} s; "
                        f"last output: {tail!r}",
                        timeout=timeout,
                    )
                self._cond.wait(remaining)


def _show(pattern: Pattern) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)


Searcher = Callable[[bytearray, int], tuple[re.Match[Any], int] | None]


def _compile(pattern: Pattern) -> Searcher:
    if isinstance(pattern, str):
        pattern = re.compile(re.escape(pattern.encode()))
    elif isinstance(pattern, (bytes, bytearray)):
        pattern = re.compile(re.escape(bytes(pattern)))
    if not isinstance(pattern, re.Pattern):
        raise ConfigError(
            f"expect() needs a str, bytes or compiled regex (got {type(pattern).__name__})"
        )
    regex = pattern
    if isinstance(regex.pattern, bytes):

        def search_bytes(buf: bytearray, pos: int) -> tuple[re.Match[Any], int] | None:
            m = regex.search(bytes(buf), pos)
            return None if m is None else (m, m.end())

        return search_bytes

    def search_text(buf: bytearray, pos: int) -> tuple[re.Match[Any], int] | None:
        text = bytes(buf[pos:]).decode("utf-8", "surrogateescape")
        m = regex.search(text)
        if m is None:
            return None
        return m, pos + len(text[: m.end()].encode("utf-8", "surrogateescape"))

    return search_text

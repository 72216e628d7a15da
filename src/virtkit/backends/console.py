"""A guest's serial console as a stream, in pexpect's vocabulary.

Backends call :meth:`Console.feed` with what the guest prints (from any
thread); users wait for text with :meth:`Console.expect` (one pattern or a
list of them), read :attr:`Console.before` / :attr:`Console.after`, send input
with :meth:`Console.write` / :meth:`Console.sendline`, and run shell commands
with :meth:`Console.run`. The stream is never rewound: after a snapshot
revert, new output is appended.

Searching is linear in the output: a literal pattern resumes where the last
search of the same call stopped; a bytes regex searches the buffer in place,
from the previous match, without copying it.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

from virtkit.backends.aio_guest import refuse_in_loop
from virtkit.backends.escapes import EscapeStripper
from virtkit.errors import ConfigError, StateError, TimeoutError, VirtkitError
from virtkit.images.args import check_bool, check_timeout

__all__ = ["Console"]

Pattern = str | bytes | re.Pattern[str] | re.Pattern[bytes]


class Console:
    """The serial console of one guest.

    Args:
        writer: sends bytes to the guest's serial input; ``None`` when the
            guest has no input path (writes then raise ``StateError``).
        log_path: a file that receives a copy of all output, if given.

    Attributes:
        strip_escapes: the default for :meth:`expect`'s ``strip_escapes``:
            search (and report in :attr:`before`/:attr:`after`) the output
            with terminal escape sequences removed.
        before: what the output held between the previous match and the last
            match (bytes; escape-free when that expect stripped them).
        after: the text the last match covered.
        match: the last match object.
        exit_status: the exit status of the last :meth:`run` command.
    """

    def __init__(
        self,
        writer: Callable[[bytes], None] | None = None,
        *,
        log_path: str | Path | None = None,
    ) -> None:
        self._writer = writer
        self._buf = bytearray()
        self._pos = 0  # where the next expect() starts searching (raw offset)
        self._stripper: EscapeStripper | None = None  # made on first escape-free search
        self._clean = bytearray()  # the output without escape sequences, once asked for
        self._cond = threading.Condition()
        self._closed: str | None = "the guest is not running"
        self._held: bytearray | None = None  # input queued until the guest first prints
        self._log = open(log_path, "ab", buffering=0) if log_path is not None else None  # noqa: SIM115
        self.strip_escapes = False
        self.before = b""
        self.after = b""
        self.match: re.Match[Any] | None = None
        self.exit_status: int | None = None

    # -- backend side ---------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Append guest output (called by the backend, from any thread)."""
        if not data:
            return
        with self._cond:
            self._buf += data
            if self._stripper is not None:
                self._clean += self._stripper.feed(data)
            if self._log is not None:
                self._log.write(data)
            self._cond.notify_all()
        if self._held is not None:
            self.release_input()  # the guest printed: its serial port is set up

    def release_input(self) -> None:
        """Send the input held since the guest started (see :meth:`open`) now.

        Backends call it when the guest first prints or reads its serial
        port; call it yourself for a guest that reads input without ever
        printing on a backend that cannot see it read (QEMU).
        """
        with self._cond:
            held, self._held = self._held, None
            writer = self._writer
        if held and writer is not None:
            with contextlib.suppress(VirtkitError, OSError):
                writer(bytes(held))

    def open(self, *, hold_input: bool = False) -> None:
        """Mark the console live (the guest started).

        Args:
            hold_input: queue what is written until the guest prints its
                first byte (or the backend sees it read its serial port), then
                send it. A guest that sets up its serial port resets the
                port's receive FIFO, which would drop input typed before (on a
                real 16550 and on QEMU's alike); a freshly booted guest has
                set its port up by the time it prints.
        """
        with self._cond:
            self._closed = None
            self._held = bytearray() if hold_input else None
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        """Mark the console dead: pending and later ``expect`` calls that cannot
        match what is already buffered raise ``StateError(reason)``."""
        with self._cond:
            self._closed = reason
            self._held = None
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
            if closed is None and writer is not None and self._held is not None:
                self._held += data  # sent when the guest first prints (see open())
                return
        if writer is None or closed is not None:
            raise StateError(f"cannot write to the console: {closed or 'no input'}")
        writer(bytes(data))

    def sendline(self, line: bytes | str = b"") -> None:
        """Send ``line`` and a newline, as typed at a terminal.

        Raises:
            StateError: the guest is not running.
        """
        if isinstance(line, str):
            line = line.encode()
        if not isinstance(line, (bytes, bytearray)):
            raise ConfigError(
                f"console 'line' must be bytes or str (got {type(line).__name__})", field="line"
            )
        self.write(bytes(line) + b"\n")

    @overload
    def expect(
        self,
        pattern: Pattern,
        timeout: float | None = 30.0,
        *,
        strip_escapes: bool | None = None,
    ) -> re.Match[Any]: ...

    @overload
    def expect(
        self,
        pattern: list[Pattern] | tuple[Pattern, ...],
        timeout: float | None = 30.0,
        *,
        strip_escapes: bool | None = None,
    ) -> int: ...

    def expect(
        self,
        pattern: Pattern | list[Pattern] | tuple[Pattern, ...],
        timeout: float | None = 30.0,
        *,
        strip_escapes: bool | None = None,
    ) -> re.Match[Any] | int:
        """Wait until ``pattern`` appears in the output after the previous match.

        A ``str`` or ``bytes`` pattern is matched literally; a compiled regex
        as a regex (a ``str`` regex sees the output decoded as UTF-8). Given
        one pattern, returns the match; given a list, waits for whichever
        appears first (the earliest in the output; the first listed on a tie)
        and returns its index, as pexpect does (the match is in
        :attr:`match`). Either way :attr:`before` and :attr:`after` are set
        and the next ``expect`` searches after the match's end.

        Args:
            pattern: a pattern or a non-empty list of patterns.
            timeout: seconds to wait; ``None`` waits for ever.
            strip_escapes: search the output with terminal escape sequences
                (colours, cursor queries such as ``ESC [ 6 n``) removed;
                default :attr:`strip_escapes`.

        Raises:
            TimeoutError: no pattern appeared within ``timeout`` seconds.
            StateError: the guest stopped before a pattern appeared.
            ConfigError: ``pattern`` or ``timeout`` has the wrong type or value.
        """
        single = isinstance(pattern, (str, bytes, bytearray, re.Pattern))
        patterns: list[Pattern] = [pattern] if single else _pattern_list(pattern)  # type: ignore[list-item]
        searchers = [_Searcher(p) for p in patterns]
        timeout = check_timeout(timeout)
        if timeout != 0:  # a zero timeout only looks (the coroutine twins poll that way)
            refuse_in_loop("expect")
        clean = (
            self.strip_escapes
            if strip_escapes is None
            else check_bool(strip_escapes, "strip_escapes")
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if clean:
                self._start_stripping()
            stripper = self._stripper
            buf = self._clean if clean else self._buf
            start = stripper.to_clean(self._pos) if clean and stripper is not None else self._pos
            while True:
                best: tuple[int, int, re.Match[Any], int] | None = None
                for number, searcher in enumerate(searchers):
                    found = searcher.search(buf, start)
                    if found is not None and (best is None or found[1] < best[0]):
                        best = (found[1], number, found[0], found[2])
                if best is not None:
                    match_start, number, match, end = best
                    self.before = bytes(buf[start:match_start])
                    self.after = bytes(buf[match_start:end])
                    self.match = match
                    self._pos = stripper.to_raw(end) if clean and stripper is not None else end
                    return match if single else number
                if self._closed is not None:
                    raise StateError(
                        f"console pattern {_show(patterns)} did not appear: {self._closed}",
                        action="expect",
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    tail = bytes(buf[max(start, len(buf) - 200) :])
                    raise TimeoutError(
                        f"console pattern {_show(patterns)} did not appear within {timeout} s; "
                        f"last output: {tail!r}",
                        timeout=timeout,
                    )
                self._cond.wait(remaining)

    def _start_stripping(self) -> None:
        """Build the escape-free copy of the output (called with the lock held)."""
        if self._stripper is None:
            self._stripper = EscapeStripper()
            self._clean += self._stripper.feed(bytes(self._buf))

    def run(
        self,
        command: str,
        *,
        prompt: Pattern,
        timeout: float | None = 30.0,
    ) -> str:
        """Run ``command`` in the guest's shell on this console; return its output.

        The console must be at a shell prompt. The command runs through
        ``eval`` between two markers that only the command's output (never
        the echo of the typed line) can contain, so the result is exactly
        what it printed: no echo, no prompt, terminal escape sequences
        removed, line endings as ``\\n`` (however the line editor wrapped
        the typed line). Its exit status is left in :attr:`exit_status`.
        Bytes that are not UTF-8 come back as surrogate escapes
        (``out.encode("utf-8", "surrogateescape")`` restores them). Returns
        after ``prompt`` appeared again.

        Raises:
            TimeoutError: the command or the next prompt did not finish in time
                (``timeout`` covers the whole call).
            StateError: the guest stopped.
            ConfigError: a bad argument.
        """
        refuse_in_loop("run")
        if not isinstance(command, str) or "\0" in command:
            raise ConfigError(
                f"'command' must be a str without NUL (got {command!r})", field="command"
            )
        _Searcher(prompt)  # a bad prompt fails before anything is typed
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        nonce = secrets.token_hex(6)
        quoted = "'" + command.replace("'", "'\\''") + "'"
        # the markers are split by '' when typed, so the echo never matches them
        self.sendline(
            f"printf '%s\\n' VKB''{nonce}; eval {quoted}; printf '\\n%s %d\\n' VKE''{nonce} $?"
        )
        # literal markers: the search over a long output stays linear
        self.expect(f"VKB{nonce}", left(), strip_escapes=True)
        self.expect("\n", left(), strip_escapes=True)
        self.expect(f"VKE{nonce} ", left(), strip_escapes=True)
        output = self.before.replace(b"\r\n", b"\n")
        output = output[:-1] if output.endswith(b"\n") else output  # printf's leading \n
        self.expect(re.compile(rb"(\d+)\r?\n"), left(), strip_escapes=True)
        assert self.match is not None  # set by the expect above
        self.exit_status = int(self.match.group(1))
        self.expect(prompt, left())
        return output.decode("utf-8", "surrogateescape")


def _show(patterns: list[Pattern]) -> str:
    shown = [repr(p.pattern if isinstance(p, re.Pattern) else p) for p in patterns]
    return shown[0] if len(shown) == 1 else "any of " + ", ".join(shown)


def _pattern_list(value: object) -> list[Pattern]:
    if isinstance(value, (list, tuple)) and value:
        return list(value)
    raise ConfigError(
        "expect() needs a str, bytes or compiled regex, or a non-empty list of them "
        f"(got {value!r})",
        field="pattern",
    )


class _Searcher:
    """One pattern's search over a growing buffer, for the length of one expect().

    A literal resumes where its previous attempt stopped (less the pattern's
    length, for a match cut in two); a bytes regex searches the buffer in
    place; a str regex decodes only the unsearched tail.
    """

    def __init__(self, pattern: Pattern) -> None:
        self.literal: bytes | None = None
        if isinstance(pattern, str):
            self.literal = pattern.encode()
        elif isinstance(pattern, (bytes, bytearray)):
            self.literal = bytes(pattern)
        if self.literal is not None:
            if not self.literal:
                raise ConfigError("an expect() pattern must not be empty", field="pattern")
            pattern = re.compile(re.escape(self.literal))
        if not isinstance(pattern, re.Pattern):
            raise ConfigError(
                "expect() needs a str, bytes or compiled regex, or a list of them "
                f"(got {type(pattern).__name__})",
                field="pattern",
            )
        self.regex: re.Pattern[Any] = pattern
        self._scanned = 0  # literal: bytes already searched without a match

    def search(self, buf: bytearray, pos: int) -> tuple[re.Match[Any], int, int] | None:
        """(match, start, end) in ``buf`` coordinates, at or after ``pos``; None if absent."""
        if self.literal is not None:
            begin = max(pos, self._scanned - len(self.literal) + 1)
            at = buf.find(self.literal, begin)
            if at < 0:
                self._scanned = len(buf)
                return None
            found = self.regex.match(buf, at)
            assert found is not None  # the literal is there
            return found, at, found.end()
        if isinstance(self.regex.pattern, bytes):
            found = self.regex.search(buf, pos)
            return None if found is None else (found, found.start(), found.end())
        text = bytes(buf[pos:]).decode("utf-8", "surrogateescape")
        matched = self.regex.search(text)
        if matched is None:
            return None
        start = pos + len(text[: matched.start()].encode("utf-8", "surrogateescape"))
        end = start + len(text[matched.start() : matched.end()].encode("utf-8", "surrogateescape"))
        return matched, start, end

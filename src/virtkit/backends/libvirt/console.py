"""A libvirt console stream feeding a :class:`virtkit.backends.Console`.

``virDomain.openConsole`` on a blocking ``virStream``, read by a small
thread of its own that hands each chunk to ``Console.feed``. End of file (the
QEMU behind the domain stopped, or a snapshot revert restarted it) ends the
thread; the guest opens a new stream when the domain runs again. Closing
aborts the stream, which wakes the reader.

A thread per console rather than a stream event callback: libvirt-python
keeps a callback's data (which refers to the stream, which refers to the
connection) alive after ``eventRemoveCallback`` on remote connections, so
every console would pin its connection open for good.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from virtkit.backends.libvirt.connection import Connection
from virtkit.errors import BackendError, StateError

__all__ = ["ConsoleStream"]

_CHUNK = 65536
_JOIN = 10.0


class ConsoleStream:
    """The serial console of one running domain, as a libvirt stream.

    Args:
        conn: the connection the domain lives on.
        domain: the ``virDomain``.
        on_data: called with each chunk the guest prints (from the reader thread).
    """

    def __init__(self, conn: Connection, domain: Any, on_data: Callable[[bytes], None]) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._on_data = on_data
        self.eof = False
        name = domain.name()
        self._stream: Any = conn.call("open a console stream", conn.raw.newStream, 0)
        try:
            conn.call(
                f"open the console of domain {name!r}",
                domain.openConsole,
                None,
                self._stream,
                conn.lv.VIR_DOMAIN_CONSOLE_FORCE,
            )
        except BaseException:
            self._stream = None
            raise
        self._reader = threading.Thread(
            target=self._read, args=(self._stream,), name=f"virtkit-console {name}", daemon=True
        )
        self._reader.start()

    def _read(self, stream: Any) -> None:
        lv = self._conn.lv
        ended_cleanly = False
        while True:
            try:
                data = stream.recv(_CHUNK)
            except lv.libvirtError:
                break  # aborted by close(), or the connection broke
            if not data or data == -2:
                ended_cleanly = True
                break
            self._on_data(bytes(data))
        with self._lock:
            mine = self._stream is stream
            if mine:
                self._stream = None
            self.eof = True
        if mine:
            with contextlib.suppress(lv.libvirtError):
                stream.finish() if ended_cleanly else stream.abort()

    def write(self, data: bytes) -> None:
        """Send ``data`` to the guest's serial input.

        Raises:
            StateError: the stream has ended.
            BackendError: libvirt failed.
        """
        lv = self._conn.lv
        view = memoryview(data)
        while view:
            with self._lock:
                stream = self._stream
            if stream is None:
                raise StateError("cannot write to the console: the console stream has ended")
            try:
                sent = stream.send(bytes(view))
            except lv.libvirtError as exc:
                raise BackendError(
                    f"libvirt at {self._conn.uri}: console write failed: {exc.get_error_message()}"
                ) from exc
            view = view[max(sent, 0) :]

    @property
    def open(self) -> bool:
        """Whether the stream still delivers output."""
        with self._lock:
            return self._stream is not None

    def drain(self, timeout: float = _JOIN) -> None:
        """Wait until the guest's last bytes are read (the stream hits end of file), then close."""
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self.close()

    def close(self) -> None:
        """Detach from the console and wait for the reader to end (idempotent)."""
        with self._lock:
            stream, self._stream = self._stream, None
            self.eof = True
        if stream is not None:
            with contextlib.suppress(self._conn.lv.libvirtError):
                stream.abort()
        if threading.current_thread() is not self._reader:
            self._reader.join(_JOIN)

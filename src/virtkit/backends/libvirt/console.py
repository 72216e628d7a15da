"""A libvirt console stream feeding a :class:`virtkit.backends.Console`.

``virDomain.openConsole`` on a non-blocking ``virStream``; the event loop
thread calls back when bytes are readable and they go to ``Console.feed``.
End of file (the QEMU behind the domain stopped, or a snapshot revert
restarted it) detaches the stream; the guest opens a new one when the domain
runs again. Writes are sent in pieces, bounded by a timeout, so a stalled
stream cannot hang the caller.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from virtkit.backends.libvirt.connection import Connection
from virtkit.errors import BackendError, StateError

__all__ = ["ConsoleStream"]

WRITE_TIMEOUT = 10.0


class ConsoleStream:
    """The serial console of one running domain, as a libvirt stream.

    Args:
        conn: the connection the domain lives on.
        domain: the ``virDomain``.
        on_data: called with each chunk the guest prints (from the event thread).
    """

    def __init__(self, conn: Connection, domain: Any, on_data: Callable[[bytes], None]) -> None:
        lv = conn.lv
        self._conn = conn
        self._lock = threading.Lock()
        self._on_data = on_data
        self.eof = False
        self._stream: Any = conn.call(
            "open a console stream", conn.raw.newStream, lv.VIR_STREAM_NONBLOCK
        )
        try:
            conn.call(
                f"open the console of domain {domain.name()!r}",
                domain.openConsole,
                None,
                self._stream,
                lv.VIR_DOMAIN_CONSOLE_FORCE,
            )
            events = (
                lv.VIR_STREAM_EVENT_READABLE
                | lv.VIR_STREAM_EVENT_ERROR
                | lv.VIR_STREAM_EVENT_HANGUP
            )
            conn.call(
                "watch the console stream", self._stream.eventAddCallback, events, self._ready, None
            )
        except BaseException:
            self._drop(abort=True)
            raise

    def _ready(self, stream: Any, events: int, _opaque: Any) -> None:
        lv = self._conn.lv
        with self._lock:
            if self._stream is not stream:
                return
            while True:
                try:
                    data = stream.recv(65536)
                except lv.libvirtError:
                    self._drop_locked(abort=True)
                    return
                if data == -2:  # EAGAIN: nothing more for now
                    break
                if not data:
                    self._drop_locked(abort=False)
                    return
                self._on_data(bytes(data))
            if events & (lv.VIR_STREAM_EVENT_ERROR | lv.VIR_STREAM_EVENT_HANGUP):
                self._drop_locked(abort=True)

    def write(self, data: bytes, timeout: float = WRITE_TIMEOUT) -> None:
        """Send ``data`` to the guest's serial input.

        Raises:
            StateError: the stream has ended.
            BackendError: libvirt failed, or the guest did not take the bytes in time.
        """
        lv = self._conn.lv
        deadline = time.monotonic() + timeout
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
                        f"libvirt at {self._conn.uri}: console write failed: "
                        f"{exc.get_error_message()}"
                    ) from exc
            if sent == -2:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"libvirt at {self._conn.uri}: the console took no input for {timeout} s"
                    )
                time.sleep(0.01)
                continue
            view = view[sent:]

    @property
    def open(self) -> bool:
        """Whether the stream still delivers output."""
        with self._lock:
            return self._stream is not None

    def _drop_locked(self, *, abort: bool) -> None:
        stream, self._stream = self._stream, None
        self.eof = True
        if stream is None:
            return
        lv = self._conn.lv
        with contextlib.suppress(lv.libvirtError):
            stream.eventRemoveCallback()
        try:
            if abort:
                stream.abort()
            else:
                stream.finish()
        except lv.libvirtError:
            pass

    def _drop(self, *, abort: bool) -> None:
        with self._lock:
            self._drop_locked(abort=abort)

    def close(self) -> None:
        """Detach from the console (idempotent)."""
        self._drop(abort=True)

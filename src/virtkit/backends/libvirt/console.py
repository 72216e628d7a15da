"""A domain's serial console feeding a :class:`virtkit.backends.Console`.

Two sources with one interface (:class:`ConsoleSource`):

* :class:`PtyConsole`, for a domain on this machine (a local URI): the serial
  port's pty, read directly. libvirt 9.0's console stream holds output back
  under load (bytes the guest printed sat in the stream, unread, until the
  next write to the console: seen in CI, and 7 of 37 runs with other guests
  running), so a local guest does not use it.
* :class:`ConsoleStream`, on a remote host: ``virDomain.openConsole`` on a
  blocking ``virStream``, read by a small thread of its own that hands each
  chunk to ``Console.feed``. End of file (the QEMU behind the domain stopped,
  or a snapshot revert restarted it) ends the thread; the guest opens a new
  stream when the domain runs again. Closing aborts the stream, which wakes
  the reader.

  A thread per console rather than a stream event callback: libvirt-python
  keeps a callback's data (which refers to the stream, which refers to the
  connection) alive after ``eventRemoveCallback`` on remote connections, so
  every console would pin its connection open for good.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import termios
import threading
import tty
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Protocol

from virtkit.backends.libvirt.connection import Connection, is_remote
from virtkit.errors import BackendError, StateError, TimeoutError

__all__ = ["ConsoleSource", "ConsoleStream", "PtyConsole", "open_console", "serial_pty"]

_CHUNK = 65536
_JOIN = 10.0
_WRITE_WAIT = 30.0  # seconds a console write waits for room before it fails


class ConsoleSource(Protocol):
    """What the guest needs of a console source (a pty or a libvirt stream)."""

    eof: bool

    def write(self, data: bytes) -> None:
        """Send ``data`` to the guest's serial input."""

    @property
    def open(self) -> bool:
        """Whether the source still delivers output."""

    def drain(self, timeout: float = _JOIN) -> None:
        """Wait until the guest's last bytes are read, then close."""

    def close(self) -> None:
        """Detach (idempotent)."""


def open_console(conn: Connection, domain: Any, on_data: Callable[[bytes], None]) -> ConsoleSource:
    """The console of running ``domain`` on ``conn``: its pty when QEMU runs on this
    machine (a local URI), else a libvirt console stream.

    Raises:
        BackendError: libvirt failed or the pty cannot be opened.
    """
    if is_remote(conn.uri):
        return ConsoleStream(conn, domain, on_data)
    name = domain.name()
    xml = conn.call(f"read the XML of domain {name!r}", domain.XMLDesc, 0)
    return PtyConsole(serial_pty(xml, name), on_data)


def serial_pty(xml: str, domain: str) -> str:
    """The pty path of the first serial port in a running domain's XML.

    Raises:
        BackendError: the domain has no pty serial port (the message names it).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise BackendError(f"domain {domain!r}: libvirt returned unreadable XML: {exc}") from exc
    for serial in root.iterfind("devices/serial"):
        source = serial.find("source")
        path = source.get("path") if source is not None else None
        if serial.get("type") == "pty" and path:
            return path
    raise BackendError(f"domain {domain!r} runs without a pty serial port to read")


class _Reader:
    """What both sources share: a reader thread that ends at the run's end of file."""

    _reader: threading.Thread

    def close(self) -> None:
        """Detach (idempotent)."""
        raise NotImplementedError

    def drain(self, timeout: float = _JOIN) -> None:
        """Wait until the guest's last bytes are read (the run's end of file), then close."""
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self.close()


class PtyConsole(_Reader):
    """The serial console of a domain running on this machine, read from its pty.

    QEMU owns the pty's master side; this opens the slave (``/dev/pts/N`` from
    the live domain XML), in raw mode, as ``virsh console`` would, and a
    thread of its own reads it. End of file (QEMU exited and closed the master:
    ``EIO``) ends the thread. Like ``virsh console``, it is the only reader:
    another client on the same pty would take a share of the bytes.

    Args:
        path: the pty's path.
        on_data: called with each chunk the guest prints (from the reader thread).

    Raises:
        BackendError: the pty cannot be opened.
    """

    def __init__(self, path: str, on_data: Callable[[bytes], None]) -> None:
        self._lock = threading.Lock()
        self._on_data = on_data
        self.eof = False
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open the console pty {path}: {exc.strerror}") from exc
        try:
            tty.setraw(fd)  # QEMU made it raw already; a pty left cooked would echo input
        except (OSError, termios.error) as exc:
            os.close(fd)
            raise BackendError(f"cannot make the console pty {path} raw: {exc}") from exc
        self._fd: int | None = fd
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._reader = threading.Thread(
            target=self._read, name=f"virtkit-console {path}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        fd = self._fd
        assert fd is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_read in ready:
                    return  # close()
                if fd not in ready:
                    continue
                try:
                    data = os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EBADF):
                        return  # QEMU closed the master: the run is over
                    raise
                if not data:
                    return
                self._on_data(data)
        finally:
            with self._lock:
                self.eof = True
                mine, self._fd = self._fd, None
            if mine is not None:
                os.close(mine)

    def write(self, data: bytes) -> None:
        """Send ``data`` to the guest's serial input.

        Raises:
            StateError: the console has ended.
            TimeoutError: the guest read none of it for a long time.
            BackendError: the pty failed.
        """
        view = memoryview(data)
        while view:
            with self._lock:
                fd = self._fd
                if fd is None:
                    raise StateError("cannot write to the console: the console has ended")
                try:
                    sent = os.write(fd, view)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise BackendError(f"console write failed: {exc.strerror}") from exc
            view = view[sent:]
            if view and not sent:
                try:
                    _, writable, _ = select.select([], [fd], [], _WRITE_WAIT)
                except (OSError, ValueError):
                    continue  # closed meanwhile: the next turn says so
                if not writable:
                    raise TimeoutError(
                        f"console write: the guest took no input for {_WRITE_WAIT} s",
                        timeout=_WRITE_WAIT,
                    )

    @property
    def open(self) -> bool:
        """Whether the pty still delivers output."""
        with self._lock:
            return self._fd is not None

    def close(self) -> None:
        """Stop reading and wait for the reader to end (idempotent)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        if threading.current_thread() is not self._reader:
            self._reader.join(_JOIN)
            for end in (self._wake_read, self._wake_write):
                with contextlib.suppress(OSError):
                    os.close(end)
            self._wake_read = self._wake_write = -1


class ConsoleStream(_Reader):
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

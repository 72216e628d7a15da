"""QMP over ``qemu.qmp``: a private event-loop thread and a sync bridge to it.

``qemu.qmp`` is asyncio. virtkit runs one private event loop on a daemon
thread for the whole process (started lazily); every QMP connection,
console stream and QEMU child process of the backend lives on it. The sync
API submits coroutines to that loop and waits for the result
(:func:`run_sync`), and refuses clearly when called from inside a running
event loop, where blocking would freeze the caller's loop (the pattern of
fsspec's ``asyn.py``). Async callers use the coroutines directly through
:func:`run_async`, which awaits them from any loop.

:class:`QmpSession` wraps one ``QMPClient``: it listens on a UNIX socket
(QEMU connects to it as a client, so no polling for a socket to appear),
turns ``ExecuteError``/disconnects into virtkit errors in one place
(:func:`translate`), dispatches events to a callback, and resolves job
waiters on ``JOB_STATUS_CHANGE``.

:class:`SyncChannel` is the thin path for blocking callers: a second QMP
monitor (QEMU listens on it; connected on first use) spoken to with a plain
blocking socket from the calling thread. A round trip through the private
loop costs two thread wake-ups (caller -> loop, loop -> caller), about a
quarter of a ``query-status`` round trip on a loaded host; the channel
costs none. Events are also broadcast on it; they are discarded there
(the main session delivers them).
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError

from virtkit.errors import BackendError, ConfigError, StateError, TimeoutError
from virtkit.images.args import check_name, check_timeout

__all__ = [
    "DEFAULT_QMP_TIMEOUT",
    "QmpSession",
    "SyncChannel",
    "check_command",
    "loop",
    "run_async",
    "run_sync",
    "translate",
]

T = TypeVar("T")

DEFAULT_QMP_TIMEOUT = 30.0


def check_command(command: object, arguments: object, timeout: object = None) -> float | None:
    """Check a raw QMP call's arguments; return the timeout to use (None: the default).

    Raises:
        ConfigError: ``command`` is not a non-empty str, ``arguments`` not a
            mapping with str keys (or None), or ``timeout`` not seconds >= 0.
    """
    check_name(command, "command")
    if arguments is not None and (
        not isinstance(arguments, Mapping) or not all(isinstance(k, str) for k in arguments)
    ):
        raise ConfigError(
            f"'arguments' must be a dict with str keys or None (got {arguments!r})",
            field="arguments",
        )
    if timeout is None:
        return None
    limit = check_timeout(timeout)
    return 10.0**9 if limit is None else limit  # inf / huge: in practice no limit


# qemu.qmp logs every disconnect (even the normal one after a power-off) at
# WARNING/ERROR level; those are reported through our own errors instead.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_loop_lock = threading.Lock()
_atexit_hooks: list[Callable[[], None]] = []


def loop() -> asyncio.AbstractEventLoop:
    """The backend's private event loop (started on first use, on a daemon thread)."""
    global _loop, _thread
    with _loop_lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            new = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(new)
                ready.set()
                new.run_forever()

            thread = threading.Thread(target=run, name="virtkit-qemu-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _thread = new, thread
        return _loop


def in_loop_thread() -> bool:
    """Whether the caller runs on the private loop's thread."""
    return _thread is not None and threading.current_thread() is _thread


def _refuse_in_loop(coro: Coroutine[Any, Any, Any] | None = None) -> None:
    """Raise StateError when a blocking call is made from inside a running event loop."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None:
        if coro is not None:
            coro.close()
        raise StateError(
            "a blocking virtkit QEMU call was made from inside a running asyncio event loop; "
            "it would freeze that loop. Use the coroutine twin instead "
            "(await guest.aio.start(), ...) or call it from a worker thread "
            "(await asyncio.to_thread(guest.start))",
            action="sync-call",
        )


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the private loop and wait for its result.

    Raises:
        StateError: called from inside a running asyncio event loop (use the
            ``guest.aio`` coroutines there) or from the private loop itself.
        TimeoutError: ``timeout`` seconds passed (the coroutine is cancelled).
    """
    _refuse_in_loop(coro)
    target = loop()
    future = asyncio.run_coroutine_threadsafe(coro, target)
    try:
        return future.result(timeout)  # waits on the future's own condition: no extra waiter
    except concurrent.futures.TimeoutError:
        if future.done():  # it finished with a TimeoutError of its own: re-raise that
            return future.result()
        future.cancel()
        raise TimeoutError(
            f"QEMU operation did not finish within {timeout} s", timeout=timeout
        ) from None


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the private loop from any event loop."""
    target = loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - always called from a coroutine
        running = None
    if running is target:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, target))


def at_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` when the interpreter exits (kills leftover QEMU children)."""
    _atexit_hooks.append(hook)


@atexit.register
def _run_atexit_hooks() -> None:
    for hook in reversed(_atexit_hooks):
        with contextlib.suppress(Exception):
            hook()


def translate(exc: BaseException, command: str, *, what: str = "QEMU") -> BaseException:
    """Map a ``qemu.qmp`` failure onto the virtkit hierarchy (the one place that does)."""
    if isinstance(exc, ExecuteError):
        return BackendError(f"{what} refused QMP command {command!r}: {exc} ({exc.error_class})")
    if isinstance(exc, ExecInterruptedError):
        return BackendError(
            f"the QMP connection to {what} closed while {command!r} was running "
            "(QEMU probably exited; see the guest's crash reason)"
        )
    if isinstance(exc, (QMPError, OSError, EOFError)):
        return BackendError(f"QMP command {command!r} to {what} failed: {exc!r}")
    return exc


class SyncChannel:
    """A second QMP monitor spoken to with a blocking socket from the caller's thread.

    QEMU listens on ``socket_path`` (``-chardev socket,server=on,wait=off``,
    added by :class:`~virtkit.backends.qemu.process.QemuProcess`); the
    channel connects on first use and negotiates capabilities once. One
    caller at a time: :meth:`try_execute` returns ``(False, None)`` when
    another thread is using it, and that caller goes through the loop.
    Events broadcast on this monitor are discarded (the main session
    delivers them); :meth:`drain` keeps them from piling up between calls.

    Args:
        name: the guest's name, for messages.
        socket_path: the UNIX socket QEMU listens on.
    """

    MAX_MESSAGE = 64 * 1024 * 1024
    """Largest QMP message accepted (bytes); a longer one breaks the connection."""

    def __init__(self, name: str, socket_path: Path) -> None:
        self.name = name
        self.socket_path = socket_path
        self.closed = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)

    def try_execute(
        self, command: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> tuple[bool, Any]:
        """Run a QMP command: ``(True, result)``, or ``(False, None)`` if the channel is busy.

        Raises:
            StateError: called from inside a running asyncio event loop.
            BackendError: QEMU refused the command or the connection broke.
            TimeoutError: no reply within ``timeout`` (default 30 s).
        """
        _refuse_in_loop()
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            return True, self._execute(command, args, timeout)
        finally:
            self._lock.release()

    async def try_execute_async(
        self, command: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> tuple[bool, Any]:
        """Coroutine twin of :meth:`try_execute`, on the caller's own event loop.

        The socket is driven with the running loop's ``sock_*`` calls: no
        thread hop to the private loop. Cancelling the caller drops the
        connection (a late reply must not meet the next command).
        """
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            return True, await self._execute_async(command, args, timeout)
        finally:
            self._lock.release()

    def _message(self, command: str, args: Mapping[str, Any] | None) -> tuple[int, bytes]:
        if self.closed:
            raise BackendError(f"no QMP connection to {self.name} (QEMU is not running)")
        ident = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": ident}
        if args:
            message["arguments"] = dict(args)
        return ident, json.dumps(message).encode() + b"\n"

    def _failure(self, exc: BaseException, command: str, limit: float) -> BaseException:
        """Forget the connection; the virtkit error for ``exc``."""
        self._drop()  # a late reply must not meet the next command
        what = f"QEMU ({self.name})"
        if isinstance(exc, builtins.TimeoutError):
            return TimeoutError(
                f"{what} did not answer QMP command {command!r} within {limit} s", timeout=limit
            )
        if isinstance(exc, EOFError):
            return BackendError(
                f"the QMP connection to {what} closed while {command!r} was running "
                "(QEMU probably exited; see the guest's crash reason)"
            )
        return BackendError(f"QMP command {command!r} to {what} failed: {exc!r}")

    def _result(self, reply: dict[str, Any], command: str) -> Any:
        error = reply.get("error")
        if error is not None:
            desc = error.get("desc") if isinstance(error, dict) else error
            kind = error.get("class") if isinstance(error, dict) else "GenericError"
            raise BackendError(
                f"QEMU ({self.name}) refused QMP command {command!r}: {desc} ({kind})"
            )
        return reply.get("return")

    def _execute(self, command: str, args: Mapping[str, Any] | None, timeout: float | None) -> Any:
        ident, payload = self._message(command, args)
        limit = DEFAULT_QMP_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + limit
        try:
            sock = self._sock if self._sock is not None else self._connect(deadline)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))  # drain() left it non-blocking
            sock.sendall(payload)
            reply = self._read(deadline)
            while reply.get("id") != ident:  # events (and nothing else: ids are never reused)
                reply = self._read(deadline)
        except (OSError, EOFError, ValueError) as exc:  # TimeoutError is an OSError
            raise self._failure(exc, command, limit) from None
        return self._result(reply, command)

    async def _execute_async(
        self, command: str, args: Mapping[str, Any] | None, timeout: float | None
    ) -> Any:
        ident, payload = self._message(command, args)
        limit = DEFAULT_QMP_TIMEOUT if timeout is None else timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit):
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock = sock
                    self._buf.clear()
                    sock.setblocking(False)
                    await loop.sock_connect(sock, os.fspath(self.socket_path))
                    if "QMP" not in await self._read_async(loop):
                        raise ValueError("no QMP greeting on the synchronous monitor")
                    await loop.sock_sendall(sock, b'{"execute": "qmp_capabilities", "id": 0}\n')
                    reply = await self._read_async(loop)
                    while reply.get("id") != 0:
                        reply = await self._read_async(loop)
                    if "error" in reply:
                        raise ValueError(f"qmp_capabilities refused: {reply['error']!r}")
                sock = self._sock
                sock.setblocking(False)
                await loop.sock_sendall(sock, payload)
                reply = await self._read_async(loop)
                while reply.get("id") != ident:
                    reply = await self._read_async(loop)
        except asyncio.CancelledError:
            self._drop()
            raise
        except (OSError, EOFError, ValueError) as exc:
            raise self._failure(exc, command, limit) from None
        return self._result(reply, command)

    def _pop(self) -> dict[str, Any] | None:
        """The next whole JSON object in the buffer, or None."""
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.MAX_MESSAGE:
                    raise ValueError(f"QMP message longer than {self.MAX_MESSAGE} bytes")
                return None
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if not line.strip():
                continue
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError(f"QMP message is not a JSON object: {line[:80]!r}")
            return value

    async def _read_async(self, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        while True:
            value = self._pop()
            if value is not None:
                return value
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise EOFError
            self._buf += chunk

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = sock
        self._buf.clear()
        sock.settimeout(max(deadline - time.monotonic(), 0.001))  # 0 would mean non-blocking
        sock.connect(os.fspath(self.socket_path))
        if "QMP" not in self._read(deadline):
            raise ValueError("no QMP greeting on the synchronous monitor")
        sock.sendall(b'{"execute": "qmp_capabilities", "id": 0}\n')
        reply = self._read(deadline)
        while reply.get("id") != 0:
            reply = self._read(deadline)
        if "error" in reply:
            raise ValueError(f"qmp_capabilities refused: {reply['error']!r}")
        return sock

    def _read(self, deadline: float) -> dict[str, Any]:
        """The next JSON object from the socket (blocking until ``deadline``)."""
        sock = self._sock
        assert sock is not None
        while True:
            value = self._pop()
            if value is not None:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise builtins.TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk

    def drain(self) -> None:
        """Discard events queued on the channel, without blocking (no-op while it is in use)."""
        if self._sock is None or not self._lock.acquire(blocking=False):
            return
        try:
            sock = self._sock
            if sock is None:
                return
            sock.setblocking(False)  # a timeout would poll before each recv
            while True:
                try:
                    chunk = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self._drop()
                    return
                if not chunk:
                    self._drop()
                    return
                self._buf += chunk
            end = self._buf.rfind(b"\n")  # whole lines here are events: no call is in flight
            if end >= 0:
                del self._buf[: end + 1]
        finally:
            self._lock.release()

    def _drop(self) -> None:
        """Forget the connection (the next call connects again)."""
        sock, self._sock = self._sock, None
        self._buf.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        """Refuse further calls; a call in flight ends with BackendError (safe from any thread)."""
        self.closed = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a caller blocked in recv
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()


class QmpSession:
    """One QMP connection to one QEMU process, living on the private loop.

    Args:
        name: used in messages and qemu.qmp's logger.
        socket_path: the UNIX socket to listen on; QEMU connects to it.
        on_event: called (on the loop thread) with each event's name and data.
        sync_socket: where QEMU listens for the :class:`SyncChannel` (None: no thin path).
    """

    def __init__(
        self,
        name: str,
        socket_path: Path,
        on_event: Callable[[str, Mapping[str, Any]], None],
        sync_socket: Path | None = None,
    ) -> None:
        self.name = name
        self.socket_path = socket_path
        self.sync = SyncChannel(name, sync_socket) if sync_socket is not None else None
        self._on_event = on_event
        self._client = QMPClient(name)
        self._pump: asyncio.Task[None] | None = None
        self._job_seen: dict[str, list[str]] = {}
        self._job_events: dict[str, asyncio.Event] = {}
        self.connected = False

    async def listen(self) -> None:
        """Bind the socket (mode 0600) and start listening."""
        await self._client.start_server(os.fspath(self.socket_path))
        os.chmod(self.socket_path, 0o600)

    @property
    def greeted(self) -> bool:
        """QEMU connected and sent its QMP greeting (even if the session then failed)."""
        return self._client.greeting is not None

    async def accept(self) -> None:
        """Wait for QEMU to connect and negotiate capabilities."""
        await self._client.accept()
        self.connected = True
        self._pump = asyncio.get_running_loop().create_task(self._pump_events())

    async def _pump_events(self) -> None:
        try:
            async for event in self._client.events:
                self._dispatch(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            return

    def _dispatch(self, event: Mapping[str, Any]) -> None:
        name = str(event["event"])
        raw = event.get("data")
        data: dict[str, Any] = dict(raw) if isinstance(raw, Mapping) else {}
        if name == "JOB_STATUS_CHANGE":
            job_id = str(data.get("id"))
            if job_id in self._job_seen:
                self._job_seen[job_id].append(str(data.get("status")))
                self._job_events[job_id].set()
        if self.sync is not None:  # the same event is queued on the sync monitor: drop it there
            self.sync.drain()
        with contextlib.suppress(Exception):
            self._on_event(name, data)

    def call(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run a QMP command for a blocking caller (not on the loop) and return its result.

        Uses the :class:`SyncChannel` when there is one and no other thread
        is using it (no thread hop), else :meth:`execute` through the loop.
        Events the command causes are delivered by the loop as usual, possibly
        just after this returns.

        Raises:
            StateError: called from inside a running asyncio event loop.
            BackendError: QEMU refused the command or the connection broke.
            TimeoutError: no reply within ``timeout`` (default 30 s).
        """
        if self.sync is not None and self.connected:
            done, result = self.sync.try_execute(command, args, timeout)
            if done:
                return result
        return run_sync(self.execute(command, args, timeout=timeout))

    async def call_async(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Coroutine twin of :meth:`call`, awaited from any event loop.

        Drives the :class:`SyncChannel` with the caller's own loop when it is
        free (no hop to the private loop), else awaits :meth:`execute` there.

        Raises:
            BackendError: QEMU refused the command or the connection broke.
            TimeoutError: no reply within ``timeout`` (default 30 s).
        """
        if self.sync is not None and self.connected:
            done, result = await self.sync.try_execute_async(command, args, timeout)
            if done:
                return result
        return await run_async(self.execute(command, args, timeout=timeout))

    async def execute(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run a QMP command and return its result.

        Raises:
            BackendError: QEMU refused the command or the connection broke.
            TimeoutError: no reply within ``timeout`` (default 30 s).
        """
        if not self.connected:
            raise BackendError(f"no QMP connection to {self.name} (QEMU is not running)")
        limit = DEFAULT_QMP_TIMEOUT if timeout is None else timeout
        try:
            # asyncio.timeout, not wait_for: no extra task per command on the hot path
            async with asyncio.timeout(limit):
                return await self._client.execute(command, dict(args) if args else None)
        except builtins.TimeoutError:
            raise TimeoutError(
                f"QEMU ({self.name}) did not answer QMP command {command!r} within {limit} s",
                timeout=limit,
            ) from None
        except (QMPError, OSError, EOFError) as exc:
            raise translate(exc, command, what=f"QEMU ({self.name})") from exc

    async def _wait_job(self, job_id: str, wanted: set[str], start: int) -> tuple[str, int]:
        """The first status in ``wanted`` seen at or after index ``start`` (and the next index).

        Statuses are recorded by the event pump as they arrive, so one that
        came while nobody was waiting is not lost.
        """
        event = self._job_events[job_id]
        while True:
            seen = self._job_seen.get(job_id, [])
            for i in range(start, len(seen)):
                if seen[i] in wanted:
                    return seen[i], i + 1
            if not self.connected:
                return "null", len(seen)
            event.clear()
            await event.wait()

    async def run_job(
        self,
        command: str,
        args: Mapping[str, Any],
        *,
        timeout: float,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Start a job command (``args['job-id']``), wait until it concludes, dismiss it.

        Raises:
            BackendError: the job failed (QEMU's error message is included).
            TimeoutError: it did not conclude within ``timeout``.
        """
        job_id = str(args["job-id"])
        self._job_seen[job_id] = []
        self._job_events[job_id] = asyncio.Event()
        try:
            await self.execute(command, args)
            done = {"concluded", "null"}
            status, pos = await asyncio.wait_for(
                self._wait_job(job_id, {*done, "ready"}, 0), timeout
            )
            if status == "ready":
                if on_ready is not None:
                    await on_ready()
                status, pos = await asyncio.wait_for(self._wait_job(job_id, done, pos), timeout)
        except builtins.TimeoutError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise TimeoutError(
                f"QEMU job {command} ({job_id}) did not finish within {timeout} s", timeout=timeout
            ) from None
        finally:
            self._job_seen.pop(job_id, None)
            self._job_events.pop(job_id, None)
        if not self.connected:
            raise BackendError(
                f"the QMP connection closed while QEMU job {command} ({job_id}) was running"
            )
        jobs = await self.execute("query-jobs")
        error = next((j.get("error") for j in jobs if j.get("id") == job_id), None)
        with contextlib.suppress(BackendError):
            await self.execute("job-dismiss", {"id": job_id})
        if error:
            raise BackendError(f"QEMU job {command} ({job_id}) failed: {error}")

    async def close(self) -> None:
        """Disconnect (a connection QEMU already closed is fine)."""
        self.connected = False
        if self.sync is not None:
            self.sync.close()
        for event in self._job_events.values():
            event.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 5)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
            # events QEMU sent just before it closed the connection (SHUTDOWN,
            # GUEST_PANICKED...) are still queued: deliver them, in order
            for message in self._client.events.clear():
                self._dispatch(message)
        with contextlib.suppress(OSError):
            self.socket_path.unlink()

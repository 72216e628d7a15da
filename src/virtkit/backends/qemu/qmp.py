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
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError

from virtkit.errors import BackendError, ConfigError, StateError, TimeoutError
from virtkit.images.args import check_name, check_timeout

__all__ = [
    "DEFAULT_QMP_TIMEOUT",
    "QmpSession",
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


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the private loop and wait for its result.

    Raises:
        StateError: called from inside a running asyncio event loop (use the
            ``guest.aio`` coroutines there) or from the private loop itself.
        TimeoutError: ``timeout`` seconds passed (the coroutine is cancelled).
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None:
        coro.close()
        raise StateError(
            "a blocking virtkit QEMU call was made from inside a running asyncio event loop; "
            "it would freeze that loop. Use the coroutine twin instead "
            "(await guest.aio.start(), ...) or call it from a worker thread "
            "(await asyncio.to_thread(guest.start))",
            action="sync-call",
        )
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


class QmpSession:
    """One QMP connection to one QEMU process, living on the private loop.

    Args:
        name: used in messages and qemu.qmp's logger.
        socket_path: the UNIX socket to listen on; QEMU connects to it.
        on_event: called (on the loop thread) with each event's name and data.
    """

    def __init__(
        self,
        name: str,
        socket_path: Path,
        on_event: Callable[[str, Mapping[str, Any]], None],
    ) -> None:
        self.name = name
        self.socket_path = socket_path
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
        with contextlib.suppress(Exception):
            self._on_event(name, data)

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

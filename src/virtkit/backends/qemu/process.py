"""Supervise one ``qemu-system-*`` process: runtime dir, sockets, stderr, reaping.

Per launch:

* a private runtime directory (mode 0700) holds the QMP socket and the
  console socket (both 0600); virtkit listens on them and QEMU connects as a
  client during its start-up, before any guest code runs;
* a second QMP monitor, ``qmp-sync.sock`` in the same directory, is the
  thin path for blocking callers (:class:`~virtkit.backends.qemu.qmp.SyncChannel`):
  QEMU listens on it and virtkit connects on the first blocking QMP call;
* QEMU runs as a child of the backend's private event-loop thread, which
  lives as long as the Python process; ``PR_SET_PDEATHSIG`` = SIGKILL (set
  by ``setpriv --pdeathsig KILL``, which then execs QEMU) kills it if that
  thread (the process) goes away, and an ``atexit`` hook kills what is left
  on a normal interpreter exit;
* stderr is captured (the last 64 KiB are kept) for error messages;
* the child is always reaped (``asyncio`` waits for it), and the runtime
  directory and its sockets are removed when it exits, whatever the cause.

Start-up failures raise :class:`~virtkit.errors.BackendError` with QEMU's
exit code, command line and stderr tail; a later exit is reported to
``on_exit`` with the same information.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from virtkit.backends.qemu.argv import opt_value
from virtkit.backends.qemu.qmp import QmpSession, at_exit
from virtkit.errors import BackendError, TimeoutError

__all__ = ["ExitInfo", "QemuProcess", "make_runtime_dir", "runtime_base"]

_PR_SET_PDEATHSIG = 1
_STDERR_KEEP = 64 * 1024
_live: set[QemuProcess] = set()


_SETPRIV = shutil.which("setpriv")  # util-linux, Essential on Debian
_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in the child
except (OSError, AttributeError):  # pragma: no cover - non-glibc hosts
    _prctl = None


def _pdeathsig() -> None:  # fallback: runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _spawn_argv(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """The argv to execute and the ``preexec_fn`` that make QEMU die with its parent.

    ``setpriv --pdeathsig KILL`` (util-linux) sets ``PR_SET_PDEATHSIG`` and
    execs QEMU: the child is started with ``vfork`` and no Python code runs
    in it. Measured here, that costs about 2.5 ms per start; a Python
    ``preexec_fn`` forces a full ``fork`` of the interpreter and costs more
    (about 4 ms). Without setpriv the ``preexec_fn`` calls a ``prctl``
    resolved before the fork (no import, lock or allocation in the child).
    """
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv], None
    if _prctl is not None:
        return argv, _pdeathsig
    return argv, None


def _kill_leftovers() -> None:
    """At interpreter exit: SIGKILL QEMU children still running, remove their runtime dirs."""
    for proc in list(_live):
        proc.kill_now()
        shutil.rmtree(proc.runtime_dir, ignore_errors=True)


at_exit(_kill_leftovers)


def runtime_base() -> Path:
    """Where per-guest runtime dirs go: ``$XDG_RUNTIME_DIR`` if usable, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg)
    return Path(tempfile.gettempdir())


def make_runtime_dir(name: str) -> Path:
    """A fresh private (0700) directory for one QEMU launch.

    UNIX socket paths are limited to 107 bytes, so the dir name is short.
    """
    path = Path(tempfile.mkdtemp(prefix=f"vkq-{os.getpid()}-{name[:12]}-", dir=runtime_base()))
    os.chmod(path, 0o700)
    return path


class ExitInfo:
    """How a QEMU process ended.

    Attributes:
        returncode: the exit status (negative: killed by that signal).
        stderr_tail: the last lines QEMU wrote to stderr.
        expected: virtkit asked it to stop (quit/kill/power-off requested).
    """

    def __init__(self, returncode: int, stderr_tail: str, expected: bool) -> None:
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.expected = expected

    def describe(self) -> str:
        """One line: ``"exit code 1"`` or ``"killed by SIGKILL"``."""
        if self.returncode < 0:
            try:
                sig = signal.Signals(-self.returncode).name
            except ValueError:
                sig = f"signal {-self.returncode}"
            return f"killed by {sig}"
        return f"exit code {self.returncode}"


class QemuProcess:
    """A running QEMU with its QMP session and console stream.

    Create with :meth:`launch` (a coroutine, run on the private loop).
    """

    def __init__(  # noqa: PLR0917 - private constructor; launch() is the API
        self,
        name: str,
        argv: list[str],
        runtime_dir: Path,
        qmp: QmpSession,
        on_console: Callable[[bytes], None],
        on_exit: Callable[[ExitInfo], None],
    ) -> None:
        self.name = name
        self.argv = argv
        self.runtime_dir = runtime_dir
        self.qmp = qmp
        self._on_console = on_console
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit: asyncio.Future[int] | None = None
        self._stderr_done: asyncio.Future[None] | None = None
        self._stderr = bytearray()
        self._console_server: asyncio.base_events.Server | None = None
        self._console_writer: asyncio.StreamWriter | None = None
        self._console_ready: asyncio.Event | None = None
        self._console_done: asyncio.Event | None = None  # the reader saw EOF (or failed)
        self._tasks: list[asyncio.Task[Any]] = []
        self.expected_exit = False
        self.exited: asyncio.Event | None = None
        self.exit_info: ExitInfo | None = None
        self.pid: int | None = None
        self.kvm_enabled: bool | None = None  # QMP query-kvm, asked during launch()

    # -- start-up -----------------------------------------------------------------
    @classmethod
    async def launch(
        cls,
        *,
        name: str,
        argv: Sequence[str],
        runtime_dir: Path,
        qmp_socket: Path,
        console_socket: Path | None,
        on_event: Callable[[str, Mapping[str, Any]], None],
        on_console: Callable[[bytes], None],
        on_exit: Callable[[ExitInfo], None],
        timeout: float = 30.0,
    ) -> QemuProcess:
        """Listen on the sockets, start QEMU, wait until it connected to both.

        Raises:
            BackendError: QEMU exited during start-up (exit code, command line
                and stderr tail included) or could not be executed.
            TimeoutError: QEMU did not connect within ``timeout`` seconds.
        """
        sync_socket = runtime_dir / "qmp-sync.sock"
        sync_path = opt_value(os.fspath(sync_socket), what="runtime_dir")
        qmp = QmpSession(name, qmp_socket, on_event, sync_socket=sync_socket)
        argv = [
            *argv,
            "-chardev",
            f"socket,id=qmp-sync,path={sync_path},server=on,wait=off",
            "-mon",
            "chardev=qmp-sync,mode=control",
        ]
        self = cls(name, argv, runtime_dir, qmp, on_console, on_exit)
        self.exited = asyncio.Event()
        self._console_ready = asyncio.Event()
        try:
            await qmp.listen()
            if console_socket is not None:
                self._console_server = await asyncio.start_unix_server(
                    self._accept_console, path=os.fspath(console_socket)
                )
                os.chmod(console_socket, 0o600)
            else:
                self._console_ready.set()
            try:
                run_argv, preexec = _spawn_argv(self.argv)
                self._proc = subprocess.Popen(
                    run_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    preexec_fn=preexec,  # noqa: PLW1509 - only a pre-resolved prctl() call
                    cwd=os.fspath(runtime_dir),
                )
            except OSError as exc:
                raise BackendError(
                    f"cannot execute {self.argv[0]}: {exc.strerror}", argv=self.argv
                ) from exc
            self.pid = self._proc.pid
            _live.add(self)
            loop = asyncio.get_running_loop()
            self._watch_fds(loop)
            assert self._exit is not None
            exit_task = self._exit
            ready = loop.create_task(self._wait_connected())
            waiters: set[asyncio.Future[Any]] = {exit_task, ready}
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if ready not in done:
                ready.cancel()
                with contextlib.suppress(BaseException):
                    await ready
                if exit_task not in done:
                    self.kill_now()
                    await exit_task
                    await self._drain_stderr()
                    raise TimeoutError(
                        f"QEMU for {name!r} did not connect its QMP monitor within {timeout} s; "
                        f"stderr: {self.stderr_tail() or '(empty)'}",
                        timeout=timeout,
                    )
                await self._drain_stderr()
                code = exit_task.result()
                if self._ran(code):
                    return await self._ended_during_launch(exit_task)
                raise BackendError(
                    f"QEMU for guest {name!r} exited during start-up",
                    exit_code=code,
                    argv=self.argv,
                    stderr_tail=self.stderr_tail(),
                )
            if ready.exception() is not None:
                # QEMU hung up during the handshake: it is exiting; report why
                with contextlib.suppress(builtins.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exit_task), 5)
                await self._drain_stderr()
                if exit_task.done() and self._ran(exit_task.result()):
                    return await self._ended_during_launch(exit_task)
                raise BackendError(
                    f"QEMU for guest {name!r} closed its QMP connection during start-up "
                    f"({ready.exception()!r})",
                    exit_code=exit_task.result() if exit_task.done() else None,
                    argv=self.argv,
                    stderr_tail=self.stderr_tail(),
                )
            # QEMU created the sync monitor's socket during its start-up (the
            # directory is 0700, so it was private all along): 0600 like the others
            with contextlib.suppress(OSError):
                os.chmod(sync_socket, 0o600)
            self.kvm_enabled = await self._query_kvm()
            self._tasks.append(loop.create_task(self._watch_exit(exit_task)))
            return self
        except BaseException:
            await self._teardown()
            raise

    def _ran(self, code: int) -> bool:
        """QEMU, gone during the start-up handshake, had run the guest: it exited 0 after
        connecting to virtkit (console stream or QMP greeting).

        A quick guest powers off while virtkit still negotiates QMP (a loaded
        host may not run virtkit's loop for a while); QEMU exits 0 then, as
        for a host-side ``SIGTERM``. A failed start exits 1.
        """
        return code == 0 and (self._console_writer is not None or self.qmp.greeted)

    async def _ended_during_launch(self, exit_task: asyncio.Future[int]) -> QemuProcess:
        """A run that ended during launch(): reported to ``on_exit`` like any later exit."""
        self.kvm_enabled = await self._query_kvm()  # from the command line: QMP is gone
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_exit(exit_task)))
        return self

    async def _query_kvm(self) -> bool:
        """Whether KVM runs the guest: asked here, on the loop, so start() pays no thread hop.

        A guest that powered off at once (QEMU gone before the question) is
        reported with the accelerator its command line asked for. A command
        line that names no KVM accelerator cannot run on KVM: nothing is asked
        (the monitor's reply, under QEMU's big lock, would delay the guest's
        first steps).
        """
        accels = [self.argv[i + 1] for i, a in enumerate(self.argv[:-1]) if a == "-accel"]
        if accels and not any(a.startswith("kvm") for a in accels):
            return False
        try:
            reply = await self.qmp.execute("query-kvm")
        except BackendError:
            accel = self.argv[self.argv.index("-accel") + 1] if "-accel" in self.argv else ""
            return accel.startswith("kvm")
        return bool(reply.get("enabled"))

    async def _wait_connected(self) -> None:
        assert self._console_ready is not None
        await self.qmp.accept()
        await self._console_ready.wait()

    async def _accept_console(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._console_writer is not None:  # only QEMU may connect, once
            writer.close()
            return
        self._console_writer = writer
        assert self._console_ready is not None
        self._console_ready.set()
        self._console_done = asyncio.Event()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self._on_console(data)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._console_done.set()

    async def _drain_console(self) -> None:
        """After QEMU exited: let the reader take what QEMU wrote last, up to the EOF."""
        if self._console_done is not None:
            with contextlib.suppress(builtins.TimeoutError):
                await asyncio.wait_for(self._console_done.wait(), 2)

    def _watch_fds(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the child's exit (a pidfd) and its stderr pipe from the event loop.

        No helper thread per child (asyncio's child watchers use one), no
        polling: the loop wakes when QEMU writes to stderr or exits.
        """
        proc = self._proc
        assert proc is not None
        assert proc.stderr is not None
        self._exit = loop.create_future()
        self._stderr_done = loop.create_future()
        err_fd = proc.stderr.fileno()
        os.set_blocking(err_fd, False)

        def on_stderr() -> None:
            try:
                chunk = os.read(err_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if chunk:
                self._stderr += chunk
                if len(self._stderr) > 2 * _STDERR_KEEP:
                    del self._stderr[:-_STDERR_KEEP]
                return
            loop.remove_reader(err_fd)
            assert proc.stderr is not None
            proc.stderr.close()
            if self._stderr_done is not None and not self._stderr_done.done():
                self._stderr_done.set_result(None)

        loop.add_reader(err_fd, on_stderr)
        pidfd = os.pidfd_open(proc.pid)

        def on_exit() -> None:
            code = proc.poll()
            if code is None:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if self._exit is not None and not self._exit.done():
                self._exit.set_result(code)

        loop.add_reader(pidfd, on_exit)

    async def _drain_stderr(self) -> None:
        if self._stderr_done is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._stderr_done), 2)

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines QEMU wrote to stderr."""
        text = bytes(self._stderr[-_STDERR_KEEP:]).decode("utf-8", "replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    # -- running --------------------------------------------------------------------
    def write_console(self, data: bytes) -> None:
        """Queue bytes for the guest's serial input (loop thread only)."""
        if self._console_writer is not None and not self._console_writer.is_closing():
            self._console_writer.write(data)

    @property
    def alive(self) -> bool:
        """The process has not exited yet."""
        return self._proc is not None and self._proc.returncode is None

    def kill_now(self) -> None:
        """SIGKILL the process (safe from any thread; no-op once it exited)."""
        self.expected_exit = True
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)

    async def stop(self, *, graceful: float = 3.0) -> None:
        """Stop QEMU: QMP ``quit``, then SIGKILL after ``graceful`` seconds; wait for the exit."""
        self.expected_exit = True
        assert self.exited is not None
        if self.alive and self.qmp.connected:
            with contextlib.suppress(Exception):
                await self.qmp.execute("quit", timeout=graceful)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), graceful)
        if self.alive:
            self.kill_now()
        await self.exited.wait()

    async def _watch_exit(self, exit_task: asyncio.Future[int]) -> None:
        code = await exit_task
        await self._drain_stderr()
        await self._drain_console()  # the guest's last output before its power-off is reported
        await self._teardown()
        self.exit_info = ExitInfo(code, self.stderr_tail(), self.expected_exit)
        assert self.exited is not None
        self.exited.set()
        with contextlib.suppress(Exception):
            self._on_exit(self.exit_info)

    async def _teardown(self) -> None:
        """Close sockets and remove the runtime dir (idempotent)."""
        await self.qmp.close()
        if self._console_writer is not None:
            self._console_writer.close()
        if self._console_server is not None:
            self._console_server.close()
            with contextlib.suppress(Exception):
                await self._console_server.wait_closed()
        if self._proc is not None and self._proc.returncode is None:
            self.kill_now()
            if self._exit is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._exit), 10)
            if self._proc.returncode is None:  # pragma: no cover - a stuck D-state child
                await asyncio.get_running_loop().run_in_executor(None, self._proc.wait)
        _live.discard(self)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

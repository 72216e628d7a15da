"""The QEMU guest agent protocol (``qemu-ga``), spoken over any byte channel.

The agent reads JSON commands (``{"execute": "guest-ping"}``) and answers
each with one JSON line: ``{"return": ...}`` or ``{"error": {"class": ...,
"desc": ...}}``. It keeps no session: after a timeout, a reconnect or garbage
on the channel, the client *resynchronises* (``guest-sync-delimited``: a
0xFF byte, which the agent echoes before the reply, marks where the stream is
clean again), so a late answer to an abandoned command is never taken for the
answer to the next one.

:class:`GuestAgent` is the blocking client; every call has a deadline and
never hangs past it. The channel comes from a ``connect`` callable returning
a connected stream socket: the qemu backend passes its virtio-serial
chardev's UNIX socket, a test may pass a ``qemu-ga`` running on the host.

Reference: QEMU's ``qga/qapi-schema.json`` (command names and fields).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from virtkit.errors import BackendError, ConfigError, TimeoutError

__all__ = [
    "AgentError",
    "CommandAgent",
    "ExecResult",
    "GuestAgent",
    "IPAddress",
    "Interface",
]

#: one answer line may not exceed this (a 1 MiB file chunk is ~1.4 MiB of base64)
MAX_LINE = 64 * 1024**2
#: bytes per guest-file-read/-write call
FILE_CHUNK = 1024**2
DEFAULT_TIMEOUT = 30.0
_SYNC_BYTE = b"\xff"
#: what a socket timeout raises (virtkit's TimeoutError shadows the builtin here)
_SocketTimeout = builtins.TimeoutError


class AgentError(BackendError):
    """The guest agent answered with an error, or its channel broke.

    Attributes:
        command: the agent command that failed.
        error_class: the agent's error class (``CommandNotFound``,
            ``GenericError``...), or None when the channel itself failed.
    """

    def __init__(self, message: str, *, command: str, error_class: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class


@attrs.frozen
class ExecResult:
    """What a command run by :meth:`GuestAgent.exec` did.

    Attributes:
        exit_code: its exit status (None when a signal ended it).
        signal: the signal that ended it, if any.
        stdout: what it wrote to standard output (captured by the agent,
            which keeps at most 16 MiB of each stream).
        stderr: what it wrote to standard error.
        stdout_truncated: the agent cut ``stdout``.
        stderr_truncated: the agent cut ``stderr``.
    """

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@attrs.frozen
class IPAddress:
    """One address of a guest network interface."""

    address: str
    prefix: int
    family: str  # "ipv4" or "ipv6"


@attrs.frozen
class Interface:
    """A guest network interface as the agent reports it."""

    name: str
    mac: str | None
    addresses: tuple[IPAddress, ...]


def _deadline(timeout: float | None) -> float:
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ConfigError(f"'timeout' must be seconds >= 0 (got {timeout!r})", field="timeout")
    return time.monotonic() + min(float(timeout), 10.0**9)


class GuestAgent:
    """A blocking client of the guest agent.

    Args:
        connect: returns a connected stream socket to the agent's channel.
        timeout: the default deadline of each call, in seconds.
        name: names the guest in error messages.

    Calls are serialised (one at a time per client) and thread-safe.
    """

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "guest",
    ) -> None:
        if not callable(connect):
            raise ConfigError("'connect' must be a callable returning a socket", field="connect")
        _deadline(timeout)
        self._connect = connect
        self.timeout = float(timeout)
        self.name = name
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._synced = False
        self._lock = threading.Lock()
        self._lost: str | None = None  # why the channel was cut under a call (see abort())
        self._chunk = memoryview(bytearray(256 * 1024))  # what one read fills

    @classmethod
    def unix(cls, path: str, **options: Any) -> GuestAgent:
        """A client for an agent channel exposed as a UNIX socket at ``path``."""

        def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
            return sock

        return cls(connect, **options)

    # -- the channel ----------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the connection (the next call reconnects)."""
        with self._lock:
            self._drop()

    def abort(self, reason: str) -> None:
        """End the call in progress, if any, with an AgentError naming ``reason``.

        For the owner of the channel, from any thread: the qemu backend calls
        it when the guest closes the agent's port (``qemu-ga`` exited or was
        killed), so a call fails then instead of at its deadline. The next
        call reconnects.
        """
        self._lost = reason
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in another thread

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._buf.clear()
        self._synced = False

    def _channel(self, command: str) -> socket.socket:
        if self._sock is None:
            self._lost = None
            try:
                self._sock = self._connect()
            except OSError as exc:
                raise AgentError(
                    f"cannot reach the guest agent of {self.name!r}: {exc.strerror or exc} "
                    "(is the guest running with Machine(agent=True), and qemu-ga started in it?)",
                    command=command,
                ) from exc
        return self._sock

    def _send(self, data: bytes, command: str, deadline: float) -> None:
        sock = self._channel(command)
        try:
            sock.settimeout(max(_left(deadline), 0.001))
            sock.sendall(data)
        except _SocketTimeout as exc:
            self._drop()
            raise TimeoutError(
                f"the guest agent of {self.name!r} did not take {command!r} in time",
                timeout=self.timeout,
            ) from exc
        except OSError as exc:
            lost, self._lost = self._lost, None
            self._drop()
            raise AgentError(
                f"the guest agent channel of {self.name!r} broke sending {command!r}: "
                f"{lost or exc}",
                command=command,
            ) from exc

    def _fill(self, command: str, deadline: float) -> None:
        """Read more bytes into the buffer before ``deadline``."""
        sock = self._channel(command)
        remaining = _left(deadline)
        if remaining <= 0:
            self._synced = False
            raise TimeoutError(
                f"the guest agent of {self.name!r} did not answer {command!r} in time",
                timeout=self.timeout,
            )
        try:
            sock.settimeout(remaining)
            got = sock.recv_into(self._chunk)  # no 1 MiB allocation per (often 4 KiB) read
        except _SocketTimeout as exc:
            self._synced = False  # a late answer may still come: resync before the next call
            raise TimeoutError(
                f"the guest agent of {self.name!r} did not answer {command!r} in time",
                timeout=self.timeout,
            ) from exc
        except OSError as exc:
            lost, self._lost = self._lost, None
            self._drop()
            raise AgentError(
                f"the guest agent channel of {self.name!r} broke during {command!r}: {lost or exc}",
                command=command,
            ) from exc
        if not got:
            lost, self._lost = self._lost, None
            self._drop()
            raise AgentError(
                f"the guest agent of {self.name!r} closed its channel during {command!r}"
                + (f": {lost}" if lost else ""),
                command=command,
            )
        self._buf += self._chunk[:got]

    def _line(self, command: str, deadline: float) -> bytes:
        scanned = 0  # a long answer arrives in many reads: search each byte once
        while True:
            end = self._buf.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line
            scanned = len(self._buf)
            if len(self._buf) > MAX_LINE:
                self._drop()
                raise AgentError(
                    f"the guest agent of {self.name!r} sent more than {MAX_LINE} bytes without "
                    f"a line end during {command!r}",
                    command=command,
                )
            self._fill(command, deadline)

    def _resync(self, deadline: float) -> None:
        """guest-sync-delimited: drop whatever stale bytes precede a fresh, known answer.

        A channel that babbles without ever answering the sync ends in a
        TimeoutError that quotes what it sent instead.
        """
        token = secrets.randbelow(2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self._send(_SYNC_BYTE + json.dumps(request).encode() + b"\n", "guest-sync", deadline)
        junk = bytearray()  # the last bytes dropped, for the error message
        try:
            while True:
                mark = self._buf.find(_SYNC_BYTE)
                if mark < 0:
                    junk = (junk + self._buf)[-120:]
                    self._buf.clear()
                    self._fill("guest-sync", deadline)
                    continue
                junk = (junk + self._buf[:mark])[-120:]
                del self._buf[: mark + 1]
                line = self._line("guest-sync", deadline)
                with contextlib.suppress(ValueError):
                    if json.loads(line) == {"return": token}:
                        self._synced = True
                        return
                junk = (junk + line)[-120:]
        except TimeoutError as exc:
            if not junk:
                raise
            raise TimeoutError(
                f"the guest agent of {self.name!r} did not answer 'guest-sync' in time; the "
                f"channel carried only garbage, last {bytes(junk)!r}",
                timeout=self.timeout,
            ) from exc

    def call(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one agent command and return its ``return`` value.

        Raises:
            AgentError: the agent answered with an error, or the channel broke.
            TimeoutError: no answer before the deadline (the next call resyncs).
            ConfigError: a bad command name or arguments.
        """
        if not isinstance(command, str) or not command:
            raise ConfigError(
                f"'command' must be a non-empty str (got {command!r})", field="command"
            )
        if arguments is not None and not isinstance(arguments, Mapping):
            raise ConfigError(
                f"'arguments' must be a mapping (got {arguments!r})", field="arguments"
            )
        deadline = _deadline(self.timeout if timeout is None else timeout)
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        data = json.dumps(request).encode() + b"\n"
        with self._lock:
            self._drop_if_lost()
            if not self._synced:
                self._resync(deadline)
            self._send(data, command, deadline)
            return self._answer(command, deadline)

    def _drop_if_lost(self) -> None:
        """A channel cut by abort() between calls: start the next call on a fresh one."""
        if self._lost is not None:
            self._drop()

    def _answer(self, command: str, deadline: float) -> Any:
        line = self._line(command, deadline)
        try:
            return _reply(self.name, command, line)
        except AgentError as exc:
            if exc.error_class is None:
                self._synced = False  # garbage: resync before the next call
            raise

    # -- commands -------------------------------------------------------------------------------
    def ping(self, *, timeout: float | None = None) -> None:
        """Check that the agent answers."""
        self.call("guest-ping", timeout=timeout)

    def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The agent's version and the commands it supports (``guest-info``)."""
        result = self.call("guest-info", timeout=timeout)
        if not isinstance(result, dict):
            raise AgentError("guest-info returned no object", command="guest-info")
        return result

    def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,  # noqa: A002 - subprocess's own word
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest and wait for it to finish.

        Args:
            argv: the program (an absolute path, or a name the agent finds
                on its PATH) and its arguments.
            input: bytes for its standard input.
            env: its environment (the agent's default when None).
            timeout: seconds for the whole run.

        Raises:
            AgentError: the agent could not start it.
            TimeoutError: it did not finish in time (it goes on in the guest).
        """
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(
                f"'argv' must be a non-empty list of str (got {argv!r})", field="argv"
            )
        if input is not None and not isinstance(input, (bytes, bytearray)):
            raise ConfigError(f"'input' must be bytes or None (got {input!r})", field="input")
        if env is not None and (
            not isinstance(env, Mapping)
            or not all(isinstance(k, str) and k and "=" not in k for k in env)
            or not all(isinstance(v, str) for v in env.values())
        ):
            raise ConfigError(
                f"'env' must map variable names (without '=') to str values (got {env!r})",
                field="env",
            )
        deadline = _deadline(self.timeout if timeout is None else timeout)
        arguments: dict[str, Any] = {
            "path": argv[0],
            "arg": list(argv[1:]),
            "capture-output": True,
        }
        if input is not None:
            arguments["input-data"] = base64.b64encode(bytes(input)).decode()
        if env is not None:
            arguments["env"] = [f"{k}={v}" for k, v in env.items()]
        started = self.call("guest-exec", arguments, timeout=_left(deadline))
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise AgentError(f"guest-exec returned no pid: {started!r}", command="guest-exec")
        pause = 0.005
        while True:
            remaining = _left(deadline)
            if remaining <= 0:
                raise TimeoutError(
                    f"{argv[0]!r} (pid {pid}) did not finish in the guest {self.name!r} in time",
                    timeout=self.timeout if timeout is None else timeout,
                )
            status = self.call("guest-exec-status", {"pid": pid}, timeout=remaining)
            if isinstance(status, dict) and status.get("exited"):
                return ExecResult(
                    exit_code=status.get("exitcode"),
                    signal=status.get("signal"),
                    stdout=_b64(status.get("out-data"), "guest-exec-status"),
                    stderr=_b64(status.get("err-data"), "guest-exec-status"),
                    stdout_truncated=bool(status.get("out-truncated")),
                    stderr_truncated=bool(status.get("err-truncated")),
                )
            time.sleep(min(pause, max(_left(deadline), 0)))
            pause = min(pause * 2, 0.2)

    def read_file(self, path: str, *, timeout: float | None = None) -> bytes:
        """The whole content of the guest file ``path`` (read in 1 MiB chunks)."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        handle = self._open(path, "r", deadline)
        out = bytearray()
        try:
            while True:
                got = self.call(
                    "guest-file-read",
                    {"handle": handle, "count": FILE_CHUNK},
                    timeout=_left(deadline),
                )
                if not isinstance(got, dict):
                    raise AgentError(
                        "guest-file-read returned no object", command="guest-file-read"
                    )
                out += _b64(got.get("buf-b64"), "guest-file-read")
                if got.get("eof") or not got.get("count"):
                    return bytes(out)
        finally:
            self._close_file(handle, deadline)

    def write_file(self, path: str, data: bytes, *, timeout: float | None = None) -> None:
        """Create or replace the guest file ``path`` with ``data`` (1 MiB chunks)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"'data' must be bytes (got {type(data).__name__})", field="data")
        deadline = _deadline(self.timeout if timeout is None else timeout)
        view = memoryview(data).cast("B")
        handle = self._open(path, "w", deadline)
        try:
            for start in range(0, len(view), FILE_CHUNK):
                chunk = view[start : start + FILE_CHUNK]
                done = self.call(
                    "guest-file-write",
                    {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()},
                    timeout=_left(deadline),
                )
                if not isinstance(done, dict) or done.get("count") != len(chunk):
                    raise AgentError(
                        f"the guest agent wrote {done!r} of a {len(chunk)}-byte chunk of {path}",
                        command="guest-file-write",
                    )
            self.call("guest-file-flush", {"handle": handle}, timeout=_left(deadline))
        finally:
            self._close_file(handle, deadline)

    def _open(self, path: str, mode: str, deadline: float) -> int:
        if not isinstance(path, str) or not path or "\0" in path:
            raise ConfigError(f"'path' must be a guest file path (got {path!r})", field="path")
        handle = self.call("guest-file-open", {"path": path, "mode": mode}, timeout=_left(deadline))
        if not isinstance(handle, int):
            raise AgentError(f"guest-file-open returned {handle!r}", command="guest-file-open")
        return handle

    def _close_file(self, handle: int, deadline: float) -> None:
        # best effort, within the caller's deadline: after a broken channel or a
        # timeout the handle may stay open, which costs the guest a file descriptor
        left = _left(deadline)
        if left > 0:
            with contextlib.suppress(AgentError, TimeoutError):
                self.call("guest-file-close", {"handle": handle}, timeout=min(left, 5.0))

    def interfaces(self, *, timeout: float | None = None) -> list[Interface]:
        """The guest's network interfaces and their addresses."""
        found = self.call("guest-network-get-interfaces", timeout=timeout)
        if not isinstance(found, list):
            raise AgentError(
                "guest-network-get-interfaces returned no list",
                command="guest-network-get-interfaces",
            )
        out = []
        for item in found:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            listed = item.get("ip-addresses")
            addresses = tuple(
                IPAddress(address=a["ip-address"], prefix=a["prefix"], family=a["ip-address-type"])
                for a in (listed if isinstance(listed, list) else ())
                if isinstance(a, dict)
                and isinstance(a.get("ip-address"), str)
                and a["ip-address"]
                and isinstance(a.get("prefix"), int)
                and not isinstance(a.get("prefix"), bool)
                and a.get("ip-address-type") in ("ipv4", "ipv6")
            )
            mac = item.get("hardware-address")
            out.append(Interface(item["name"], mac if isinstance(mac, str) else None, addresses))
        return out

    def shutdown(self, mode: str = "powerdown", *, timeout: float | None = None) -> None:
        """Ask the guest OS to power down (``"halt"``, ``"reboot"`` also).

        The agent does not answer a successful shutdown; this returns once the
        request is sent and no error came back within a moment.
        """
        if mode not in ("powerdown", "halt", "reboot"):
            raise ConfigError(
                f"'mode' must be 'powerdown', 'halt' or 'reboot' (got {mode!r})", field="mode"
            )
        deadline = _deadline(self.timeout if timeout is None else timeout)
        data = json.dumps({"execute": "guest-shutdown", "arguments": {"mode": mode}}).encode()
        with self._lock:
            self._drop_if_lost()
            if not self._synced:
                self._resync(deadline)
            self._send(data + b"\n", "guest-shutdown", deadline)
            try:
                self._answer("guest-shutdown", min(deadline, time.monotonic() + 0.5))
            except (TimeoutError, AgentError) as exc:
                if isinstance(exc, AgentError) and exc.error_class is not None:
                    raise
                self._drop()  # no answer (or the channel closed): the guest is going down

    def set_time(self, ns: int | None = None, *, timeout: float | None = None) -> None:
        """Set the guest clock to ``ns`` nanoseconds since the epoch (None: from its RTC)."""
        if ns is not None and (isinstance(ns, bool) or not isinstance(ns, int) or ns < 0):
            raise ConfigError(f"'ns' must be an int >= 0 or None (got {ns!r})", field="ns")
        self.call("guest-set-time", None if ns is None else {"time": ns}, timeout=timeout)

    def fsfreeze(self, *, timeout: float | None = None) -> int:
        """Freeze the guest's file systems; returns how many were frozen."""
        return int(self.call("guest-fsfreeze-freeze", timeout=timeout))

    def fsthaw(self, *, timeout: float | None = None) -> int:
        """Thaw the guest's file systems; returns how many were thawed."""
        return int(self.call("guest-fsfreeze-thaw", timeout=timeout))

    def fsfreeze_status(self, *, timeout: float | None = None) -> str:
        """``"thawed"`` or ``"frozen"``."""
        return str(self.call("guest-fsfreeze-status", timeout=timeout))


def _reply(name: str, command: str, line: bytes) -> Any:
    """The ``return`` value of one agent reply line, or the AgentError it carries."""
    try:
        reply = json.loads(line)
    except ValueError:
        raise AgentError(
            f"the guest agent of {name!r} answered {command!r} with garbage: {line[:120]!r}",
            command=command,
        ) from None
    if isinstance(reply, dict) and "return" in reply:
        return reply["return"]
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        error = reply["error"]
        raise AgentError(
            f"guest agent of {name!r}: {command} failed: {error.get('desc', error)}",
            command=command,
            error_class=str(error.get("class")),
        )
    raise AgentError(
        f"the guest agent of {name!r} answered {command!r} with an unexpected message: "
        f"{line[:120]!r}",
        command=command,
    )


class CommandAgent(GuestAgent):
    """A guest agent reached through a request/reply pipe rather than a byte stream.

    libvirt owns its domains' agent channel and passes whole commands through
    (``virDomainQemuAgentCommand``); ``send(request_json, timeout_seconds)``
    returns the reply's JSON text. The pipe does the synchronising, so there
    is no ``guest-sync-delimited`` here; every command has the same methods
    and deadlines as :class:`GuestAgent`.
    """

    def __init__(
        self,
        send: Callable[[str, float], str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "guest",
    ) -> None:
        if not callable(send):
            raise ConfigError("'send' must be a callable", field="send")
        super().__init__(_no_stream, timeout=timeout, name=name)
        self._send_command = send

    def call(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one agent command through the pipe and return its ``return`` value.

        Raises:
            AgentError: the agent answered with an error, or the pipe failed.
            TimeoutError: no answer before the deadline.
            ConfigError: a bad command name or arguments.
        """
        if not isinstance(command, str) or not command:
            raise ConfigError(
                f"'command' must be a non-empty str (got {command!r})", field="command"
            )
        if arguments is not None and not isinstance(arguments, Mapping):
            raise ConfigError(
                f"'arguments' must be a mapping (got {arguments!r})", field="arguments"
            )
        deadline = _deadline(self.timeout if timeout is None else timeout)
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        with self._lock:
            text = self._send_command(json.dumps(request), _left(deadline))
        return _reply(self.name, command, text.encode())

    def shutdown(self, mode: str = "powerdown", *, timeout: float | None = None) -> None:
        """Ask the guest OS to power down; the agent never answers a shutdown that works."""
        if mode not in ("powerdown", "halt", "reboot"):
            raise ConfigError(
                f"'mode' must be 'powerdown', 'halt' or 'reboot' (got {mode!r})", field="mode"
            )
        try:
            self.call("guest-shutdown", {"mode": mode}, timeout=min(timeout or 2.0, 2.0))
        except TimeoutError:
            pass  # no answer: the guest is going down
        except AgentError as exc:
            if exc.error_class is not None:
                raise  # the agent refused
            # the pipe closed under the command: the agent exited with the guest

    def close(self) -> None:
        """Nothing to close: the pipe belongs to its owner."""


def _no_stream() -> socket.socket:
    raise OSError("this agent is reached through a command pipe, not a stream")


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _b64(value: object, command: str) -> bytes:
    if value is None:
        return b""
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise AgentError(f"{command} returned invalid base64", command=command) from None

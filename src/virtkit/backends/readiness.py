"""Is the guest really up, and where can it be reached?

:meth:`ReadinessMixin.wait_ready` retries one probe with a growing pause
until it succeeds or the deadline passes:

* ``via="agent"``: the guest agent answers ``guest-ping``;
* ``via="console"``: a pattern appears on the serial console;
* ``via="tcp"``: a connection to a forwarded guest port yields *the guest's
  own bytes* (its banner, or its reply to ``send``). A connection that is
  merely accepted proves nothing: with user-mode networking QEMU accepts on
  the host side whether or not anything listens in the guest, then closes
  or stalls; such a probe fails and is retried.

:meth:`ReadinessMixin.addresses` lists what the guest agent reports, and
the host ends of user-mode port forwards.
"""

from __future__ import annotations

import builtins
import contextlib
import socket
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import attrs

from virtkit.agent import AgentError
from virtkit.errors import ConfigError, StateError, TimeoutError
from virtkit.images.args import check_timeout
from virtkit.model import PortForward, State

if TYPE_CHECKING:
    from virtkit.agent import GuestAgent
    from virtkit.backends.console import Console, Pattern

__all__ = ["GuestAddress", "ReadinessMixin", "forward_addresses"]

_FIRST_PAUSE = 0.05
_MAX_PAUSE = 1.0
_LIVE = (State.RUNNING, State.PAUSED)
#: what a socket timeout raises (virtkit's TimeoutError shadows the builtin here)
_SocketTimeout = builtins.TimeoutError


@attrs.frozen
class GuestAddress:
    """One way to reach a guest.

    Attributes:
        address: an IP address the guest has (from the agent), or the host
            address a port forward listens on.
        family: ``"ipv4"`` or ``"ipv6"``.
        interface: the guest's interface name (agent addresses), else None.
        prefix: the network prefix length (agent addresses), else None.
        host_port: for a port forward, the host port to connect to.
        guest_port: for a port forward, the guest port it reaches.
        protocol: for a port forward, ``"tcp"`` or ``"udp"``.
    """

    address: str
    family: str
    interface: str | None = None
    prefix: int | None = None
    host_port: int | None = None
    guest_port: int | None = None
    protocol: str | None = None


class ReadinessMixin:
    """The readiness and address part of :class:`~virtkit.backends.base.Guest`."""

    if TYPE_CHECKING:
        machine: Any
        console: Console
        _lifecycle: Any

        @property
        def name(self) -> str: ...

        @property
        def state(self) -> State: ...

        @property
        def agent(self) -> GuestAgent: ...

        @property
        def forwards(self) -> tuple[tuple[str, PortForward], ...]: ...

        def host_port(
            self, guest_port: int, *, protocol: str = "tcp", nic: str | None = None
        ) -> int: ...

    def wait_ready(
        self,
        *,
        via: Literal["agent", "console", "tcp"] = "agent",
        timeout: float = 120.0,
        pattern: Pattern | None = None,
        port: int | None = None,
        send: bytes | None = None,
        expect: bytes | None = None,
    ) -> bytes | None:
        """Wait until the guest answers through ``via``, retrying with backoff.

        Args:
            via: ``"agent"`` (``guest-ping`` answers), ``"console"``
                (``pattern`` appears on the console; the console's cursor
                moves past it) or ``"tcp"`` (the forwarded guest ``port``
                sends bytes of its own).
            timeout: seconds for the whole wait.
            pattern: the console pattern (``via="console"``).
            port: the guest TCP port, forwarded by a user-mode NIC (``via="tcp"``).
            send: bytes to send after connecting (``via="tcp"``): the guest's
                reply then counts, for protocols where the client speaks first.
            expect: bytes the guest's answer must contain (``via="tcp"``);
                any non-empty answer otherwise.

        Returns:
            The bytes the guest sent (``via="tcp"``), else None.

        Raises:
            TimeoutError: not ready in time; the message names the last failure.
            StateError: the guest is not running, or stopped while waiting.
            ConfigError: a bad combination of arguments.
        """
        self._lifecycle.check_alive("wait_ready")
        limit = check_timeout(timeout)
        deadline = time.monotonic() + (10.0**9 if limit is None else limit)
        if via == "console":
            if pattern is None:
                raise ConfigError("wait_ready(via='console') needs a pattern", field="pattern")
            if self.state not in _LIVE:
                raise StateError(f"guest {self.name!r} is not running", action="wait_ready")
            self.console.expect(pattern, timeout=max(deadline - time.monotonic(), 0.0))
            return None
        if via == "agent":
            agent = self.agent
            probe: Any = lambda left: agent.ping(timeout=min(left, 2.0))  # noqa: E731
        elif via == "tcp":
            if not isinstance(port, int) or isinstance(port, bool):
                raise ConfigError("wait_ready(via='tcp') needs the guest 'port'", field="port")
            for field, value in (("send", send), ("expect", expect)):
                if value is not None and not isinstance(value, (bytes, bytearray)):
                    raise ConfigError(
                        f"wait_ready {field!r} must be bytes or None (got {value!r})",
                        field=field,
                        value=value,
                    )
            if expect is not None and not expect:
                raise ConfigError("wait_ready 'expect' must not be empty", field="expect")
            host_port = self.host_port(port)
            address = next(
                (f.host_addr for _, f in self.forwards if f.host_port == host_port), "127.0.0.1"
            )
            probe = lambda left: _tcp_probe(address, host_port, send, expect, left)  # noqa: E731
        else:
            raise ConfigError(
                f"'via' must be 'agent', 'console' or 'tcp' (got {via!r})", field="via"
            )
        pause, last = _FIRST_PAUSE, "no attempt was made"
        while True:
            if self.state not in _LIVE:
                raise StateError(
                    f"guest {self.name!r} is not running (waiting for it via {via}: {last})",
                    action="wait_ready",
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"guest {self.name!r} was not ready via {via} within {timeout} s: {last}",
                    timeout=timeout,
                )
            try:
                result: bytes | None = probe(left)
                return result
            except (AgentError, TimeoutError, OSError, _NotReady) as exc:
                last = str(exc) or type(exc).__name__
            time.sleep(max(min(pause, deadline - time.monotonic()), 0.0))
            pause = min(pause * 2, _MAX_PAUSE)

    @contextlib.contextmanager
    def quiesce(self, *, timeout: float = 10.0) -> Iterator[int]:
        """Freeze the guest's file systems through its agent for the ``with`` block.

        Yields how many file systems were frozen: 0 when the guest has no
        agent channel, is not running, or its agent does not answer a ping
        within 2 s or the freeze within ``timeout`` (the block then runs
        unfrozen, as libvirt's quiesce does when asked to try). File systems
        are thawed however the block ends, also after a freeze that timed out
        (the agent may have frozen them late). Disk-only and full snapshots on
        the qemu backend take themselves inside it.

        Raises:
            ConfigError: a bad ``timeout``.
            StateError: the handle is dead (undefined, or its hypervisor closed).
        """
        self._lifecycle.check_alive("quiesce")
        limit = check_timeout(timeout)
        timeout = 10.0**9 if limit is None else limit
        frozen, asked = 0, False
        if getattr(self.machine, "agent", False) and self.state is State.RUNNING:
            try:
                self.agent.ping(timeout=min(timeout, 2.0))  # no agent: do not wait the freeze out
                asked = True
                frozen = self.agent.fsfreeze(timeout=timeout)
            except TimeoutError:
                pass  # silent: nothing frozen, unless the freeze was sent (asked): thaw then
            except AgentError:
                asked = False  # no channel, no agent, or it refused: nothing frozen
        try:
            yield frozen
        finally:
            if asked:
                with contextlib.suppress(AgentError, TimeoutError):
                    self.agent.fsthaw(timeout=timeout)

    def addresses(self, *, timeout: float = 10.0) -> list[GuestAddress]:
        """Where the guest can be reached.

        The guest agent's interface addresses (loopback left out) when the
        machine has an agent channel and the agent answers, then the host
        ends of user-mode port forwards (their host port picked at start for
        ``host_port=0``).

        Raises:
            StateError: the handle is dead (undefined, or its hypervisor closed).
        """
        self._lifecycle.check_alive("list the addresses of")
        out: list[GuestAddress] = []
        if getattr(self.machine, "agent", False) and self.state in _LIVE:
            try:
                interfaces = self.agent.interfaces(timeout=timeout)
            except (AgentError, TimeoutError):
                interfaces = []
            for iface in interfaces:
                out += [
                    GuestAddress(a.address, a.family, interface=iface.name, prefix=a.prefix)
                    for a in iface.addresses
                    if iface.name != "lo" and not a.address.startswith(("127.", "::1"))
                ]
        return out + forward_addresses(self.forwards)


def forward_addresses(forwards: Iterable[tuple[str, PortForward]]) -> list[GuestAddress]:
    """The host ends of user-mode port forwards (those with a host port)."""
    return [
        GuestAddress(
            fwd.host_addr,
            "ipv6" if ":" in fwd.host_addr else "ipv4",
            host_port=fwd.host_port,
            guest_port=fwd.guest_port,
            protocol=fwd.protocol,
        )
        for _, fwd in forwards
        if fwd.host_port
    ]


class _NotReady(Exception):
    """A probe reached something that is not the guest yet."""


def _tcp_probe(
    address: str, port: int, send: bytes | None, expect: bytes | None, left: float
) -> bytes:
    """Connect, optionally send, and demand bytes from the guest."""
    per_try = min(left, 2.0)
    with socket.create_connection((address, port), timeout=per_try) as sock:
        if send:
            sock.sendall(send)
        sock.settimeout(per_try)
        received = bytearray()
        try:
            while expect is None or expect not in received:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
                if expect is None:
                    break
        except _SocketTimeout:
            pass
    if not received:
        raise _NotReady(
            f"{address}:{port} accepted a connection but the guest sent nothing (with user-mode "
            "networking the host side accepts whether or not the guest listens)"
        )
    if expect is not None and expect not in received:
        raise _NotReady(f"{address}:{port} answered {bytes(received[:80])!r}, not {expect!r}")
    return bytes(received)

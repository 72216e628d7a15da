"""Port forwards of user-mode NICs: fixed host ports and ``host_port=0``.

A fixed host port is checked at ``define()`` against every other guest of
the hypervisor (``ConfigError`` naming the field). ``PortForward(host_port=0)``
asks for a free port: one is picked each time the guest starts (bound and
released, so another program could take it in between; the window is a few
milliseconds) and reported by :attr:`PortsMixin.forwards` and
:meth:`PortsMixin.host_port`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from virtkit.errors import ConfigError, ResourceError, StateError
from virtkit.model import Machine, Nic, PortForward, State

if TYPE_CHECKING:
    from virtkit.backends.base import Hypervisor
    from virtkit.backends.lifecycle import Lifecycle

__all__ = ["PortsMixin", "fixed_forwards", "free_port"]

_LIVE = (State.RUNNING, State.PAUSED)


def free_port(protocol: str, addr: str, avoid: set[int]) -> int:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    for _ in range(64):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((addr, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
    raise ResourceError(f"no free {protocol} port on {addr}", resource="port")


def fixed_forwards(nics: Iterable[Nic]) -> Iterable[tuple[str, PortForward]]:
    for i, nic in enumerate(nics):
        for j, fwd in enumerate(nic.forwards):
            if fwd.host_port:
                yield f"nics[{i}].forwards[{j}].host_port", fwd


class PortsMixin:
    """The port-forward part of :class:`~virtkit.backends.base.Guest`."""

    if TYPE_CHECKING:
        machine: Machine
        hypervisor: Hypervisor
        _lifecycle: Lifecycle
        _ports: dict[tuple[str, int], int]

        @property
        def name(self) -> str: ...

        @property
        def state(self) -> State: ...

    @property
    def forwards(self) -> tuple[tuple[str, PortForward], ...]:
        """(NIC name, forward) for every port forward, with the host port in use.

        A ``PortForward(host_port=0)`` shows the port picked at the last start
        (0 before the first start).
        """
        out = []
        for nic in self.machine.nics:
            for j, fwd in enumerate(nic.forwards):
                port = self._ports.get((str(nic.name), j), fwd.host_port)
                out.append((str(nic.name), attrs.evolve(fwd, host_port=port)))
        return tuple(out)

    def host_port(self, guest_port: int, *, protocol: str = "tcp", nic: str | None = None) -> int:
        """The host port forwarded to ``guest_port`` (the one picked at start for host_port=0).

        Raises:
            ConfigError: no such forward, or it is ambiguous (give ``nic``).
            StateError: the port is picked at start and the guest was never started,
                or the handle is dead.
        """
        self._lifecycle.check_alive("look up a port of")
        hits = [
            (name, fwd)
            for name, fwd in self.forwards
            if fwd.guest_port == guest_port
            and fwd.protocol == protocol
            and (nic is None or name == nic)
        ]
        if not hits:
            raise ConfigError(
                f"guest {self.name!r} forwards no {protocol} port to guest port {guest_port!r}",
                field="guest_port",
                value=guest_port,
            )
        if len(hits) > 1:
            raise ConfigError(
                f"guest {self.name!r} forwards {protocol} guest port {guest_port} on several "
                f"NICs ({', '.join(n for n, _ in hits)}); pass nic=",
                field="nic",
            )
        port = hits[0][1].host_port
        if port == 0:
            raise StateError(
                f"guest {self.name!r} picks the host port for guest port {guest_port} when it "
                "starts; start it first",
                state=self.state,
                action="host_port",
            )
        return port

    def _taken_ports(self) -> set[int]:
        taken: set[int] = set()
        for other in self.hypervisor._created:
            if other is not self and other.state in _LIVE:
                taken.update(f.host_port for _, f in other.forwards)
        return taken

    def _assign_ports(self) -> None:
        """Pick a free host port for each ``host_port=0`` forward (start)."""
        taken = self._taken_ports()
        self._ports = {}
        for nic in self.machine.nics:
            self._pick(nic, taken)

    def _pick(self, nic: Nic, taken: set[int]) -> Nic:
        fwds = []
        for j, fwd in enumerate(nic.forwards):
            if fwd.host_port == 0:
                port = free_port(fwd.protocol, fwd.host_addr, taken)
                taken.add(port)
                self._ports[(str(nic.name), j)] = port
                fwd = attrs.evolve(fwd, host_port=port)  # noqa: PLW2901 - the resolved copy
            fwds.append(fwd)
        return attrs.evolve(nic, forwards=tuple(fwds))

    def _with_ports(self, nic: Nic) -> Nic:
        """A NIC being hot-plugged, its ``host_port=0`` forwards given free ports (recorded)."""
        taken = self._taken_ports() | {f.host_port for _, f in self.forwards}
        return self._pick(nic, taken)

    def launch_machine(self) -> Machine:
        """The machine as a backend launches it: ``host_port=0`` replaced by the picked ports."""
        if not self._ports:
            return self.machine
        nics = []
        for nic in self.machine.nics:
            fwds = tuple(
                attrs.evolve(f, host_port=self._ports.get((str(nic.name), j), f.host_port))
                for j, f in enumerate(nic.forwards)
            )
            nics.append(attrs.evolve(nic, forwards=fwds))
        return attrs.evolve(self.machine, nics=tuple(nics))

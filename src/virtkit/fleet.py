"""A fleet of libvirt hosts: guests across them, placement, migration. Thin on purpose.

``virtkit.Fleet(["qemu+ssh://a/system", "qemu+ssh://b/system"])`` opens one
libvirt connection per host. libvirt does the work; the fleet only chooses:

* :meth:`Fleet.place` picks a host for a machine with the hypervisors' own
  admission policy, fed by each host's real figures (node CPUs and memory,
  what every running domain holds, the node's free memory now);
* :meth:`Fleet.define` places and defines;
* :meth:`Fleet.migrate` moves a running guest (to a host you name, or to the
  best other host).

There is no daemon, database or scheduler of virtkit's own: everything a fleet
knows it asks the hosts each time, and a VM folder records where its guest runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs

from virtkit.errors import ConfigError, ResourceError, StateError

if TYPE_CHECKING:
    from virtkit.backends.libvirt import LibvirtGuest, LibvirtHypervisor
    from virtkit.model import AllocationPolicy, Machine

__all__ = ["Fleet", "HostLoad"]


@attrs.frozen
class HostLoad:
    """One host's figures as placement sees them.

    Attributes:
        uri: the host's libvirt URI.
        cpus, memory: node CPUs and memory (bytes).
        used_cpus, used_memory: what running domains hold (all of them, not only virtkit's).
        free_memory: the node's free memory now (bytes).
        cpu_limit, memory_limit: what the allocation policy allows in total.
    """

    uri: str
    cpus: int
    memory: int
    used_cpus: int
    used_memory: int
    free_memory: int
    cpu_limit: int
    memory_limit: int

    def refusal(self, vcpus: int, memory: int) -> str | None:
        """Why a guest of ``vcpus`` and ``memory`` bytes does not fit here (None: it fits)."""
        if self.used_cpus + vcpus > self.cpu_limit:
            return f"{self.used_cpus} + {vcpus} vCPUs > {self.cpu_limit} allowed"
        if self.used_memory + memory > self.memory_limit:
            return f"{self.used_memory} + {memory} bytes > {self.memory_limit} allowed"
        if memory > self.free_memory:
            return f"only {self.free_memory} bytes of memory free"
        return None


class Fleet:
    """Guests on several libvirt hosts.

    Args:
        uris: libvirt URIs, one per host (``qemu:///system``, ``qemu+ssh://...``).
        root: where each host's guests get their VM folders by default
            (``root/<host index>/<name>``); default: private temporary folders.
        policy: the allocation policy every host admits guests by.
        options: more ``virtkit.connect("libvirt", ...)`` options for every host
            (``accel``, ``name_prefix``, ``timeout``...). ``host_options``
            maps a URI to options for that host only (e.g. ``migration_uri``).

    Raises:
        ConfigError: no URIs, a URI twice, or bad options.
        BackendError: a host cannot be reached (the hosts opened so far are closed).
    """

    def __init__(
        self,
        uris: Iterable[str],
        *,
        root: str | os.PathLike[str] | None = None,
        policy: AllocationPolicy | None = None,
        host_options: dict[str, dict[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        from virtkit.backends import connect  # noqa: PLC0415 - the fleet sits above backends
        from virtkit.backends.libvirt import LibvirtHypervisor  # noqa: PLC0415

        if isinstance(uris, str) or not isinstance(uris, Iterable):
            raise ConfigError(f"'uris' must be a list of libvirt URIs (got {uris!r})", field="uris")
        wanted = list(uris)
        if not wanted or not all(isinstance(u, str) and u for u in wanted):
            raise ConfigError(
                f"'uris' must be a non-empty list of libvirt URIs (got {wanted!r})", field="uris"
            )
        if len(set(wanted)) != len(wanted):
            raise ConfigError(f"'uris' names a host twice ({wanted!r})", field="uris")
        extra = dict(host_options or {})
        unknown = set(extra) - set(wanted)
        if unknown:
            raise ConfigError(
                f"'host_options' names hosts not in 'uris': {sorted(unknown)}", field="host_options"
            )
        self._hosts: list[LibvirtHypervisor] = []
        try:
            for index, uri in enumerate(wanted):
                where = None if root is None else Path(root) / str(index)
                hv = connect(
                    "libvirt",
                    uri=uri,
                    root=where,
                    policy=policy,
                    **{**options, **extra.get(uri, {})},
                )
                assert isinstance(hv, LibvirtHypervisor)
                self._hosts.append(hv)
        except BaseException:
            self.close()
            raise

    # -- what there is ---------------------------------------------------------------------
    @property
    def hosts(self) -> tuple[LibvirtHypervisor, ...]:
        """One hypervisor connection per host, in the order given."""
        return tuple(self._hosts)

    def host(self, uri: str) -> LibvirtHypervisor:
        """The connection to the host ``uri``."""
        for hv in self._hosts:
            if hv.uri == uri:
                return hv
        raise ConfigError(
            f"no host {uri!r} in this fleet (hosts: {', '.join(h.uri for h in self._hosts)})",
            field="uri",
        )

    @property
    def guests(self) -> tuple[LibvirtGuest, ...]:
        """The guests this fleet's connections manage, host by host."""
        from virtkit.backends.libvirt import LibvirtGuest  # noqa: PLC0415

        return tuple(g for hv in self._hosts for g in hv.guests if isinstance(g, LibvirtGuest))

    def domains(self) -> dict[str, tuple[str, ...]]:
        """Every domain on every host (virtkit's or not), by host URI."""
        out: dict[str, tuple[str, ...]] = {}
        for hv in self._hosts:
            conn = hv.connection
            doms = conn.call("list domains", conn.raw.listAllDomains, 0)
            out[hv.uri] = tuple(sorted(d.name() for d in doms))
        return out

    def where(self, name: str) -> LibvirtGuest:
        """The guest called ``name``, on whichever host runs it."""
        for guest in self.guests:
            if guest.name == name:
                return guest
        raise ConfigError(f"no guest named {name!r} in this fleet", field="name")

    def __iter__(self) -> Iterator[LibvirtGuest]:
        return iter(self.guests)

    # -- placement -------------------------------------------------------------------------
    def load(self, hv: LibvirtHypervisor) -> HostLoad:
        """A host's figures, read now."""
        host = hv.host
        usable = max(host.memory - hv.policy.reserved_memory, 0)
        return HostLoad(
            uri=hv.uri,
            cpus=host.cpus,
            memory=host.memory,
            used_cpus=host.allocated_cpus,
            used_memory=host.allocated_memory,
            free_memory=hv.free_memory,
            cpu_limit=int(host.cpus * hv.policy.cpu_overcommit),
            memory_limit=int(usable * hv.policy.memory_overcommit),
        )

    def place(self, machine: Machine, *, exclude: Iterable[str] = ()) -> LibvirtHypervisor:
        """The host that admits ``machine`` with the most memory to spare.

        Raises:
            ResourceError: no host admits it (the message gives each host's reason).
        """
        from virtkit.model import Machine  # noqa: PLC0415

        if not isinstance(machine, Machine):
            raise ConfigError(f"place() needs a Machine (got {type(machine).__name__})")
        skip = set(exclude)
        reasons: list[str] = []
        best: tuple[int, LibvirtHypervisor] | None = None
        for hv in self._hosts:
            if hv.uri in skip:
                continue
            load = self.load(hv)
            why = load.refusal(machine.vcpus, machine.memory)
            if why is not None:
                reasons.append(f"{hv.uri}: {why}")
                continue
            spare = load.memory_limit - load.used_memory - machine.memory
            if best is None or spare > best[0]:
                best = (spare, hv)
        if best is None:
            raise ResourceError(
                f"no host admits {machine.name!r} ({machine.vcpus} vCPUs, {machine.memory} "
                f"bytes): " + ("; ".join(reasons) or "no candidate hosts"),
                resource="host",
                requested=machine.memory,
            )
        return best[1]

    def define(
        self, machine: Machine, *, folder: str | os.PathLike[str] | None = None
    ) -> LibvirtGuest:
        """Place ``machine`` on the best host and define it there (see :meth:`place`)."""
        from virtkit.backends.libvirt import LibvirtGuest  # noqa: PLC0415

        guest = self.place(machine).define(machine, folder=folder)
        assert isinstance(guest, LibvirtGuest)
        return guest

    def migrate(
        self,
        guest: LibvirtGuest | str,
        to: LibvirtHypervisor | str | None = None,
        *,
        live: bool = True,
        copy_storage: bool = False,
    ) -> LibvirtGuest:
        """Move a running guest to ``to`` (a host or its URI; default: the best other host).

        Raises:
            ConfigError: unknown guest or host.
            StateError: the guest is not running or paused.
            ResourceError: no other host admits it.
        """
        from virtkit.backends.libvirt import LibvirtGuest  # noqa: PLC0415

        moving = self.where(guest) if isinstance(guest, str) else guest
        if not isinstance(moving, LibvirtGuest) or moving not in self.guests:
            raise ConfigError(f"{guest!r} is not a guest of this fleet", field="guest")
        if isinstance(to, str):
            dest = self.host(to)
        elif to is None:
            dest = self.place(moving.machine, exclude=[moving.hypervisor.uri])
        elif to in self._hosts:
            dest = to
        else:
            raise ConfigError(f"{to!r} is not a host of this fleet", field="to")
        if moving.state.value not in ("running", "paused"):
            raise StateError(
                f"cannot migrate {moving.name!r}: it is {moving.state.value}", action="migrate"
            )
        return moving.migrate(dest, live=live, copy_storage=copy_storage)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Close every host connection (their guests are killed and undefined, as on any
        hypervisor's close)."""
        hosts, self._hosts = self._hosts, []
        for hv in reversed(hosts):
            hv.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Fleet {', '.join(h.uri for h in self._hosts) or 'closed'}>"

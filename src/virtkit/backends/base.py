"""What every backend shares: the ``Hypervisor`` and ``Guest`` base classes.

The public operations (``start``, ``pause``, ``snapshot``...) are written once
here: they check the lifecycle state machine, admission control and snapshot
bookkeeping, then call a small hook a backend implements (``_do_start``...).
Backends report what a guest does by itself through ``_notify_*``.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import attrs

from virtkit import bundle
from virtkit.agent import GuestAgent
from virtkit.backends.aio_guest import AsyncGuest, GuestTwin, refuse_in_loop
from virtkit.backends.console import Console
from virtkit.backends.devices import DevicesMixin
from virtkit.backends.files import HeldFile, fit_disk_sizes, held_files
from virtkit.backends.folder import FolderMixin
from virtkit.backends.lifecycle import Lifecycle
from virtkit.backends.ports import PortsMixin, fixed_forwards
from virtkit.backends.readiness import ReadinessMixin
from virtkit.errors import (
    BackendError,
    CapabilityWarning,
    ConfigError,
    ResourceError,
    StateError,
    VirtkitError,
)
from virtkit.images.args import check_bool, check_name, check_path, check_timeout
from virtkit.model import (
    AllocationPolicy,
    HostResources,
    HypervisorType,
    Machine,
    Snapshot,
    SnapshotKind,
    State,
)
from virtkit.model.devices import ports_clash

__all__ = ["Guest", "Hypervisor"]

_LIVE = (State.RUNNING, State.PAUSED)
#: What ``shutdown(timeout=None)`` waits: in practice, for ever.
_NO_LIMIT = 10.0**9


class Hypervisor(abc.ABC):
    """A hypervisor: places machines on a host and enforces its allocation policy.

    Args:
        root: folder holding one folder per guest. Default: a private
            temporary folder that :meth:`close` removes.
        host: the capacity to admit guests against. Default: this host's
            CPUs, RAM and free storage under ``root``.
        policy: overcommit ratios and reserved memory.
    """

    #: the name ``virtkit.connect()`` knows this backend by.
    name: ClassVar[str]

    def __init__(
        self,
        *,
        root: str | os.PathLike[str] | None = None,
        host: HostResources | None = None,
        policy: AllocationPolicy | None = None,
    ) -> None:
        if host is not None and not isinstance(host, HostResources):
            raise ConfigError(f"'host' must be a HostResources (got {host!r})", field="host")
        if policy is not None and not isinstance(policy, AllocationPolicy):
            raise ConfigError(
                f"'policy' must be an AllocationPolicy (got {policy!r})", field="policy"
            )
        self._owns_root = root is None
        self.root = (
            Path(tempfile.mkdtemp(prefix=f"virtkit-{self.name}-"))
            if root is None
            else Path(check_path(root, "root"))
        )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create guest root {self.root}: {exc.strerror}", field="root"
            ) from exc
        self._capacity = host if host is not None else HostResources.detect(str(self.root))
        self.policy = policy if policy is not None else AllocationPolicy()
        self._guests: dict[str, Guest] = {}
        #: every guest ever placed here (undefined ones too): close() stops them all
        self._created: list[Guest] = []
        self._lock = threading.RLock()
        self._closed = False

    # -- what a backend provides ------------------------------------------------
    @property
    @abc.abstractmethod
    def kind(self) -> HypervisorType:
        """Type 1 (bare-metal, e.g. KVM) or type 2 (hosted, e.g. TCG, the emulator)."""

    @abc.abstractmethod
    def _create_guest(self, machine: Machine, folder: Path) -> Guest:
        """Make the backend's Guest for an admitted machine in its folder."""

    def _ignored_devices(self, machine: Machine) -> list[tuple[str, str]]:
        """(field, why) for each device or setting of ``machine`` this backend cannot run.

        ``define()`` warns (:class:`~virtkit.CapabilityWarning`) about each,
        or refuses the machine with ``strict=True``. Default: none.
        """
        del machine
        return []

    @classmethod
    def probe(cls, **options: object) -> None:
        """Raise ``BackendUnavailable`` (with a hint) if the backend cannot run here."""
        del options  # every option is acceptable unless a backend says otherwise

    # -- resources --------------------------------------------------------------
    @property
    def host(self) -> HostResources:
        """Host capacity and what guests hold: running guests' CPUs and memory,
        defined guests' storage."""
        with self._lock:
            live = [g for g in self._guests.values() if g.state in _LIVE]
            return attrs.evolve(
                self._capacity,
                allocated_cpus=sum(g.machine.vcpus for g in live),
                allocated_memory=sum(g.machine.memory for g in live),
                allocated_storage=sum(g.storage for g in self._guests.values()),
            )

    @property
    def guests(self) -> tuple[Guest, ...]:
        """Defined guests, in definition order."""
        with self._lock:
            return tuple(self._guests.values())

    def guest(self, name: str) -> Guest:
        """The defined guest called ``name``."""
        check_name(name)
        with self._lock:
            try:
                return self._guests[name]
            except KeyError:
                raise ConfigError(f"no guest named {name!r} is defined", field="name") from None

    def _memory_limit(self) -> int:
        usable = max(self._capacity.memory - self.policy.reserved_memory, 0)
        return int(usable * self.policy.memory_overcommit)

    def _cpu_limit(self) -> int:
        return int(self._capacity.cpus * self.policy.cpu_overcommit)

    def _admit_define(self, machine: Machine, storage: int) -> None:
        if machine.vcpus > self._cpu_limit():
            raise ResourceError(
                f"guest {machine.name!r} wants {machine.vcpus} vCPUs; the policy allows at most "
                f"{self._cpu_limit()} ({self._capacity.cpus} host CPUs x "
                f"{self.policy.cpu_overcommit} overcommit)",
                resource="cpus",
                requested=machine.vcpus,
                available=self._cpu_limit(),
            )
        if machine.memory > self._memory_limit():
            raise ResourceError(
                f"guest {machine.name!r} wants {machine.memory} bytes of memory; the host can "
                f"give at most {self._memory_limit()} (after reserving "
                f"{self.policy.reserved_memory} for itself)",
                resource="memory",
                requested=machine.memory,
                available=self._memory_limit(),
            )
        limit = int(self._capacity.storage * self.policy.storage_overcommit)
        used = sum(g.storage for g in self._guests.values())
        if used + storage > limit:
            raise ResourceError(
                f"guest {machine.name!r} needs {storage} bytes of disk; only {limit - used} of "
                f"{limit} remain under the storage policy",
                resource="storage",
                requested=storage,
                available=limit - used,
            )

    def _admit_start(self, guest: Guest) -> None:
        """Refuse to start ``guest`` if running guests would exceed the policy."""
        with self._lock:
            live = [g for g in self._guests.values() if g.state in _LIVE and g is not guest]
            cpus = sum(g.machine.vcpus for g in live) + guest.machine.vcpus
            memory = sum(g.machine.memory for g in live) + guest.machine.memory
            if cpus > self._cpu_limit():
                raise ResourceError(
                    f"starting {guest.name!r} would run {cpus} vCPUs; the policy allows "
                    f"{self._cpu_limit()}",
                    resource="cpus",
                    requested=guest.machine.vcpus,
                    available=self._cpu_limit() - (cpus - guest.machine.vcpus),
                )
            if memory > self._memory_limit():
                raise ResourceError(
                    f"starting {guest.name!r} would commit {memory} bytes of guest memory; "
                    f"the policy allows {self._memory_limit()}",
                    resource="memory",
                    requested=guest.machine.memory,
                    available=self._memory_limit() - (memory - guest.machine.memory),
                )

    def _check_isolation(
        self, machine: Machine, files: Iterable[HeldFile], *, skip: Guest | None = None
    ) -> None:
        """Two guests may hold one file only if neither writes it.

        ``files`` are the new machine's held files (every layer of every disk,
        media, NVRAM, kernel); each other guest's come from its folder.
        """
        mine = {f.path: f for f in files}
        for other in self._guests.values():
            if other is skip:
                continue
            with contextlib.suppress(VirtkitError):
                other._refresh()  # its folder may have changed (a clone froze its top layer)
            try:
                theirs_all = other.files()
            except VirtkitError:  # a broken chain of theirs is their problem, not ours
                theirs_all = other.files(chains=False)
            for theirs in theirs_all:
                held = mine.get(theirs.path)
                if held is None or not (held.writable or theirs.writable):
                    continue
                how = "writes" if theirs.writable else "reads"
                raise ResourceError(
                    f"{held.what}: {theirs.path} is already attached to guest {other.name!r}, "
                    f"which {how} it ({theirs.what}); a file can be shared only when no guest "
                    "writes it (attach it read_only=True in both, or use a layer of its own)",
                    resource="disk",
                )

    def _check_ports(self, machine: Machine, *, skip: Guest | None = None) -> None:
        """Fixed host ports must not collide with another guest's (host_port=0 never does)."""
        taken = [
            (other.name, theirs)
            for other in self._guests.values()
            if other is not skip
            for _, theirs in fixed_forwards(other.machine.nics)
        ]
        for field, fwd in fixed_forwards(machine.nics):
            for owner, theirs in taken:
                if ports_clash(fwd, theirs):
                    raise ConfigError(
                        f"'{field}' {fwd.protocol} port {fwd.host_port} on {fwd.host_addr} is "
                        f"already forwarded by guest {owner!r} ({theirs.host_addr}); pick "
                        "another port, or host_port=0 to get a free one at start",
                        field=field,
                        value=fwd.host_port,
                    )

    def _check_capabilities(self, machine: Machine, *, strict: bool) -> None:
        for field, why in self._ignored_devices(machine):
            message = f"the {self.name} backend ignores '{field}': {why}"
            if strict:
                raise ConfigError(f"{message} (strict=True refuses it)", field=field)
            warnings.warn(CapabilityWarning(message, field=field, backend=self.name), stacklevel=4)

    # -- definitions ------------------------------------------------------------
    def define(
        self,
        machine: Machine,
        *,
        folder: str | os.PathLike[str] | None = None,
        allow: Iterable[str | os.PathLike[str]] = (),
        strict: bool = False,
    ) -> Guest:
        """Place ``machine`` on this hypervisor.

        The guest's files live in ``folder`` (default ``root/<name>``): its
        ``machine.toml``, ``disks/`` (missing images with a ``size`` are
        created, smaller ones grown to it) and ``snapshots/``.

        Args:
            machine: the definition.
            folder: the VM folder (default ``root/<name>``).
            allow: folders or files outside ``folder`` this guest may read
                through backing chains (and ``Disk.backing``); files the
                machine names by absolute path are allowed as given. Roots
                the folder's bundle records (a linked clone's base) are
                allowed too.
            strict: refuse a machine with devices this backend cannot run
                (``ConfigError``) instead of warning
                (:class:`~virtkit.CapabilityWarning`) and ignoring them.

        Raises:
            ConfigError: a guest with that name exists, the folder is unusable,
                a fixed host port is forwarded by another guest, a backing file
                lies outside the allowed places, a ``Disk.size`` is smaller
                than its image, or (``strict``) a device cannot be run.
            ResourceError: the policy cannot admit it, or a file it would write
                is held by another guest; nothing is created then.
        """
        if not isinstance(machine, Machine):
            raise ConfigError(f"define() needs a Machine (got {type(machine).__name__})")
        check_bool(strict, "strict")
        refuse_in_loop("define")
        allowed = _allowed(allow)
        with self._lock:
            if self._closed:
                raise StateError("this hypervisor connection is closed", action="define")
            if machine.name in self._guests:
                raise ConfigError(
                    f"a guest named {machine.name!r} is already defined; undefine it or "
                    "choose another name",
                    field="name",
                    value=machine.name,
                )
            target = (
                Path(check_path(folder, "folder"))
                if folder is not None
                else self.root / machine.name
            )
            self._check_capabilities(machine, strict=strict)
            self._check_ports(machine)
            storage = sum(d.size or 0 for d in machine.disks)
            self._admit_define(machine, storage)
            roots = [*allowed, *_bundle_roots(target)]
            snapshots = bundle.load_snapshots(target) if target.is_dir() else ()
            self._check_isolation(
                machine, held_files(machine, target, snapshots=snapshots, allow=roots)
            )
            existed = target.exists()
            bundle.save(machine, target, allow=roots)
            try:
                fit_disk_sizes(machine, target)
                guest = self._create_guest(machine, target)
            except BaseException:
                if folder is None and not existed:
                    shutil.rmtree(target, ignore_errors=True)
                raise
            guest.storage = storage
            guest.allow = tuple(Path(os.path.abspath(r)) for r in roots)
            self._guests[machine.name] = guest
            self._created.append(guest)
            return guest

    def undefine(self, guest: Guest) -> None:
        """Forget a stopped guest. Its folder and files stay on disk.

        Raises:
            StateError: the guest is running or paused.
        """
        if not isinstance(guest, Guest):
            raise ConfigError(
                f"undefine() needs a Guest (got {type(guest).__name__} {guest!r})", field="guest"
            )
        refuse_in_loop("undefine")
        guest._lifecycle.check_alive("undefine")
        with self._lock:
            if self._guests.get(guest.name) is not guest:
                raise ConfigError(f"guest {guest.name!r} is not defined here", field="guest")
            guest._lifecycle.check("undefine")
            guest._release()
            del self._guests[guest.name]
            guest._lifecycle.retire(f"it was undefined from {self!r}")

    def close(self) -> None:
        """Stop every guest this connection ever started, forget them, remove a private root.

        Every guest handle is dead afterwards (its calls raise ``StateError``).
        """
        refuse_in_loop("close")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            guests = list(self._created)
        for guest in guests:
            if guest.state in (*_LIVE, State.CRASHED) and guest._lifecycle.retired is None:
                with contextlib.suppress(StateError, BackendError):
                    guest.kill()
            guest._release()
            guest._lifecycle.retire("its hypervisor connection was closed")
        with self._lock:
            self._guests.clear()
            self._created.clear()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        count = len(self._guests)
        return f"<{type(self).__name__} {self.name} root={str(self.root)!r} guests={count}>"


def _allowed(allow: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """``allow`` as a list of absolute paths (ConfigError naming 'allow' otherwise)."""
    if isinstance(allow, (str, bytes, os.PathLike)):
        raise ConfigError(
            f"'allow' must be a list of paths, not a single path (got {allow!r})", field="allow"
        )
    try:
        items = list(allow)
    except TypeError as exc:
        raise ConfigError(
            f"'allow' must be a list of paths (got {allow!r})", field="allow"
        ) from exc
    return [Path(os.path.abspath(check_path(p, "allow"))) for p in items]


def _bundle_roots(folder: Path) -> list[Path]:
    """Outside locations the folder's own bundle records as allowed (a linked clone's base)."""
    if not (folder / bundle.CONFIG_NAME).exists():
        return []
    return [Path(p) for p in bundle.allowed_roots(folder)]


class Guest(FolderMixin, PortsMixin, DevicesMixin, ReadinessMixin, abc.ABC):
    """A machine placed on a hypervisor: the thing that runs.

    Use it as a context manager to kill and undefine it on exit.
    """

    def __init__(self, hypervisor: Hypervisor, machine: Machine, folder: Path) -> None:
        self.hypervisor = hypervisor
        self.machine = machine
        self.folder = Path(folder)
        self.storage = 0
        #: outside roots this guest may read through backing chains (``define(allow=...)``)
        self.allow: tuple[Path, ...] = ()
        #: (nic name, forward index) -> host port chosen at start for host_port=0
        self._ports: dict[tuple[str, int], int] = {}
        self._lifecycle = Lifecycle(machine.name)
        log = self.folder / machine.serial.log if machine.serial.log else None
        self.console = Console(log_path=log)
        self._snapshots: dict[str, Snapshot] = {
            s.name: s for s in bundle.load_snapshots(self.folder)
        }
        self._current: str | None = bundle.current_snapshot(self.folder)

    # -- identity and state -----------------------------------------------------
    @property
    def name(self) -> str:
        """The machine's name."""
        return self.machine.name

    @property
    def agent(self) -> GuestAgent:
        """The QEMU guest agent in this guest, on backends that give it a channel.

        Raises:
            ConfigError: this backend has no guest agent channel (the qemu
                backend has one with ``Machine(agent=True)``).
        """
        raise ConfigError(
            f"the {self.hypervisor.name} backend gives guest {self.name!r} no guest agent "
            "channel; use the qemu backend with Machine(agent=True)",
            field="agent",
        )

    @property
    def aio(self) -> GuestTwin:
        """This guest's API as coroutines (``await guest.aio.start()``); see virtkit.aio."""
        return AsyncGuest(self)

    @property
    def state(self) -> State:
        """The current run state."""
        return self._lifecycle.state

    @property
    def crash_reason(self) -> str | None:
        """Why the guest is CRASHED (None otherwise)."""
        return self._lifecycle.crash_reason

    def snapshot_dir(self, name: str) -> Path:
        """A folder where a backend may keep a snapshot's saved state."""
        check_name(name)
        return bundle.snapshot_dir(self.folder, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.state.value}>"

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Power the guest on.

        Raises:
            StateError: it is already running or paused.
            ResourceError: running it would exceed the host's allocation policy.
            BackendError: the hypervisor failed to start it.
            ConfigError: a backing file moved outside the allowed places, or a
                ``Disk.size`` is smaller than its image.
        """
        refuse_in_loop("start")
        with self._lifecycle.operation("start"):
            self._refresh()
            self.hypervisor._admit_start(self)
            self.files()  # backing chains still inside the allowed places
            fit_disk_sizes(self.machine, self.folder)
            self._assign_ports()
            self.console.open(hold_input=True)
            self._lifecycle.begin_start()  # what the new run reports until it is RUNNING
            try:
                self._do_start()
            except BaseException:
                self._lifecycle.abort_start()
                self.console.close("the guest failed to start")
                raise
            # a quick guest may have powered off or crashed already (on a loaded host too)
            reached = self._lifecycle.finish_start()
            if reached is State.SHUTOFF:
                self.console.close("the guest powered off")
            elif reached is State.CRASHED:
                self.console.close(f"the guest crashed: {self.crash_reason}")

    def pause(self) -> None:
        """Freeze the guest's CPUs."""
        refuse_in_loop("pause")
        with self._lifecycle.operation("pause"):
            self._do_pause()
            self._lifecycle.notify(State.PAUSED, only_from=frozenset({State.RUNNING}))

    def resume(self) -> None:
        """Continue a paused guest."""
        refuse_in_loop("resume")
        with self._lifecycle.operation("resume"):
            self._do_resume()
            self._lifecycle.notify(State.RUNNING, only_from=frozenset({State.PAUSED}))

    def reset(self) -> None:
        """Press the reset button (the run state is kept)."""
        refuse_in_loop("reset")
        with self._lifecycle.operation("reset"):
            self._do_reset()

    def shutdown(self, timeout: float = 30) -> None:
        """Press the ACPI power button and wait for the guest to power off.

        Raises:
            StateError: the guest is not running.
            TimeoutError: the guest ignored the request for ``timeout`` seconds
                (it keeps running; ``kill()`` stops it hard).
            ConfigError: ``timeout`` is not a number of seconds >= 0 (None: no limit).
        """
        limit = check_timeout(timeout)
        refuse_in_loop("shutdown")
        with self._lifecycle.operation("shutdown"):
            self._do_shutdown(_NO_LIMIT if limit is None else limit)
            self._stopped(State.SHUTOFF, "the guest was shut down")

    def kill(self) -> None:
        """Stop the guest at once, like pulling the plug."""
        refuse_in_loop("kill")
        with self._lifecycle.operation("kill"):
            self._do_kill()
            self._stopped(State.SHUTOFF, "the guest was killed")

    def wait(self, timeout: float | None = None) -> State:
        """Wait until the guest stops by itself (powers off or crashes).

        Returns the final state (``SHUTOFF`` or ``CRASHED``).

        Raises:
            TimeoutError: it still runs after ``timeout`` seconds.
        """
        refuse_in_loop("wait")
        return self._lifecycle.wait_for(
            lambda s: s in (State.SHUTOFF, State.CRASHED), timeout, "power off"
        )

    # -- snapshots ----------------------------------------------------------------
    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        """Snapshots of this guest, oldest first."""
        return tuple(sorted(self._snapshots.values(), key=lambda s: s.created_at))

    @property
    def current_snapshot(self) -> Snapshot | None:
        """The snapshot the guest was last taken at or reverted to."""
        return self._snapshots.get(self._current) if self._current else None

    def snapshot(self, name: str, *, memory: bool = True, description: str = "") -> Snapshot:
        """Capture the guest.

        Args:
            name: unique among this guest's snapshots.
            memory: capture RAM, CPU and device state too (a full snapshot;
                the guest must be running or paused). ``False``: disks only.
            description: free text kept with the snapshot.

        Raises:
            ConfigError: the name is taken or invalid.
            StateError: a full snapshot of a guest that is not running.
        """
        check_name(name)
        check_bool(memory, "memory")
        refuse_in_loop("snapshot")
        with self._lifecycle.operation("snapshot"):
            self._refresh()
            if name in self._snapshots:
                raise ConfigError(
                    f"guest {self.name!r} already has a snapshot named {name!r}",
                    field="name",
                    value=name,
                )
            state = self.state
            if memory and state not in _LIVE:
                raise StateError(
                    f"a full snapshot (memory=True) needs a running or paused guest; "
                    f"{self.name!r} is {state.value} (use memory=False for a disk snapshot)",
                    state=state,
                    action="snapshot",
                )
            snap = Snapshot(
                name=name,
                kind=SnapshotKind.FULL if memory else SnapshotKind.DISK,
                state=state,
                parent=self._current,
                description=description,
            )
            snap = self._do_snapshot(snap) or snap
            self._snapshots[name] = snap
            self._current = name
            self._persist_snapshots()
            return snap

    def revert(self, name: str) -> None:
        """Go back to snapshot ``name``.

        A full snapshot restores disks, memory and devices and the run state
        it was taken in (running or paused). A disk snapshot restores the
        disks and leaves the guest shut off. Console output is not rewound.
        """
        check_name(name)
        refuse_in_loop("revert")
        with self._lifecycle.operation("revert"):
            self._refresh()
            snap = self._get_snapshot(name)
            was_live = self.state in _LIVE
            if snap.kind is SnapshotKind.FULL and not was_live:
                self.hypervisor._admit_start(self)
            self._do_revert(snap)
            if snap.kind is SnapshotKind.FULL and snap.state in _LIVE:
                self.console.open()
                self._lifecycle.set(snap.state)
            else:
                self._stopped(State.SHUTOFF, "the guest was reverted to a disk snapshot")
            self._current = name
            self._persist_snapshots()

    def delete_snapshot(self, name: str) -> None:
        """Delete snapshot ``name``; its children are re-parented to its parent."""
        check_name(name)
        refuse_in_loop("delete_snapshot")
        with self._lifecycle.operation("delete_snapshot"):
            self._refresh()
            snap = self._get_snapshot(name)
            self._do_delete_snapshot(snap)
            self._drop_snapshot_record(snap)
            shutil.rmtree(bundle.snapshot_dir(self.folder, name, create=False), ignore_errors=True)

    def _drop_snapshot_record(self, snap: Snapshot) -> None:
        """Remove ``snap`` from the index (children re-parented) and persist it, once.

        A backend may call it inside ``_do_delete_snapshot`` once it decided the
        deletion goes ahead and before it changes files, so a crash never leaves
        a record of a snapshot whose files were already changed.
        """
        if self._snapshots.get(snap.name) is not snap:
            return
        del self._snapshots[snap.name]
        for child_name, child in list(self._snapshots.items()):
            if child.parent == snap.name:
                self._snapshots[child_name] = attrs.evolve(child, parent=snap.parent)
        if self._current == snap.name:
            self._current = snap.parent
        self._persist_snapshots()

    def _get_snapshot(self, name: str) -> Snapshot:
        try:
            return self._snapshots[name]
        except KeyError:
            known = ", ".join(self._snapshots) or "none"
            raise ConfigError(
                f"guest {self.name!r} has no snapshot named {name!r} (snapshots: {known})",
                field="name",
                value=name,
            ) from None

    def _persist_snapshots(self) -> None:
        bundle.save_snapshots(self.folder, self.snapshots, current=self._current)

    # -- notifications from backend threads ----------------------------------------
    def _stopped(self, state: State, why: str, reason: str | None = None) -> None:
        self._lifecycle.set(state, reason=reason)
        self.console.close(why if reason is None else f"{why}: {reason}")

    def _notify_poweroff(self) -> None:
        """The guest powered itself off."""
        if self._lifecycle.notify(State.SHUTOFF, only_from=frozenset(_LIVE)):
            self.console.close("the guest powered off")

    def _notify_crash(self, reason: str) -> None:
        """The guest or its hypervisor failed."""
        if self._lifecycle.notify(State.CRASHED, reason=reason, only_from=frozenset(_LIVE)):
            self.console.close(f"the guest crashed: {reason}")

    def _notify_paused(self) -> None:
        """The guest was paused by something other than ``pause()``."""
        self._lifecycle.notify(State.PAUSED, only_from=frozenset({State.RUNNING}))

    def _notify_resumed(self) -> None:
        """The guest was resumed by something other than ``resume()``."""
        self._lifecycle.notify(State.RUNNING, only_from=frozenset({State.PAUSED}))

    def _release(self) -> None:
        """Free what the guest object holds (called by undefine/close)."""
        self.console.release()

    # -- hooks a backend implements -------------------------------------------------
    @abc.abstractmethod
    def _do_start(self) -> None:
        """Boot the guest; return once it runs."""

    @abc.abstractmethod
    def _do_pause(self) -> None:
        """Freeze the vCPUs."""

    @abc.abstractmethod
    def _do_resume(self) -> None:
        """Continue the vCPUs."""

    @abc.abstractmethod
    def _do_reset(self) -> None:
        """Hard-reset the machine (keeps running)."""

    @abc.abstractmethod
    def _do_shutdown(self, timeout: float) -> None:
        """Press the ACPI power button; wait for power-off or raise TimeoutError."""

    @abc.abstractmethod
    def _do_kill(self) -> None:
        """Stop at once and release the run-time resources."""

    @abc.abstractmethod
    def _do_snapshot(self, snap: Snapshot) -> Snapshot | None:
        """Capture a disk-only or full snapshot (``snap.kind``).

        May return ``snap`` completed with what the backend recorded (its
        ``layers``); ``None`` keeps ``snap`` as it is.
        """

    @abc.abstractmethod
    def _do_revert(self, snap: Snapshot) -> None:
        """Restore ``snap``; for a disk snapshot also stop the guest if it runs."""

    @abc.abstractmethod
    def _do_delete_snapshot(self, snap: Snapshot) -> None:
        """Free what ``snap`` holds."""

    # -- context manager ------------------------------------------------------------
    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state in (*_LIVE, State.CRASHED):
            self.kill()
        if self.hypervisor._guests.get(self.name) is self:
            self.hypervisor.undefine(self)

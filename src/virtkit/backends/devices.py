"""Media changes and hot-plug: the part of the Guest API that changes its devices.

``change_media``, ``attach`` and ``detach`` work on every backend while the
guest is shut off (they edit the definition in the folder). On a running or
paused guest they call a backend hook; a backend that cannot do it live
raises ``ConfigError`` saying so (and the conformance suite's declared
capabilities ``live_media`` / ``hot_plug`` say the same). Every change is
recorded in the folder's ``machine.toml`` (atomically) once it took effect,
so a restart, another backend or another process sees the same devices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from virtkit import bundle
from virtkit.backends.aio_guest import refuse_in_loop
from virtkit.backends.files import create_disk, held_files
from virtkit.errors import ConfigError, ImageError
from virtkit.images.args import check_path
from virtkit.model import CdRom, Disk, Machine, Nic, Snapshot, State

if TYPE_CHECKING:
    from virtkit.backends.base import Hypervisor
    from virtkit.backends.lifecycle import Lifecycle

__all__ = ["DevicesMixin"]

_LIVE = (State.RUNNING, State.PAUSED)


class DevicesMixin:
    """The device-changing part of :class:`~virtkit.backends.base.Guest`."""

    if TYPE_CHECKING:
        machine: Machine
        folder: Path
        allow: tuple[Path, ...]
        hypervisor: Hypervisor
        _lifecycle: Lifecycle

        @property
        def name(self) -> str: ...

        @property
        def state(self) -> State: ...

        @property
        def snapshots(self) -> tuple[Snapshot, ...]: ...

        def _set_machine(self, machine: Machine) -> None: ...

        def _refresh(self) -> None: ...

    # -- media and hot-plug ----------------------------------------------------------
    def _cdrom_index(self, cdrom: object) -> int:
        targets = [str(c.target) for c in self.machine.cdroms]
        if not isinstance(cdrom, str) or cdrom not in targets:
            raise ConfigError(
                f"guest {self.name!r} has no CD-ROM drive {cdrom!r} "
                f"(drives: {', '.join(targets) or 'none'})",
                field="cdrom",
                value=cdrom,
            )
        return targets.index(cdrom)

    def change_media(self, cdrom: str, path: str | os.PathLike[str] | None) -> None:
        """Insert a medium into CD-ROM drive ``cdrom`` (its target, e.g. ``"cdrom0"``), or eject it.

        On a running or paused guest the change is live (the guest sees the
        tray move); on a stopped one it changes the definition. Either way
        the folder's ``machine.toml`` records it, so a restart or another
        backend sees the same drive.

        Args:
            cdrom: the drive's target name.
            path: the ISO image (relative: the folder's ``disks/``), or
                ``None`` to eject and leave the drive empty.

        Raises:
            ConfigError: no such drive, a bad path, or the backend cannot
                change media of a running guest (see its capabilities).
            ImageError: the ISO file does not exist.
            StateError: the handle is dead.
        """
        refuse_in_loop("change_media")
        index = self._cdrom_index(cdrom)
        name = None if path is None else os.fspath(check_path(path, "path"))
        with self._lifecycle.operation("change_media"):
            self._refresh()
            drive = attrs.evolve(self.machine.cdroms[index], path=name)
            if name is not None:
                medium = bundle.resolve_disk(self.folder, name)
                if not medium.is_file():
                    raise ImageError(
                        f"cannot insert {medium} into {cdrom}: no such file", path=str(medium)
                    )
            cdroms = list(self.machine.cdroms)
            cdroms[index] = drive
            machine = attrs.evolve(self.machine, cdroms=tuple(cdroms))
            if self.state in _LIVE:
                self._do_change_media(drive)
            self._set_machine(machine)

    def attach(self, device: Disk | Nic) -> Disk | Nic:
        """Add a disk or a network card; live (hot-plug) on a running or paused guest.

        The device gets its target or name as ``Machine`` assigns them; a
        disk with a ``size`` whose image does not exist is created. The
        folder records the device at once.

        Returns:
            The device as attached (with its ``target``/``name``).

        Raises:
            ConfigError: not a Disk or Nic, a duplicate file, target, name,
                MAC or host port, or the backend cannot hot-plug it (see its
                capabilities).
            ResourceError: the disk's file is held by another guest.
            StateError: the handle is dead.
        """
        refuse_in_loop("attach")
        if not isinstance(device, (Disk, Nic)):
            raise ConfigError(
                f"attach() needs a Disk or a Nic (got {type(device).__name__} {device!r})",
                field="device",
            )
        with self._lifecycle.operation("attach"):
            self._refresh()
            if isinstance(device, Disk):
                machine = attrs.evolve(self.machine, disks=(*self.machine.disks, device))
                added: Disk | Nic = machine.disks[-1]
            else:
                machine = attrs.evolve(self.machine, nics=(*self.machine.nics, device))
                added = machine.nics[-1]
            hv = self.hypervisor
            with hv._lock:
                hv._check_ports(machine, skip=self)  # type: ignore[arg-type]  # self is a Guest
                files = held_files(machine, self.folder, snapshots=self.snapshots, allow=self.allow)
                hv._check_isolation(machine, files, skip=self)  # type: ignore[arg-type]
            created = create_disk(added, self.folder) if isinstance(added, Disk) else None
            try:
                if self.state in _LIVE:
                    self._do_attach(added)
                self._set_machine(machine)
            except BaseException:
                if created is not None:
                    created.unlink(missing_ok=True)
                raise
            return added

    def detach(self, target: str) -> Disk | Nic:
        """Remove the disk or network card called ``target`` (``"vdb"``, ``"net1"``).

        Live on a running or paused guest: the guest is asked to release the
        device (PCI hot-unplug) and the call waits for it. The disk's files
        stay on disk.

        Returns:
            The device that was removed.

        Raises:
            ConfigError: no such disk or NIC, or the backend cannot hot-unplug.
            TimeoutError: the guest did not release the device in time (it is
                still attached and recorded).
            StateError: the handle is dead.
        """
        refuse_in_loop("detach")
        with self._lifecycle.operation("detach"):
            self._refresh()
            m = self.machine
            disks = [d for d in m.disks if d.target == target]
            nics = [n for n in m.nics if n.name == target]
            if not isinstance(target, str) or not (disks or nics):
                names = [str(d.target) for d in m.disks] + [str(n.name) for n in m.nics]
                raise ConfigError(
                    f"guest {self.name!r} has no disk or NIC {target!r} "
                    f"(devices: {', '.join(names) or 'none'})",
                    field="target",
                    value=target,
                )
            device: Disk | Nic = disks[0] if disks else nics[0]
            if target in m.boot:
                machine = attrs.evolve(m, boot=tuple(b for b in m.boot if b != target))
            else:
                machine = m
            if disks:
                machine = attrs.evolve(machine, disks=tuple(d for d in m.disks if d is not device))
            else:
                machine = attrs.evolve(machine, nics=tuple(n for n in m.nics if n is not device))
            if self.state in _LIVE:
                self._do_detach(device)
            self._set_machine(machine)
            return device

    def _do_change_media(self, drive: CdRom) -> None:
        """Insert ``drive.path`` (None: eject) into the running guest's drive."""
        raise ConfigError(
            f"the {self.hypervisor.name} backend cannot change media of a running guest; "
            "stop it first (the definition can be changed while it is shut off)",
            field="cdrom",
        )

    def _do_attach(self, device: Disk | Nic) -> None:
        """Hot-plug ``device`` (its target or name assigned) into the running guest."""
        raise ConfigError(
            f"the {self.hypervisor.name} backend cannot hot-plug devices; stop the guest "
            "first (the definition can be changed while it is shut off)",
            field="device",
        )

    def _do_detach(self, device: Disk | Nic) -> None:
        """Hot-unplug ``device`` from the running guest; wait until the guest released it."""
        raise ConfigError(
            f"the {self.hypervisor.name} backend cannot hot-unplug devices; stop the guest "
            "first (the definition can be changed while it is shut off)",
            field="target",
        )

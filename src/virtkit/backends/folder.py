"""A guest's view of its VM folder: which file each disk uses now, what it holds, persisting.

The folder is the truth (see :mod:`virtkit.bundle`): a guest handle caches the
``Machine`` it was defined with, re-reads the folder before acting while it is
stopped (another process may have changed it: a clone froze its top layer, a
user edited ``machine.toml``), and writes every change of layers, media or
devices back through :func:`virtkit.bundle.write_machine` before adopting it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from virtkit import bundle, images
from virtkit.backends.files import HeldFile, held_files
from virtkit.bundle.paths import explicit_roots
from virtkit.errors import ConfigError
from virtkit.model import CdRom, Disk, Machine, Snapshot, State

if TYPE_CHECKING:
    from virtkit.backends.lifecycle import Lifecycle

__all__ = ["FolderMixin"]

_LIVE = (State.RUNNING, State.PAUSED)


def _stamp(folder: Path) -> tuple[tuple[int, ...], ...] | None:
    """What identifies the folder files a load reads (machine.toml, links.toml) as they are
    now; None without a machine.toml. Atomic rewrites change the inode, edits in place
    the size or times."""
    out: list[tuple[int, ...]] = []
    for name in (bundle.CONFIG_NAME, bundle.LINKS_NAME):
        try:
            st = os.stat(folder / name)
        except OSError:
            if name == bundle.CONFIG_NAME:
                return None
            out.append(())
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class FolderMixin:
    """The folder part of :class:`~virtkit.backends.base.Guest`."""

    if TYPE_CHECKING:
        machine: Machine
        folder: Path
        allow: tuple[Path, ...]
        _lifecycle: Lifecycle
        _folder_stamp: tuple[tuple[int, ...], ...] | None

        @property
        def name(self) -> str: ...

        @property
        def state(self) -> State: ...

        @property
        def snapshots(self) -> tuple[Snapshot, ...]: ...

    def _attached(self, disk: Disk | CdRom) -> Disk | CdRom:
        """The guest's own attachment with ``disk``'s target (its layers may have moved on)."""
        devices: tuple[Disk | CdRom, ...] = (*self.machine.disks, *self.machine.cdroms)
        for dev in devices:
            if type(dev) is type(disk) and dev.target == disk.target:
                return dev
        return disk

    def disk_path(self, disk: Disk | CdRom) -> Path:
        """Absolute path of the file an attachment reads and writes now.

        For a disk that is its active (top) layer, whose backing chain leads
        to :meth:`base_disk_path`; ``virtkit.images.open()`` on it sees the
        guest's current disk. Relative paths live in the folder's ``disks/``.

        Raises:
            ConfigError: not a Disk or CdRom, or a CD-ROM drive that is empty.
        """
        if not isinstance(disk, (Disk, CdRom)):
            raise ConfigError(
                f"disk_path() needs a Disk or CdRom (got {type(disk).__name__} {disk!r})",
                field="disk",
            )
        current = self._attached(disk)
        if isinstance(current, CdRom):
            if current.path is None:
                raise ConfigError(
                    f"CD-ROM drive {current.target} of {self.name!r} is empty", field="disk"
                )
            return bundle.resolve_disk(self.folder, current.path)
        return bundle.resolve_disk(self.folder, current.active)

    def base_disk_path(self, disk: Disk) -> Path:
        """Absolute path of the file ``Disk.path`` names: the bottom of the disk's chain."""
        if not isinstance(disk, Disk):
            raise ConfigError(
                f"base_disk_path() needs a Disk (got {type(disk).__name__} {disk!r})",
                field="disk",
            )
        return bundle.resolve_disk(self.folder, disk.path)

    def backing_roots(self) -> tuple[Path, ...]:
        """Where this guest's backing chains may lead: its folder, the directories of
        the machine's absolute disk paths, and the roots allowed at ``define()``."""
        explicit = [
            Path(os.path.dirname(d.path)) for d in self.machine.disks if os.path.isabs(d.path)
        ]
        return (self.folder, *explicit, *self.allow)

    def open_disk(self, disk: Disk | int = 0, *, writable: bool = False) -> images.Image:
        """Open a disk's active layer with :func:`virtkit.images.open`, backing chain allowed.

        Args:
            disk: a Disk of this machine or its index in ``machine.disks``.
            writable: open for writing (refused while a backend runs the guest:
                the image lock is held).

        Raises:
            ConfigError: no such disk.
            ImageError: the image cannot be opened (locked, corrupt...).
            StateError: the handle is dead (undefined, or its hypervisor closed): the
                folder may belong to another guest now.
        """
        self._lifecycle.check_alive("open a disk of")
        if isinstance(disk, int) and not isinstance(disk, bool):
            if not 0 <= disk < len(self.machine.disks):
                raise ConfigError(
                    f"guest {self.name!r} has {len(self.machine.disks)} disks (got index {disk})",
                    field="disk",
                    value=disk,
                )
            disk = self.machine.disks[disk]
        if not isinstance(disk, Disk):
            raise ConfigError(f"open_disk() needs a Disk or an index (got {disk!r})", field="disk")
        current = self._attached(disk)
        assert isinstance(current, Disk)
        fmt = "qcow2" if current.layers else current.format
        return images.open(
            self.disk_path(current),
            writable=writable,
            format=fmt,  # type: ignore[arg-type]  # "qcow2" | "raw", checked by the model
            allow_backing=self.backing_roots(),
        )

    def files(self, *, chains: bool = True) -> tuple[HeldFile, ...]:
        """Every file this guest holds, with whether it writes it.

        All layers of every disk (and, with ``chains``, the backing files
        below them, checked against the allowed places), the snapshots'
        frozen layers, CD-ROM media, the UEFI variables file, the cloud-init
        seed and the kernel. This drives isolation between guests.

        Raises:
            ConfigError: (``chains``) a backing file lies outside the allowed places.
        """
        return held_files(
            self.machine, self.folder, snapshots=self.snapshots, allow=self.allow, chains=chains
        )

    def _refresh(self) -> None:
        """Adopt the folder's definition if it changed behind this handle (the folder is the
        truth: a clone may have put a new layer on the source, a user edited machine.toml).

        Only while the guest is stopped; a running guest's files are locked by its backend.
        """
        if self.state in _LIVE:
            return
        seen = _stamp(self.folder)
        if seen is None or seen == getattr(self, "_folder_stamp", None):
            return  # no machine.toml, or the files are as this handle last read or wrote them
        allow = [*self.allow, *explicit_roots(self.machine)]
        fresh = bundle.load(self.folder, allow=allow)
        if fresh != self.machine and fresh.name == self.machine.name:
            self.machine = fresh
        self._folder_stamp = _stamp(self.folder)  # load may have written identity back

    def _set_machine(self, machine: Machine) -> None:
        """Persist a changed definition to the folder (atomically), then adopt it.

        Backends call this after every change of layers, media or devices, so
        a restart, another backend or another process sees the same machine.
        """
        bundle.write_machine(self.folder, machine, allow=self.allow)
        self.machine = machine
        self._folder_stamp = _stamp(self.folder)

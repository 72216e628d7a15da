"""Disk layers of a qemu guest: external (overlay) snapshots kept in the VM folder.

A disk starts as one file, ``Disk.path``. A disk-only snapshot freezes each
writable disk's *active layer* and puts a new qcow2 overlay on top of it; the
frozen file is what the snapshot captured. Reverting puts a fresh overlay on
top of the snapshot's frozen layer (the frozen file itself is never written,
so one can revert to it again); deleting merges the frozen layer into the
layers that use it as their backing file and removes it (the disk's own file,
``Disk.path``, is never removed).

Where this state lives: in the folder's own format, not in a backend file.

* ``Disk.layers`` (``machine.toml``): the overlays above ``Disk.path``,
  bottom to top; the last is the active layer every backend and
  ``virtkit.images.open()`` reads;
* ``Snapshot.layers`` (``snapshots/_index.toml``): disk target -> the file a
  disk snapshot froze, or the layer holding a full snapshot.

Names are relative to the folder's ``disks/`` (absolute only for a base file
that lives outside the folder), new overlays are created in ``disks/`` and
store their backing file by a relative name when it is inside the folder, so
a copied folder is a separate machine.

Crash safety: every change creates its new files first, then persists the
folder (one atomic ``machine.toml`` replace: the commit point), then removes
files no longer used. A kill before the commit leaves the old machine (plus an
unused overlay file), after it the new one (plus, at worst, a stale file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from virtkit import bundle
from virtkit.backends.files import inside
from virtkit.backends.qemu.argv import CACHE_MODES, node_name
from virtkit.backends.qemu.qmp import run_sync
from virtkit.errors import BackendError, StateError
from virtkit.model import Disk, Snapshot, SnapshotKind

if TYPE_CHECKING:
    from virtkit.backends.qemu.guest import QemuGuest

__all__ = ["Layers", "qemu_img"]

_JOB_TIMEOUT = 300.0
_MAX_CHAIN = 64
_OVERLAY = re.compile(r"\.s(\d+)\.qcow2$")


def qemu_img(binary: str, *args: str) -> str:
    """Run ``qemu-img`` and return stdout.

    Raises:
        BackendError: it failed (its stderr is included).
    """
    try:
        proc = subprocess.run(
            [binary, *args], capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as exc:
        raise BackendError(f"{binary} is not installed (apt-get install qemu-utils)") from exc
    if proc.returncode != 0:
        raise BackendError(
            f"qemu-img {args[0]} failed",
            exit_code=proc.returncode,
            argv=[binary, *args],
            stderr_tail=proc.stderr[-2000:],
        )
    return proc.stdout


class Layers:
    """The layer operations of one :class:`~virtkit.backends.qemu.guest.QemuGuest`.

    Reads the chain from ``guest.machine`` and the snapshot records, changes
    files with ``qemu-img`` (offline) or QMP block jobs (live), and persists
    every change through ``guest._set_machine`` / the snapshot index.
    """

    def __init__(self, guest: QemuGuest) -> None:
        self.guest = guest

    # -- names and files -----------------------------------------------------------------
    @property
    def disks_dir(self) -> Path:
        """The folder's ``disks/``, where new overlays are created."""
        return self.guest.folder / bundle.DISKS

    def name(self, path: Path) -> str:
        """How the folder records ``path``: relative to ``disks/`` inside it, else absolute."""
        if inside(path, self.guest.folder):
            return os.path.relpath(os.path.abspath(path), os.path.abspath(self.disks_dir))
        return os.path.abspath(path)

    def path(self, name: str) -> Path:
        """Absolute path of a recorded layer name."""
        return bundle.resolve_disk(self.guest.folder, name)

    def same(self, a: Path, b: Path) -> bool:
        """Whether two paths name one file."""
        return os.path.realpath(a) == os.path.realpath(b)

    def fmt(self, disk: Disk, path: Path) -> str:
        """The format of a layer: the disk's own for its base file, qcow2 for overlays."""
        return disk.format if self.same(path, self.guest.base_disk_path(disk)) else "qcow2"

    def new_overlay(self, disk: Disk) -> Path:
        """A fresh overlay file name in ``disks/``, derived from the disk's base name."""
        stem = re.sub(r"\.s\d+$", "", Path(disk.path).stem) or "disk"
        self.disks_dir.mkdir(parents=True, exist_ok=True)
        used = [
            int(m.group(1))
            for p in self.disks_dir.iterdir()
            if (m := _OVERLAY.search(p.name)) is not None
        ]
        number = max(used, default=0) + 1
        return self.disks_dir / f"{stem}.s{number}.qcow2"

    def backing_of(self, path: Path) -> Path | None:
        """The backing file ``path`` names (resolved), or None."""
        info = json.loads(
            qemu_img(self.guest.hypervisor.qemu_img, "info", "-U", "--output=json", str(path))
        )
        full = info.get("full-backing-filename") or info.get("backing-filename")
        if not full:
            return None
        return Path(full) if os.path.isabs(full) else path.parent / full

    def virtual_size(self, path: Path) -> int:
        """The virtual size of an image."""
        info = json.loads(
            qemu_img(self.guest.hypervisor.qemu_img, "info", "-U", "--output=json", str(path))
        )
        return int(info["virtual-size"])

    def backing_name(self, below: Path, overlay: Path) -> str:
        """The backing name an overlay stores: relative inside the folder, else absolute."""
        if inside(below, self.guest.folder):
            return os.path.relpath(os.path.abspath(below), os.path.abspath(overlay.parent))
        return os.path.abspath(below)

    def create_overlay(self, below: Path, fmt: str, overlay: Path) -> None:
        """Create ``overlay`` (qcow2) over ``below``, fsynced before it gets its name."""
        tmp = overlay.with_name(f".{overlay.name}.creating")
        tmp.unlink(missing_ok=True)
        try:
            qemu_img(
                self.guest.hypervisor.qemu_img, "create", "-q", "-f", "qcow2", "-F", fmt,
                "-b", self.backing_name(below, overlay), "-u", str(tmp),
                str(self.virtual_size(below)),
            )  # fmt: skip
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, overlay)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def chain_names(self, disk: Disk, top: Path) -> tuple[str, ...]:
        """``Disk.layers`` for a chain whose active layer is ``top`` (bottom to top).

        Follows backing files from ``top`` down to the disk's base file.

        Raises:
            BackendError: ``top`` does not lead down to the disk's base file.
        """
        base = self.guest.base_disk_path(disk)
        names: list[str] = []
        path: Path | None = top
        while path is not None and len(names) <= _MAX_CHAIN:
            if self.same(path, base):
                return tuple(reversed(names))
            names.append(self.name(path))
            path = self.backing_of(path)
        raise BackendError(f"layer {top} does not lead down to disk {disk.target}'s file {base}")

    def tracked(self) -> set[Path]:
        """Every layer file the folder records: disk chains and snapshot layers."""
        files = {self.path(n) for d in self.guest.machine.disks for n in d.layers}
        for snap in self.guest.snapshots:
            files.update(self.path(n) for n in snap.layers.values())
        return files

    def children_of(self, layer: Path) -> list[Path]:
        """Recorded layers whose backing file is ``layer``."""
        want = os.path.realpath(layer)
        found = []
        for path in sorted(self.tracked()):
            if self.same(path, layer) or not path.is_file():
                continue
            backing = self.backing_of(path)
            if backing is not None and os.path.realpath(backing) == want:
                found.append(path)
        return found

    def _writable(self) -> list[tuple[int, Disk]]:
        return [(i, d) for i, d in enumerate(self.guest.machine.disks) if not d.read_only]

    def _with_layers(self, changes: dict[int, tuple[str, ...]]) -> None:
        """Persist new ``Disk.layers`` for the disks at the given indexes (the commit point)."""
        if not changes:
            return
        machine = self.guest.machine
        disks = tuple(
            attrs.evolve(d, layers=changes[i]) if i in changes else d
            for i, d in enumerate(machine.disks)
        )
        self.guest._set_machine(attrs.evolve(machine, disks=disks))

    def _set_snapshot(self, snap: Snapshot) -> None:
        self.guest._snapshots[snap.name] = snap

    # -- disk-only snapshots ------------------------------------------------------------------
    def snapshot(self, snap: Snapshot) -> Snapshot:
        """Freeze every writable disk under a new overlay; returns ``snap`` with its layers."""
        guest = self.guest
        live = guest._live()
        frozen: dict[str, str] = {}
        changes: dict[int, tuple[str, ...]] = {}
        pending: list[Path] = []
        try:
            for i, disk in self._writable():
                target = str(disk.target)
                below = guest.disk_path(disk)
                overlay = self.new_overlay(disk)
                self.create_overlay(below, self.fmt(disk, below), overlay)
                pending.append(overlay)
                if live:
                    self._switch_live(disk, overlay)
                pending.remove(overlay)
                frozen[target] = self.name(below)
                changes[i] = (*disk.layers, self.name(overlay))
        finally:
            # disks already switched (live) write their overlays now: record them even if a
            # later disk failed, so the folder never lies; unused new files go away
            for path in pending:
                path.unlink(missing_ok=True)
            self._with_layers(changes)
        return attrs.evolve(snap, layers=frozen)

    def _switch_live(self, disk: Disk, overlay: Path) -> None:
        guest = self.guest
        target = str(disk.target)
        node = f"{node_name(target)}-s{guest._next_id()}"
        direct, no_flush, _ = CACHE_MODES[disk.cache]
        cache = {"direct": direct, "no-flush": no_flush}
        guest._qmp_sync(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": node,
                "cache": cache,
                "discard": disk.discard,
                "file": {"driver": "file", "filename": str(overlay), "cache": cache},
                "backing": None,
            },
        )
        try:
            guest._qmp_sync("blockdev-snapshot", {"node": guest._nodes[target], "overlay": node})
        except BaseException:
            with contextlib.suppress(BackendError, StateError):
                guest._qmp_sync("blockdev-del", {"node-name": node})
            raise
        guest._nodes[target] = node

    def revert(self, snap: Snapshot) -> None:
        """A fresh overlay on each frozen layer of ``snap`` (QEMU is stopped first)."""
        guest = self.guest
        if guest._proc is not None:
            guest._terminate()
        keep = {os.path.realpath(self.path(n)) for s in guest.snapshots for n in s.layers.values()}
        keep |= self._read_by_clones()
        changes: dict[int, tuple[str, ...]] = {}
        discard: list[Path] = []
        created: list[Path] = []
        try:
            for i, disk in self._writable():
                frozen = snap.layers.get(str(disk.target))
                if frozen is None:
                    continue
                below = self.path(frozen)
                overlay = self.new_overlay(disk)
                self.create_overlay(below, self.fmt(disk, below), overlay)
                created.append(overlay)
                below_chain = self.chain_names(disk, below)
                changes[i] = (*below_chain, self.name(overlay))
                new_files = {os.path.realpath(self.path(n)) for n in changes[i]}
                for name in disk.layers:  # the discarded state after the snapshot
                    path = self.path(name)
                    real = os.path.realpath(path)
                    if real not in keep and real not in new_files:
                        discard.append(path)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise
        self._with_layers(changes)
        for path in discard:
            path.unlink(missing_ok=True)

    def _read_by_clones(self) -> set[str]:
        """Real paths of this folder's files that linked clones read."""
        folder = self.guest.folder
        return {
            os.path.realpath(folder / name)
            for _, files in bundle.dependents(folder)
            for name in files
        }

    def removed_by_delete(self, snap: Snapshot) -> dict[str, Path]:
        """disk target -> the layer file deleting disk snapshot ``snap`` would remove."""
        removed: dict[str, Path] = {}
        for target, layer in snap.layers.items():
            disk = next((d for d in self.guest.machine.disks if str(d.target) == target), None)
            if disk is None:
                continue
            path = self.path(layer)
            children = self.children_of(path)
            if self.same(path, self.guest.base_disk_path(disk)):
                if len(children) == 1:
                    removed[target] = children[0]
            else:
                removed[target] = path
        return removed

    def delete(self, snap: Snapshot) -> None:
        """Merge away what disk snapshot ``snap`` froze (never the disk's own file)."""
        guest = self.guest
        live = guest._live()
        for target, doomed in self.removed_by_delete(snap).items():
            for other in guest.snapshots:
                held = other.layers.get(target)
                if (
                    other.kind is SnapshotKind.FULL
                    and held is not None
                    and self.same(self.path(held), doomed)
                ):
                    raise StateError(
                        f"cannot delete disk snapshot {snap.name!r}: it would merge away "
                        f"{doomed.name}, which holds full snapshot {other.name!r}; delete "
                        f"{other.name!r} first",
                        action="delete_snapshot",
                    )
        for _, disk in self._writable():  # first refuse, then change: all or nothing
            layer = snap.layers.get(str(disk.target))
            if layer is None:
                continue
            path = self.path(layer)
            children = self.children_of(path)
            if not self.same(path, guest.base_disk_path(disk)) or len(children) == 1:
                bundle.check_unshared(
                    guest.folder, [path, *children], action=f"delete disk snapshot {snap.name!r}"
                )
        # the record goes first: from here on the frozen files change (crash: it is deleted)
        guest._drop_snapshot_record(snap)
        for i, disk in self._writable():
            layer = snap.layers.get(str(disk.target))
            if layer is None:
                continue
            path = self.path(layer)
            children = self.children_of(path)
            base = guest.base_disk_path(disk)
            if self.same(path, base):
                # the machine's own file stays the bottom of every chain: merge the one
                # layer above back into it; with several (branches after a revert) the
                # file stays as it is and only the record goes
                if len(children) == 1:
                    self._commit_into(i, disk, children[0], path, live=live, deleting=snap.name)
                continue
            below = self.backing_of(path)
            chain = self.running_chain(disk) if live else []
            for child in children:
                if any(self.same(child, c) for c in chain):
                    self._stream_live(child, below)
                else:
                    args = ["rebase", "-q", "-f", "qcow2"]
                    if below is not None:
                        args += ["-F", self.fmt(disk, below), "-b", self.backing_name(below, child)]
                    else:
                        args += ["-b", ""]
                    qemu_img(guest.hypervisor.qemu_img, *args, str(child))
            if not self.same(path, base):
                now = guest.machine.disks[i]
                kept = tuple(n for n in now.layers if not self.same(self.path(n), path))
                self._with_layers({i: kept})
                path.unlink(missing_ok=True)

    def _commit_into(
        self, index: int, disk: Disk, top: Path, base: Path, *, live: bool, deleting: str
    ) -> None:
        """Merge layer ``top`` into its backing file ``base`` and drop ``top`` from the chain.

        Live: QEMU's ``block-commit`` (an active commit pivots the disk onto
        ``base`` with ``job-complete``); offline: ``qemu-img commit``.
        Records that named ``top`` (the chain, another snapshot's layer) then
        name ``base``.
        """
        guest = self.guest
        target = str(disk.target)
        is_active = self.same(top, guest.disk_path(disk))
        fmt = self.fmt(disk, base)
        if live and any(self.same(top, c) for c in self.running_chain(disk)):
            proc = guest._proc
            assert proc is not None
            top_node, base_node = self.node_of(top), self.node_of(base)
            if top_node is None or base_node is None:
                raise BackendError(f"cannot find the QEMU block nodes for {top} and {base}")
            job_id = f"vk-commit-{guest._next_id()}"
            args: dict[str, Any] = {
                "job-id": job_id,
                "device": guest._nodes[target],
                "base-node": base_node,
            }
            if not is_active:
                args["top-node"] = top_node
                args["backing-file"] = self.backing_name(base, top)

            async def complete() -> None:
                await proc.qmp.execute("job-complete", {"id": job_id})

            run_sync(
                proc.qmp.run_job("block-commit", args, timeout=_JOB_TIMEOUT, on_ready=complete)
            )
            if is_active:
                guest._nodes[target] = base_node
            if top_node.startswith(node_name(target)):  # added by us: monitor-owned
                with contextlib.suppress(BackendError, StateError):
                    guest._qmp_sync("blockdev-del", {"node-name": top_node})
        else:
            qemu_img(guest.hypervisor.qemu_img, "commit", "-q", "-d", "-f", "qcow2", str(top))
        for grandchild in self.children_of(top):  # same contents through base now
            qemu_img(
                guest.hypervisor.qemu_img, "rebase", "-q", "-u", "-f", "qcow2", "-F", fmt,
                "-b", self.backing_name(base, grandchild), str(grandchild),
            )  # fmt: skip
        for other in guest.snapshots:
            held = other.layers.get(target)
            if other.name != deleting and held is not None and self.same(self.path(held), top):
                self._set_snapshot(
                    attrs.evolve(other, layers={**other.layers, target: self.name(base)})
                )
        disk = guest.machine.disks[index]
        self._with_layers(
            {index: tuple(n for n in disk.layers if not self.same(self.path(n), top))}
        )
        guest._persist_snapshots()
        top.unlink(missing_ok=True)

    # -- the running QEMU's view ---------------------------------------------------------------
    def running_chain(self, disk: Disk) -> list[Path]:
        """The files of the disk's chain, active layer first (from the image headers)."""
        chain: list[Path] = []
        path: Path | None = self.guest.disk_path(disk)
        while path is not None and len(chain) < _MAX_CHAIN:
            chain.append(path)
            path = self.backing_of(path)
        return chain

    def node_of(self, path: Path) -> str | None:
        """The QEMU format node that opened ``path``, if any."""
        nodes = self.guest._qmp_sync("query-named-block-nodes", {"flat": True})
        want = os.path.realpath(path)
        for node in nodes:
            name = plain_filename(str(node.get("file", "")))
            if node.get("drv") != "file" and name and os.path.realpath(name) == want:
                return str(node["node-name"])
        return None

    def _stream_live(self, child: Path, below: Path | None) -> None:
        guest = self.guest
        node = self.node_of(child)
        if node is None:
            raise BackendError(f"cannot find the QEMU block node for {child}")
        args: dict[str, Any] = {"job-id": f"vk-stream-{guest._next_id()}", "device": node}
        if below is not None:
            base_node = self.node_of(below)
            if base_node is None:
                raise BackendError(f"cannot find the QEMU block node for {below}")
            args["base-node"] = base_node
            args["backing-file"] = self.backing_name(below, child)
        proc = guest._proc
        assert proc is not None
        run_sync(proc.qmp.run_job("block-stream", args, timeout=_JOB_TIMEOUT))


def plain_filename(name: str) -> str | None:
    """A node's file name; QEMU reports ``json:{...}`` for nodes opened with options."""
    if not name.startswith("json:"):
        return name
    try:
        doc = json.loads(name[5:])
    except ValueError:
        return None
    inner = doc.get("file", doc)
    found = inner.get("filename") if isinstance(inner, dict) else None
    return str(found) if found else None

"""``virtkit.clone``: a new VM folder from an existing one, linked or fully copied.

A clone is a new machine: new folder, new UUID, new MACs, and every port
forward with a fixed host port turned into ``host_port=0`` (a free port is
picked at start), so a clone can run beside its source.

**Linked** (the default): each writable disk of the clone is a small qcow2
overlay whose backing file is the source's current active layer, named by a
relative path. That file must never change again, so the clone also puts a
fresh overlay on top of the source's disk (the source's ``Disk.layers`` grows
by one): the source keeps running and writing on its new top layer, every
clone writes its own overlay, and the shared file is frozen for everyone, as
libvirt and VirtualBox linked clones do. Both folders record the link in
``links.toml``: the clone defines and starts without ``allow=``, and the
source refuses to delete or merge a layer a clone reads
(:func:`virtkit.bundle.check_unshared`). Read-only disks and CD-ROM images are
referenced, not copied.

**Full** (``linked=False``): every disk's chain is flattened into a new image
by the image engine (sparse: zero ranges are not written), CD-ROM images are
copied; the clone shares nothing with its source.

Crash safety: the clone is built in a hidden sibling folder and renamed into
place in one step; the source's files change (a new overlay, ``links.toml``,
``machine.toml``) only through atomic, fsynced replacements, ordered so that a
crash at any point leaves each folder in its old or its new state. A crash
can at worst leave an unreferenced overlay file in the source's ``disks/``.
"""

from __future__ import annotations

import os
import shutil
import uuid as _uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from virtkit import bundle, images
from virtkit.bundle.atomic import folder_lock, fsync_dir
from virtkit.bundle.links import Link, Links, live, read_links, relative_folder, write_links
from virtkit.bundle.paths import check_allow
from virtkit.errors import ConfigError, ImageLockedError, StateError
from virtkit.images.args import check_bool, check_callable, check_path
from virtkit.model import CdRom, Disk, KernelBoot, Machine, Nic
from virtkit.model.devices import generate_mac

__all__ = ["clone"]

#: Files of a VM folder (besides disks) a clone copies when present.
_COPIED_FILES = ("OVMF_VARS.fd",)
_COPY_CHUNK = 1024 * 1024
_LOCK_WAIT = 30.0  # seconds a clone waits for another clone of the same source

Progress = Callable[[int, int], object]


def _abs(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(path))


def _check_folders(src: Path, dst: Path) -> None:
    if not (src / bundle.CONFIG_NAME).is_file():
        raise ConfigError(
            f"'src_folder' {src} is not a VM folder (no {bundle.CONFIG_NAME})", field="src_folder"
        )
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    for a, b in ((real_src, real_dst), (real_dst, real_src)):
        if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
            raise ConfigError(
                f"'dst_folder' {dst} and 'src_folder' {src} must not contain each other",
                field="dst_folder",
            )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(
            f"'dst_folder' {dst} already exists and is not an empty folder", field="dst_folder"
        )
    if not dst.parent.is_dir():
        raise ConfigError(f"'dst_folder': {dst.parent} does not exist", field="dst_folder")


def _clone_name(name: str | None, dst: Path) -> str:
    if name is not None:
        return name
    candidate = dst.name
    try:
        Machine(name=candidate)
    except ConfigError:
        raise ConfigError(
            f"the clone needs a name: the folder name {candidate!r} is not a DNS label; "
            "pass name=...",
            field="name",
            value=candidate,
        ) from None
    return candidate


def _not_running(src: Path, machine: Machine, roots: list[str]) -> None:
    """Refuse a source that a running guest holds (its active layers are write-locked)."""
    for i, disk in enumerate(machine.disks):
        if disk.read_only:
            continue
        path = bundle.resolve_disk(src, disk.active)
        fmt = "qcow2" if disk.layers else disk.format
        try:
            with images.open(path, format=fmt, allow_backing=roots):  # type: ignore[arg-type]
                pass
        except ImageLockedError as exc:
            raise StateError(
                f"cannot clone {src}: disks[{i}] ({disk.target}) is in use by a running "
                "guest; shut it down first",
                action="clone",
            ) from exc


def _roots(src: Path, allow: list[str]) -> list[str]:
    """Where the source's files and backing chains may be: its folder, its bases, ``allow``."""
    return [str(src), *map(str, bundle.allowed_roots(src)), *allow]


def _file_name(disk: Disk, suffix: str | None, used: set[str]) -> str:
    """The clone's file for a disk: the source's relative name (new suffix), made unique."""
    rel = disk.path
    if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
        rel = os.path.basename(rel)
    base = Path(rel)
    if suffix is not None and base.suffix != suffix:
        base = base.with_suffix(suffix)
    name, n = str(base), 1
    while os.path.normpath(name) in used:
        n += 1
        name = str(base.with_name(f"{base.stem}-{n}{base.suffix}"))
    used.add(os.path.normpath(name))
    return name


def _new_identity(machine: Machine, name: str) -> Machine:
    nics: list[Nic] = []
    for nic in machine.nics:
        forwards = [attrs.evolve(f, host_port=0) if f.host_port else f for f in nic.forwards]
        nics.append(attrs.evolve(nic, mac=generate_mac(), forwards=forwards))
    macs = {n.mac for n in nics}
    while len(macs) != len(nics):  # 1 in 16 million per pair: draw again
        nics = [attrs.evolve(n, mac=generate_mac()) for n in nics]
        macs = {n.mac for n in nics}
    return attrs.evolve(machine, name=name, uuid=_uuid.uuid4(), nics=nics)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a file and fsync it (kernel, NVRAM, CD-ROM images)."""
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            while chunk := fin.read(_COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    shutil.copymode(src, dst)


def _copy_kernel(src: Path, dst: Path, stage: Path, kernel: KernelBoot | None) -> KernelBoot | None:
    """Copy a kernel/initrd that lives inside the source folder (its path stays the same).

    One outside the folder is referenced: an absolute path as it is, a
    relative one re-based on the clone's folder.
    """
    if kernel is None:
        return None
    paths: list[Path | None] = []
    for path in (kernel.kernel, kernel.initrd):
        if path is None or path.is_absolute():
            paths.append(path)
        elif os.path.normpath(path).startswith(".."):
            paths.append(Path(os.path.relpath(_abs(src / path), dst)))
        else:
            target = stage / path
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(bundle.resolve_file(src, path), target)
            paths.append(path)
    return attrs.evolve(kernel, kernel=paths[0], initrd=paths[1])


class _Plan:
    """What a clone creates: its machine, and the source's changes for a linked clone."""

    def __init__(
        self, src: Path, dst: Path, machine: Machine, progress: Progress | None, roots: list[str]
    ) -> None:
        self.src, self.dst = src, dst
        self.roots = roots
        self.machine = machine
        self.progress = progress
        self.disks: list[Disk] = []
        self.cdroms: list[CdRom] = []
        self.used: set[str] = set()
        # source side of a linked clone: (disk index, overlay name relative to disks/)
        self.source_layers: dict[int, str] = {}
        self.shared: list[str] = []  # source files the clone reads, relative to the source
        self.sizes = [self._size(d) for d in machine.disks]
        self.done = 0

    def _size(self, disk: Disk) -> int:
        path = bundle.resolve_disk(self.src, disk.active)
        fmt = "qcow2" if disk.layers else disk.format
        with images.open(path, format=fmt, force_share=True, allow_backing=self.roots) as img:  # type: ignore[arg-type]
            return img.virtual_size

    def _advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, sum(self.sizes))

    def _reference(self, path: str) -> str:
        """A source file named relative to the clone's disks/ folder."""
        origin = bundle.resolve_disk(self.src, path)
        return os.path.relpath(origin, _abs(self.dst / bundle.DISKS))

    def _share(self, disk: Disk) -> None:
        for f in disk.files():
            origin = bundle.resolve_disk(self.src, f)
            self.shared.append(os.path.relpath(origin, _abs(self.src)))

    def _source_overlay(self, index: int, disk: Disk) -> str:
        folder = os.path.dirname(disk.path) if not os.path.isabs(disk.path) else ""
        stem = Path(disk.path).stem
        taken = {os.path.normpath(f) for d in self.machine.disks for f in d.files()}
        n = 1
        while True:
            name = os.path.join(folder, f"{stem}.c{n}.qcow2")
            if (
                os.path.normpath(name) not in taken
                and not bundle.resolve_disk(self.src, name).exists()
            ):
                self.source_layers[index] = name
                return name
            n += 1

    def linked(self, stage: Path) -> None:
        for i, disk in enumerate(self.machine.disks):
            active = bundle.resolve_disk(self.src, disk.active)
            fmt = "qcow2" if disk.layers else disk.format
            self._share(disk)
            if disk.read_only:
                self.disks.append(
                    attrs.evolve(
                        disk,
                        path=self._reference(disk.active),
                        format=fmt,
                        layers=(),
                        backing=None,
                        backing_format=None,
                    )
                )
                self._advance(self.sizes[i])
                continue
            name = _file_name(disk, ".qcow2", self.used)
            target = stage / bundle.DISKS / name
            target.parent.mkdir(parents=True, exist_ok=True)
            backing = os.path.relpath(active, _abs(self.dst / bundle.DISKS / name).parent)
            img = images.create(
                target,
                self.sizes[i],
                "qcow2",
                backing=backing,
                backing_format=fmt,  # type: ignore[arg-type]
                allow_backing=tuple(self.roots),
            )
            img.close()
            self.disks.append(
                attrs.evolve(
                    disk, path=name, format="qcow2", layers=(), backing=None, backing_format=None
                )
            )
            self._source_overlay(i, disk)
            self._advance(self.sizes[i])
        for cd in self.machine.cdroms:
            if cd.path is None or os.path.isabs(cd.path):
                self.cdroms.append(cd)
            else:
                self.cdroms.append(attrs.evolve(cd, path=self._reference(cd.path)))
                self.shared.append(
                    os.path.relpath(bundle.resolve_disk(self.src, cd.path), _abs(self.src))
                )

    def full(self, stage: Path) -> None:
        for i, disk in enumerate(self.machine.disks):
            active = bundle.resolve_disk(self.src, disk.active)
            fmt = "qcow2" if disk.layers or disk.format == "qcow2" else "raw"
            name = _file_name(disk, ".qcow2" if fmt != disk.format else None, self.used)
            target = stage / bundle.DISKS / name
            target.parent.mkdir(parents=True, exist_ok=True)
            start = self.done

            def step(done: int, _total: int, start: int = start) -> None:
                if self.progress is not None:
                    self.progress(start + done, sum(self.sizes))

            images.convert(
                active,
                target,
                fmt,
                progress=step,
                src_format="qcow2" if disk.layers else disk.format,
                allow_backing=tuple(self.roots),
            )
            self.done = start + self.sizes[i]
            self.disks.append(
                attrs.evolve(
                    disk, path=name, format=fmt, layers=(), backing=None, backing_format=None
                )
            )
        for cd in self.machine.cdroms:
            if cd.path is None or os.path.isabs(cd.path):
                self.cdroms.append(cd)
                continue
            name = _file_name(Disk(path=cd.path), None, self.used)
            target = stage / bundle.DISKS / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(bundle.resolve_disk(self.src, cd.path), target)
            self.cdroms.append(attrs.evolve(cd, path=name))


def clone(
    src_folder: str | os.PathLike[str],
    dst_folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    linked: bool = True,
    progress: Progress | None = None,
    allow: Iterable[str | os.PathLike[str]] = (),
) -> Machine:
    """Make a new VM folder ``dst_folder`` from the VM folder ``src_folder``.

    The clone gets a new UUID and new MACs; port forwards with a fixed host
    port get ``host_port=0`` (picked at start). Snapshots are not cloned.

    Args:
        src_folder: the source VM folder; its guest must not be running.
        dst_folder: the new folder; it must not exist (or be empty), and
            neither folder may contain the other.
        name: the clone's machine name; default: ``dst_folder``'s name.
        linked: ``True``: disks are overlays over the source's (which then
            gets a fresh top layer of its own); ``False``: full, independent
            copies (sparse).
        progress: called as ``progress(done_bytes, total_bytes)`` over the
            disks' virtual sizes.
        allow: places outside the source folder its disks may come from (as
            for :func:`virtkit.load`); a linked clone's own bases need none.

    Returns:
        The clone's machine, as saved in ``dst_folder``.

    Raises:
        ConfigError: a bad argument, a folder that is not a VM folder, an
            existing ``dst_folder``, a name that is not a DNS label.
        StateError: the source guest is running.
        ImageError: reading the source's images or writing the clone's failed.
    """
    src = _abs(check_path(src_folder, "src_folder"))
    dst = _abs(check_path(dst_folder, "dst_folder"))
    check_bool(linked, "linked")
    check_callable(progress, "progress")
    _check_folders(src, dst)
    allowed = [os.fspath(p) for p in check_allow(allow)]
    bundle.load(src, allow=allowed)  # writes back a generated identity first (takes the lock)
    clone_name = _clone_name(name, dst)
    with folder_lock(src, wait=_LOCK_WAIT) as locked:
        if not locked:
            raise StateError(
                f"cannot clone {src}: another clone of it is in progress", action="clone"
            )
        return _clone_locked(src, dst, clone_name, linked=linked, progress=progress, allow=allowed)


def _clone_locked(
    src: Path,
    dst: Path,
    clone_name: str,
    *,
    linked: bool,
    progress: Progress | None,
    allow: list[str],
) -> Machine:
    source = bundle.load(src, allow=allow)
    roots = _roots(src, allow)
    _not_running(src, source, roots)
    plan = _Plan(src, dst, source, progress, roots)
    stage = dst.parent / f".{dst.name}.clone-tmp"
    if stage.exists():
        shutil.rmtree(stage)  # left by a clone that crashed: never referenced by anything
    for sub in (stage, stage / bundle.DISKS, stage / bundle.SNAPSHOTS):
        sub.mkdir()
    try:
        if linked:
            plan.linked(stage)
        else:
            plan.full(stage)
        kernel = _copy_kernel(src, dst, stage, source.kernel)
        for extra in _COPIED_FILES:
            if (src / extra).is_file():
                _copy_file(src / extra, stage / extra)
        machine = attrs.evolve(
            _new_identity(source, clone_name), disks=plan.disks, cdroms=plan.cdroms, kernel=kernel
        )
        if linked:
            write_links(stage, Links(base=(_base_link(dst, src, source),)))
        bundle.save(machine, stage, create_disks=False, allow=roots)
        for sub in (stage / bundle.DISKS, stage / bundle.SNAPSHOTS, stage):
            fsync_dir(sub)
        if linked:
            _freeze_source(src, dst, source, machine, plan)
        os.rename(stage, dst)
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if plan.progress is not None and not plan.sizes:
        plan.progress(0, 0)
    return machine


def _base_link(dst: Path, src: Path, source: Machine) -> Link:
    return Link(folder=relative_folder(dst, src), uuid=source.uuid)


def _freeze_source(src: Path, dst: Path, source: Machine, clone: Machine, plan: _Plan) -> None:
    """Put a fresh overlay on each writable source disk and record the clone (in that order).

    New overlay files first (unreferenced until machine.toml names them), then
    the ``[[clone]]`` record (stale, hence ignored, until the clone folder
    exists), then machine.toml: only from then on does the source write to its
    new top layer, before the clone appears.
    """
    disks = list(source.disks)
    for i, name in plan.source_layers.items():
        disk = disks[i]
        below = bundle.resolve_disk(src, disk.active)
        target = bundle.resolve_disk(src, name)
        img = images.create(
            target,
            plan.sizes[i],
            "qcow2",
            backing=os.path.relpath(below, target.parent),
            backing_format="qcow2" if disk.layers else disk.format,  # type: ignore[arg-type]
            allow_backing=tuple(plan.roots),
        )
        img.close()
        disks[i] = attrs.evolve(disk, layers=(*disk.layers, name))
    fsync_dir(src / bundle.DISKS)
    links = read_links(src)
    record = Link(folder=relative_folder(src, dst), uuid=clone.uuid, files=tuple(plan.shared))
    kept = tuple(c for c in links.clone if live(src, c))  # drop clones deleted since
    write_links(src, attrs.evolve(links, clone=(*kept, record)))
    bundle.write_machine(src, attrs.evolve(source, disks=disks))

"""The files a guest holds: every layer of every disk, media, NVRAM, seed, kernel.

One answer, computed from the folder's own data (``Machine`` and the snapshot
records), drives what every backend does with files:

* isolation: two guests may hold one file only if neither writes it;
* the allow-list: a file a guest reads must lie inside its folder, be named
  explicitly by the machine (an absolute ``Disk.path``, ``CdRom.path``,
  kernel), or lie under a root the caller allowed (``define(allow=...)``)
  or the bundle records (linked clones). Backing file names found inside
  images are untrusted and checked the same way, as
  :func:`virtkit.images.open` checks them;
* copy and clone (what belongs to the VM).

A file is held *writable* when the guest writes it: the active (top) layer
of a disk that is not read-only, and the UEFI variables (NVRAM). Everything
else (frozen layers, backing files, ISO media, kernel, initrd) is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from virtkit import bundle, images
from virtkit.errors import ConfigError, ImageError
from virtkit.images.probe import check_declared_format
from virtkit.model import Disk, Machine, Snapshot

__all__ = [
    "NVRAM_FILE",
    "SEED_FILE",
    "HeldFile",
    "create_disk",
    "fit_disk_sizes",
    "held_files",
    "inside",
    "kernel_file",
    "resolve_media",
]

#: the UEFI variables file in a guest folder
NVRAM_FILE = "OVMF_VARS.fd"
#: the cloud-init seed ISO in a guest folder
SEED_FILE = "cloud-init-seed.iso"
_MAX_CHAIN = 64


@attrs.frozen
class HeldFile:
    """One file a guest holds.

    Attributes:
        path: absolute, symlinks resolved.
        writable: the guest writes it.
        what: where it comes from (``"disks[0] (vda) active layer"``), for messages.
    """

    path: Path
    writable: bool
    what: str


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (symlinks resolved) is ``root`` or lies under it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def resolve_media(folder: Path, path: str) -> Path:
    """Absolute path of a CD-ROM image or disk file named in a machine (relative: ``disks/``)."""
    return bundle.resolve_disk(folder, path)


def _kernel_file(folder: Path, path: Path) -> Path:
    return Path(os.path.abspath(path if path.is_absolute() else folder / path))


def _backing_chain(top: Path, fmt: str, roots: Sequence[Path], what: str) -> list[Path]:
    """Files below ``top`` in its backing chain, each checked against ``roots``.

    The names come from the image files (untrusted): each must resolve inside
    the directory of the image naming it or one of ``roots``.
    """
    if not top.is_file() or fmt != "qcow2":
        return []
    chain: list[Path] = []
    try:
        with images.open(top, format="qcow2", force_share=True, allow_backing=roots) as image:
            below = getattr(image, "backing", None)
            while below is not None and len(chain) < _MAX_CHAIN:
                chain.append(Path(os.path.realpath(below.path)))
                below = getattr(below, "backing", None)
    except ImageError as exc:
        hint = (
            "; pass define(..., allow=[<that folder>]) to let this guest read it"
            if "outside" in exc.message
            else ""
        )
        raise ConfigError(f"{what}: {exc.message}{hint}", field=what) from exc
    return chain


def held_files(
    machine: Machine,
    folder: str | os.PathLike[str],
    *,
    snapshots: Iterable[Snapshot] = (),
    allow: Iterable[str | os.PathLike[str]] = (),
    chains: bool = True,
) -> tuple[HeldFile, ...]:
    """Every file ``machine`` in ``folder`` holds, with whether it writes it.

    Args:
        machine: the definition (its disks' ``layers`` included).
        folder: the VM folder.
        snapshots: the folder's snapshot records (their frozen layers are held
            read-only even when no longer in a disk's chain).
        allow: extra roots backing files may come from.
        chains: also follow each disk's backing chain in the image files
            (checking every name against the folder, the machine's own
            absolute paths and ``allow``).

    Raises:
        ConfigError: a backing file lies outside every allowed location
            (naming the disk), or an image cannot be read.
    """
    root = Path(folder)
    found: dict[Path, HeldFile] = {}

    def add(path: Path, writable: bool, what: str) -> None:
        real = Path(os.path.realpath(path))
        old = found.get(real)
        if old is None or (writable and not old.writable):
            found[real] = HeldFile(real, writable, what)

    explicit = [Path(os.path.dirname(d.path)) for d in machine.disks if os.path.isabs(d.path)]
    roots = [root, *(Path(os.path.abspath(a)) for a in allow)]
    for i, disk in enumerate(machine.disks):
        files = [bundle.resolve_disk(root, f) for f in disk.files()]
        name = f"disks[{i}] ({disk.target})"
        for j, path in enumerate(files[:-1]):
            add(path, False, f"{name} layer {j}")
        add(files[-1], not disk.read_only, f"{name} active layer")
        if chains:
            fmt = disk.format if not disk.layers else "qcow2"
            for path in _backing_chain(files[-1], fmt, [*roots, *explicit], f"disks[{i}].path"):
                add(path, False, f"{name} backing file")
    for snap in snapshots:
        for target, layer in getattr(snap, "layers", {}).items():
            add(
                bundle.resolve_disk(root, layer), False, f"snapshot {snap.name!r} layer of {target}"
            )
    for i, cd in enumerate(machine.cdroms):
        if cd.path is not None:
            add(resolve_media(root, cd.path), False, f"cdroms[{i}] ({cd.target}) medium")
    if machine.firmware == "uefi":
        add(root / NVRAM_FILE, True, "UEFI variables (NVRAM)")
    if machine.cloud_init is not None:
        add(root / SEED_FILE, True, "cloud-init seed ISO")
    kernel = getattr(machine, "kernel", None)
    if kernel is not None:
        add(_kernel_file(root, kernel.kernel), False, "kernel")
        if kernel.initrd is not None:
            add(_kernel_file(root, kernel.initrd), False, "kernel initrd")
    return tuple(found.values())


def kernel_file(folder: str | os.PathLike[str], path: Path) -> Path:
    """Absolute path of a kernel or initrd named by ``Machine.kernel`` (relative: the folder)."""
    return _kernel_file(Path(folder), path)


def fit_disk_sizes(machine: Machine, folder: Path) -> None:
    """Grow each disk whose ``size`` is larger than its image; refuse a smaller ``size``.

    First each existing base image is probed as qemu-img would: a file that
    is not in its disk's declared format is refused (``ConfigError``).

    The active layer is resized (an overlay may be larger than its backing
    file, as QEMU allows). Never shrinks.

    Raises:
        ConfigError: a ``Disk.size`` is smaller than the image, or a read-only
            disk would need growing (naming the field).
    """
    for i, disk in enumerate(machine.disks):
        base = bundle.resolve_disk(folder, disk.path)
        if base.is_file():  # the file must be what the disk declares (a .img may be qcow2)
            check_declared_format(base, disk.format, f"disks[{i}].format")
        if disk.size is None:
            continue
        path = bundle.resolve_disk(folder, disk.active)
        if not path.is_file():
            continue
        fmt = "qcow2" if disk.layers else disk.format
        with images.open(path, format=fmt, force_share=True) as image:  # type: ignore[arg-type]
            current = image.virtual_size
        field = f"disks[{i}].size"
        if disk.size < current:
            raise ConfigError(
                f"'{field}' is {disk.size} bytes but the image {path} is {current}; virtkit "
                "never shrinks a disk (that drops data): set size to at least "
                f"{current} or leave it out",
                field=field,
                value=disk.size,
            )
        if disk.size > current:
            if disk.read_only:
                raise ConfigError(
                    f"'{field}' is {disk.size} bytes but the read-only image {path} is "
                    f"{current}; a read-only disk cannot be grown",
                    field=field,
                    value=disk.size,
                )
            with images.open(path, writable=True, format=fmt) as image:  # type: ignore[arg-type]
                image.resize(disk.size)


def create_disk(disk: Disk, folder: Path) -> Path | None:
    """Create a disk's missing image (with a ``size``) atomically; returns it if created."""
    path = bundle.resolve_disk(folder, disk.path)
    if disk.size is None or path.exists() or disk.layers:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.creating")
    tmp.unlink(missing_ok=True)
    try:
        options: dict[str, str | None] = {}
        if disk.backing is not None:
            options = {"backing": disk.backing, "backing_format": disk.backing_format}
        images.create(tmp, disk.size, disk.format, **options).close()  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

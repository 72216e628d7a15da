"""A VM as its set of files: ``machine.toml``, ``disks/``, ``snapshots/`` (bundle format 2).

::

    web/
        machine.toml          the definition (TOML, format-version = 2), hand-editable
        disks/root.qcow2      images; a Disk's relative path is relative to disks/
        disks/root.s1.qcow2   overlays above it: Disk.layers, bottom to top
        snapshots/_index.toml snapshot records (with the layers each froze) and the current one
        snapshots/state/NAME/ saved machine state of full snapshots
        links.toml            linked clones: whose files this folder reads, who reads its files

The folder is self-contained and relocatable: every path in it is relative,
and everything a backend needs to find the VM's current state again (the
active layer of each disk, the kernel, the media in a drive) is in these
files. The full specification is docs/bundle-format.rst.

API for backends: call :func:`write_machine` after every change of layers,
media or devices (atomic, fsynced, keeps the user's comments), and
:func:`save_snapshots` after every snapshot change. Before deleting or
merging a layer call :func:`check_unshared`; ``define()`` adds
:func:`allowed_roots` to its ``allow=`` list.

``load`` executes nothing and refuses any path that leaves the folder unless
the caller (or the folder's recorded linked bases) allows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid as _uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from virtkit.bundle.atomic import atomic_write, folder_lock, fsync_dir
from virtkit.bundle.document import fresh, merge_text, plain
from virtkit.bundle.links import (
    LINKS_NAME,
    allowed_roots,
    check_unshared,
    dependents,
)
from virtkit.bundle.paths import (
    DISKS,
    check_allow,
    check_paths,
    explicit_roots,
    resolve_disk,
    resolve_file,
)
from virtkit.bundle.schema import FORMAT_VERSION, check_version, machine_from_dict, machine_to_dict
from virtkit.bundle.snapshots import (
    SNAPSHOTS,
    current_snapshot,
    parse_toml,
    read_index,
    read_toml,
    save_snapshots,
    snapshot_dir,
    with_layers,
)
from virtkit.bundle.upgrade import LEGACY_LAYERS, apply_v1_layers, read_v1_layers
from virtkit.errors import ConfigError
from virtkit.images.args import check_path
from virtkit.model import Machine, Snapshot

__all__ = [
    "CONFIG_NAME",
    "DISKS",
    "FORMAT_VERSION",
    "LINKS_NAME",
    "SNAPSHOTS",
    "allowed_roots",
    "check_unshared",
    "current_snapshot",
    "dependents",
    "folder_lock",
    "load",
    "load_snapshots",
    "resolve_disk",
    "resolve_file",
    "save",
    "save_snapshots",
    "snapshot_dir",
    "write_machine",
]

CONFIG_NAME = "machine.toml"
_LOCK_WAIT = 5.0  # seconds load() waits for another process persisting the same identity


# -- reading -----------------------------------------------------------------------------


def _folder(folder: str | os.PathLike[str]) -> Path:
    root = Path(check_path(folder, "folder"))
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder", file=str(root))
    return root


def _parse(root: Path, allowed: list[str | os.PathLike[str]]) -> tuple[Machine, bytes, bool]:
    """(machine upgraded to version 2 in memory, the file's bytes, identity was missing)."""
    config = root / CONFIG_NAME
    raw = read_toml(config, root, allowed)
    doc = parse_toml(raw, config)
    machine = machine_from_dict(doc, file=str(config))
    if check_version(doc, file=str(config)) == 1:
        legacy = read_v1_layers(root, machine)
        if legacy is not None:
            machine = apply_v1_layers(machine, legacy)
    nics = doc.get("nics", [])
    missing = "uuid" not in doc or (
        isinstance(nics, list) and any(isinstance(n, dict) and "mac" not in n for n in nics)
    )
    return machine, raw, missing


def load(
    folder: str | os.PathLike[str], *, allow: Iterable[str | os.PathLike[str]] = ()
) -> Machine:
    """Read the Machine stored in a VM folder.

    Nothing is executed and no file outside ``folder``, its recorded linked
    bases (:func:`allowed_roots`) or the allowed paths is read or
    referenced: a disk, layer, CD-ROM, kernel or backing path that leaves the
    folder, directly or through a symlink, is refused.

    A version-1 folder is upgraded in memory (including the version-1 qemu
    backend's ``qemu-layers.json``); :func:`save` writes it as version 2.

    Identity is stable: a ``machine.toml`` written without ``uuid`` or MACs
    gets generated ones, written back into the file (atomically, keeping its
    comments) so every later load sees the same machine. When the folder is
    read-only they are instead derived from the file and its location, so two
    loads still agree.

    Raises:
        ConfigError: naming the file and key: missing file, bad TOML, unknown
            key, wrong type, newer format-version, a path that escapes.
    """
    root = _folder(folder)
    allowed = [*check_allow(allow), *allowed_roots(root)]
    machine, raw, missing = _parse(root, allowed)
    check_paths(machine, root, allowed, str(root / CONFIG_NAME))
    if missing:
        machine = _persist_identity(root, machine, raw, allowed)
    return machine


# -- identity ----------------------------------------------------------------------------


def _derived(machine: Machine, raw: bytes, root: Path) -> Machine:
    """Identity derived from the file, the folder's location and the host (read-only folders)."""
    host = b""
    with contextlib.suppress(OSError):
        host = Path("/etc/machine-id").read_bytes().strip()
    seed = hashlib.sha256(host + b"\0" + os.fsencode(os.path.realpath(root)) + b"\0" + raw)
    ident = _uuid.UUID(bytes=seed.digest()[:16], version=4)
    nics = []
    for i, nic in enumerate(machine.nics):
        tail = hashlib.sha256(seed.digest() + i.to_bytes(4, "big")).digest()[:3]
        nics.append(attrs.evolve(nic, mac="52:54:00:" + ":".join(f"{b:02x}" for b in tail)))
    return attrs.evolve(machine, uuid=ident, nics=nics)


def _persist_identity(
    root: Path, machine: Machine, raw: bytes, allowed: list[str | os.PathLike[str]]
) -> Machine:
    """Write generated uuid/MACs back; another process doing the same first wins."""
    with folder_lock(root, wait=_LOCK_WAIT) as locked:
        if locked:
            again, raw_now, missing = _parse(root, allowed)
            if not missing:
                return again  # someone persisted it while we waited
            if raw_now != raw:
                machine, raw = again, raw_now
            try:
                _store(root, machine, allowed)
                return machine
            except (ConfigError, OSError):
                pass  # read-only folder: fall through to derived values
    parsed, raw, _ = _parse(root, allowed)
    doc = parse_toml(raw, root / CONFIG_NAME)
    derived = _derived(parsed, raw, root)
    nics = doc.get("nics", [])
    keep_macs = [isinstance(n, dict) and "mac" in n for n in nics] if isinstance(nics, list) else []
    merged_nics = [
        p if i < len(keep_macs) and keep_macs[i] else d
        for i, (p, d) in enumerate(zip(parsed.nics, derived.nics, strict=True))
    ]
    ident = parsed.uuid if "uuid" in doc else derived.uuid
    return attrs.evolve(parsed, uuid=ident, nics=merged_nics)


# -- writing -----------------------------------------------------------------------------


def _render(config: Path, machine: Machine) -> bytes | None:
    """The new machine.toml bytes, merged into the existing file; None when nothing changes."""
    minimal = machine_to_dict(machine)
    old: str | None = None
    try:
        with open(config, "rb") as fh:
            old = fh.read(2 * 1024 * 1024).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        old = None
    candidates = []
    if old is not None:
        try:
            doc = parse_toml(old.encode(), config)
            if (
                check_version(doc, file=str(config)) == FORMAT_VERSION
                and machine_from_dict(doc, file=str(config)) == machine
            ):
                return None
        except ConfigError:
            pass
        merged = merge_text(old, minimal, machine_to_dict(machine, minimal=False))
        if merged is not None:
            candidates.append(merged)
    candidates += [fresh(minimal), plain(minimal)]
    for text in candidates:
        try:
            if machine_from_dict(parse_toml(text.encode(), config), file=str(config)) == machine:
                return text.encode()
        except ConfigError:
            continue
    raise ConfigError(  # a bug, not a user error: refuse rather than write a wrong file
        f"cannot render machine {machine.name!r} as TOML that reads back equal", file=str(config)
    )


def _upgrade_index(root: Path) -> None:
    """Rewrite a version-1 snapshot index as version 2 (with layers from the legacy JSON)."""
    found = read_index(root)
    if found is None or found[0] == FORMAT_VERSION:
        return
    save_snapshots(root, load_snapshots(root), current=found[2])


def _store(root: Path, machine: Machine, allowed: list[str | os.PathLike[str]]) -> None:
    """Write machine.toml (and finish a version-1 upgrade): each step atomic and fsynced.

    Order: the snapshot index becomes version 2 first, then machine.toml, then
    the legacy JSON goes. A crash between steps leaves a folder that loads the
    same (a version-2 index is read the same with or without the JSON; a
    version-2 machine.toml ignores it).
    """
    config = root / CONFIG_NAME
    check_paths(machine, root, allowed, str(config))
    legacy = root / LEGACY_LAYERS
    if legacy.exists():
        _upgrade_index(root)
    data = _render(config, machine)
    if data is not None:
        atomic_write(config, data)
    if legacy.exists():
        try:
            legacy.unlink()
            fsync_dir(root)
        except OSError as exc:
            raise ConfigError(f"cannot remove {legacy}: {exc.strerror}", file=str(legacy)) from exc


def write_machine(
    folder: str | os.PathLike[str],
    machine: Machine,
    *,
    allow: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Persist a changed definition into an existing VM folder (what backends call).

    Call it after every change of layers, media or devices. ``machine.toml``
    is replaced atomically (temp file, fsync, rename, fsync of the folder): a
    crash leaves the old definition or the new one. The user's comments, key
    order and spelling of unchanged values are kept; nothing is written when
    the file already says exactly ``machine``. No disk image is created.

    Raises:
        ConfigError: ``folder`` is not a VM folder, a path leaves it (absolute
            paths outside it, the recorded linked bases and ``allow`` are
            refused), or the file cannot be written.
    """
    if not isinstance(machine, Machine):
        raise ConfigError(f"write_machine() needs a Machine (got {type(machine).__name__})")
    root = _folder(folder)
    allowed = [*check_allow(allow), *allowed_roots(root), *explicit_roots(machine)]
    _store(root, machine, allowed)


def save(
    machine: Machine,
    folder: str | os.PathLike[str],
    *,
    create_disks: bool = True,
    allow: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``machine`` as a VM folder; returns the folder.

    Creates ``folder``, ``disks/`` and ``snapshots/`` as needed, creates each
    missing disk image that has a ``size`` and no layers (with
    ``create_disks``), then replaces ``machine.toml`` atomically (as
    :func:`write_machine`): a crash leaves the old definition or the new one,
    never a mix. A version-1 folder is written as version 2.

    Raises:
        ConfigError: a path leaves the folder (absolute paths need ``allow``),
            or the folder cannot be written.
    """
    if not isinstance(machine, Machine):
        raise ConfigError(f"save() needs a Machine (got {type(machine).__name__})")
    root = Path(check_path(folder, "folder"))
    config = root / CONFIG_NAME
    allowed = [*check_allow(allow), *explicit_roots(machine)]
    if (root / LINKS_NAME).exists():
        allowed += allowed_roots(root)
    check_paths(machine, root, allowed, str(config))
    try:
        for sub in (root, root / DISKS, root / SNAPSHOTS):
            sub.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create VM folder {root}: {exc.strerror}", file=str(root)
        ) from exc
    if create_disks:
        _create_missing_disks(machine, root)
    _store(root, machine, allowed)
    return root


def _create_missing_disks(machine: Machine, root: Path) -> None:
    from virtkit import images  # noqa: PLC0415 - the image engine is only needed to create

    for disk in machine.disks:
        path = resolve_disk(root, disk.path)
        if disk.size is None or disk.layers or path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating")
        tmp.unlink(missing_ok=True)
        try:
            kwargs: dict[str, Any] = {}
            if disk.backing is not None:
                kwargs = {"backing": disk.backing, "backing_format": disk.backing_format}
            img = images.create(tmp, disk.size, disk.format, **kwargs)  # type: ignore[arg-type]
            img.close()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# -- snapshot records ---------------------------------------------------------------------


def load_snapshots(folder: str | os.PathLike[str]) -> tuple[Snapshot, ...]:
    """The snapshot records of a VM folder (empty when it has none).

    A version-1 index in a folder that still holds the version-1 qemu
    backend's ``qemu-layers.json`` gets each record's layers from there.
    """
    found = read_index(folder)
    if found is None:
        return ()
    version, snaps, _current = found
    root = Path(folder)
    if version == 1 and (root / LEGACY_LAYERS).exists():
        config = root / CONFIG_NAME
        doc = parse_toml(read_toml(config, root), config)
        legacy = read_v1_layers(root, machine_from_dict(doc, file=str(config)))
        if legacy is not None:
            snaps = with_layers(snaps, legacy.snapshots)
    return snaps

"""A VM as its set of files: ``machine.toml``, ``disks/``, ``snapshots/``.

::

    web/
        machine.toml          the definition (TOML, format-version = 1)
        disks/root.qcow2      images; a Disk's relative path is relative to disks/
        snapshots/_index.toml snapshot records and which one is current
        snapshots/state/NAME/ saved machine state of full snapshots

The folder is self-contained and relocatable. ``save`` is atomic (temp file,
fsync, rename); ``load`` executes nothing and refuses any path that leaves
the folder unless the caller allows it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tomli_w

from virtkit.bundle.atomic import atomic_write
from virtkit.bundle.schema import (
    FORMAT_VERSION,
    machine_from_dict,
    machine_to_dict,
    snapshot_from_dict,
    snapshot_to_dict,
)
from virtkit.errors import ConfigError
from virtkit.images.args import check_path
from virtkit.model import Machine, Snapshot

__all__ = [
    "CONFIG_NAME",
    "current_snapshot",
    "load",
    "load_snapshots",
    "resolve_disk",
    "save",
    "save_snapshots",
    "snapshot_dir",
]

CONFIG_NAME = "machine.toml"
DISKS = "disks"
SNAPSHOTS = "snapshots"
_INDEX = "_index.toml"
_MAX_CONFIG = 1024 * 1024  # a machine.toml is a few KiB; refuse to parse megabytes


def _inside(path: Path, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def resolve_disk(
    folder: str | os.PathLike[str],
    path: str,
    *,
    allow: Iterable[str | os.PathLike[str]] | None = None,
    field: str = "path",
) -> Path:
    """Absolute location of a disk image named ``path`` in a VM folder.

    Relative paths are relative to ``folder/disks``. With ``allow`` given, the
    result (symlinks followed) must lie inside ``folder`` or one of the allowed
    paths, else ``ConfigError``.
    """
    base = Path(folder) / DISKS
    candidate = Path(path) if os.path.isabs(path) else base / path
    if allow is not None:
        roots = [Path(folder), *map(Path, allow)]
        if not any(_inside(candidate, r) for r in roots):
            raise ConfigError(
                f"'{field}' {path!r} points outside the VM folder {folder}; pass "
                "allow=[...] with that location to use it",
                field=field,
                value=path,
            )
    return Path(os.path.abspath(candidate))


def _check_paths(
    machine: Machine, folder: Path, allow: Iterable[str | os.PathLike[str]], file: str
) -> None:
    allowed = list(allow)
    items: list[tuple[str, str]] = []
    for i, d in enumerate(machine.disks):
        items.append((f"disks[{i}].path", d.path))
        if d.backing is not None:
            # a backing name is resolved relative to the image that names it
            parent = os.path.dirname(d.path)
            items.append(
                (
                    f"disks[{i}].backing",
                    d.backing if os.path.isabs(d.backing) else os.path.join(parent, d.backing),
                )
            )
    items.extend(
        (f"cdroms[{i}].path", c.path) for i, c in enumerate(machine.cdroms) if c.path is not None
    )
    for field, path in items:
        try:
            resolve_disk(folder, path, allow=allowed, field=field)
        except ConfigError as exc:
            raise ConfigError(exc.message, file=file, field=field, value=path) from None


def _allowed(allow: Iterable[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    """``allow`` as a list of checked paths (ConfigError naming 'allow' otherwise)."""
    if isinstance(allow, (str, os.PathLike)):
        raise ConfigError(
            f"'allow' must be a list of paths, not a single path (got {allow!r})", field="allow"
        )
    try:
        return [check_path(p, "allow") for p in allow]
    except TypeError as exc:
        raise ConfigError(
            f"'allow' must be a list of paths (got {allow!r})", field="allow"
        ) from exc


def save(
    machine: Machine,
    folder: str | os.PathLike[str],
    *,
    create_disks: bool = True,
    allow: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``machine`` as a VM folder; returns the folder.

    Creates ``folder``, ``disks/`` and ``snapshots/`` as needed, creates each
    missing disk image that has a ``size`` (with ``create_disks``), then
    replaces ``machine.toml`` atomically: a crash leaves the old definition
    or the new one, never a mix.

    Raises:
        ConfigError: a path leaves the folder (absolute paths need ``allow``),
            or the folder cannot be written.
    """
    if not isinstance(machine, Machine):
        raise ConfigError(f"save() needs a Machine (got {type(machine).__name__})")
    root = Path(check_path(folder, "folder"))
    config = root / CONFIG_NAME
    allowed = _allowed(allow)
    allowed += [os.path.dirname(d.path) for d in machine.disks if os.path.isabs(d.path)]
    allowed += [
        os.path.dirname(c.path)
        for c in machine.cdroms
        if c.path is not None and os.path.isabs(c.path)
    ]
    _check_paths(machine, root, allowed, str(config))
    try:
        for sub in (root, root / DISKS, root / SNAPSHOTS):
            sub.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create VM folder {root}: {exc.strerror}", file=str(root)
        ) from exc
    if create_disks:
        _create_missing_disks(machine, root)
    text = tomli_w.dumps(machine_to_dict(machine))
    atomic_write(config, text.encode())
    return root


def _create_missing_disks(machine: Machine, root: Path) -> None:
    from virtkit import images  # noqa: PLC0415 - the image engine is only needed to create

    for disk in machine.disks:
        path = resolve_disk(root, disk.path)
        if disk.size is None or path.exists():
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


def _read_toml(path: Path, root: Path, allow: list[str | os.PathLike[str]]) -> dict[str, Any]:
    if not path.exists() and not path.is_symlink():
        raise ConfigError(
            f"{path.name} is missing: {root} is not a virtkit VM folder", file=str(path)
        )
    if not any(_inside(path, r) for r in [root, *map(Path, allow)]):
        raise ConfigError(f"{path.name} is a link to a file outside the VM folder", file=str(path))
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_CONFIG + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path.name}: {exc.strerror}", file=str(path)) from exc
    if len(raw) > _MAX_CONFIG:
        raise ConfigError(f"{path.name} is larger than {_MAX_CONFIG} bytes", file=str(path))
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(path)
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid TOML: {exc}", file=str(path)) from exc
    except RecursionError as exc:
        raise ConfigError(f"{path.name} nests too deeply", file=str(path)) from exc


def load(
    folder: str | os.PathLike[str], *, allow: Iterable[str | os.PathLike[str]] = ()
) -> Machine:
    """Read the Machine stored in a VM folder.

    Nothing is executed and no file outside ``folder`` (or the allowed
    paths) is read or referenced: a disk, CD-ROM or backing path that leaves
    the folder, directly or through a symlink, is refused.

    Raises:
        ConfigError: naming the file and key: missing file, bad TOML, unknown
            key, wrong type, newer format-version, a path that escapes.
    """
    root = Path(check_path(folder, "folder"))
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder", file=str(root))
    allowed = _allowed(allow)
    config = root / CONFIG_NAME
    doc = _read_toml(config, root, allowed)
    machine = machine_from_dict(doc, file=str(config))
    _check_paths(machine, root, allowed, str(config))
    return machine


# -- snapshot records ------------------------------------------------------------------


def snapshot_dir(folder: str | os.PathLike[str], name: str, *, create: bool = True) -> Path:
    """The folder that holds snapshot ``name``'s saved state.

    Raises:
        ConfigError: ``name`` is not a single file name (a slash, ``..``, NUL...),
            which would put the folder outside ``snapshots/state/``.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\0"):
        raise ConfigError(
            f"snapshot 'name' must be a plain file name without slashes (got {name!r})",
            field="name",
            value=name,
        )
    path = Path(check_path(folder, "folder")) / SNAPSHOTS / "state" / name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def save_snapshots(
    folder: str | os.PathLike[str], snapshots: Iterable[Snapshot], *, current: str | None
) -> None:
    """Atomically replace the snapshot index of a VM folder."""
    index = Path(folder) / SNAPSHOTS / _INDEX
    index.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"format-version": FORMAT_VERSION}
    if current is not None:
        doc["current"] = current
    doc["snapshot"] = [snapshot_to_dict(s) for s in snapshots]
    atomic_write(index, tomli_w.dumps(doc).encode())


def _index(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], str] | None:
    index = Path(folder) / SNAPSHOTS / _INDEX
    if not index.exists():
        return None
    return _read_toml(index, Path(folder), []), str(index)


def load_snapshots(folder: str | os.PathLike[str]) -> tuple[Snapshot, ...]:
    """The snapshot records of a VM folder (empty when it has none)."""
    found = _index(folder)
    if found is None:
        return ()
    doc, file = found
    version = doc.get("format-version")
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"unsupported snapshot index format-version {version!r}",
            file=file,
            field="format-version",
        )
    unknown = set(doc) - {"format-version", "current", "snapshot"}
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}", file=file)
    records = doc.get("snapshot", [])
    if not isinstance(records, list):
        raise ConfigError("'snapshot' must be an array of tables", file=file, field="snapshot")
    snaps = []
    for i, rec in enumerate(records):
        try:
            snaps.append(snapshot_from_dict(rec, file=file))
        except ConfigError as exc:
            raise ConfigError(exc.message, file=file, field=f"snapshot[{i}]") from None
    names = [s.name for s in snaps]
    if len(set(names)) != len(names):
        raise ConfigError("a snapshot name appears twice", file=file, field="snapshot")
    return tuple(snaps)


def current_snapshot(folder: str | os.PathLike[str]) -> str | None:
    """The name of the current snapshot recorded in a VM folder, if any."""
    found = _index(folder)
    if found is None:
        return None
    current = found[0].get("current")
    if current is not None and not isinstance(current, str):
        raise ConfigError("'current' must be a snapshot name", file=found[1], field="current")
    return current

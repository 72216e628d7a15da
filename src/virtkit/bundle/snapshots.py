"""The snapshot index: ``snapshots/_index.toml``, its records and the current snapshot.

::

    format-version = 2
    current = "after-install"

    [[snapshot]]
    name = "after-install"
    kind = "disk"
    state = "running"
    created-at = 2026-12-03T10:00:00Z
    layers = { vda = "root.qcow2" }   # what the snapshot froze, relative to disks/

A version-1 index has no ``layers``; in a folder that still has the
version-1 qemu backend's ``qemu-layers.json`` they are read from there.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from virtkit.bundle.atomic import atomic_write
from virtkit.bundle.schema import (
    FORMAT_VERSION,
    check_version,
    snapshot_from_dict,
    snapshot_to_dict,
)
from virtkit.errors import ConfigError
from virtkit.images.args import check_path
from virtkit.model import Snapshot

__all__ = [
    "INDEX",
    "SNAPSHOTS",
    "current_snapshot",
    "read_index",
    "read_toml",
    "save_snapshots",
    "snapshot_dir",
]

SNAPSHOTS = "snapshots"
INDEX = "_index.toml"
MAX_TOML = 1024 * 1024  # a bundle file is a few KiB; refuse to parse megabytes


def read_toml(path: Path, root: Path, allow: Iterable[str | os.PathLike[str]] = ()) -> bytes:
    """The bytes of a bundle file (bounded; must not be a link out of the folder)."""
    from virtkit.bundle.paths import inside  # noqa: PLC0415 - avoid an import cycle at load

    if not path.exists() and not path.is_symlink():
        raise ConfigError(
            f"{path.name} is missing: {root} is not a virtkit VM folder", file=str(path)
        )
    if not any(inside(path, r) for r in [root, *map(Path, allow)]):
        raise ConfigError(f"{path.name} is a link to a file outside the VM folder", file=str(path))
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TOML + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path.name}: {exc.strerror}", file=str(path)) from exc
    if len(raw) > MAX_TOML:
        raise ConfigError(f"{path.name} is larger than {MAX_TOML} bytes", file=str(path))
    return raw


def parse_toml(raw: bytes, path: Path) -> dict[str, Any]:
    """Parse a bundle file's bytes (ConfigError naming the file)."""
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
    """Atomically replace the snapshot index of a VM folder (format-version 2)."""
    index = Path(folder) / SNAPSHOTS / INDEX
    index.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"format-version": FORMAT_VERSION}
    if current is not None:
        doc["current"] = current
    doc["snapshot"] = [snapshot_to_dict(s) for s in snapshots]
    atomic_write(index, tomli_w.dumps(doc).encode())


def read_index(
    folder: str | os.PathLike[str],
) -> tuple[int, tuple[Snapshot, ...], str | None] | None:
    """(format-version, records, current) of a folder's index; None when it has none."""
    index = Path(folder) / SNAPSHOTS / INDEX
    if not index.exists():
        return None
    file = str(index)
    doc = parse_toml(read_toml(index, Path(folder)), index)
    version = check_version(doc, file=file)
    unknown = set(doc) - {"format-version", "current", "snapshot"}
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}", file=file)
    records = doc.get("snapshot", [])
    if not isinstance(records, list):
        raise ConfigError("'snapshot' must be an array of tables", file=file, field="snapshot")
    snaps = []
    for i, rec in enumerate(records):
        if version == 1 and isinstance(rec, dict) and "layers" in rec:
            raise ConfigError(
                "'layers' needs format-version = 2", file=file, field=f"snapshot[{i}]"
            )
        try:
            snaps.append(snapshot_from_dict(rec, file=file))
        except ConfigError as exc:
            raise ConfigError(exc.message, file=file, field=f"snapshot[{i}]") from None
    names = [s.name for s in snaps]
    if len(set(names)) != len(names):
        raise ConfigError("a snapshot name appears twice", file=file, field="snapshot")
    current = doc.get("current")
    if current is not None and not isinstance(current, str):
        raise ConfigError("'current' must be a snapshot name", file=file, field="current")
    return version, tuple(snaps), current


def with_layers(
    snaps: tuple[Snapshot, ...], layers: dict[str, dict[str, str]]
) -> tuple[Snapshot, ...]:
    """Records that have no layers get them from a version-1 layer state."""
    return tuple(
        attrs.evolve(s, layers=layers[s.name]) if not s.layers and s.name in layers else s
        for s in snaps
    )


def current_snapshot(folder: str | os.PathLike[str]) -> str | None:
    """The name of the current snapshot recorded in a VM folder, if any."""
    found = read_index(folder)
    return None if found is None else found[2]

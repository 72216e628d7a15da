"""Reading a version-1 folder's private layer state (``qemu-layers.json``) as version 2.

Version 1 of the qemu backend kept each disk's overlay chain in a private
JSON file with **absolute** paths::

    {"active": {"vda": "/vms/web/disks/root.s2.qcow2"},
     "frozen": {"before-upgrade": {"vda": "/vms/web/disks/root.qcow2"}},
     "full":   {"clean": {"vda": "/vms/web/disks/root.s1.qcow2"}},
     "counter": 2}

Version 2 keeps the same facts in the folder's own format, relative to
``disks/``: ``Disk.layers`` (the chain from the base up to the active layer)
and ``Snapshot.layers``. The chain is rebuilt by following the qcow2 backing
file names down from the active layer (the JSON only named the top); an
absolute path that is not inside this folder (a folder copied from elsewhere
still names the original's files) is taken to mean the file of the same name
next to the disk in *this* folder, never the original's.

Nothing here writes: :func:`virtkit.bundle.save` writes version 2 and then
removes the JSON file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs

from virtkit.errors import ConfigError, VirtkitError
from virtkit.model import Disk, Machine

__all__ = ["LEGACY_LAYERS", "MAX_CHAIN", "V1Layers", "read_v1_layers"]

#: The version-1 qemu backend's private layer file.
LEGACY_LAYERS = "qemu-layers.json"
#: The longest overlay chain followed (a cycle or a hostile file stops here).
MAX_CHAIN = 256
_MAX_JSON = 1024 * 1024
DISKS = "disks"


@attrs.frozen
class V1Layers:
    """What a version-1 ``qemu-layers.json`` says, in version-2 terms.

    Attributes:
        disks: disk target -> layers above the disk's path, bottom to top.
        snapshots: snapshot name -> (disk target -> layer file).
    """

    disks: dict[str, tuple[str, ...]]
    snapshots: dict[str, dict[str, str]]


def _inside(path: str, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _read(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as fh:
            raw = fh.read(_MAX_JSON + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {file.name}: {exc.strerror}", file=str(file)) from exc
    if len(raw) > _MAX_JSON:
        raise ConfigError(f"{file.name} is larger than {_MAX_JSON} bytes", file=str(file))
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{file.name} is not valid JSON: {exc}", file=str(file)) from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{file.name} must hold a JSON object", file=str(file))
    return doc


def _map(doc: dict[str, Any], key: str, file: Path) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be an object", file=str(file), field=key)
    return value


def _paths(value: Any, field: str, file: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v and "\0" not in v for k, v in value.items()
    ):
        raise ConfigError(
            f"'{field}' must map disk targets to file paths", file=str(file), field=field
        )
    return dict(value)


class _Mapper:
    """Absolute version-1 paths -> names relative to ``disks/`` in this folder."""

    def __init__(self, root: Path, file: Path) -> None:
        self.root = root
        self.disks = root / DISKS
        self.file = file

    def relative(self, disk: Disk, path: str, field: str) -> str:
        if os.path.isabs(disk.path):
            return path  # an outside disk's overlays live next to it, outside too
        if not os.path.isabs(path):
            candidate = os.path.normpath(path)
        elif _inside(path, self.disks):
            candidate = os.path.relpath(os.path.realpath(path), os.path.realpath(self.disks))
        else:
            # the folder was copied or moved: the same file name next to this disk
            candidate = os.path.join(os.path.dirname(disk.path), os.path.basename(path))
        if candidate.startswith(".."):
            raise ConfigError(
                f"'{field}' {path!r} points outside the VM folder", file=str(self.file), field=field
            )
        if not (self.disks / candidate).is_file():
            raise ConfigError(
                f"'{field}' names {path!r}, but {self.disks / candidate} does not exist",
                file=str(self.file),
                field=field,
            )
        return candidate

    def chain(self, disk: Disk, active: str, field: str) -> tuple[str, ...]:
        """The layers from ``disk.path`` (excluded) up to ``active``, bottom to top."""
        from virtkit import images  # noqa: PLC0415 - only an upgrade reads image headers

        base = os.path.normpath(disk.path)
        layers: list[str] = []
        current = active
        allow: list[str] = [str(self.root)]
        if os.path.isabs(disk.path):
            allow.append(os.path.dirname(disk.path))
        while os.path.normpath(current) != base:
            if len(layers) >= MAX_CHAIN or current in layers:
                raise ConfigError(
                    f"'{field}': the overlay chain above {disk.path} loops or is longer than "
                    f"{MAX_CHAIN}",
                    file=str(self.file),
                    field=field,
                )
            layers.append(current)
            location = current if os.path.isabs(current) else str(self.disks / current)
            try:
                with images.open(
                    location, format="qcow2", force_share=True, allow_backing=allow
                ) as img:
                    backing = img.backing_file
            except VirtkitError as exc:
                raise ConfigError(
                    f"'{field}': cannot read layer {location}: {exc}",
                    file=str(self.file),
                    field=field,
                ) from exc
            if backing is None:
                raise ConfigError(
                    f"'{field}': layer {location} has no backing file, so it does not lead "
                    f"down to the disk's file {disk.path}",
                    file=str(self.file),
                    field=field,
                )
            below = backing
            if not os.path.isabs(below):
                below = os.path.normpath(os.path.join(os.path.dirname(current), below))
            current = self.relative(disk, below, field)
        return tuple(reversed(layers))


def read_v1_layers(root: Path, machine: Machine) -> V1Layers | None:
    """The layer state of a version-1 qemu backend folder; None without ``qemu-layers.json``.

    Raises:
        ConfigError: the JSON is malformed, names files this folder lacks, or
            its chain does not lead down to the disk's own file (naming the key).
    """
    file = root / LEGACY_LAYERS
    if not file.is_file():
        return None
    doc = _read(file)
    mapper = _Mapper(root, file)
    by_target = {str(d.target): d for d in machine.disks}
    disks: dict[str, tuple[str, ...]] = {}
    for target, path in _paths(_map(doc, "active", file), "active", file).items():
        disk = by_target.get(target)
        if disk is None:
            continue  # a disk removed from machine.toml since: its layers are gone with it
        field = f"active.{target}"
        disks[target] = mapper.chain(disk, mapper.relative(disk, path, field), field)
    snapshots: dict[str, dict[str, str]] = {}
    for key in ("frozen", "full"):
        for name, targets in _map(doc, key, file).items():
            for target, path in _paths(targets, f"{key}.{name}", file).items():
                disk = by_target.get(target)
                if disk is not None:
                    rel = mapper.relative(disk, path, f"{key}.{name}.{target}")
                    snapshots.setdefault(str(name), {})[target] = rel
    return V1Layers(disks=disks, snapshots=snapshots)


def apply_v1_layers(machine: Machine, legacy: V1Layers) -> Machine:
    """``machine`` with each disk's layers taken from the version-1 state."""
    disks = [
        attrs.evolve(d, layers=legacy.disks[str(d.target)]) if str(d.target) in legacy.disks else d
        for d in machine.disks
    ]
    return attrs.evolve(machine, disks=disks)

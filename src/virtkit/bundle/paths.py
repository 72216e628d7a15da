"""Where a folder's files are, and the check that none leaves the folder unasked.

Disk images, layers and CD-ROM images named by a relative path live under the
folder's ``disks/``; kernel and initrd under the folder itself. An absolute
path, or a relative one that climbs out (a linked clone's ``../gold/...``),
must lie inside the folder, one of its recorded linked bases
(:func:`virtkit.bundle.allowed_roots`) or a location the caller allows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from virtkit.errors import ConfigError
from virtkit.images.args import check_path
from virtkit.model import Machine

__all__ = ["DISKS", "check_allow", "check_paths", "inside", "resolve_disk", "resolve_file"]

DISKS = "disks"

PathLike = str | os.PathLike[str]


def inside(path: PathLike, root: PathLike) -> bool:
    """Does ``path`` (symlinks followed) lie in ``root``?"""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _resolve(
    folder: PathLike, base: Path, path: str, allow: Iterable[PathLike] | None, field: str
) -> Path:
    candidate = Path(path) if os.path.isabs(path) else base / path
    if allow is not None:
        roots = [Path(folder), *map(Path, allow)]
        if not any(inside(candidate, r) for r in roots):
            raise ConfigError(
                f"'{field}' {path!r} points outside the VM folder {folder}; pass "
                "allow=[...] with that location to use it",
                field=field,
                value=path,
            )
    return Path(os.path.abspath(candidate))


def resolve_disk(
    folder: PathLike,
    path: str,
    *,
    allow: Iterable[PathLike] | None = None,
    field: str = "path",
) -> Path:
    """Absolute location of a disk image, layer or CD-ROM image named ``path`` in a VM folder.

    Relative paths are relative to ``folder/disks``. With ``allow`` given, the
    result (symlinks followed) must lie inside ``folder`` or one of the allowed
    paths, else ``ConfigError``.
    """
    return _resolve(folder, Path(folder) / DISKS, path, allow, field)


def resolve_file(
    folder: PathLike,
    path: str | os.PathLike[str],
    *,
    allow: Iterable[PathLike] | None = None,
    field: str = "kernel",
) -> Path:
    """Absolute location of a file named relative to the VM folder itself (kernel, initrd)."""
    return _resolve(folder, Path(folder), os.fspath(path), allow, field)


def check_allow(allow: Iterable[PathLike]) -> list[PathLike]:
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


def named_files(machine: Machine) -> list[tuple[str, str, bool]]:
    """Every file a machine names: (field, path, relative to disks/ rather than the folder)."""
    items: list[tuple[str, str, bool]] = []
    for i, d in enumerate(machine.disks):
        items.append((f"disks[{i}].path", d.path, True))
        if d.backing is not None:
            # a backing name is resolved relative to the image that names it
            parent = os.path.dirname(d.path)
            backing = d.backing if os.path.isabs(d.backing) else os.path.join(parent, d.backing)
            items.append((f"disks[{i}].backing", backing, True))
        items.extend((f"disks[{i}].layers[{j}]", f, True) for j, f in enumerate(d.layers))
    items.extend(
        (f"cdroms[{i}].path", c.path, True) for i, c in enumerate(machine.cdroms) if c.path
    )
    if machine.kernel is not None:
        items.append(("kernel.kernel", os.fspath(machine.kernel.kernel), False))
        if machine.kernel.initrd is not None:
            items.append(("kernel.initrd", os.fspath(machine.kernel.initrd), False))
    return items


def check_paths(machine: Machine, folder: Path, allow: Iterable[PathLike], file: str) -> None:
    """Every path the machine names stays in ``folder`` or ``allow`` (ConfigError naming it)."""
    allowed = list(allow)
    for field, path, in_disks in named_files(machine):
        try:
            if in_disks:
                resolve_disk(folder, path, allow=allowed, field=field)
            else:
                resolve_file(folder, path, allow=allowed, field=field)
        except ConfigError as exc:
            raise ConfigError(exc.message, file=file, field=field, value=path) from None


def explicit_roots(machine: Machine) -> list[PathLike]:
    """The folders of absolute paths a machine names: naming them is allowing them (save)."""
    return [os.path.dirname(p) for _f, p, _d in named_files(machine) if os.path.isabs(p)]

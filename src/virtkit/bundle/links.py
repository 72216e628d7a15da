"""Dependencies between VM folders: linked clones and the files they share.

A linked clone's disks are qcow2 overlays whose backing files live in
another VM folder (its *base*). Both folders record the link in their
``links.toml``, so that

* the clone defines and starts without ``allow=``: :func:`allowed_roots`
  names the base folders its backing chains may reach;
* the base refuses to delete or merge a file a clone still reads:
  :func:`check_unshared` raises :class:`~virtkit.StateError` naming the clone.

::

    format-version = 2

    [[base]]                      # in the clone: whose files my disks read
    folder = "../gold"            # relative to this folder
    uuid = "5a0e..."              # that machine's uuid

    [[clone]]                     # in the base: who reads my files
    folder = "../web-1"
    uuid = "c2d1..."
    files = ["disks/root.qcow2"]  # relative to this folder; never changed while linked

A ``[[clone]]`` record whose folder is gone, or no longer names this folder
as its base, is stale and ignored (a clone deleted with ``rm -r`` frees its
base). All paths are relative, so a base and its clones can move together.
"""

from __future__ import annotations

import os
import tomllib
import uuid as _uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from virtkit.bundle.atomic import atomic_write
from virtkit.errors import ConfigError, StateError

__all__ = [
    "LINKS_NAME",
    "MAX_DEPTH",
    "Link",
    "Links",
    "allowed_roots",
    "check_unshared",
    "dependents",
    "live",
    "read_links",
    "write_links",
]

LINKS_NAME = "links.toml"
_MAX = 1024 * 1024
_VERSION = 2


@attrs.frozen
class Link:
    """One linked folder.

    Attributes:
        folder: the other folder, relative to this one.
        uuid: the other machine's uuid (a different machine at that path is not the link).
        files: for a ``clone`` record, the files of *this* folder it reads
            (relative to this folder); empty for a ``base`` record.
    """

    folder: str
    uuid: _uuid.UUID
    files: tuple[str, ...] = ()

    def location(self, here: Path) -> Path:
        """The linked folder's absolute path, seen from folder ``here``."""
        return Path(os.path.normpath(os.path.join(os.path.abspath(here), self.folder)))


@attrs.frozen
class Links:
    """A folder's ``links.toml``: the folders it reads from and those that read from it."""

    base: tuple[Link, ...] = ()
    clone: tuple[Link, ...] = ()


def _link(rec: Any, key: str, i: int, file: Path) -> Link:
    field = f"{key}[{i}]"
    if not isinstance(rec, dict) or set(rec) - {"folder", "uuid", "files"}:
        raise ConfigError(
            f"'{field}' must be a table of folder, uuid and files", file=str(file), field=field
        )
    folder, ident, files = rec.get("folder"), rec.get("uuid"), rec.get("files", [])
    if not isinstance(folder, str) or not folder or "\0" in folder or os.path.isabs(folder):
        raise ConfigError(
            f"'{field}.folder' must be a relative folder path (got {folder!r})",
            file=str(file),
            field=f"{field}.folder",
        )
    try:
        parsed = _uuid.UUID(str(ident)) if isinstance(ident, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise ConfigError(
            f"'{field}.uuid' must be a UUID (got {ident!r})", file=str(file), field=f"{field}.uuid"
        )
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f and "\0" not in f and not os.path.isabs(f) for f in files
    ):
        raise ConfigError(
            f"'{field}.files' must be a list of relative file paths",
            file=str(file),
            field=f"{field}.files",
        )
    return Link(folder=folder, uuid=parsed, files=tuple(files))


def read_links(folder: str | os.PathLike[str]) -> Links:
    """The links of a VM folder (none when it has no ``links.toml``).

    Raises:
        ConfigError: the file is malformed (naming the key).
    """
    file = Path(folder) / LINKS_NAME
    try:
        with open(file, "rb") as fh:
            raw = fh.read(_MAX + 1)
    except FileNotFoundError:
        return Links()
    except OSError as exc:
        raise ConfigError(f"cannot read {file.name}: {exc.strerror}", file=str(file)) from exc
    if len(raw) > _MAX:
        raise ConfigError(f"{file.name} is larger than {_MAX} bytes", file=str(file))
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{file.name} is not valid TOML: {exc}", file=str(file)) from exc
    if doc.get("format-version") != _VERSION:
        raise ConfigError(
            f"unsupported {file.name} format-version {doc.get('format-version')!r}",
            file=str(file),
            field="format-version",
        )
    unknown = set(doc) - {"format-version", "base", "clone"}
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}", file=str(file))
    out: dict[str, tuple[Link, ...]] = {}
    for key in ("base", "clone"):
        recs = doc.get(key, [])
        if not isinstance(recs, list):
            raise ConfigError(f"'{key}' must be an array of tables", file=str(file), field=key)
        out[key] = tuple(_link(r, key, i, file) for i, r in enumerate(recs))
    return Links(base=out["base"], clone=out["clone"])


def write_links(folder: str | os.PathLike[str], links: Links) -> None:
    """Atomically replace a folder's ``links.toml`` (removed when there are no links)."""
    file = Path(folder) / LINKS_NAME
    if not links.base and not links.clone:
        if file.exists():
            file.unlink()
            from virtkit.bundle.atomic import fsync_dir  # noqa: PLC0415 - rare path

            fsync_dir(file.parent)
        return
    doc: dict[str, Any] = {"format-version": _VERSION}
    for key, recs in (("base", links.base), ("clone", links.clone)):
        if recs:
            doc[key] = [
                {
                    "folder": r.folder,
                    "uuid": str(r.uuid),
                    **({"files": list(r.files)} if r.files else {}),
                }
                for r in recs
            ]
    atomic_write(file, tomli_w.dumps(doc).encode())


def relative_folder(frm: Path, to: Path) -> str:
    """``to`` as a path relative to folder ``frm``."""
    return os.path.relpath(os.path.abspath(to), os.path.abspath(frm))


#: How many linked bases deep allowed_roots() follows (a clone of a clone of ...).
MAX_DEPTH = 16


def _confirmed_bases(here: Path) -> list[Path]:
    """The ``[[base]]`` folders of ``here`` that confirm the link from their side.

    A base counts only if it is a VM folder with the recorded uuid whose own
    ``links.toml`` lists ``here`` (with ``here``'s uuid) as its clone: a
    folder cannot make itself allowed to read arbitrary places by writing
    ``[[base]] folder = "/"`` into its own file.
    """
    mine = _machine_uuid(here)
    real = os.path.realpath(here)
    out = []
    for link in read_links(here).base:
        other = link.location(here)
        if not other.is_dir() or _machine_uuid(other) != link.uuid:
            continue
        try:
            clones = read_links(other).clone
        except ConfigError:
            continue
        if any(c.uuid == mine and os.path.realpath(c.location(other)) == real for c in clones):
            out.append(other)
    return out


def allowed_roots(folder: str | os.PathLike[str]) -> list[Path]:
    """Folders outside ``folder`` whose files its disks may reference: its linked bases.

    The bases of the bases are included (a clone of a clone reads through
    both). A base counts only when its own ``links.toml`` confirms the link.
    A backend's ``define()`` adds these to the caller's ``allow=`` list, so a
    linked clone defines and starts without one.

    Raises:
        ConfigError: this folder's ``links.toml`` is malformed.
    """
    here = Path(folder)
    roots: list[Path] = []
    todo = [(here, 0)]
    seen = {os.path.realpath(here)}
    while todo:
        current, depth = todo.pop(0)
        if depth >= MAX_DEPTH:
            break
        try:
            bases = _confirmed_bases(current)
        except ConfigError:
            if current == here:
                raise
            continue
        for base in bases:
            key = os.path.realpath(base)
            if key not in seen:
                seen.add(key)
                roots.append(base)
                todo.append((base, depth + 1))
    return roots


def _machine_uuid(folder: Path) -> _uuid.UUID | None:
    from virtkit.bundle import CONFIG_NAME  # noqa: PLC0415 - the package imports this module

    try:
        with open(folder / CONFIG_NAME, "rb") as fh:
            doc = tomllib.loads(fh.read(_MAX).decode("utf-8"))
        return _uuid.UUID(str(doc["uuid"]))
    except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError):
        return None


def live(here: Path, link: Link) -> bool:
    """Is the clone a ``clone`` record names still there and still based on ``here``?"""
    other = link.location(here)
    if not other.is_dir() or _machine_uuid(other) != link.uuid:
        return False
    try:
        bases = read_links(other).base
    except ConfigError:
        return True  # unreadable: assume it still depends on us rather than break it
    real = os.path.realpath(here)
    return any(os.path.realpath(b.location(other)) == real for b in bases)


def dependents(folder: str | os.PathLike[str]) -> list[tuple[Path, tuple[str, ...]]]:
    """The live linked clones of ``folder``: (clone folder, files of ``folder`` it reads)."""
    here = Path(folder)
    return [
        (link.location(here), link.files) for link in read_links(here).clone if live(here, link)
    ]


def check_unshared(
    folder: str | os.PathLike[str], files: Iterable[str | os.PathLike[str]], *, action: str
) -> None:
    """Refuse to change or remove ``files`` of ``folder`` while a linked clone reads them.

    Backends call this before deleting or merging (committing, streaming) a
    disk layer; ``files`` are absolute or relative to ``folder``.

    Raises:
        StateError: a live clone reads one of the files; names the clone and
            the file.
    """
    here = Path(folder)
    wanted = {os.path.realpath(f if os.path.isabs(f) else here / f): os.fspath(f) for f in files}
    for clone, shared in dependents(here):
        for name in shared:
            if os.path.realpath(here / name) in wanted:
                raise StateError(
                    f"cannot {action}: {name} is the base of the linked clone {clone}; "
                    "delete that clone (or make it a full copy) first",
                    action=action,
                )

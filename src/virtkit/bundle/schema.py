"""machine.toml <-> Machine: the bundle format's keys (see docs/bundle-format.rst).

The file is human-readable TOML with kebab-case keys, sizes written as
``"1GiB"`` where exact, defaults left out, and a ``format-version`` so that
older files are upgraded in memory and newer ones refused::

    format-version = 2
    name = "web"
    uuid = "0b6f..."
    cpus = 2
    memory = "1GiB"

    [[disks]]
    path = "root.qcow2"
    size = "4GiB"
    layers = ["root.s1.qcow2"]

Reading goes through ``cattrs`` (strict types, every error naming its key);
writing builds plain dicts (:func:`machine_to_dict`) that
:mod:`virtkit.bundle.document` renders, preserving a hand-written file's
comments and key order.
"""

from __future__ import annotations

import datetime as _dt
import enum
import uuid as _uuid
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from virtkit.errors import ConfigError
from virtkit.model import (
    CdRom,
    CloudInit,
    CpuTopology,
    Disk,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    Serial,
    Share,
    Snapshot,
)
from virtkit.units import exact_size, parse_size

__all__ = [
    "FORMAT_VERSION",
    "check_version",
    "machine_from_dict",
    "machine_to_dict",
    "snapshot_from_dict",
    "snapshot_to_dict",
]

#: The bundle format this virtkit writes; it reads this and every older one.
FORMAT_VERSION = 2
_SIZE_FIELDS = {"memory", "size"}
#: Fields whose default is generated (a fresh value each time): never left out.
_GENERATED = {(Machine, "uuid"), (Nic, "mac"), (Snapshot, "created_at")}
_MIB = 1024**2


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _strict(kind: type | tuple[type, ...]) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        bad_bool = isinstance(value, bool) and kind in (int, (int, float))
        if not isinstance(value, kind) or bad_bool:
            names = kind.__name__ if isinstance(kind, type) else kind[0].__name__
            raise ConfigError(f"must be {names} (got {type(value).__name__} {value!r})")
        return value

    return hook


def _passthrough(value: Any, _type: Any) -> Any:
    return value


def _path(value: Any, _type: Any) -> Path:
    return Path(_strict(str)(value, str))


def _cpus(value: Any, _type: Any) -> int | CpuTopology:
    if isinstance(value, dict):
        structured: CpuTopology = _converter.structure(value, CpuTopology)
        return structured
    return _strict(int)(value, int)  # type: ignore[no-any-return]


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int))
    conv.register_structure_hook(str, _strict(str))
    conv.register_structure_hook(bool, _strict(bool))
    conv.register_structure_hook(float, _strict((int, float)))
    conv.register_structure_hook(Path, _path)
    conv.register_structure_hook(_uuid.UUID, _passthrough)  # Machine's converter parses it
    conv.register_structure_hook(_dt.datetime, _strict(_dt.datetime))
    conv.register_structure_hook(int | CpuTopology, _cpus)
    # inner classes first: a generated hook captures the hooks of its fields
    classes = (CpuTopology, PortForward, Disk, CdRom, Nic, Serial, CloudInit, KernelBoot, Share)
    for cls in (*classes, Snapshot, Machine):
        overrides: dict[str, Any] = {}
        for f in attrs.fields(cls):
            hook = _passthrough if f.name in _SIZE_FIELDS else None
            overrides[f.name] = override(rename=_kebab(f.name), struct_hook=hook)
        conv.register_structure_hook(
            cls, make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, **overrides)
        )
    return conv


_converter = _make_converter()


# -- writing ----------------------------------------------------------------------------


def _default_of(obj: Any, field: Any) -> Any:
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory(obj) if default.takes_self else default.factory()
    return default


def _value(value: Any, name: str, minimal: bool) -> Any:
    if value is None:
        return None
    if attrs.has(type(value)):
        return _record(value, minimal=minimal)
    if name in _SIZE_FIELDS and isinstance(value, int):
        return exact_size(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (_uuid.UUID, Path)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_value(v, name, minimal) for v in value]
    if isinstance(value, dict):
        return {k: _value(v, name, minimal) for k, v in value.items()}
    return value


def _record(obj: Any, *, minimal: bool) -> dict[str, Any]:
    """One model object as a plain dict; ``minimal`` leaves out values equal to the default."""
    out: dict[str, Any] = {}
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if value is None:
            continue  # TOML has no null: an unset optional field is simply absent
        if (
            minimal
            and field.default is not attrs.NOTHING
            and (type(obj), field.name) not in _GENERATED
            and value == _default_of(obj, field)
        ):
            continue
        out[_kebab(field.name)] = _value(value, field.name, minimal)
    return out


_NAMED = (("disks", "target"), ("cdroms", "target"), ("nics", "name"))


def _automatic_names(machine: Machine) -> dict[str, bool]:
    """Which device lists get exactly their names back when the names are left out."""
    out = {}
    for coll, attr in _NAMED:
        items = getattr(machine, coll)
        bare: dict[str, Any] = {coll: [attrs.evolve(i, **{attr: None}) for i in items]}
        again = getattr(Machine(name="x", **bare), coll)
        out[coll] = [getattr(i, attr) for i in again] == [getattr(i, attr) for i in items]
    return out


def machine_to_dict(machine: Machine, *, minimal: bool = True) -> dict[str, Any]:
    """The TOML document for ``machine`` (``format-version`` first).

    With ``minimal`` (what is written), values equal to their default are left
    out (device names too, when leaving them out assigns the same ones); the
    generated ``uuid`` and MACs are always written. ``minimal=False`` gives
    every value, for comparing against a hand-written file.
    """
    body = _record(machine, minimal=minimal)
    if minimal:
        automatic = _automatic_names(machine)
        for coll, key in _NAMED:
            if automatic[coll]:
                for item in body.get(coll, []):
                    item.pop(key, None)
    return {"format-version": FORMAT_VERSION, **body}


# -- reading ----------------------------------------------------------------------------


def _leaves(exc: BaseException, path: str) -> list[tuple[str, BaseException]]:
    """Flatten a cattrs error tree into (key path, leaf error) pairs."""
    if isinstance(exc, (cattrs.ClassValidationError, cattrs.IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        out: list[tuple[str, BaseException]] = []
        for sub, note in with_notes:
            if isinstance(note, cattrs.IterableValidationNote):
                step = f"{path}[{note.index}]"
            else:
                step = f"{path}.{_kebab(str(note.name))}" if path else _kebab(str(note.name))
            out += _leaves(sub, step)
        for sub in without:
            out += _leaves(sub, path)
        return out
    return [(path, exc)]


def _message(err: BaseException) -> str:
    if isinstance(err, ConfigError):
        return err.message
    if isinstance(err, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(map(_kebab, err.extra_fields)))}"
    if isinstance(err, KeyError):
        return f"required key {_kebab(str(err.args[0]))!r} is missing"
    return f"invalid value ({err})"


def _describe(exc: BaseException, file: str) -> ConfigError:
    """Turn a cattrs error tree into one ConfigError naming the file and key."""
    leaves = _leaves(exc, "")
    path, first = leaves[0]
    if isinstance(first, ConfigError) and first.field:
        # raised by a model validator: its field is relative to the object at `path`
        inner = _kebab(first.field)
        path = f"{path}.{inner}" if path else inner
    text = "; ".join(_message(err) for _, err in leaves)
    return ConfigError(text, file=file, field=path or None)


def check_version(doc: dict[str, Any], *, file: str) -> int:
    """The ``format-version`` of a parsed bundle file (1 or 2).

    Raises:
        ConfigError: missing, not a positive integer, or newer than this virtkit.
    """
    version = doc.get("format-version")
    if version is None:
        raise ConfigError(
            "required key 'format-version' is missing: a hand-written file starts with "
            f"'format-version = {FORMAT_VERSION}' (the bundle format it follows)",
            file=file,
            field="format-version",
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(
            f"'format-version' must be a positive integer (got {version!r})",
            file=file,
            field="format-version",
        )
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"'format-version' is {version}, newer than this virtkit understands "
            f"({FORMAT_VERSION}); upgrade virtkit",
            file=file,
            field="format-version",
        )
    return version


def _upgrade_v1(body: dict[str, Any]) -> dict[str, Any]:
    """A version-1 body in version-2 terms.

    Version 1 had no ``layers``, ``kernel`` or empty CD-ROMs (all additions), and
    took any memory size; QEMU rounded it up to whole MiB, so that is what the
    machine really had and what version 2 records.
    """
    out = dict(body)
    disks = out.get("disks")
    layered = isinstance(disks, list) and any(isinstance(d, dict) and "layers" in d for d in disks)
    if layered or "kernel" in out:
        raise ConfigError("'layers' and 'kernel' need format-version = 2")
    memory = out.get("memory")
    if memory is not None and not isinstance(memory, bool):
        try:
            size = parse_size(memory, field="memory")
        except ConfigError:
            return out  # reported by the model with the right key
        if size % _MIB:
            out["memory"] = (size // _MIB + 1) * _MIB
    return out


def machine_from_dict(doc: dict[str, Any], *, file: str) -> Machine:
    """Build a Machine from a parsed machine.toml (format-version 1 or 2).

    Raises:
        ConfigError: naming ``file`` and the offending key.
    """
    version = check_version(doc, file=file)
    body = {k: v for k, v in doc.items() if k != "format-version"}
    try:
        if version == 1:
            body = _upgrade_v1(body)
        machine: Machine = _converter.structure(body, Machine)
    except (cattrs.BaseValidationError, ConfigError, ValueError, TypeError, KeyError) as exc:
        raise _describe(exc, file) from exc
    return machine


def snapshot_to_dict(snap: Snapshot) -> dict[str, Any]:
    """One snapshot's record for the snapshot index (defaults left out)."""
    return _record(snap, minimal=True)


def snapshot_from_dict(doc: Any, *, file: str) -> Snapshot:
    """Rebuild a snapshot record. Raises ConfigError naming ``file``."""
    try:
        snap: Snapshot = _converter.structure(doc, Snapshot)
    except (cattrs.BaseValidationError, ConfigError, ValueError, TypeError, KeyError) as exc:
        raise _describe(exc, file) from exc
    return snap

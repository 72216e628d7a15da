"""machine.toml <-> Machine, with cattrs.

The file is human-readable TOML with kebab-case keys, sizes written as
``"1GiB"`` where exact, and a ``format-version`` so later versions can
migrate old files and refuse newer ones::

    format-version = 1
    name = "web"
    uuid = "0b6f..."
    cpus = 2
    memory = "1GiB"

    [[disks]]
    path = "root.qcow2"
    size = "4GiB"
"""

from __future__ import annotations

import datetime as _dt
import uuid as _uuid
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from virtkit.errors import ConfigError
from virtkit.model import (
    CdRom,
    CloudInit,
    CpuTopology,
    Disk,
    Machine,
    Nic,
    PortForward,
    Serial,
    Snapshot,
)
from virtkit.units import exact_size

__all__ = [
    "FORMAT_VERSION",
    "machine_from_dict",
    "machine_to_dict",
    "snapshot_from_dict",
    "snapshot_to_dict",
]

FORMAT_VERSION = 1
_SIZE_FIELDS = {"memory", "size"}


def _size_text(value: int | None) -> int | str | None:
    return None if value is None else exact_size(value)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _strict(kind: type) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"must be {kind.__name__} (got {type(value).__name__} {value!r})")
        return value

    return hook


def _passthrough(value: Any, _type: Any) -> Any:
    return value


def _cpus(value: Any, _type: Any) -> int | CpuTopology:
    if isinstance(value, dict):
        structured: CpuTopology = _converter.structure(value, CpuTopology)
        return structured
    return _strict(int)(value, int)  # type: ignore[no-any-return]


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, omit_if_default=False)
    conv.register_structure_hook(int, _strict(int))
    conv.register_structure_hook(str, _strict(str))
    conv.register_structure_hook(bool, _strict(bool))
    conv.register_structure_hook(float, _strict((int, float)))  # type: ignore[arg-type]
    conv.register_structure_hook(_uuid.UUID, _passthrough)  # Machine's converter parses it
    conv.register_unstructure_hook(_uuid.UUID, str)
    conv.register_structure_hook(_dt.datetime, _strict(_dt.datetime))
    conv.register_unstructure_hook(_dt.datetime, lambda d: d)
    conv.register_structure_hook(int | CpuTopology, _cpus)
    conv.register_unstructure_hook(
        int | CpuTopology, lambda v: v if isinstance(v, int) else conv.unstructure(v)
    )
    # inner classes first: a generated hook captures the hooks of its fields
    for cls in (CpuTopology, PortForward, Disk, CdRom, Nic, Serial, CloudInit, Snapshot, Machine):
        fields = attrs.fields(cls)
        struct_overrides: dict[str, Any] = {}
        unstruct_overrides: dict[str, Any] = {}
        for f in fields:
            if f.name in _SIZE_FIELDS:
                struct_overrides[f.name] = override(rename=_kebab(f.name), struct_hook=_passthrough)
                unstruct_overrides[f.name] = override(
                    rename=_kebab(f.name), unstruct_hook=_size_text
                )
            else:
                struct_overrides[f.name] = override(rename=_kebab(f.name))
                unstruct_overrides[f.name] = override(rename=_kebab(f.name))
        conv.register_structure_hook(
            cls,
            make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, **struct_overrides),
        )
        conv.register_unstructure_hook(
            cls, make_dict_unstructure_fn(cls, conv, **unstruct_overrides)
        )
    return conv


_converter = _make_converter()


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave unset optional fields out."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def machine_to_dict(machine: Machine) -> dict[str, Any]:
    """The TOML document for ``machine`` (``format-version`` first)."""
    body = _drop_none(_converter.unstructure(machine, Machine))
    if not body.get("labels"):
        body.pop("labels", None)
    return {"format-version": FORMAT_VERSION, **body}


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


def machine_from_dict(doc: dict[str, Any], *, file: str) -> Machine:
    """Build a Machine from a parsed machine.toml, checking its format-version.

    Raises:
        ConfigError: naming ``file`` and the offending key.
    """
    version = doc.get("format-version")
    if version is None:
        raise ConfigError(
            "required key 'format-version' is missing", file=file, field="format-version"
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
    body = {k: v for k, v in doc.items() if k != "format-version"}
    try:
        machine: Machine = _converter.structure(body, Machine)
    except (cattrs.BaseValidationError, ConfigError, ValueError, TypeError, KeyError) as exc:
        raise _describe(exc, file) from exc
    return machine


def snapshot_to_dict(snap: Snapshot) -> dict[str, Any]:
    """One snapshot's record for the snapshot index."""
    result: dict[str, Any] = _drop_none(_converter.unstructure(snap, Snapshot))
    return result


def snapshot_from_dict(doc: Any, *, file: str) -> Snapshot:
    """Rebuild a snapshot record. Raises ConfigError naming ``file``."""
    try:
        snap: Snapshot = _converter.structure(doc, Snapshot)
    except (cattrs.BaseValidationError, ConfigError, ValueError, TypeError, KeyError) as exc:
        raise _describe(exc, file) from exc
    return snap

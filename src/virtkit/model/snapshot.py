"""Snapshot records: what was captured, when, and the tree they form."""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

import attrs

from virtkit.errors import ConfigError
from virtkit.model._validate import call_errors_are_config_errors, instance_of, optional_str
from virtkit.model.enums import SnapshotKind, State

__all__ = ["Snapshot"]


def _snapshot_name(_inst: Any, attribute: Any, value: Any) -> None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 128
        or value.strip() != value
        or any(c in value for c in "/\\\0\n\r")
        or value in (".", "..")
    ):
        raise ConfigError(
            f"'{attribute.name}' must be 1-128 characters without slashes, line breaks "
            f"or surrounding spaces (got {value!r})",
            field=attribute.name,
            value=value,
        )


def _utc(value: Any) -> _dt.datetime:
    if not isinstance(value, _dt.datetime):
        raise ConfigError(
            f"'created_at' must be a datetime (got {value!r})", field="created_at", value=value
        )
    if value.tzinfo is None:
        return value.replace(tzinfo=_dt.UTC)
    return value.astimezone(_dt.UTC)


def _kind(value: Any) -> SnapshotKind:
    try:
        return SnapshotKind(value)
    except ValueError:
        raise ConfigError(
            f"'kind' must be 'disk' or 'full' (got {value!r})", field="kind", value=value
        ) from None


def _state(value: Any) -> State:
    try:
        return State(value)
    except ValueError:
        allowed = ", ".join(repr(s.value) for s in State)
        raise ConfigError(
            f"'state' must be one of {allowed} (got {value!r})", field="state", value=value
        ) from None


_TARGET_RE = re.compile(r"^[a-z][a-z0-9]{1,15}$")


def _convert_layers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(
            f"'layers' must be a dict of disk target to layer file (got {value!r})",
            field="layers",
            value=value,
        )
    for target, path in value.items():
        if not isinstance(target, str) or not _TARGET_RE.match(target):
            raise ConfigError(
                f"'layers' keys must be disk targets like 'vda' (got {target!r})",
                field=f"layers[{target!r}]",
                value=target,
            )
        if not isinstance(path, str) or not path or any(c in path for c in "\0\n\r"):
            raise ConfigError(
                f"'layers' values must be file paths without NUL or line breaks "
                f"(got {path!r} for {target!r})",
                field=f"layers[{target!r}]",
                value=path,
            )
    return dict(sorted(value.items()))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


@call_errors_are_config_errors
@attrs.frozen
class Snapshot:
    """A point-in-time capture of a guest.

    Args:
        name: unique per guest.
        kind: ``SnapshotKind.DISK`` (disks only) or ``SnapshotKind.FULL``
            (disks, RAM, CPU and devices).
        state: the run state when taken; reverting restores it (a snapshot
            taken while running reverts to running, as libvirt does).
        created_at: when it was taken (UTC).
        parent: the snapshot this one was taken on top of, if any.
        description: free text.
        layers: disk target -> layer file (relative to the folder's
            ``disks/``): the file a disk-only snapshot froze, or the layer
            that holds a full snapshot's internal state.
    """

    name: str = attrs.field(validator=_snapshot_name)
    kind: SnapshotKind = attrs.field(default=SnapshotKind.FULL, converter=_kind)
    state: State = attrs.field(default=State.SHUTOFF, converter=_state)
    created_at: _dt.datetime = attrs.field(factory=_now, converter=_utc)
    parent: str | None = attrs.field(default=None, validator=optional_str)
    description: str = attrs.field(default="", validator=instance_of(str))
    layers: dict[str, str] = attrs.field(factory=dict, converter=_convert_layers, hash=False)

"""Checks for arguments handed to the public image calls (and reused by the layers above).

Each check raises :class:`virtkit.ConfigError` naming the argument, what it
must be and what it got, before the value reaches the operating system or a
format driver, where it would fail as a ``TypeError``, ``ValueError`` or
``OverflowError`` with no hint of which argument was wrong.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any

from virtkit.errors import ConfigError

__all__ = [
    "check_bool",
    "check_bytes",
    "check_callable",
    "check_choice",
    "check_int",
    "check_name",
    "check_path",
    "check_timeout",
]


def _kind(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:200]


def check_path(value: object, field: str = "path") -> str:
    """Return ``value`` as a ``str`` path: a non-empty ``str`` or ``os.PathLike`` without NUL.

    Raises:
        ConfigError: anything else (bytes paths, ints, which ``open()`` would
            take as a file descriptor, None, ...).
    """
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise ConfigError(
            f"'{field}' must be a file path (str or os.PathLike) (got {_kind(value)})",
            field=field,
            value=value,
        )
    if not path:
        raise ConfigError(f"'{field}' must not be empty", field=field, value=value)
    if "\0" in path:
        raise ConfigError(
            f"'{field}' must not contain a NUL byte (got {path!r})", field=field, value=value
        )
    return path


def check_bool(value: object, field: str) -> bool:
    """Return ``value`` if it is a ``bool``.

    A switch given ``"no"`` or ``0`` is refused rather than read as truthy or
    falsy: ``writable="no"`` would otherwise open an image for writing.

    Raises:
        ConfigError: anything but True or False.
    """
    if not isinstance(value, bool):
        raise ConfigError(
            f"'{field}' must be True or False (got {_kind(value)})", field=field, value=value
        )
    return value


def check_choice(value: object, allowed: tuple[str, ...], field: str) -> str:
    """Return ``value`` if it is one of the strings in ``allowed``.

    Raises:
        ConfigError: anything else, naming the choices.
    """
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(
            f"'{field}' must be one of {', '.join(allowed)} (got {value!r})",
            field=field,
            value=value,
        )
    return value


def check_int(value: object, field: str) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``).

    Raises:
        ConfigError: a float, str, bool, None...
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"'{field}' must be an int (got {_kind(value)})", field=field, value=value
        )
    return value


def check_bytes(value: object, field: str = "data") -> memoryview:
    """Return a byte view of a bytes-like ``value`` (bytes, bytearray, memoryview...).

    Raises:
        ConfigError: a str, int, list... or a non-contiguous buffer.
    """
    if isinstance(value, str):
        raise ConfigError(
            f"'{field}' must be bytes-like, not str (encode it first) (got {_kind(value)})",
            field=field,
        )
    try:
        return memoryview(value).cast("B")  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"'{field}' must be a contiguous bytes-like object (got {_kind(value)}: {exc})",
            field=field,
        ) from exc


def check_name(value: object, field: str = "name") -> str:
    """Return ``value`` if it is a non-empty ``str`` without NUL bytes.

    Raises:
        ConfigError: anything else.
    """
    if not isinstance(value, str):
        raise ConfigError(f"'{field}' must be a str (got {_kind(value)})", field=field, value=value)
    if not value:
        raise ConfigError(f"'{field}' must not be empty", field=field, value=value)
    if "\0" in value:
        raise ConfigError(
            f"'{field}' must not contain a NUL byte (got {value!r})", field=field, value=value
        )
    return value


def check_callable(value: object, field: str) -> Callable[..., Any] | None:
    """Return ``value`` if it is None or callable.

    Raises:
        ConfigError: anything else.
    """
    if value is not None and not callable(value):
        raise ConfigError(f"'{field}' must be a callable or None (got {_kind(value)})", field=field)
    return value


def check_timeout(value: object, field: str = "timeout") -> float | None:
    """Return a timeout in seconds, or None to wait forever.

    None, ``inf`` and values too large for a lock wait mean "no limit".

    Raises:
        ConfigError: a bool, str, NaN or negative number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"'{field}' must be a number of seconds or None (got {_kind(value)})",
            field=field,
            value=value,
        )
    seconds = float(value) if isinstance(value, float) or abs(value) < 2**53 else value * math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ConfigError(
            f"'{field}' must be a number of seconds >= 0 or None (got {value!r})",
            field=field,
            value=value,
        )
    return None if seconds >= threading.TIMEOUT_MAX else seconds

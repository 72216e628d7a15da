"""Validators and converters shared by the model classes.

Each raises :class:`virtkit.ConfigError` naming the field, the bad value and
what is allowed, so ``Machine(memory=0)`` says exactly what to fix.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from virtkit.errors import ConfigError

T = TypeVar("T")

DNS_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def one_of(allowed: Collection[str]) -> Callable[[Any, Any, Any], None]:
    """attrs validator: the value must be one of ``allowed``."""

    def check(_inst: Any, attribute: Any, value: Any) -> None:
        if value not in allowed:
            raise ConfigError(
                f"'{attribute.name}' must be one of {', '.join(map(repr, sorted(allowed)))} "
                f"(got {value!r})",
                field=attribute.name,
                value=value,
            )

    return check


def instance_of(kind: type | tuple[type, ...]) -> Callable[[Any, Any, Any], None]:
    """attrs validator: ``isinstance`` with a ConfigError naming the field."""

    def check(_inst: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) and kind is not bool and kind != (bool,):
            ok = False
        else:
            ok = isinstance(value, kind)
        if not ok:
            names = (
                " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            )
            raise ConfigError(
                f"'{attribute.name}' must be {names} (got {type(value).__name__} {value!r})",
                field=attribute.name,
                value=value,
            )

    return check


def optional_str(_inst: Any, attribute: Any, value: Any) -> None:
    """attrs validator: ``None`` or a string without NUL/newlines."""
    if value is None:
        return
    plain_str(_inst, attribute, value)


def plain_str(_inst: Any, attribute: Any, value: Any) -> None:
    """attrs validator: a non-empty string without NUL or line breaks."""
    if not isinstance(value, str):
        raise ConfigError(
            f"'{attribute.name}' must be a string (got {type(value).__name__} {value!r})",
            field=attribute.name,
            value=value,
        )
    if not value:
        raise ConfigError(
            f"'{attribute.name}' must not be empty", field=attribute.name, value=value
        )
    if any(c in value for c in "\0\n\r"):
        raise ConfigError(
            f"'{attribute.name}' must not contain NUL or line breaks (got {value!r})",
            field=attribute.name,
            value=value,
        )


def dns_label(_inst: Any, attribute: Any, value: Any) -> None:
    """attrs validator: a DNS label (1-63 of letters, digits, inner hyphens)."""
    if not isinstance(value, str) or not DNS_LABEL_RE.match(value):
        raise ConfigError(
            f"'{attribute.name}' must be a DNS label: 1-63 letters, digits or hyphens, "
            f"not starting or ending with a hyphen (got {value!r})",
            field=attribute.name,
            value=value,
        )


def tuple_of(kind: type[T], field: str) -> Callable[[Any], tuple[T, ...]]:
    """attrs converter: any iterable of ``kind`` -> tuple, rejecting other items."""

    def convert(value: Any) -> tuple[T, ...]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(
                f"'{field}' must be a list of {kind.__name__} (got {value!r})",
                field=field,
                value=value,
            )
        items = tuple(value)
        for i, item in enumerate(items):
            if not isinstance(item, kind):
                raise ConfigError(
                    f"'{field}[{i}]' must be a {kind.__name__} "
                    f"(got {type(item).__name__} {item!r})",
                    field=f"{field}[{i}]",
                    value=item,
                )
        return items

    return convert


def int_range(low: int, high: int) -> Callable[[Any, Any, Any], None]:
    """attrs validator: an int (not bool) in ``[low, high]``."""

    def check(_inst: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"'{attribute.name}' must be an integer from {low} to {high} (got {value!r})",
                field=attribute.name,
                value=value,
            )

    return check


_UNEXPECTED_RE = re.compile(r"unexpected keyword argument '([^']+)'")
_MISSING_RE = re.compile(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.+)$")
_C = TypeVar("_C", bound=type)


def call_errors_are_config_errors(cls: _C) -> _C:
    """Class decorator: ``cls(bogus=1)`` or a missing argument is a ConfigError naming it.

    Python reports a bad call signature as a bare ``TypeError``; this turns it
    (and any other ``TypeError`` from construction) into a :class:`ConfigError`
    with ``field`` set, as every other wrong value is reported.
    """
    init: Callable[..., None] = cls.__dict__["__init__"]
    fields = ", ".join(a.name for a in getattr(cls, "__attrs_attrs__", ()))

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except TypeError as exc:
            text = str(exc)
            if found := _UNEXPECTED_RE.search(text):
                name = found.group(1)
                raise ConfigError(
                    f"{cls.__name__} has no field {name!r}; fields: {fields}", field=name
                ) from None
            if found := _MISSING_RE.search(text):
                names = found.group(1).replace("'", "")
                first = names.split(",")[0].split(" ")[0]
                message = f"{cls.__name__} needs a value for {names}"
                raise ConfigError(message, field=first) from None
            raise ConfigError(f"{cls.__name__}: {text}") from exc

    setattr(cls, "__init__", __init__)  # noqa: B010 - mypy refuses assigning to a method
    return cls

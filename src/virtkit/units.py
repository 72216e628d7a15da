"""Byte sizes written the way QEMU and libvirt users write them (shared by model and images)."""

from __future__ import annotations

import re

from virtkit.errors import ConfigError

__all__ = ["BINARY_UNITS", "exact_size", "format_size", "parse_size"]

# Binary by default, as qemu-img reads "10G"; libvirt's "KB"/"MB"/"GB" are decimal.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
    "p": 1024**5,
    "pib": 1024**5,
    "pb": 1000**5,
    "e": 1024**6,
    "eib": 1024**6,
    "eb": 1000**6,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, *, field: str = "size") -> int:
    """Turn ``"512MiB"``, ``"2G"``, ``"1.5GiB"`` or an int into a byte count.

    ``K``/``M``/``G``/``T`` and ``KiB``... are binary (as qemu-img and libvirt
    read them); ``KB``/``MB``/``GB`` are decimal (as libvirt reads them).

    Raises:
        ConfigError: the value is not a non-negative whole number of bytes.
    """
    if isinstance(value, bool):
        raise ConfigError(f"'{field}' must be a size, not a bool (got {value!r})", field=field)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"'{field}' must not be negative (got {value})", field=field)
        return value
    if not isinstance(value, str):
        raise ConfigError(
            f"'{field}' must be an int or a string like '512MiB' (got {value!r})",
            field=field,
            value=value,
        )
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"'{field}' must be a size like 512MiB, 2G or 4096 (got {value!r}); "
            "units: K, M, G, T, P, E, KiB..EiB (binary), KB..EB (decimal)",
            field=field,
            value=value,
        )
    number: str = match.group(1)
    scale: int = _UNITS[unit]
    if "." in number:
        whole, frac = number.split(".")
        numerator = int(whole + frac) * scale
        denominator = 10 ** len(frac)
        if numerator % denominator:
            raise ConfigError(
                f"'{field}' is not a whole number of bytes (got {value!r})",
                field=field,
                value=value,
            )
        result: int = numerator // denominator
        return result
    return int(number) * scale


#: binary units, largest first
BINARY_UNITS: tuple[tuple[str, int], ...] = (
    ("EiB", 1024**6),
    ("PiB", 1024**5),
    ("TiB", 1024**4),
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
)


def format_size(size: int) -> str:
    """Render a byte count the short binary way (``"1 GiB"``, ``"1.5 MiB"``)."""
    for unit, scale in BINARY_UNITS:
        if size >= scale:
            text = f"{size / scale:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    return f"{size} B"


def exact_size(size: int) -> int | str:
    """The largest binary unit that divides ``size`` exactly (``"4GiB"``), else the int.

    ``parse_size(exact_size(n)) == n`` always holds, so config files stay exact.
    """
    for unit, scale in BINARY_UNITS:
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return size

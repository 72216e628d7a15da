"""The options the ``virtkit image`` commands share, spelled as qemu-img spells them."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from virtkit.errors import ConfigError, ImageError

__all__ = [
    "OPTIONS",
    "PROGRESS",
    "QUIET",
    "SHARE",
    "as_format",
    "check_parent",
    "fmt_option",
    "parse_options",
]

F = TypeVar("F", bound=Callable[..., Any])


def as_format(fmt: str | None) -> Any:
    """A format name from the command line; virtkit.images checks it (and names the choices)."""
    return fmt


#: -o options that are switches: on/off (or true/false), nothing else.
_SWITCHES = ("lazy_refcounts", "extended_l2", "force_size")
#: qemu-img's -o spelling -> virtkit.images keyword
_OPTION_NAMES = {"backing_file": "backing", "backing_fmt": "backing_format"}
_INT_OPTIONS = ("refcount_bits",)


def parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    """Turn qemu-img ``-o a=b,c=d`` (repeatable) into keyword arguments.

    Raises:
        ConfigError: an item is not ``key=value`` or a switch is not on/off.
    """
    out: dict[str, Any] = {}
    for value in values:
        for pair in value.split(","):
            if not pair:
                continue
            key, sep, raw = pair.partition("=")
            name = key.strip().replace("-", "_")
            if not sep or not name:
                raise ConfigError(f"-o expects key=value (got {pair!r})", field="-o")
            lowered = raw.lower()
            if name in _SWITCHES:
                if lowered not in ("on", "off", "true", "false"):
                    raise ConfigError(f"-o {key} takes on or off (got {raw!r})", field=key)
                out[name] = lowered in ("on", "true")
                continue
            if name in _INT_OPTIONS:
                if not raw.isdigit():
                    raise ConfigError(f"-o {key} takes a number (got {raw!r})", field=key)
                out[name] = int(raw)
                continue
            out[_OPTION_NAMES.get(name, name)] = raw
    return out


def fmt_option(
    help_text: str = "Image format (probed from the file when omitted).",
) -> Callable[[F], F]:
    """The ``-f FMT`` option, with ``help_text``."""
    return click.option("-f", "fmt", metavar="FMT", default=None, help=help_text)


#: ``-U``: open an image another process holds (read-only uses)
SHARE = click.option(
    "-U",
    "--force-share",
    "force_share",
    is_flag=True,
    help="Open the image even if another process (a running VM) holds it.",
)
#: ``-q``: print nothing but errors
QUIET = click.option("-q", "quiet", is_flag=True, help="Print nothing but errors.")
#: ``-p``: a progress bar on a terminal
PROGRESS = click.option(
    "-p", "progress", is_flag=True, help="Show a progress bar (on a terminal, on stderr)."
)
#: ``-o KEY=VALUE[,...]``: format options, repeatable
OPTIONS = click.option(
    "-o",
    "options",
    metavar="KEY=VALUE[,...]",
    multiple=True,
    help="Format options, as qemu-img -o (cluster_size, compat, refcount_bits, "
    "lazy_refcounts, extended_l2, preallocation, compression_type, backing_file...).",
)


def check_parent(path: str, what: str) -> None:
    """Refuse early when ``path``'s folder is missing, naming ``path`` (not a temp file)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ImageError(f"cannot create {what}: the folder {folder} does not exist", path=path)

"""How the ``virtkit`` command prints: qemu-img's human sizes, JSON, errors.

Data goes to stdout (human text, or JSON shaped like ``qemu-img
--output=json``); diagnostics and progress go to stderr, so a script can
parse stdout whatever else happens.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import click

__all__ = ["OUTPUT", "emit_json", "error", "human_bool", "human_size", "warn"]

_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")

#: the ``--output`` option of the commands that print data, as qemu-img spells it
OUTPUT = click.option(
    "--output",
    "output",
    type=click.Choice(["human", "json"]),
    default="human",
    show_default=True,
    help="Output format: human-readable text, or JSON shaped like qemu-img's.",
)


def human_size(size: int) -> str:
    """A byte count the way qemu-img prints it: three significant digits, binary units.

    >>> human_size(1073741824), human_size(331776), human_size(0), human_size(1536)
    ('1 GiB', '324 KiB', '0 B', '1.5 KiB')
    """
    if size <= 0:
        return "0 B"
    # the unit is chosen so that the number stays below 1000 (qemu's size_to_str)
    _, exp = math.frexp(size / (1000.0 / 1024.0))
    index = min(max((exp - 1) // 10, 0), len(_SUFFIXES) - 1)
    value = size / (1 << (index * 10))
    return f"{value:.3g} {_SUFFIXES[index]}B"


def human_bool(value: Any) -> str:
    """``true``/``false`` for booleans (as qemu-img prints them), ``str()`` otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_EMPTY = re.compile(r"^( *)(.*)(\[\]|\{\})(,?)$", re.M)


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout, byte for byte as qemu-img does.

    qemu-img writes an empty list or object over two lines (``[`` then ``]``).
    """
    text = json.dumps(data, indent=4)
    text = _EMPTY.sub(lambda m: f"{m[1]}{m[2]}{m[3][0]}\n{m[1]}{m[3][1]}{m[4]}", text)
    click.echo(text)


def error(message: str) -> None:
    """Print one ``virtkit: error: ...`` line on stderr."""
    click.echo(f"virtkit: error: {message}", file=sys.stderr)


def warn(message: str) -> None:
    """Print one ``virtkit: warning: ...`` line on stderr."""
    click.echo(f"virtkit: warning: {message}", file=sys.stderr)

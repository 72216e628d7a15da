"""Rendering bundle files with ``tomlkit``: hand edits survive a save.

A ``machine.toml`` is meant to be written and edited by people. Saving a
changed machine therefore *merges* the new values into the file as it is:

* a key whose meaning did not change is left exactly as written (its
  spelling such as ``memory = "1G"``, its comment, its place);
* a changed key is replaced in place, keeping its comment and position;
* a key that is no longer set is removed; a new key is added after the key
  that precedes it in virtkit's order (or after the table's last plain key,
  never after comments that introduce what follows), and only when it differs
  from the default;
* arrays of tables (``[[disks]]``...) are matched by position.

Strings holding line breaks (cloud-init user-data) are written as multi-line
strings. Whatever the merge produces is parsed back and compared with the
machine; if it does not give exactly that machine (a file tomlkit cannot
edit cleanly), a fresh minimal document is written instead, so the file is
never wrong, only occasionally less pretty.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomli_w
import tomlkit
import tomlkit.exceptions
from tomlkit.container import Container
from tomlkit.items import AoT, Array, InlineTable, Item, Table

from virtkit.errors import VirtkitError
from virtkit.units import parse_size

__all__ = ["fresh", "merge_text", "plain", "to_item"]

_SIZE_KEYS = {"memory", "size"}


def _string(value: str) -> Item:
    """Line breaks make a multi-line string, opened on its own line as people write it."""
    if "\n" in value and "\r" not in value:
        text = tomlkit.string(value, multiline=True).as_string()
        if value.startswith("\n"):
            return tomlkit.string(value, multiline=True)  # tomlkit already opens a line
        # TOML drops a newline right after the opening quotes: same value, easier to read
        parsed: Item = tomlkit.parse(f'v = """\n{text[3:]}\n')["v"]
        return parsed
    return tomlkit.item(value)


def to_item(value: Any, *, top: bool = False) -> Any:
    """A TOML item for a plain value; lists of dicts become ``[[tables]]`` at the top level."""
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        table = tomlkit.table() if top else tomlkit.inline_table()
        for key, sub in value.items():
            table.append(key, to_item(sub))
        return table
    if isinstance(value, list):
        if top and value and all(isinstance(v, Mapping) for v in value):
            aot = tomlkit.aot()
            for sub in value:
                aot.append(to_item(sub, top=True))
            return aot
        array = tomlkit.array()
        array.extend(to_item(v) for v in value)
        return array
    return tomlkit.item(value)


def fresh(doc: Mapping[str, Any]) -> str:
    """A new document: plain keys first, then tables and arrays of tables."""
    out = tomlkit.document()
    tables = []
    for key, value in doc.items():
        item = to_item(value, top=True)
        if isinstance(item, (Table, AoT)):
            tables.append((key, item))
        else:
            out.append(key, item)
    for key, item in tables:
        out.add(tomlkit.nl())
        out.append(key, item)
    return tomlkit.dumps(out)


def _plain(value: Any) -> Any:
    unwrap = getattr(value, "unwrap", None)
    return unwrap() if unwrap is not None else value


def _same(key: str, old: Any, new: Any) -> bool:
    old = _plain(old)
    if old == new and type(old) is type(new):
        return True
    if key in _SIZE_KEYS:
        try:
            return parse_size(old, field=key) == parse_size(new, field=key)
        except (ValueError, TypeError, ArithmeticError, VirtkitError):
            return False
    return False


def _container(table: Any) -> Container | None:
    if isinstance(table, Container):
        return table
    if isinstance(table, Table):
        return table.value
    return None


def _plain_keys(container: Container) -> list[tuple[int, str]]:
    """(body index, key) of each plain key/value (not a table, array of tables or comment)."""
    return [
        (i, key.key)
        for i, (key, item) in enumerate(container.body)
        if key is not None and not isinstance(item, (Table, AoT))
    ]


def _add(table: Any, key: str, value: Any, *, top: bool, after: str | None) -> None:
    """Add ``key`` after the plain key ``after`` (the one before it in virtkit's order), else
    after the last plain key: never after trailing comments, which belong to what follows."""
    item = to_item(value, top=top)
    container = _container(table)
    if container is not None and not isinstance(item, (Table, AoT)):
        plain_keys = _plain_keys(container)
        spots = [i for i, k in plain_keys if k == after] or [i for i, _ in plain_keys[-1:]]
        # tomlkit has no public "insert at"; without its private one (or at the very end of
        # the body) a plain append still lands before the sub-tables
        insert_at = getattr(container, "_insert_at", None)
        if spots and insert_at is not None and spots[0] + 1 < len(container.body):
            insert_at(spots[0] + 1, key, item)
            return
    if isinstance(item, (Table, AoT)) and container is not None:
        container.append(None, tomlkit.nl())
    table[key] = item


def _merge_list(old: Any, minimal: list[Any], full: list[Any]) -> bool:
    """Merge a list of tables element by element; False when it must be replaced whole."""
    if not isinstance(old, (AoT, Array)) or not all(isinstance(v, Mapping) for v in full):
        return False
    if not all(isinstance(v, (Table, InlineTable)) for v in old):
        return False
    while len(old) > len(full):
        del old[len(old) - 1]
    for i, (min_v, full_v) in enumerate(zip(minimal, full, strict=True)):
        if i < len(old):
            merge(old[i], min_v, full_v)
        elif isinstance(old, AoT):
            table = to_item(min_v, top=True)
            old.append(table)
        else:
            old.append(to_item(min_v))
    return True


def merge(table: Any, minimal: Mapping[str, Any], full: Mapping[str, Any]) -> None:
    """Make ``table`` (a tomlkit document or table) say ``full``, touching only what differs.

    ``minimal`` is ``full`` without the values equal to their defaults: a key
    only in ``full`` is at its default, so it is kept if the file already says
    exactly that, and otherwise removed rather than spelled out.
    """
    top = isinstance(table, Container)
    for key in [k for k in table if k not in full]:
        del table[key]
    before: str | None = None  # the last plain key seen, in virtkit's order
    for key, full_v in full.items():
        if key not in table:
            if key in minimal:
                _add(table, key, minimal[key], top=top, after=before)
                before = key if not isinstance(minimal[key], (Mapping, list)) else before
            continue
        if not isinstance(table[key], (Table, AoT)):
            before = key
        old = table[key]
        if key not in minimal:
            if not _same(key, old, full_v):
                del table[key]
            continue
        min_v = minimal[key]
        if isinstance(full_v, Mapping) and isinstance(old, (Table, InlineTable)):
            merge(old, min_v, full_v)
        elif isinstance(full_v, list) and full_v and isinstance(full_v[0], Mapping):
            if not _merge_list(old, list(min_v), full_v):
                table[key] = to_item(min_v, top=top)
        elif not _same(key, old, full_v):
            table[key] = to_item(min_v)


def merge_text(text: str, minimal: Mapping[str, Any], full: Mapping[str, Any]) -> str | None:
    """``text`` (a TOML document) changed to say ``full``; None when it cannot be parsed."""
    try:
        doc = tomlkit.parse(text)
    except (tomlkit.exceptions.TOMLKitError, ValueError, RecursionError):
        return None
    merge(doc, minimal, full)
    return tomlkit.dumps(doc)


def plain(doc: Mapping[str, Any]) -> str:
    """The document in tomli-w's plain style (no multi-line strings): the last resort."""
    return tomli_w.dumps(dict(doc))

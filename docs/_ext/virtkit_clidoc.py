"""``.. virtkit-cli::`` renders the `virtkit` command reference from the click commands.

The reference is generated from the CLI itself at build time, so it always
says what the code does: every group and command gets a section with its
usage line, its help text and a list of its options.
"""

from __future__ import annotations

import re
from typing import Any

import click
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

_UNDERLINES = "~^\"'+#"
_SPECIAL = re.compile(r"([\\`*_|])")


def _escape(text: str) -> str:
    return _SPECIAL.sub(r"\\\1", text)


def _render(cmd: click.Command, ctx: click.Context, depth: int, out: list[str]) -> None:
    title = ctx.command_path
    out += [title, _UNDERLINES[min(depth, len(_UNDERLINES) - 1)] * len(title), ""]
    out += ["::", "", "    " + cmd.get_usage(ctx), ""]
    for paragraph in (cmd.help or "").split("\n\n"):
        text = " ".join(line.strip() for line in paragraph.splitlines() if line.strip())
        if text:
            out += [_escape(text), ""]
    options = [
        p.get_help_record(ctx)
        for p in cmd.get_params(ctx)
        if isinstance(p, click.Option) and not p.hidden
    ]
    records = [r for r in options if r is not None]
    if records:
        out += ["Options:", ""]
        for names, help_text in records:
            out += [f"``{names}``", f"    {_escape(help_text) or '-'}", ""]
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            _render(sub, click.Context(sub, info_name=name, parent=ctx), depth + 1, out)


class VirtkitCli(SphinxDirective):
    """Insert the reference of the whole `virtkit` command."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from virtkit.cli import cli  # imported late: the docs build imports the package

        lines: list[str] = []
        root = click.Context(cli, info_name="virtkit")
        _render(cli, root, 1, lines)
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="virtkit.cli"), node)
        return list(node.children)


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the directive."""
    app.add_directive("virtkit-cli", VirtkitCli)
    return {"parallel_read_safe": True, "version": "1"}

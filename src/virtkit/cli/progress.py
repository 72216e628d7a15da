"""Progress bars for long commands: rich, on stderr, only on a terminal.

A command asks :func:`progress_bar` for a ``progress(done, total)`` callback
(the signature every long virtkit call takes). On a TTY it draws a bar with
the byte rate and the time left; otherwise (a pipe, a log file, JSON output)
it draws nothing, so machine-read output is never mixed with bars.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["ProgressCallback", "progress_bar"]

ProgressCallback = Callable[[int, int], None]


def _noop(done: int, total: int) -> None:
    del done, total


@contextmanager
def progress_bar(label: str, *, enabled: bool = True) -> Iterator[ProgressCallback]:
    """Yield a ``progress(done, total)`` callback drawing a bar on stderr.

    Args:
        label: what is being done (``"convert"``), shown left of the bar.
        enabled: whether the user asked for progress (``-p``); even then the
            bar is drawn only when stderr is a terminal.
    """
    if not enabled or not sys.stderr.isatty():
        yield _noop
        return
    # rich is imported only when a bar is drawn: it is most of the CLI's own start-up time
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update

"""The ``virtkit`` command: a thin shell over the public API (click).

::

    virtkit image info|create|check|convert|snapshot|resize|rebase|commit|
                  measure|compare|map|amend|dd ...     (qemu-img's flags and JSON)
    virtkit vm list|show|define|undefine|start|stop|kill|pause|resume|reset|
               console|snapshot|run ...                (virsh's verbs)

``virtkit --help`` and ``virtkit COMMAND --help`` describe every command and
option; the full reference is generated from this code into the docs.

Exit status: 0 on success; 1 when virtkit reports an error (one line on
stderr, no traceback); 2 for a usage error; ``image check`` returns 2 for
corruptions and 3 for leaks, ``image compare`` 1 when the images differ and
2 on error, as qemu-img does; 130 after Ctrl-C and 143 after SIGTERM (temp
files and runtime folders are removed first; destinations are untouched).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from types import FrameType
from typing import Any

import click

from virtkit.cli.image import image
from virtkit.cli.output import error, warn
from virtkit.cli.vm import vm
from virtkit.errors import VirtkitError

__all__ = ["Interrupted", "cli", "main"]


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM so that cleanup code runs.

    A BaseException (like KeyboardInterrupt), so ``except Exception`` blocks
    do not swallow it; every ``finally`` and context manager on the way out
    removes what it created.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it."""
        return 128 + self.signum


def _version() -> str:
    try:
        return metadata.version("virtkit")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
        return "unknown"


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    no_args_is_help=True,
)
@click.version_option(_version(), "-V", "--version", prog_name="virtkit")
def cli() -> None:
    """Virtual machines and disk images, from the shell.

    `virtkit image` speaks qemu-img (same flags, exit codes and JSON);
    `virtkit vm` speaks virsh (list, start, stop, console, snapshot...).
    """


cli.add_command(image)
cli.add_command(vm)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    del frame
    # one signal is enough: ignore further ones while the cleanup runs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def _signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    del category, filename, lineno, file, line
    warn(str(message))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``virtkit`` command; return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with _signals(), warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one "virtkit: warning:" line each
            try:
                result: Any = cli.main(args, prog_name="virtkit", standalone_mode=False)
            except KeyboardInterrupt as exc:  # a Ctrl-C arriving outside our handler
                raise Interrupted(signal.SIGINT) from exc
    except Interrupted as exc:
        name = "interrupted" if exc.signum == signal.SIGINT else "terminated"
        click.echo(f"virtkit: {name}", file=sys.stderr)
        return exc.exit_status
    except click.exceptions.Abort:
        click.echo("virtkit: aborted", file=sys.stderr)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except VirtkitError as exc:
        error(str(exc))
        return 1
    except BrokenPipeError:
        return 1
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0

"""Shared by the locking tests: child processes that hold images, and waiting for their locks."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from virtkit.images import locking

Ready = Callable[[locking.LockHolders], bool]


def wait_for_locks(path: Path, ready: Ready) -> None:
    """Poll the lock bytes of ``path`` until ``ready`` holds (the holder finished opening)."""
    for _ in range(400):
        if ready(locking.probe(path)):
            return
        time.sleep(0.025)
    raise AssertionError(f"lock state never reached on {path}: {locking.probe(path)}")


class Holder:
    """A child process that keeps images open until stopped; ready once ``ready`` sees its locks."""

    def __init__(self, argv: list[str], path: Path, ready: Ready) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_locks(path, ready)
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the holder (if still running) and reap it."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)

    def finish(self) -> None:
        """Close the holder's stdin so it exits by itself, and reap it."""
        self.proc.communicate(input="", timeout=30)


def holders(make: Callable[..., Holder]) -> Iterator[Callable[..., Holder]]:
    """Body of a ``hold`` fixture: start holders with ``make``; kill them all at the end."""
    started: list[Holder] = []

    def start(*args: object, **kwargs: object) -> Holder:
        holder = make(*args, **kwargs)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.stop()

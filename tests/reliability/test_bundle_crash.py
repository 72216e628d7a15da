"""A crash at any point of save() leaves the old folder or the new one, never a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import virtkit
from virtkit import Disk, Machine


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing catches it."""


OLD = Machine(name="vm", memory="256MiB", disks=[Disk(path="root.raw", size="1MiB")])
NEW = Machine(
    name="vm",
    uuid=OLD.uuid,
    memory="1GiB",
    disks=[Disk(path="root.raw", size="1MiB"), Disk(path="data.raw", size="2MiB")],
    labels={"v": "2"},
)


def _count_syscalls(monkeypatch: pytest.MonkeyPatch, crash_at: int | None) -> list[str]:
    """Make the N-th file-system call of save() 'crash' the process."""
    calls: list[str] = []
    for name in ("write", "fsync", "replace", "rename", "open", "ftruncate", "mkdir", "unlink"):
        real = getattr(os, name)

        def wrapper(
            *args: object, _real: object = real, _name: str = name, **kwargs: object
        ) -> object:
            calls.append(_name)
            if crash_at is not None and len(calls) == crash_at:
                raise Crash(_name)
            return _real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(os, name, wrapper)
    return calls


class TestSaveCrashes:
    def test_every_crash_point(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Crashing at each file-system call of a re-save leaves OLD or NEW loadable."""
        with monkeypatch.context() as m:
            folder = tmp_path / "probe"
            virtkit.save(OLD, folder)
            calls = _count_syscalls(m, None)
            virtkit.save(NEW, folder)
            total = len(calls)
        assert total > 5
        outcomes = {"old": 0, "new": 0}
        for n in range(1, total + 1):
            folder = tmp_path / f"run{n}"
            virtkit.save(OLD, folder)
            with monkeypatch.context() as m:
                _count_syscalls(m, n)
                with pytest.raises(Crash):
                    virtkit.save(NEW, folder)
            loaded = virtkit.load(folder)
            assert loaded in (OLD, NEW), f"crash at call {n} left a mixed folder"
            outcomes["old" if loaded == OLD else "new"] += 1
        assert outcomes["old"] > 0
        assert outcomes["new"] >= 0

    def test_first_save_crash_never_loads_partial(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A crash during the first save leaves no folder that loads as something else."""
        with monkeypatch.context() as m:
            calls = _count_syscalls(m, None)
            virtkit.save(NEW, tmp_path / "probe")
            total = len(calls)
        for n in range(1, total + 1):
            folder = tmp_path / f"run{n}"
            with monkeypatch.context() as m:
                _count_syscalls(m, n)
                with pytest.raises(Crash):
                    virtkit.save(NEW, folder)
            try:
                loaded = virtkit.load(folder)
            except virtkit.ConfigError:
                continue  # nothing saved yet: refused cleanly
            assert loaded == NEW


class TestKill9:
    def test_killed_savers(self, tmp_path: Path) -> None:
        """A child re-saving in a loop, SIGKILLed at random moments, always leaves a loadable folder."""
        folder = tmp_path / "vm"
        virtkit.save(OLD, folder)
        script = textwrap.dedent(
            f"""
            import virtkit, attrs
            from virtkit import Machine
            old = virtkit.load({str(folder)!r})
            i = 0
            while True:
                i += 1
                virtkit.save(attrs.evolve(old, labels={{"i": str(i)}}), {str(folder)!r})
                print(i, flush=True)
            """
        )
        import random

        rng = random.Random(1234)
        for _ in range(8):
            proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            for _ in range(rng.randint(1, 30)):
                proc.stdout.readline()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            loaded = virtkit.load(folder)
            assert loaded.uuid == OLD.uuid
            assert loaded.name == "vm"

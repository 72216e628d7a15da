"""A crash at any point of save() leaves the old folder or the new one, never a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fs_crash import Crash, FsCrash
from kill_steps import KillAtStep

import virtkit
from virtkit import Disk, Machine

OLD = Machine(name="vm", memory="256MiB", disks=[Disk(path="root.raw", size="1MiB")])
NEW = Machine(
    name="vm",
    uuid=OLD.uuid,
    memory="1GiB",
    disks=[Disk(path="root.raw", size="1MiB"), Disk(path="data.raw", size="2MiB")],
    labels={"v": "2"},
)


class TestSaveCrashes:
    """Each file-system call of save() is cut in turn, as kill -9 would (see fs_crash)."""

    def test_every_crash_point(self, tmp_path: Path) -> None:
        """Crashing at each file-system call of a re-save leaves OLD or NEW loadable."""
        folder = tmp_path / "probe"
        virtkit.save(OLD, folder)
        with FsCrash(None) as probe:
            virtkit.save(NEW, folder)
        total = probe.calls
        assert total > 5
        outcomes = {"old": 0, "new": 0}
        for n in range(1, total + 1):
            folder = tmp_path / f"run{n}"
            virtkit.save(OLD, folder)
            with FsCrash(n), pytest.raises(Crash):
                virtkit.save(NEW, folder)
            loaded = virtkit.load(folder)
            assert loaded in (OLD, NEW), f"crash at call {n} left a mixed folder"
            outcomes["old" if loaded == OLD else "new"] += 1
        assert outcomes["old"] > 0
        assert outcomes["new"] >= 0

    def test_first_save_crash_never_loads_partial(self, tmp_path: Path) -> None:
        """A crash during the first save leaves no folder that loads as something else."""
        with FsCrash(None) as probe:
            virtkit.save(NEW, tmp_path / "probe")
        for n in range(1, probe.calls + 1):
            folder = tmp_path / f"run{n}"
            with FsCrash(n), pytest.raises(Crash):
                virtkit.save(NEW, folder)
            try:
                loaded = virtkit.load(folder)
            except virtkit.ConfigError:
                continue  # nothing saved yet: refused cleanly
            assert loaded == NEW


class TestKill9:
    def test_every_step(self, tmp_path: Path) -> None:
        """A real SIGKILL of the saving process before each file-system step of a re-save
        leaves a folder that loads as OLD or NEW."""
        model = tmp_path / "model"
        virtkit.save(NEW, model)
        code = "virtkit.save(virtkit.load(model), folder)"
        outcomes = {"old": 0, "new": 0}
        with KillAtStep(tmp_path / "zygote.log") as kill:
            probe = tmp_path / "probe"
            virtkit.save(OLD, probe)
            done = kill.run(code, 0, model=str(model), folder=str(probe))
            assert done.error is None and done.steps is not None, done
            assert virtkit.load(probe) == NEW
            for n in range(1, done.steps + 1):
                folder = tmp_path / f"run{n}"
                virtkit.save(OLD, folder)
                assert kill.run(code, n, model=str(model), folder=str(folder)).killed
                loaded = virtkit.load(folder)
                assert loaded in (OLD, NEW), f"kill before step {n} left a mixed folder"
                outcomes["old" if loaded == OLD else "new"] += 1
        assert outcomes["old"] > 0

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

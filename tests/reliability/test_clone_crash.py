"""A crash at any file-system step of clone, write_machine or a v1 upgrade leaves old or new state.

Every step of the operation is cut in turn (:mod:`fs_crash`: the N-th ``os``
call and all later ones fail, as after kill -9); after each cut the folders
are checked: each one loads as its old or its new self, shared files are
unchanged, a clone folder exists only complete and only once its source has
stopped writing the shared file, and the operation can be run again. The
default run cuts every step of a linked clone, a full clone, write_machine and
the version-1 upgrade; clones are also cut by a real SIGKILL of a cloning process
before each step (:mod:`kill_steps`) and at random moments.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
from fs_crash import Crash, FsCrash
from kill_steps import KillAtStep

import virtkit
from virtkit import Disk, Machine, Nic, PortForward, bundle, images
from virtkit.bundle.upgrade import LEGACY_LAYERS

MIB = 1024**2


def _make_source(folder: Path) -> Machine:
    m = Machine(
        name="gold",
        memory="64MiB",
        disks=[
            Disk(path="root.qcow2", size="1MiB"),
            Disk(path="ro.raw", size="1MiB", read_only=True),
        ],
        nics=[Nic(forwards=[PortForward(2222, 22)])],
    )
    virtkit.save(m, folder)
    with images.open(folder / "disks" / "root.qcow2", writable=True) as img:
        img.write(0, b"gold-root")
    with images.open(folder / "disks" / "ro.raw", writable=True) as img:
        img.write(0, b"gold-ro")
    return virtkit.load(folder)


def _read(folder: Path, disk: Disk) -> bytes:
    path = bundle.resolve_disk(folder, disk.active)
    with images.open(path, allow_backing=bundle.allowed_roots(folder)) as img:
        return img.read(0, 9)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _check_after_clone_crash(
    src: Path, dst: Path, old: Machine, template: dict[str, bytes], *, linked: bool
) -> str:
    """Each folder is old or new; returns which of 'none', 'source-only', 'both' happened."""
    now = virtkit.load(src)
    assert attrs.evolve(now, disks=old.disks) == old, "the source changed beyond its layers"
    layers = now.disks[0].layers
    assert layers in ((), ("root.c1.qcow2",)), layers
    assert now.disks[1] == old.disks[1]
    # the files the source had are untouched (the base is never written by a clone)
    for name in ("disks/root.qcow2", "disks/ro.raw"):
        assert (src / name).read_bytes() == template[name], name
    assert _read(src, now.disks[0]) == b"gold-root"
    hidden = [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    if not dst.exists():
        assert bundle.dependents(src) == []  # a record naming a missing clone is stale
        return "source-only" if layers else "none"
    assert not hidden
    if not linked:
        assert not layers and bundle.dependents(src) == []
        assert not (dst / "links.toml").exists()
        c = virtkit.load(dst)
        assert _read(dst, c.disks[0]) == b"gold-root"
        return "both"
    assert layers, "a clone exists while its source still writes the shared file"
    c = virtkit.load(dst)
    assert c.name == dst.name and c.uuid != old.uuid
    assert _read(dst, c.disks[0]) == b"gold-root"
    assert _read(dst, c.disks[1]) == b"gold-ro\0\0"
    assert [p for p, _ in bundle.dependents(src)] == [dst]
    return "both"


class TestCloneCrashes:
    def _campaign(self, tmp_path: Path, *, linked: bool, sample: int | None) -> dict[str, int]:
        template = tmp_path / "template"
        old = _make_source(template)
        files = _files(template)
        shutil.copytree(template, tmp_path / "probe" / "gold")
        with FsCrash(None) as probe:
            virtkit.clone(tmp_path / "probe" / "gold", tmp_path / "probe" / "web", linked=linked)
        total = probe.calls
        assert total > 10
        steps = list(range(1, total + 1))
        if sample is not None and sample < total:
            steps = sorted({1, total, *random.Random(7).sample(steps, sample)})
        outcomes = {"none": 0, "source-only": 0, "both": 0}
        for n in steps:
            run = tmp_path / f"run{n}"
            shutil.copytree(template, run / "gold")
            src, dst = run / "gold", run / "web"
            with FsCrash(n), contextlib.suppress(Crash):
                virtkit.clone(src, dst, linked=linked)
            outcome = _check_after_clone_crash(src, dst, old, files, linked=linked)
            if not linked:
                assert outcome != "source-only"  # a full clone never changes its source
                assert _files(src) == files
            outcomes[outcome] += 1
            if outcome != "both":  # the operation can simply be run again
                c = virtkit.clone(src, dst, linked=linked)
                assert _read(dst, c.disks[0]) == b"gold-root"
            shutil.rmtree(run)
        assert outcomes["none"] > 0 and outcomes["both"] > 0
        return outcomes

    def test_linked_clone_every_step(self, tmp_path: Path) -> None:
        """Cut at every file-system call of a linked clone: source and clone are each old or new."""
        outcomes = self._campaign(tmp_path, linked=True, sample=None)
        assert outcomes["source-only"] > 0  # the window between freezing and publishing

    def test_full_clone_every_step(self, tmp_path: Path) -> None:
        """Cut at every file-system call of a full clone (a few seconds: in the default run)."""
        self._campaign(tmp_path, linked=False, sample=None)


class TestCloneKill9:
    """The same cuts by a real SIGKILL of a cloning process before each step (kill_steps)."""

    @pytest.mark.parametrize("linked", [True, False], ids=["linked", "full"])
    def test_every_step(self, tmp_path: Path, linked: bool) -> None:
        """kill -9 before every file-system step of clone(): source and clone are each old or
        new, the shared file never changes, and cloning again succeeds."""
        template = tmp_path / "template"
        old = _make_source(template)
        files = _files(template)
        code = "virtkit.clone(src, dst, linked=linked)"
        outcomes = {"none": 0, "source-only": 0, "both": 0}
        with KillAtStep(tmp_path / "zygote.log") as kill:
            probe = tmp_path / "probe"
            shutil.copytree(template, probe / "gold")
            done = kill.run(code, 0, src=str(probe / "gold"), dst=str(probe / "web"), linked=linked)
            assert done.error is None and done.steps is not None, done
            assert done.steps > 10
            for n in range(1, done.steps + 1):
                run = tmp_path / f"run{n}"
                shutil.copytree(template, run / "gold")
                src, dst = run / "gold", run / "web"
                outcome = kill.run(code, n, src=str(src), dst=str(dst), linked=linked)
                assert outcome.killed, outcome
                seen = _check_after_clone_crash(src, dst, old, files, linked=linked)
                outcomes[seen] += 1
                if seen != "both":
                    c = virtkit.clone(src, dst, linked=linked)
                    assert _read(dst, c.disks[0]) == b"gold-root"
                shutil.rmtree(run)
        assert outcomes["none"] > 0 and outcomes["both"] > 0


HAND = """\
# hand-written; keep me
format-version = 2
name = "vm"
uuid = "7d3c1b52-45c6-4a5c-a4e6-3c9a0e0f3a11"
memory = "1G"  # my spelling

[[disks]]
path = "root.qcow2"  # the root disk
"""


class TestWriteMachineCrashes:
    def test_every_step(self, tmp_path: Path) -> None:
        """A crash at each step of a comment-preserving rewrite leaves the old text or the new text."""
        probe = tmp_path / "probe"
        probe.mkdir()
        (probe / "machine.toml").write_text(HAND)
        old = virtkit.load(probe)
        new = attrs.evolve(
            old, cpus=2, disks=[attrs.evolve(old.disks[0], layers=["root.s1.qcow2"])]
        )
        with FsCrash(None) as counter:
            bundle.write_machine(probe, new)
        new_text = (probe / "machine.toml").read_text()
        assert "# the root disk" in new_text and new_text != HAND
        seen = set()
        for n in range(1, counter.calls + 1):
            folder = tmp_path / f"run{n}"
            folder.mkdir()
            (folder / "machine.toml").write_text(HAND)
            with FsCrash(n), contextlib.suppress(Crash):
                bundle.write_machine(folder, new)
            text = (folder / "machine.toml").read_text()
            assert text in (HAND, new_text), f"crash at call {n} left a mixed file"
            seen.add(text == new_text)
            assert virtkit.load(folder) in (old, new)
        assert seen == {False, True}

    def test_every_step_by_a_real_kill(self, tmp_path: Path) -> None:
        """The same rewrite in a process SIGKILLed before each file-system step (kill_steps)."""
        code = (
            "import attrs\n"
            "old = virtkit.load(folder)\n"
            "disk = attrs.evolve(old.disks[0], layers=['root.s1.qcow2'])\n"
            "virtkit.bundle.write_machine(folder, attrs.evolve(old, cpus=2, disks=[disk]))\n"
        )
        with KillAtStep(tmp_path / "zygote.log") as kill:
            probe = tmp_path / "probe"
            probe.mkdir()
            (probe / "machine.toml").write_text(HAND)
            done = kill.run(code, 0, folder=str(probe))
            assert done.error is None and done.steps is not None, done
            new_text = (probe / "machine.toml").read_text()
            assert "# the root disk" in new_text and new_text != HAND
            seen = set()
            for n in range(1, done.steps + 1):
                folder = tmp_path / f"run{n}"
                folder.mkdir()
                (folder / "machine.toml").write_text(HAND)
                assert kill.run(code, n, folder=str(folder)).killed
                text = (folder / "machine.toml").read_text()
                assert text in (HAND, new_text), f"kill before step {n} left a mixed file"
                seen.add(text == new_text)
        assert seen == {False, True}


def _v1_folder(folder: Path) -> None:
    """A version-1 qemu backend folder: root.qcow2 <- root.s1.qcow2 (active), snapshot 'f1'."""
    (folder / "disks").mkdir(parents=True)
    (folder / "snapshots").mkdir()
    with images.create(folder / "disks" / "root.qcow2", "1MiB") as img:
        img.write(0, b"base")
    with images.create(
        folder / "disks" / "root.s1.qcow2", backing="root.qcow2", backing_format="qcow2"
    ) as img:
        img.write(0, b"top")
    (folder / "machine.toml").write_text(
        'format-version = 1\nname = "old"\nuuid = "7d3c1b52-45c6-4a5c-a4e6-3c9a0e0f3a11"\n'
        '[[disks]]\npath = "root.qcow2"\n'
    )
    (folder / "snapshots" / "_index.toml").write_text(
        'format-version = 1\ncurrent = "f1"\n[[snapshot]]\nname = "f1"\nkind = "disk"\n'
        "created-at = 2026-01-02T00:00:00Z\n"
    )
    top, base = folder / "disks" / "root.s1.qcow2", folder / "disks" / "root.qcow2"
    state = {"active": {"vda": str(top)}, "frozen": {"f1": {"vda": str(base)}}, "counter": 1}
    (folder / LEGACY_LAYERS).write_text(json.dumps(state))


class TestUpgradeCrashes:
    def test_v1_save_every_step(self, tmp_path: Path) -> None:
        """Saving a v1 folder (with qemu-layers.json) as v2, cut anywhere, loads the same machine."""
        template = tmp_path / "template"
        _v1_folder(template)
        machine = virtkit.load(template)
        snaps = bundle.load_snapshots(template)
        probe = tmp_path / "probe"
        shutil.copytree(template, probe)
        with FsCrash(None) as counter:
            virtkit.save(virtkit.load(probe), probe)
        assert not (probe / LEGACY_LAYERS).exists()
        for n in range(1, counter.calls + 1):
            folder = tmp_path / f"run{n}"
            shutil.copytree(template, folder)
            with FsCrash(n), contextlib.suppress(Crash):
                virtkit.save(virtkit.load(folder), folder)
            assert virtkit.load(folder) == machine, f"crash at call {n}"
            assert bundle.load_snapshots(folder) == snaps
            assert bundle.current_snapshot(folder) == "f1"
            shutil.rmtree(folder)

    def test_v1_save_every_step_by_a_real_kill(self, tmp_path: Path) -> None:
        """The same upgrade in a process SIGKILLed before each file-system step (kill_steps)."""
        template = tmp_path / "template"
        _v1_folder(template)
        machine = virtkit.load(template)
        snaps = bundle.load_snapshots(template)
        code = "virtkit.save(virtkit.load(folder), folder)"
        with KillAtStep(tmp_path / "zygote.log") as kill:
            probe = tmp_path / "probe"
            shutil.copytree(template, probe)
            done = kill.run(code, 0, folder=str(probe))
            assert done.error is None and done.steps is not None, done
            assert not (probe / LEGACY_LAYERS).exists()
            for n in range(1, done.steps + 1):
                folder = tmp_path / f"run{n}"
                shutil.copytree(template, folder)
                assert kill.run(code, n, folder=str(folder)).killed
                assert virtkit.load(folder) == machine, f"kill before step {n}"
                assert bundle.load_snapshots(folder) == snaps
                assert bundle.current_snapshot(folder) == "f1"
                shutil.rmtree(folder)


class TestKilledCloner:
    def test_sigkill_during_clones(self, tmp_path: Path) -> None:
        """A child cloning in a loop, SIGKILLed at random moments: every folder is whole or absent."""
        src = tmp_path / "gold"
        _make_source(src)
        script = textwrap.dedent(
            f"""
            import virtkit, sys
            i = int(sys.argv[1])
            while True:
                virtkit.clone({str(src)!r}, {str(tmp_path)!r} + f"/c{{i}}", linked=i % 3 != 0)
                print(i, flush=True)
                i += 1
            """
        )
        rng = random.Random(99)
        start = 1
        for _ in range(6):
            proc = subprocess.Popen(
                [sys.executable, "-c", script, str(start)], stdout=subprocess.PIPE, text=True
            )
            assert proc.stdout is not None
            for _ in range(rng.randint(0, 2)):
                line = proc.stdout.readline()
                start = int(line) + 1 if line else start
            # die somewhere inside the next clone
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            start += 1  # the killed clone's folder name is never reused
            gold = virtkit.load(src)
            assert _read(src, gold.disks[0]) == b"gold-root"
            live = {p for p, _ in bundle.dependents(src)}
            for folder in tmp_path.glob("c*"):
                c = virtkit.load(folder)
                assert _read(folder, c.disks[0]) == b"gold-root"
                if (folder / "links.toml").exists():
                    assert folder in live

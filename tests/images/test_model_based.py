"""Model-based tests: random write/zero/discard/snapshot/revert sequences vs a bytearray.

A Hypothesis rule-based state machine drives an image and a plain ``bytearray``
model with the same operations; every read must agree, reopening must not
change anything, and at the end ``qemu-img check`` must find the image clean
and ``qemu-img convert -O raw`` must produce exactly the model's bytes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import virtkit
import virtkit.images

SIZE = 256 * 1024
_SETTINGS = settings(
    max_examples=int(os.environ.get("VIRTKIT_QCOW2_EXAMPLES", "40")),  # as test_qcow2_model
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

offsets = st.integers(0, SIZE - 1)
lengths = st.one_of(st.integers(1, 5000), st.integers(1, 70000), st.sampled_from([512, 4096]))


def _clip(offset: int, length: int) -> tuple[int, int]:
    return offset, min(length, SIZE - offset)


class ImageMachine(RuleBasedStateMachine):
    """Drive one image and a bytearray model side by side."""

    fmt = "qcow2"
    create_options: dict[str, object] = {}  # noqa: RUF012 - overridden per subclass
    has_snapshots = True
    #: qcow2 cache mode the image is (re)opened with.
    cache = "writeback"
    #: Pinned L2 tables before the write-back cache writes itself back (None: default).
    dirty_limit: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vk-model-"))
        self.path = self.dir / f"disk.{self.fmt}"
        self.model = bytearray(SIZE)
        options = dict(self.create_options)
        if options.pop("with_backing", False):
            base = self.dir / "base.raw"
            content = random.Random(99).randbytes(SIZE // 2)  # shorter than the overlay
            base.write_bytes(content)
            self.model[: len(content)] = content
            options.update(backing="base.raw", backing_format="raw")
        self.img = virtkit.images.create(
            self.path,
            SIZE,
            format=self.fmt,  # type: ignore[arg-type]
            **options,  # type: ignore[arg-type]
        )
        self.snaps: dict[str, bytes] = {}
        self.counter = 0
        self.log: list[str] = []
        if self.fmt == "qcow2":
            self._reopen()

    def _reopen(self) -> None:
        """Close and open again in this machine's cache mode."""
        self.img.close()
        if self.fmt != "qcow2":
            self.img = virtkit.images.open(self.path, writable=True)
            return
        self.img = virtkit.images.open(self.path, writable=True, cache=self.cache)  # type: ignore[arg-type]
        if self.dirty_limit is not None:
            self.img.metadata_cache._limit = self.dirty_limit  # type: ignore[attr-defined]

    @rule()
    def flush(self) -> None:
        """flush() changes nothing visible."""
        self.log.append("flush()")
        self.img.flush()

    @rule(offset=offsets, length=lengths, seed=st.integers(0, 255))
    def write(self, offset: int, length: int, seed: int) -> None:
        """Write pseudo-random bytes."""
        offset, length = _clip(offset, length)
        data = random.Random(seed).randbytes(length)
        self.log.append(f"write({offset}, {length})")
        self.img.write(offset, data)
        self.model[offset : offset + length] = data

    @rule(offset=offsets, length=lengths, unmap=st.booleans())
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range (with or without unmapping)."""
        offset, length = _clip(offset, length)
        self.log.append(f"write_zeroes({offset}, {length}, unmap={unmap})")
        self.img.write_zeroes(offset, length, unmap=unmap)
        self.model[offset : offset + length] = bytes(length)

    @rule(offset=offsets, length=lengths)
    def discard(self, offset: int, length: int) -> None:
        """Discard a range: with no backing file it must read as zeroes or keep its data."""
        offset, length = _clip(offset, length)
        self.log.append(f"discard({offset}, {length})")
        self.img.discard(offset, length)
        after = self.img.read(offset, length)
        before = bytes(self.model[offset : offset + length])
        # Partial clusters may be left alone (QEMU does the same); whole ones read zero.
        for i in range(length):
            if after[i] != before[i] and after[i] != 0:
                raise AssertionError(f"discard made byte {offset + i} read {after[i]:#x}")
        self.model[offset : offset + length] = after

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        """A read returns the model's bytes."""
        offset, length = _clip(offset, length)
        assert self.img.read(offset, length) == bytes(self.model[offset : offset + length]), (
            self.log
        )

    @rule()
    def reopen(self) -> None:
        """Closing and reopening keeps every byte."""
        self.log.append("reopen()")
        self._reopen()

    @precondition(lambda self: self.has_snapshots and len(self.snaps) < 4)
    @rule()
    def snapshot(self) -> None:
        """Take an internal snapshot."""
        self.counter += 1
        name = f"s{self.counter}"
        self.log.append(f"create_snapshot({name})")
        self.img.create_snapshot(name)
        self.snaps[name] = bytes(self.model)

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        """Revert to a snapshot: the disk is what it was then."""
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.log.append(f"revert_snapshot({name})")
        self.img.revert_snapshot(name)
        self.model = bytearray(self.snaps[name])

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """Delete a snapshot: the current disk is unchanged."""
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.log.append(f"delete_snapshot({name})")
        self.img.delete_snapshot(name)
        del self.snaps[name]

    @invariant()
    def snapshot_names(self) -> None:
        """The image lists exactly the snapshots the model has."""
        if self.has_snapshots:
            assert sorted(s.name for s in self.img.snapshots) == sorted(self.snaps), self.log

    def teardown(self) -> None:
        """Whole-disk compare, then qemu-img check and a qemu-img raw export."""
        try:
            assert self.img.read(0, SIZE) == bytes(self.model), self.log
            self.img.close()
            if self.fmt == "qcow2":
                check = subprocess.run(
                    ["qemu-img", "check", str(self.path)],
                    capture_output=True, text=True, timeout=120, check=False,
                )  # fmt: skip
                assert check.returncode == 0, f"{self.log}\n{check.stdout}{check.stderr}"
                out = self.dir / "export.raw"
                subprocess.run(
                    ["qemu-img", "convert", "-O", "raw", str(self.path), str(out)],
                    check=True, capture_output=True, timeout=120,
                )  # fmt: skip
                assert out.read_bytes() == bytes(self.model), self.log
                for name, content in self.snaps.items():
                    snap_out = self.dir / f"{name}.raw"
                    subprocess.run(
                        ["qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw",
                         str(self.path), str(snap_out)],
                        check=True, capture_output=True, timeout=120,
                    )  # fmt: skip
                    assert snap_out.read_bytes() == content, (name, self.log)
        finally:
            self.img.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class Qcow2Machine(ImageMachine):
    """qcow2 v3 with 4 KiB clusters (many clusters in a small disk)."""

    create_options = {"cluster_size": 4096}  # noqa: RUF012


class Qcow2V2Machine(ImageMachine):
    """qcow2 v2 (compat 0.10: no zero flag) with 512-byte clusters.

    The write-back cache may pin one L2 table (of 64 entries) only, so it
    writes itself back in the middle of most requests.
    """

    create_options = {"cluster_size": 512, "compat": "0.10"}  # noqa: RUF012
    dirty_limit = 1


class Qcow2WritethroughMachine(ImageMachine):
    """qcow2 v3 with 4 KiB clusters opened with cache="writethrough"."""

    create_options = {"cluster_size": 4096}  # noqa: RUF012
    cache = "writethrough"


class Qcow2OverlayWritethroughMachine(ImageMachine):
    """A qcow2 v3 overlay (4 KiB clusters) on a raw backing file, cache="writethrough"."""

    create_options = {"cluster_size": 4096, "with_backing": True}  # noqa: RUF012
    cache = "writethrough"


class Qcow2ExtendedL2Machine(ImageMachine):
    """qcow2 with extended L2 entries (32 subclusters of 2 KiB in 64 KiB clusters)."""

    create_options = {"extended_l2": True}  # noqa: RUF012


class Qcow2OverlayMachine(ImageMachine):
    """qcow2 v3 overlay (4 KiB clusters) on a raw backing file half its size."""

    create_options = {"cluster_size": 4096, "with_backing": True}  # noqa: RUF012


class RawMachine(ImageMachine):
    """raw: the same data rules, no snapshots."""

    fmt = "raw"
    has_snapshots = False


TestQcow2 = Qcow2Machine.TestCase
TestQcow2.settings = _SETTINGS
TestQcow2V2 = Qcow2V2Machine.TestCase
TestQcow2V2.settings = _SETTINGS
TestQcow2ExtendedL2 = Qcow2ExtendedL2Machine.TestCase
TestQcow2ExtendedL2.settings = _SETTINGS
TestQcow2Overlay = Qcow2OverlayMachine.TestCase
TestQcow2Overlay.settings = _SETTINGS
TestQcow2Writethrough = Qcow2WritethroughMachine.TestCase
TestQcow2Writethrough.settings = _SETTINGS
TestQcow2OverlayWritethrough = Qcow2OverlayWritethroughMachine.TestCase
TestQcow2OverlayWritethrough.settings = _SETTINGS
TestRaw = RawMachine.TestCase
TestRaw.settings = _SETTINGS

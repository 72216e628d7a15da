"""A full disk (ENOSPC) during image writes: a clear ImageError, a consistent image.

:class:`~virtkit.testing.faults.NoSpace` makes the file system full exactly
where the operating system would report it: ``os.pwrite`` fails with
``ENOSPC`` (a write that partly fits stores its first part first). The error
enters ``FileStorage`` as a real one, so what the caller sees is the engine's
own translation. After the space comes back the same open image keeps
working, and the file checks clean with the real ``qemu-img``.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
from image_workloads import (
    CS,
    SIZE,
    Model,
    copied_flag_window,
    qemu_check,
    sample,
)
from image_workloads import _pattern as pattern

import virtkit
from virtkit import images
from virtkit.testing import faults


def scattered(img: images.Image, m: Model, seed: int = 5, count: int = 30, start: int = 0) -> None:
    """Writes and zeroings all over the disk, flushed every few operations.

    ``start`` skips the first operations (to retry from a failed one). An
    ``ImageError`` raised by operation ``i`` carries ``i`` as ``.op_index``.
    """
    rnd = random.Random(seed)
    for i in range(count):
        off = rnd.randrange(0, SIZE - 1)
        length = min(rnd.choice([700, CS, 3 * CS + 1, 8 * CS]), SIZE - off)
        if i < start:
            continue
        try:
            if i % 6 == 5:
                m.write_zeroes(img, off, length)
            else:
                m.write(img, off, pattern(1000 + i, length))
            if i % 4 == 3:
                m.flush(img)
        except virtkit.ImageError as exc:
            exc.op_index = i  # type: ignore[attr-defined]
            raise


def assert_enospc(exc: virtkit.ImageError, path: Path) -> None:
    """The error is an ImageError naming the file and saying the disk is full."""
    assert isinstance(exc, virtkit.VirtkitError)
    assert exc.path is not None and Path(exc.path).name == path.name, exc
    assert "No space left on device" in str(exc) and path.name in str(exc), str(exc)
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC


def assert_clean_after(path: Path, m: Model) -> None:
    """qemu-img finds no corruption, the acknowledged data reads back, repair leaves it clean.

    (qemu-img has no check for raw files: those are checked by their data alone.)
    """
    qcow2 = images.probe_format(path) == "qcow2"
    if qcow2:
        report = qemu_check(path)
        _window, harmful = copied_flag_window(report)
        assert report["rc"] in (0, 2, 3) and not harmful, report["stderr"]
    with images.open(path, writable=True) as img:
        m.verify(img)
        res = img.check(repair=True)
        assert res.ok, res
    if qcow2:
        after = qemu_check(path)
        assert after["rc"] == 0, after["stderr"]


def new_image(path: Path, fmt: str) -> None:
    """A fresh 2 MiB image (qcow2 with 4 KiB clusters, or raw)."""
    opts = {"cluster_size": CS} if fmt == "qcow2" else {}
    with images.create(path, SIZE, format=fmt, **opts):  # type: ignore[arg-type]
        pass


def count_writes(path: Path) -> int:
    """How many storage writes the scattered workload makes on a fresh copy of ``path``."""
    with (
        faults.inject(faults.Recorder(), only=path) as rec,
        images.open(path, writable=True) as img,
    ):
        scattered(img, Model(bytes(SIZE)))
    return rec.writes


class TestDiskFullDuringWrites:
    """ENOSPC at sampled points of a scattered-write workload."""

    @pytest.mark.parametrize(
        ("fmt", "cow"),
        [("qcow2", False), ("raw", False), ("qcow2", True), ("raw", True)],
        ids=["qcow2", "raw", "qcow2-cow", "raw-cow"],
    )
    def test_full_disk_at_sampled_writes(self, fmt: str, cow: bool, tmp_path: Path) -> None:
        """Each full-disk point gives an ImageError; after space returns the same handle works.

        ``cow``: overwrites need space too (btrfs, ZFS, thin volumes), so metadata
        updates in place can fail as well as allocations.
        """
        probe = tmp_path / f"probe.{fmt}"
        new_image(probe, fmt)
        total = count_writes(probe)
        tried = raised = 0
        broken: list[str] = []
        for k in sample(total, 25):
            path = tmp_path / f"disk{k}.{fmt}"
            new_image(path, fmt)
            m = Model(bytes(SIZE))
            with images.open(path, writable=True) as img:
                plan = faults.NoSpace(at_write=k, cow=cow)
                with faults.inject(plan, only=path):
                    try:
                        scattered(img, m)
                    except virtkit.ImageError as exc:
                        assert_enospc(exc, path)
                        assert plan.failures == 1
                        raised += 1
                        plan.release()  # space comes back: the caller retries and goes on
                        scattered(img, m, start=exc.op_index)  # type: ignore[attr-defined]
                    plan.release()
                    m.write(img, 3 * CS + 11, pattern(77, 2 * CS))
                    m.flush(img)
            m.ack()
            tried += 1
            try:
                assert_clean_after(path, m)
            except AssertionError as exc:
                broken.append(f"disk full from write {k}/{total}: {exc}")
            path.unlink()
        print(
            f"enospc {fmt} cow={cow}: writes={total} tried={tried} errors-raised={raised}"
            f" survived={tried - len(broken)}"
        )
        assert raised >= tried // 2 and tried >= min(total, 20)
        assert not broken, f"{len(broken)} of {tried} full-disk points broke the image:\n" + (
            "\n".join(b[:400] for b in broken)
        )

    @pytest.mark.parametrize("after_bytes", [0, 100, 4096 + 17, 20_000, 60_000])
    def test_partial_write_then_full(self, after_bytes: int, tmp_path: Path) -> None:
        """A write that only partly fits stores a prefix, fails, and leaves no corruption."""
        path = tmp_path / "disk.qcow2"
        new_image(path, "qcow2")
        m = Model(bytes(SIZE))
        with images.open(path, writable=True) as img:
            plan = faults.NoSpace(after_bytes=after_bytes)
            with faults.inject(plan, only=path):
                with pytest.raises(virtkit.ImageError) as info:
                    scattered(img, m)
                assert_enospc(info.value, path)
                plan.release()
                img.flush()
        m.ack()
        assert_clean_after(path, m)
        with images.open(path, writable=True) as img:  # usable: write and read back
            img.write(SIZE - CS, b"back" * (CS // 4))
            assert img.read(SIZE - CS, CS) == b"back" * (CS // 4)


class TestDiskFullElsewhere:
    """ENOSPC while creating, growing into snapshots, and converting."""

    def test_create_full_disk_leaves_nothing(self, tmp_path: Path) -> None:
        """images.create on a full disk raises ImageError and leaves no half file."""
        path = tmp_path / "new.qcow2"
        with (
            faults.inject(faults.NoSpace(at_write=2), only=tmp_path),
            pytest.raises(virtkit.ImageError) as info,
        ):
            images.create(path, SIZE, cluster_size=CS)
        assert_enospc(info.value, path)
        assert not path.exists()

    def test_snapshot_on_full_disk(self, tmp_path: Path) -> None:
        """A snapshot that cannot be stored fails cleanly; the disk keeps its data."""
        path = tmp_path / "disk.qcow2"
        new_image(path, "qcow2")
        m = Model(bytes(SIZE))
        with images.open(path, writable=True) as img:
            m.write(img, 0, pattern(3, 40 * CS))
            m.flush(img)
            plan = faults.NoSpace(at_write=1)
            with faults.inject(plan, only=path):
                with pytest.raises(virtkit.ImageError) as info:
                    img.create_snapshot("s1", vm_state=b"x" * 10_000)
                assert_enospc(info.value, path)
                plan.release()
                img.flush()
            assert "s1" not in {s.name for s in img.snapshots}
        assert_clean_after(path, m)

    def test_convert_full_disk_keeps_destination(self, tmp_path: Path) -> None:
        """convert(compress=True) on a full disk: ImageError, old destination intact, no temp."""
        src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
        new_image(src, "qcow2")
        with images.open(src, writable=True) as img:
            img.write(0, pattern(8, 100 * CS))
        with images.create(dst, SIZE, cluster_size=CS) as old:
            old.write(0, b"old!" * 1000)
        before = dst.read_bytes()
        for at in (1, 5, 40):
            with (
                faults.inject(faults.NoSpace(at_write=at), only=tmp_path),
                pytest.raises(virtkit.ImageError) as info,
            ):
                images.convert(src, dst, compress=True, cluster_size=CS)
            assert "No space left on device" in str(info.value)
            assert "dst.qcow2" in str(info.value), str(info.value)
            assert dst.read_bytes() == before
            assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.qcow2", "src.qcow2"]
        images.convert(src, dst, compress=True, cluster_size=CS)  # space is back
        with images.open(src) as a, images.open(dst) as b:
            assert a.read(0, SIZE) == b.read(0, SIZE)
        assert qemu_check(dst)["rc"] == 0

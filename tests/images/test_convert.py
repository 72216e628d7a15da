"""convert and measure vs qemu-img for raw sources and targets (qcow2: test_convert_qcow2)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit

convert_mod = importlib.import_module("virtkit.images.convert")

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20


def _qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=120)


@pytest.fixture
def sparse_raw(tmp_path: Path, qemu_img: Run) -> Path:
    """A 16 MiB raw image with scattered data (made by qemu-io) and explicit zero runs."""
    path = tmp_path / "src.raw"
    qemu_img("create", "-f", "raw", path, "16M")
    _qemu_io(
        path, "raw",
        "write -P 0x11 0 1000", "write -P 0x22 70000 5000", "write -P 0x33 5M 3M",
        "write -z 6M 256k", "write -P 0x44 16380k 4k",
    )  # fmt: skip
    return path


class TestConvertRaw:
    """Raw to raw conversion."""

    def test_raw_to_raw_identical_and_sparse(
        self, sparse_raw: Path, tmp_path: Path, qemu_img: Run
    ) -> None:
        """The copy compares equal and has exactly the holes of qemu-img's own copy."""
        ours = tmp_path / "ours.raw"
        theirs = tmp_path / "theirs.raw"
        virtkit.images.convert(sparse_raw, ours, format="raw")
        qemu_img("convert", "-f", "raw", "-O", "raw", sparse_raw, theirs)
        assert qemu_img("compare", "-f", "raw", "-F", "raw", sparse_raw, ours).returncode == 0
        assert os.path.getsize(ours) == 16 * MiB
        assert (
            qemu_img("map", "--output=json", ours).stdout
            == qemu_img("map", "--output=json", theirs).stdout
        )
        assert os.stat(ours).st_blocks * 512 <= 3 * MiB  # ~2.8 MiB of data

    def test_zero_data_is_not_written(self, tmp_path: Path, qemu_img: Run) -> None:
        """Data blocks that hold only zeroes become holes in the output."""
        src = tmp_path / "zeros.raw"
        with virtkit.images.create(src, "4M", format="raw") as img:
            img.write(0, bytes(2 * MiB))  # allocated, but zero
            img.write(3 * MiB, b"\x01")
        assert os.stat(src).st_blocks * 512 >= 2 * MiB
        dst = tmp_path / "out.raw"
        virtkit.images.convert(src, dst, format="raw")
        assert os.stat(dst).st_blocks * 512 <= 64 * 1024
        assert qemu_img("compare", "-f", "raw", "-F", "raw", src, dst).returncode == 0

    def test_progress_reports_monotonic_to_total(self, sparse_raw: Path, tmp_path: Path) -> None:
        """progress(done, total) never goes back and ends at (total, total)."""
        calls: list[tuple[int, int]] = []
        virtkit.images.convert(
            sparse_raw, tmp_path / "o.raw", format="raw", progress=lambda d, t: calls.append((d, t))
        )
        assert calls[0] == (0, 16 * MiB)
        assert calls[-1] == (16 * MiB, 16 * MiB)
        dones = [d for d, _ in calls]
        assert dones == sorted(dones)
        assert {t for _, t in calls} == {16 * MiB}

    def test_failure_leaves_no_partial_destination(self, sparse_raw: Path, tmp_path: Path) -> None:
        """A failure mid-copy leaves an existing dst untouched and no temp file behind."""
        dst = tmp_path / "keep.raw"
        dst.write_bytes(b"old contents")

        def explode(done: int, total: int) -> None:
            if done > 4 * MiB:
                raise RuntimeError("interrupted")

        with pytest.raises(RuntimeError, match="interrupted"):
            virtkit.images.convert(sparse_raw, dst, format="raw", progress=explode)
        assert dst.read_bytes() == b"old contents"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.raw", "src.raw"]

    def test_replaces_existing_destination(self, sparse_raw: Path, tmp_path: Path) -> None:
        """An existing dst nobody holds is replaced atomically by the new image."""
        dst = tmp_path / "old.raw"
        dst.write_bytes(b"x" * 100)
        virtkit.images.convert(sparse_raw, dst, format="raw")
        with virtkit.images.open(dst) as img:
            assert img.virtual_size == 16 * MiB
            assert img.read(5 * MiB, 4) == b"\x33" * 4

    def test_refuses_destination_in_use(self, sparse_raw: Path, tmp_path: Path) -> None:
        """convert will not replace an image another open holds writable."""
        dst = tmp_path / "busy.raw"
        with virtkit.images.create(dst, "1M", format="raw") as busy:
            busy.write(0, b"mine")
            with pytest.raises(virtkit.ImageLockedError):
                virtkit.images.convert(sparse_raw, dst, format="raw")
            assert busy.read(0, 4) == b"mine"

    def test_refuses_converting_onto_source(self, sparse_raw: Path) -> None:
        """Converting an image onto itself is refused before anything is written."""
        with pytest.raises(virtkit.ConfigError, match="source"):
            virtkit.images.convert(sparse_raw, sparse_raw, format="raw")

    def test_compress_needs_qcow2(self, sparse_raw: Path, tmp_path: Path) -> None:
        """compress=True with a raw target is a ConfigError."""
        with pytest.raises(virtkit.ConfigError, match="qcow2"):
            virtkit.images.convert(sparse_raw, tmp_path / "o.raw", format="raw", compress=True)

    def test_unaligned_size(self, tmp_path: Path, qemu_img: Run) -> None:
        """A disk whose size is not a multiple of 4 KiB converts byte-exactly."""
        src = tmp_path / "odd.raw"
        with virtkit.images.create(src, 10000 * 512 + 512, format="raw") as img:
            img.write(img.virtual_size - 700, b"\xee" * 700)
        dst = tmp_path / "odd2.raw"
        virtkit.images.convert(src, dst, format="raw")
        assert src.read_bytes() == dst.read_bytes()


class TestChunking:
    """The copy helpers."""

    def test_nonzero_runs(self) -> None:
        """Runs of non-zero granules are found and merged; zero granules skipped."""
        g = 4
        data = b"\0" * 4 + b"ab\0\0" + b"\0\0\0c" + b"\0" * 8 + b"x"
        assert list(convert_mod._nonzero_runs(data, g)) == [(4, 12), (20, 21)]
        assert list(convert_mod._nonzero_runs(bytes(64), g)) == []

    def test_chunks_align(self) -> None:
        """Chunks never exceed CHUNK and split on alignment boundaries."""
        pieces = list(convert_mod._chunks(100, 5 * MiB, 65536))
        assert pieces[0] == (100, convert_mod.CHUNK)
        assert all(b - a <= convert_mod.CHUNK for a, b in pieces)
        assert pieces[-1][1] == 5 * MiB


class TestMeasure:
    """measure() answers what qemu-img measure --output=json does."""

    def _theirs(self, qemu_img: Run, *args: str | Path) -> dict[str, int]:
        out: dict[str, int] = json.loads(qemu_img("measure", "--output=json", *args).stdout)
        return out

    @pytest.mark.parametrize(
        "options",
        [
            {},
            {"cluster_size": 4096, "refcount_bits": 1},
            {"cluster_size": 512},
            {"cluster_size": 2 * MiB, "refcount_bits": 64},
            {"extended_l2": True, "cluster_size": 131072},
            {"preallocation": "full"},
            {"preallocation": "metadata"},
        ],
    )
    def test_raw_source_to_qcow2(
        self, sparse_raw: Path, qemu_img: Run, options: dict[str, object]
    ) -> None:
        """required and fully-allocated equal qemu-img's for a raw source."""
        opts = ",".join(f"{k}={'on' if v is True else v}" for k, v in options.items())
        args: list[str | Path] = ["-f", "raw", "-O", "qcow2"]
        if opts:
            args += ["-o", opts]
        theirs = self._theirs(qemu_img, *args, sparse_raw)
        assert virtkit.images.measure(sparse_raw, "qcow2", **options) == theirs

    def test_raw_target(self, sparse_raw: Path, qemu_img: Run) -> None:
        """A raw target needs its whole virtual size, as qemu-img says."""
        theirs = self._theirs(qemu_img, "-f", "raw", "-O", "raw", sparse_raw)
        assert virtkit.images.measure(sparse_raw, "raw") == theirs

    @pytest.mark.parametrize("size", ["1G", "100M", "12345678", "3T"])
    def test_by_size(self, qemu_img: Run, size: str) -> None:
        """measure(size=...) for a new empty image equals qemu-img measure --size."""
        for fmt in ("qcow2", "raw"):
            theirs = self._theirs(qemu_img, "-O", fmt, "--size", size)
            assert virtkit.images.measure(format=fmt, size=size) == theirs

    def test_needs_source_or_size(self) -> None:
        """Giving neither (or both) a source and a size is a ConfigError."""
        with pytest.raises(virtkit.ConfigError):
            virtkit.images.measure(format="qcow2")

    def test_bad_cluster_size(self) -> None:
        """An impossible cluster size is rejected naming the field."""
        with pytest.raises(virtkit.ConfigError, match="cluster_size"):
            virtkit.images.measure(size="1G", cluster_size=3000)


class TestSourceLocking:
    """convert respects the source's locks, as qemu-img does, unless force_share."""

    def test_source_held_by_writer(self, sparse_raw: Path, tmp_path: Path) -> None:
        """A source held by a writer needs force_share=True (qemu-img convert -U)."""
        src = tmp_path / "busy.qcow2"
        virtkit.images.convert(sparse_raw, src)
        with virtkit.images.open(src, writable=True):
            with pytest.raises(virtkit.ImageLockedError):
                virtkit.images.convert(src, tmp_path / "copy.raw", format="raw")
            virtkit.images.convert(src, tmp_path / "copy.raw", format="raw", force_share=True)
        assert (tmp_path / "copy.raw").read_bytes() == sparse_raw.read_bytes()


_SLOW_CONVERT = """
import sys, time, virtkit.images as I
def slow(done, total):
    if done:
        print(done, flush=True)
        time.sleep(0.05)
I.convert(sys.argv[1], sys.argv[2], format='raw', progress=slow)
"""


class TestKilledConvert:
    """A convert killed with SIGKILL never leaves a partial destination."""

    def test_sigkill_mid_copy_keeps_old_destination(self, sparse_raw: Path, tmp_path: Path) -> None:
        """After kill -9 mid-copy dst still holds its old bytes; only a hidden temp file remains."""
        dst = tmp_path / "dst.raw"
        dst.write_bytes(b"previous image")
        child = subprocess.Popen(
            [sys.executable, "-c", _SLOW_CONVERT, str(sparse_raw), str(dst)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout is not None
        for _ in range(3):  # a few chunks are written
            assert child.stdout.readline()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert dst.read_bytes() == b"previous image"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("dst.raw", "src.raw")]
        assert all(name.startswith(".dst.raw.virtkit-") for name in leftovers), leftovers

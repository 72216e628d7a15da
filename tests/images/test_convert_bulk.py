"""convert into a new qcow2 image through the bulk writer: variants, layout, faults, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit import images
from virtkit.images import convert_pipeline
from virtkit.images.qcow2.bulk import BulkWriter
from virtkit.testing import faults

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20


def _make_source(path: Path, size: int, seed: int = 1) -> Path:
    """Random, text-like and zero clusters, holes, data at odd offsets, an odd-sized tail."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(2, 9)) for _ in range(200)]
    with path.open("wb") as fh:
        fh.truncate(size)
        pos = 0
        i = 0
        while pos < size - 300 * 1024:
            fh.seek(pos)
            kind = i % 4
            if kind == 0:
                fh.write(rng.randbytes(70_000))  # does not compress
            elif kind == 1:
                fh.write(b" ".join(rng.choice(words) for _ in range(30_000))[:150_000])
            elif kind == 2:
                fh.write(bytes(100_000) + b"x" * 3000 + bytes(9000) + rng.randbytes(500))
            else:
                fh.write(bytes(65536))  # allocated in the source, all zero
            pos += rng.randrange(90, 400) * 1024 + rng.randrange(0, 4096)
            i += 1
        fh.seek(size - 1000)
        fh.write(b"tail" * 250)
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 5 MiB + 1536 B raw image (not a multiple of any cluster size above 512)."""
    return _make_source(tmp_path / "src.raw", 5 * MiB + 1536)


def _ranges(qemu_img: Run, path: Path) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for e in json.loads(qemu_img("map", "--output=json", "-U", path).stdout):
        if e["data"]:
            if out and out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], e["start"] + e["length"])
            else:
                out.append((e["start"], e["start"] + e["length"]))
    return out


def _inside(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    return all(any(a <= s and e <= b for a, b in outer) for s, e in inner)


def _qemu_options(options: dict[str, Any]) -> list[str]:
    opts = ",".join(f"{k}={'on' if v is True else v}" for k, v in options.items())
    return ["-o", opts] if opts else []


VARIANTS = [
    pytest.param({}, id="v3"),
    pytest.param({"compat": "0.10"}, id="v2"),
    pytest.param({"cluster_size": 512, "refcount_bits": 1}, id="512-rc1"),
    pytest.param({"cluster_size": 512, "refcount_bits": 64}, id="512-rc64-table-grows"),
    pytest.param({"cluster_size": 4096, "refcount_bits": 2}, id="4k-rc2"),
    pytest.param({"cluster_size": 4096, "refcount_bits": 4}, id="4k-rc4"),
    pytest.param({"cluster_size": 8192, "refcount_bits": 8}, id="8k-rc8"),
    pytest.param({"cluster_size": 1024, "refcount_bits": 32}, id="1k-rc32"),
    pytest.param({"extended_l2": True}, id="extl2"),
    pytest.param({"extended_l2": True, "cluster_size": 16384}, id="extl2-16k"),
    pytest.param({"cluster_size": 2 * MiB}, id="2M"),
    pytest.param({"lazy_refcounts": True}, id="lazy"),
    pytest.param({"compression_type": "zstd"}, id="zstd"),
]


class TestVariants:
    """Every qcow2 variant convert creates: clean, identical, no more allocated than qemu-img."""

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
    @pytest.mark.parametrize("options", VARIANTS)
    def test_against_qemu_img(
        self, source: Path, tmp_path: Path, qemu_img: Run, options: dict[str, Any], compress: bool
    ) -> None:
        """qemu-img check finds it clean, compare finds it identical; sizes as qemu-img's."""
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        images.convert(source, ours, compress=compress, **options)
        qemu_img("convert", *(["-c"] if compress else []), "-f", "raw", "-O", "qcow2",
                 *_qemu_options(options), source, theirs)  # fmt: skip
        checked = json.loads(qemu_img("check", "--output=json", ours).stdout)
        assert not checked.get("corruptions") and not checked.get("leaks"), checked
        assert not checked.get("check-errors"), checked
        qemu_img("compare", "-f", "raw", "-F", "qcow2", source, ours)
        ours_ranges, theirs_ranges = _ranges(qemu_img, ours), _ranges(qemu_img, theirs)
        small = options.get("cluster_size", 65536) < 4096
        if (options.get("extended_l2") or small) and not compress:
            # qemu-img allocates the 4 KiB blocks it writes; we, the non-zero
            # clusters (or subclusters): never more
            assert _inside(ours_ranges, theirs_ranges)
        else:
            assert ours_ranges == theirs_ranges
        if compress:
            theirs_check = json.loads(qemu_img("check", "--output=json", theirs).stdout)
            assert checked["compressed-clusters"] == theirs_check["compressed-clusters"] > 0
            assert ours.stat().st_size <= theirs.stat().st_size
        else:
            assert ours.stat().st_size <= theirs.stat().st_size + options.get("cluster_size", 65536)

    def test_refcount_table_grows(self, tmp_path: Path, qemu_img: Run) -> None:
        """Data past what the new image's refcount table can describe moves the table."""
        src = tmp_path / "dense.raw"
        src.write_bytes(random.Random(9).randbytes(3 * MiB))
        out = tmp_path / "out.qcow2"
        images.convert(src, out, cluster_size=512, refcount_bits=64)
        info = json.loads(qemu_img("info", "--output=json", out).stdout)
        assert info["virtual-size"] == 3 * MiB
        with out.open("rb") as fh:
            head = fh.read(64)
        assert int.from_bytes(head[48:56], "big") != 512  # no longer right after the header
        assert int.from_bytes(head[56:60], "big") > 1
        qemu_img("check", out)
        qemu_img("compare", src, out)

    def test_qcow2_source(self, source: Path, tmp_path: Path, qemu_img: Run) -> None:
        """A qcow2 source (read through Image.read, not the raw fast path) converts the same."""
        mid = tmp_path / "mid.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", source, mid)
        a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
        images.convert(mid, a)
        images.convert(source, b)
        assert a.read_bytes() == b.read_bytes()
        qemu_img("compare", source, a)

    def test_empty_and_all_zero_sources(self, tmp_path: Path, qemu_img: Run) -> None:
        """Holes only, or allocated zeroes only: no data cluster, a valid image."""
        holes = tmp_path / "holes.raw"
        holes.write_bytes(b"")
        with holes.open("r+b") as fh:
            fh.truncate(3 * MiB)
        zeros = tmp_path / "zeros.raw"
        zeros.write_bytes(bytes(3 * MiB))
        for src in (holes, zeros):
            out = tmp_path / f"{src.stem}.qcow2"
            images.convert(src, out)
            checked = json.loads(qemu_img("check", "--output=json", out).stdout)
            assert checked.get("allocated-clusters", 0) == 0
            qemu_img("compare", src, out)


class TestDeterministic:
    """The same source gives the same file, whatever the thread count."""

    def test_plain_runs_are_identical(self, source: Path, tmp_path: Path) -> None:
        """Two converts write the same bytes."""
        a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
        images.convert(source, a)
        images.convert(source, b)
        assert a.read_bytes() == b.read_bytes()

    @pytest.mark.parametrize("ctype", ["zlib", "zstd"])
    def test_compressed_same_as_one_thread_by_hand(
        self, monkeypatch: pytest.MonkeyPatch, source: Path, tmp_path: Path, ctype: str
    ) -> None:
        """1, 2 and 3 compressor threads write what one thread, cluster by cluster, writes."""
        outs = []
        for workers in (1, 2, 3):
            monkeypatch.setattr(convert_pipeline, "default_workers", lambda w=workers: w)
            out = tmp_path / f"w{workers}.qcow2"
            images.convert(source, out, compress=True, compression_type=ctype)
            outs.append(out.read_bytes())
        by_hand = tmp_path / "by-hand.qcow2"
        with images.open(source) as src:
            size = src.virtual_size
            images.create(by_hand, size, compression_type=ctype).close()
            writer = BulkWriter(by_hand)
            cs = writer.cluster_size
            for pos in range(0, size, cs):
                piece = src.read(pos, min(cs, size - pos))
                if piece != bytes(len(piece)):
                    writer.write_precompressed(pos, piece, writer.compress_cluster(piece))
            writer.finish()
        assert outs[0] == outs[1] == outs[2] == by_hand.read_bytes()


class TestOneFlush:
    """The target is written, then flushed once, then published."""

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
    def test_nothing_written_after_the_last_flush(
        self, source: Path, tmp_path: Path, compress: bool
    ) -> None:
        """The bulk writer's file gets one fdatasync, after its last write."""
        with faults.inject(faults.Recorder(keep_log=True), only=tmp_path) as rec:
            images.convert(source, tmp_path / "out.qcow2", compress=compress)
        temps = {path for path, *_ in rec.log if ".out.qcow2.virtkit-" in path}
        ops = [op for path, op, *_ in rec.log if path in temps]
        assert ops[-1] == "flush"
        # create() flushes the empty image, closing it flushes again, the bulk writer once
        assert ops.count("flush") <= 3, ops


class TestFaults:
    """A convert cut at any write, or by a full disk, leaves no target and no temporary file."""

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
    def test_crash_at_every_write(self, tmp_path: Path, compress: bool) -> None:
        """SimulatedCrash at each write: dst keeps its old bytes, the temp file is gone."""
        src = _make_source(tmp_path / "src.raw", 2 * MiB + 512, seed=4)
        dst = tmp_path / "dst.qcow2"
        with faults.inject(faults.Recorder(), only=tmp_path) as rec:
            images.convert(src, dst, compress=compress)
        assert rec.writes > 5
        dst.write_bytes(b"old image")
        for n in range(1, rec.writes + 1):
            plan = faults.CrashAfter(n)
            with pytest.raises(faults.SimulatedCrash), faults.inject(plan, only=tmp_path):
                images.convert(src, dst, compress=compress)
            assert dst.read_bytes() == b"old image"
            assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.qcow2", "src.raw"], n

    @pytest.mark.parametrize("at_write", [2, 5, 9, 14])
    def test_disk_full(self, source: Path, tmp_path: Path, at_write: int) -> None:
        """ENOSPC at a write: ImageError naming dst's directory's file, nothing left behind."""
        dst = tmp_path / "dst.qcow2"
        plan = faults.NoSpace(at_write=at_write)
        with (
            pytest.raises(virtkit.ImageError, match="No space"),
            faults.inject(plan, only=tmp_path),
        ):
            images.convert(source, dst)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src.raw"]

    def test_sigkill_mid_copy_keeps_old_destination(self, source: Path, tmp_path: Path) -> None:
        """kill -9 during a qcow2 convert: dst keeps its old bytes; at most a hidden temp file."""
        dst = tmp_path / "dst.qcow2"
        dst.write_bytes(b"previous image")
        script = (
            "import sys, time, virtkit.images as I\n"
            "def slow(done, total):\n"
            "    if done:\n"
            "        print(done, flush=True)\n"
            "        time.sleep(0.05)\n"
            "I.convert(sys.argv[1], sys.argv[2], progress=slow)\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(source), str(dst)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        for _ in range(2):
            assert child.stdout.readline()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert dst.read_bytes() == b"previous image"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("dst.qcow2", "src.raw")]
        assert all(name.startswith(".dst.qcow2.virtkit-") for name in leftovers), leftovers

    def test_raw_source_is_read_into_buffers(self, source: Path) -> None:
        """A raw file source takes the preadv path (no allocation per chunk)."""
        with images.open(source) as img:
            assert convert_pipeline._file_reader(img) is not None

    def test_failing_source_read_stops_the_pipeline(
        self, monkeypatch: pytest.MonkeyPatch, source: Path, tmp_path: Path
    ) -> None:
        """An OSError reading a raw source becomes an ImageError; no thread or file is left."""
        calls = {"n": 0}
        real = os.preadv

        def preadv(fd: int, buffers: Any, offset: int) -> int:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(5, "Input/output error")
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        with pytest.raises(virtkit.ImageError, match="read failed"):
            images.convert(source, tmp_path / "out.qcow2", compress=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src.raw"]


class TestBadInput:
    """BulkWriter refuses what it cannot do, with the file named."""

    def _new(self, tmp_path: Path, size: int = 4 * MiB, **options: Any) -> BulkWriter:
        path = tmp_path / "new.qcow2"
        images.create(path, size, **options).close()
        return BulkWriter(path)

    def test_out_of_order(self, tmp_path: Path) -> None:
        """A write below the last one is refused."""
        w = self._new(tmp_path)
        w.write_clusters(MiB, b"a" * 65536)
        with pytest.raises(virtkit.ImageError, match="increasing order"):
            w.write_clusters(0, b"b" * 65536)
        w.close()

    def test_misaligned_and_partial(self, tmp_path: Path) -> None:
        """Offsets off a cluster boundary and part clusters before the end are refused."""
        w = self._new(tmp_path)
        with pytest.raises(virtkit.ImageError, match="increasing order of whole clusters"):
            w.write_clusters(512, b"a" * 65536)
        with pytest.raises(virtkit.ImageError, match="whole clusters"):
            w.write_clusters(0, b"a" * 1000)
        with pytest.raises(virtkit.ImageError, match="one whole cluster"):
            w.write_precompressed(0, b"a" * 1000, b"zz")
        w.close()

    def test_past_the_end(self, tmp_path: Path) -> None:
        """A write past the virtual size is refused."""
        w = self._new(tmp_path, size=MiB)
        with pytest.raises(virtkit.ImageError, match="runs past the end"):
            w.write_clusters(MiB, b"a" * 65536)
        w.close()

    def test_image_with_data_refused(self, tmp_path: Path) -> None:
        """An image that already maps data (metadata preallocation) is not a new image."""
        path = tmp_path / "pre.qcow2"
        images.create(path, MiB, preallocation="metadata").close()
        with pytest.raises(virtkit.ImageError, match="no data yet"):
            BulkWriter(path)

    def test_image_with_backing_refused(self, tmp_path: Path) -> None:
        """An overlay is never filled by the bulk writer (convert -B keeps the generic path)."""
        base = tmp_path / "base.qcow2"
        images.create(base, MiB).close()
        top = tmp_path / "top.qcow2"
        images.create(top, None, backing="base.qcow2", backing_format="qcow2").close()
        with pytest.raises(virtkit.ImageError, match="no backing file"):
            BulkWriter(top)

    def test_finished_file_is_valid(self, tmp_path: Path, qemu_img: Run) -> None:
        """Clusters written by hand, compressed and not, read back through qemu-img."""
        w = self._new(tmp_path, size=MiB + 512)
        data = b"hello world " * 6000
        w.write_clusters(0, data[:65536])
        w.write_precompressed(65536, data[:65536], w.compress_cluster(data[:65536]))
        tail = b"t" * 512
        w.write_precompressed(MiB, tail, w.compress_cluster(tail))
        w.finish()
        path = tmp_path / "new.qcow2"
        qemu_img("check", path)
        with images.open(path) as img:
            assert img.read(0, 65536) == data[:65536]
            assert img.read(65536, 65536) == data[:65536]
            assert img.read(MiB, 512) == tail
            assert img.read(131072, 4096) == bytes(4096)


class TestBoundedMetadata:
    """The writer keeps one L2 table and a few refcount blocks in memory, however much it writes."""

    def test_blocks_behind_the_end_are_written(self, tmp_path: Path, qemu_img: Run) -> None:
        """512 B clusters, 64-bit counts (a block per 32 KiB): a shared cluster holds back only its own."""
        path = tmp_path / "new.qcow2"
        images.create(path, 4 * MiB, cluster_size=512, refcount_bits=64).close()
        w = BulkWriter(path)
        text = b"compressible " * 40
        w.write_precompressed(0, text[:512], w.compress_cluster(text[:512]))  # a shared cluster
        rng = random.Random(2)
        most = 0
        for pos in range(4096, 3 * MiB, 4096):
            w.write_clusters(pos, rng.randbytes(4096))
            most = max(most, len(w.blocks))
        w.write_precompressed(3 * MiB, text[:512], w.compress_cluster(text[:512]))
        w.finish()
        assert most <= 4
        qemu_img("check", path)
        with images.open(path) as img:
            assert img.read(0, 512) == text[:512] == img.read(3 * MiB, 512)

"""convert as a pipeline: parallel compression, deterministic output, bounded memory."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit import images
from virtkit.images import convert_pipeline
from virtkit.testing import faults

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20


@pytest.fixture
def mixed_raw(tmp_path: Path) -> Path:
    """A 24 MiB raw image: text-like, random and zero clusters, holes, an odd tail."""
    path = tmp_path / "src.raw"
    rng = random.Random(5)
    words = [rng.randbytes(rng.randrange(2, 9)) for _ in range(300)]
    size = 24 * MiB + 3 * 512  # not a multiple of the cluster size: a short last cluster
    with path.open("wb") as fh:
        fh.truncate(size)
        for i in range(0, 24 * MiB, 192 * 1024):
            fh.seek(i)
            if i % 3:
                fh.write(b" ".join(rng.choice(words) for _ in range(20000))[: 100 * 1024])
            else:
                fh.write(rng.randbytes(64 * 1024) + bytes(4096) + rng.randbytes(777))
        fh.seek(size - 1000)
        fh.write(b"tail" * 250)
    return path


def _convert_with(
    monkeypatch: pytest.MonkeyPatch, workers: int, src: Path, dst: Path, ctype: str = "zlib"
) -> bytes:
    monkeypatch.setattr(convert_pipeline, "default_workers", lambda: workers)
    images.convert(src, dst, compress=True, cluster_size=65536, compression_type=ctype)
    return dst.read_bytes()


class TestBarriers:
    """raw -> qcow2 takes its barriers per write-back batch, not per extent."""

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
    def test_flushes_do_not_grow_with_extents(self, tmp_path: Path, compress: bool) -> None:
        """300 separate data extents are converted with the same few fdatasyncs as 3."""
        counts = []
        for extents in (3, 300):
            src = tmp_path / f"src{extents}.raw"
            with src.open("wb") as fh:
                fh.truncate(64 * MiB)
                for i in range(extents):
                    fh.seek(i * (64 * MiB // extents) // 65536 * 65536)
                    fh.write(random.Random(i).randbytes(4096))
            with faults.inject(faults.Recorder(), only=tmp_path) as rec:
                images.convert(src, tmp_path / f"out{extents}.qcow2", compress=compress)
            counts.append(rec.flushes)
        assert counts[1] == counts[0] <= 6, counts


class TestParallelCompression:
    """Compressed convert on several threads."""

    @pytest.mark.parametrize("ctype", ["zlib", "zstd"])
    def test_output_identical_to_one_thread(
        self,
        monkeypatch: pytest.MonkeyPatch,
        mixed_raw: Path,
        tmp_path: Path,
        qemu_img: QemuImg,
        ctype: str,
    ) -> None:
        """1, 2 and 3 compressor threads write the same bytes, run after run."""
        one = _convert_with(monkeypatch, 1, mixed_raw, tmp_path / "one.qcow2", ctype)
        two = _convert_with(monkeypatch, 2, mixed_raw, tmp_path / "two.qcow2", ctype)
        three = _convert_with(monkeypatch, 3, mixed_raw, tmp_path / "three.qcow2", ctype)
        again = _convert_with(monkeypatch, 2, mixed_raw, tmp_path / "again.qcow2", ctype)
        assert one == two == three == again
        qemu_img("check", tmp_path / "two.qcow2")
        qemu_img("compare", mixed_raw, tmp_path / "two.qcow2")
        info = qemu_img("info", tmp_path / "two.qcow2").stdout
        assert f"compression type: {ctype}" in info

    def test_same_content_as_cluster_by_cluster_writes(
        self, monkeypatch: pytest.MonkeyPatch, mixed_raw: Path, tmp_path: Path, qemu_img: QemuImg
    ) -> None:
        """The pipeline stores what write_compressed, cluster by cluster, stores (other layout)."""
        _convert_with(monkeypatch, 2, mixed_raw, tmp_path / "piped.qcow2")
        cs = 65536
        by_hand = tmp_path / "by-hand.qcow2"
        with images.open(mixed_raw) as src:
            size = src.virtual_size
            with images.create(by_hand, size, cluster_size=cs) as out:
                for ext in src.block_status(0, size):
                    if ext.kind != "data":
                        continue
                    first = ext.start // cs * cs
                    for pos in range(first, min(ext.start + ext.length, size), cs):
                        piece = src.read(pos, min(cs, size - pos))
                        if piece == bytes(len(piece)):
                            continue
                        out.write_compressed(pos, piece)  # type: ignore[attr-defined]
        qemu_img("compare", "-s", by_hand, tmp_path / "piped.qcow2")
        piped = json.loads(qemu_img("check", "--output=json", tmp_path / "piped.qcow2").stdout)
        hand = json.loads(qemu_img("check", "--output=json", by_hand).stdout)
        assert piped["compressed-clusters"] == hand["compressed-clusters"] > 0

    def test_compressed_no_bigger_than_qemu_img(
        self, mixed_raw: Path, tmp_path: Path, qemu_img: QemuImg
    ) -> None:
        """Our compressed file is not bigger than qemu-img convert -c's."""
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        images.convert(mixed_raw, ours, compress=True)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", mixed_raw, theirs)
        assert ours.stat().st_size <= theirs.stat().st_size

    def test_read_error_stops_the_pipeline(
        self, monkeypatch: pytest.MonkeyPatch, mixed_raw: Path, tmp_path: Path
    ) -> None:
        """A failing source read surfaces as its own error; no thread or temp file is left."""
        calls = {"n": 0}
        real_open = images.open

        def failing_open(path: object, *args: object, **kwargs: object) -> images.Image:
            img = real_open(path, *args, **kwargs)  # type: ignore[arg-type]
            inner = img.read

            def read(offset: int, length: int) -> bytes:
                calls["n"] += 1
                if calls["n"] == 5:
                    raise virtkit.ImageError("simulated read failure", path=str(path))
                return inner(offset, length)

            img.read = read  # type: ignore[method-assign]
            return img

        monkeypatch.setattr(images, "open", failing_open)
        monkeypatch.setattr(convert_pipeline, "_file_reader", lambda src: None)  # use src.read
        with pytest.raises(virtkit.ImageError, match="simulated read failure"):
            images.convert(mixed_raw, tmp_path / "out.qcow2", compress=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src.raw"]

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
    def test_chunks_out_are_bounded(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compress: bool
    ) -> None:
        """Chunks read through Image.read and not yet handed back never exceed depth + 2."""
        dense = tmp_path / "dense.raw"
        rng = random.Random(8)
        dense.write_bytes(b"".join(rng.randbytes(512) + bytes(3584) for _ in range(2048)))
        monkeypatch.setattr(convert_pipeline, "_file_reader", lambda src: None)  # use src.read
        monkeypatch.setattr(convert_pipeline, "CHUNK", 128 * 1024)  # many chunks in 24 MiB
        counts = {"read": 0, "released": 0, "most": 0}
        real_open, real_release = images.open, convert_pipeline._Reader.release

        def counting_open(path: object, *args: object, **kwargs: object) -> images.Image:
            img = real_open(path, *args, **kwargs)  # type: ignore[arg-type]
            inner = img.read

            def read(offset: int, length: int) -> bytes:
                counts["read"] += 1
                counts["most"] = max(counts["most"], counts["read"] - counts["released"])
                return inner(offset, length)

            img.read = read  # type: ignore[method-assign]
            return img

        def release(self: Any, buf: bytes | bytearray | None) -> None:
            if buf is not None:
                counts["released"] += 1
            real_release(self, buf)

        def slow(done: int, total: int) -> None:
            time.sleep(0.001)  # the reader gets ahead of the writer

        monkeypatch.setattr(images, "open", counting_open)
        monkeypatch.setattr(convert_pipeline._Reader, "release", release)
        images.convert(dense, tmp_path / "out.qcow2", compress=compress, progress=slow)
        depth = 2 * convert_pipeline.default_workers() + 1
        assert counts["read"] > 3 * depth
        assert counts["most"] <= depth + 2

    def test_memory_bound_is_stated(self) -> None:
        """The bound the docs state: (depth + 2) read buffers and depth compressed chunks."""
        depth = 5  # 2 per worker + 1
        assert convert_pipeline.memory_bound(2) == (2 * depth + 2) * convert_pipeline.CHUNK
        assert convert_pipeline.memory_bound(2) <= 32 * MiB


RSS_CHILD = textwrap.dedent(
    """
    import sys
    from virtkit import images
    src, dst, compress = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    images.convert(src, dst, compress=compress)
    # VmHWM is this process's own peak; ru_maxrss is not: a child spawned with
    # vfork inherits the parent's high-water mark at exec (a big pytest process)
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) // 1024)  # KiB -> MiB
    """
)


class TestBoundedMemory:
    """A 100 GiB sparse image converts in a small, fixed amount of memory."""

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
    def test_rss_of_100_gib_sparse_convert(
        self, tmp_path: Path, qemu_img: QemuImg, compress: bool
    ) -> None:
        """Peak RSS of the converting process stays under 150 MiB (measured in a child)."""
        src = tmp_path / "big.raw"
        rng = random.Random(3)
        with src.open("wb") as fh:
            fh.truncate(100 << 30)
            for gib in range(0, 100, 4):  # 4 MiB of data every 4 GiB: 100 MiB in all
                fh.seek(gib << 30)
                fh.write(rng.randbytes(2 * MiB) + bytes(MiB) + b"text " * (MiB // 5))
        dst = tmp_path / "big.qcow2"
        proc = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(src), str(dst), "1" if compress else "0"],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        peak_mib = int(proc.stdout.split()[-1])
        print(f"100 GiB sparse convert (compress={compress}): peak RSS {peak_mib} MiB")
        assert peak_mib < 150
        with images.open(dst) as out, images.open(src) as inp:
            assert out.virtual_size == 100 << 30
            for gib in (0, 48, 96):
                at = gib << 30
                assert out.read(at, 4 * MiB) == inp.read(at, 4 * MiB)
        qemu_img("check", dst)

"""convert / measure / rebase / commit with qcow2 images, checked against qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
import virtkit.images

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20


def _qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=120)


def _data_ranges(qemu_img: Run, path: Path) -> list[tuple[int, int]]:
    """Guest ranges qemu-img map reports as data stored in the top image, merged."""
    out: list[tuple[int, int]] = []
    for e in json.loads(qemu_img("map", "--output=json", "-U", path).stdout):
        if e["data"] and e["depth"] == 0:
            if out and out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], e["start"] + e["length"])
            else:
                out.append((e["start"], e["start"] + e["length"]))
    return out


def _export(qemu_img: Run, path: Path, out: Path) -> bytes:
    qemu_img("convert", "-U", "-O", "raw", path, out)
    return out.read_bytes()


@pytest.fixture
def text_raw(tmp_path: Path, qemu_img: Run) -> Path:
    """An 8 MiB raw image: compressible text, random bytes, zero-filled data, holes."""
    path = tmp_path / "src.raw"
    qemu_img("create", "-f", "raw", path, "8M")
    text = b"The quick brown fox jumps over the lazy dog. " * 25000
    with virtkit.images.open(path, writable=True, format="raw") as img:
        img.write(0, text[: MiB + 100])
        img.write(3 * MiB + 4096, os.urandom(200_000))
        img.write(5 * MiB, bytes(MiB))  # allocated but zero
        img.write(8 * MiB - 700, b"\x01" * 700)
    return path


class TestConvertToQcow2:
    """raw/qcow2 -> qcow2."""

    @pytest.mark.parametrize(
        "options",
        [
            {},
            {"compat": "0.10"},
            {"cluster_size": 4096, "refcount_bits": 1},
            {"extended_l2": True},
            {"cluster_size": 2 * MiB},
        ],
        ids=["v3", "v2", "4k-rc1", "extl2", "2M"],
    )
    def test_raw_to_qcow2_matches_qemu_img(
        self, text_raw: Path, tmp_path: Path, qemu_img: Run, options: dict[str, Any]
    ) -> None:
        """Our qcow2 compares equal, checks clean and stores the same ranges as qemu-img's."""
        ours = tmp_path / "ours.qcow2"
        theirs = tmp_path / "theirs.qcow2"
        virtkit.images.convert(text_raw, ours, format="qcow2", **options)
        opts = ",".join(f"{k}={'on' if v is True else v}" for k, v in options.items())
        qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-o", opts] if opts else []),
                 text_raw, theirs)  # fmt: skip
        assert qemu_img("check", ours).returncode == 0
        assert qemu_img("compare", "-F", "raw", ours, text_raw).returncode == 0
        ours_ranges, theirs_ranges = _data_ranges(qemu_img, ours), _data_ranges(qemu_img, theirs)
        if options.get("extended_l2"):
            # qemu-img allocates the 4 KiB blocks it writes, virtkit the non-zero subclusters
            assert all(any(a <= s and e <= b for a, b in theirs_ranges) for s, e in ours_ranges)
        else:
            assert ours_ranges == theirs_ranges

    def test_qcow2_chain_to_qcow2_flattens(self, tmp_path: Path, qemu_img: Run) -> None:
        """A qemu-img backing chain converts into one self-contained image with the same bytes."""
        base = tmp_path / "base.qcow2"
        qemu_img("create", "-f", "qcow2", base, "4M")
        _qemu_io(base, "qcow2", "write -P 0x11 0 2M")
        top = tmp_path / "top.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
        _qemu_io(top, "qcow2", "write -P 0x22 1M 64k", "write -z 0 4k")
        out = tmp_path / "flat.qcow2"
        virtkit.images.convert(top, out)
        with virtkit.images.open(out) as img:
            assert img.backing_file is None
        assert qemu_img("check", out).returncode == 0
        assert qemu_img("compare", top, out).returncode == 0

    def test_compressed_zlib(self, text_raw: Path, tmp_path: Path, qemu_img: Run) -> None:
        """compress=True writes compressed clusters: much smaller, checks clean, same bytes."""
        plain = tmp_path / "plain.qcow2"
        packed = tmp_path / "packed.qcow2"
        virtkit.images.convert(text_raw, plain)
        virtkit.images.convert(text_raw, packed, compress=True)
        theirs = tmp_path / "theirs.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", text_raw, theirs)
        ours_check = json.loads(qemu_img("check", "--output=json", packed).stdout)
        theirs_check = json.loads(qemu_img("check", "--output=json", theirs).stdout)
        assert ours_check["compressed-clusters"] == theirs_check["compressed-clusters"] > 10
        assert ours_check["allocated-clusters"] == theirs_check["allocated-clusters"]
        assert qemu_img("compare", "-F", "raw", packed, text_raw).returncode == 0
        assert os.path.getsize(packed) < os.path.getsize(plain) - 800_000
        with virtkit.images.open(packed) as img:
            assert img.read(0, 45) == b"The quick brown fox jumps over the lazy dog. "

    def test_compressed_zstd(
        self, text_raw: Path, tmp_path: Path, qemu_img: Run, qemu_img_info: Callable[[Path], Any]
    ) -> None:
        """compression_type=zstd makes a zstd image qemu-img reads identically."""
        packed = tmp_path / "zstd.qcow2"
        virtkit.images.convert(text_raw, packed, compress=True, compression_type="zstd")
        checked = json.loads(qemu_img("check", "--output=json", packed).stdout)
        assert checked["compressed-clusters"] > 10
        info = qemu_img_info(packed)
        assert info["format-specific"]["data"]["compression-type"] == "zstd"
        assert qemu_img("check", packed).returncode == 0
        assert qemu_img("compare", "-F", "raw", packed, text_raw).returncode == 0
        assert os.path.getsize(packed) < 3 * MiB

    def test_progress_and_atomicity(self, text_raw: Path, tmp_path: Path) -> None:
        """A failing qcow2 convert leaves no dst and no temp file; progress reaches total."""
        calls: list[int] = []
        virtkit.images.convert(
            text_raw, tmp_path / "a.qcow2", progress=lambda d, t: calls.append(d)
        )
        assert calls[-1] == 8 * MiB

        def boom(done: int, total: int) -> None:
            if done >= 3 * MiB:
                raise OSError("disk on fire")

        with pytest.raises(OSError, match="fire"):
            virtkit.images.convert(text_raw, tmp_path / "b.qcow2", compress=True, progress=boom)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.qcow2", "src.raw"]


class TestConvertFromQcow2:
    """qcow2 -> raw."""

    def test_qemu_made_compressed_to_raw(
        self, text_raw: Path, tmp_path: Path, qemu_img: Run
    ) -> None:
        """A qemu-img compressed image converts to a raw image equal to the original."""
        packed = tmp_path / "q.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", text_raw, packed)
        out = tmp_path / "out.raw"
        virtkit.images.convert(packed, out, format="raw")
        assert out.read_bytes() == text_raw.read_bytes()
        assert os.stat(out).st_blocks * 512 < 3 * MiB  # holes stay holes


class TestMeasureQcow2:
    """measure() with qcow2 sources equals qemu-img measure."""

    @pytest.mark.parametrize("target", [{}, {"compat": "0.10"}, {"cluster_size": 4096}])
    def test_qcow2_source(
        self, text_raw: Path, tmp_path: Path, qemu_img: Run, target: dict[str, Any]
    ) -> None:
        """required/fully-allocated/bitmaps match for a qcow2 source."""
        src = tmp_path / "s.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", text_raw, src)
        opts = ",".join(f"{k}={v}" for k, v in target.items())
        theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2",
                                     *(["-o", opts] if opts else []), src).stdout)  # fmt: skip
        assert virtkit.images.measure(src, "qcow2", **target) == theirs

    @pytest.mark.parametrize("with_backing", [False, True])
    def test_chain_source(self, tmp_path: Path, qemu_img: Run, with_backing: bool) -> None:
        """A backing chain counts its data through every layer (all of it with -o backing_file)."""
        base, top = tmp_path / "b.qcow2", tmp_path / "t.qcow2"
        qemu_img("create", "-f", "qcow2", base, "10M")
        _qemu_io(base, "qcow2", "write 0 1M")
        qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top)
        _qemu_io(top, "qcow2", "write 5M 64k", "write -z 0 64k")
        extra = ["-o", "backing_file=b.qcow2,backing_fmt=qcow2"] if with_backing else []
        theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", *extra,
                                     top).stdout)  # fmt: skip
        options = {"backing": "b.qcow2", "backing_format": "qcow2"} if with_backing else {}
        assert virtkit.images.measure(top, "qcow2", **options) == theirs

    @pytest.mark.parametrize("cluster_size", [65536, 4096])
    def test_source_with_bitmaps(self, tmp_path: Path, qemu_img: Run, cluster_size: int) -> None:
        """The bitmaps figure counts the source's persistent bitmaps as qemu-img does."""
        src = tmp_path / "bm.qcow2"
        qemu_img("create", "-f", "qcow2", src, "100M")
        qemu_img("bitmap", "--add", "-g", "65536", src, "first")
        qemu_img("bitmap", "--add", "-g", "512", src, "a_longer_bitmap_name")
        theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "-o",
                                     f"cluster_size={cluster_size}", src).stdout)  # fmt: skip
        assert theirs["bitmaps"] > 0
        assert virtkit.images.measure(src, "qcow2", cluster_size=cluster_size) == theirs


@pytest.fixture
def chain(tmp_path: Path, qemu_img: Run) -> tuple[Path, Path, Path]:
    """base1/base2 (qcow2, differing in places) and an overlay on base1 with its own writes."""
    base1, base2, top = tmp_path / "base1.qcow2", tmp_path / "base2.qcow2", tmp_path / "top.qcow2"
    for b in (base1, base2):
        qemu_img("create", "-f", "qcow2", b, "4M")
    _qemu_io(base1, "qcow2", "write -P 0x11 0 1M", "write -P 0x12 2M 512k")
    _qemu_io(base2, "qcow2", "write -P 0x11 0 1M", "write -P 0x99 3M 64k")
    qemu_img("create", "-f", "qcow2", "-b", "base1.qcow2", "-F", "qcow2", top)
    _qemu_io(top, "qcow2", "write -P 0x33 512k 100k", "write -z 2M 64k")
    return base1, base2, top


class TestRebase:
    """rebase() as qemu-img rebase."""

    def test_safe_rebase_keeps_contents(
        self,
        chain: tuple[Path, Path, Path],
        tmp_path: Path,
        qemu_img: Run,
        qemu_img_info: Callable[[Path], Any],
    ) -> None:
        """After a safe rebase the overlay reads exactly as before, over the new backing file."""
        _, _, top = chain
        before = _export(qemu_img, top, tmp_path / "before.raw")
        virtkit.images.rebase(top, "base2.qcow2", backing_format="qcow2")
        info = qemu_img_info(top)
        assert info["backing-filename"] == "base2.qcow2"
        assert info["backing-filename-format"] == "qcow2"
        assert qemu_img("check", top).returncode == 0
        assert _export(qemu_img, top, tmp_path / "after.raw") == before

    def test_unsafe_rebase_only_changes_header(
        self, chain: tuple[Path, Path, Path], tmp_path: Path, qemu_img: Run
    ) -> None:
        """unsafe=True copies nothing: unallocated ranges now read base2's bytes."""
        _, _base2, top = chain
        virtkit.images.rebase(top, "base2.qcow2", backing_format="qcow2", unsafe=True)
        with virtkit.images.open(top) as img:
            assert img.read(3 * MiB, 16) == b"\x99" * 16
            assert img.read(2 * MiB + 64 * 1024, 16) == bytes(16)
        assert qemu_img("check", top).returncode == 0

    def test_rebase_to_nothing_flattens(
        self, chain: tuple[Path, Path, Path], tmp_path: Path, qemu_img: Run
    ) -> None:
        """rebase(image, None) copies all backing data in and drops the backing file."""
        _, _, top = chain
        before = _export(qemu_img, top, tmp_path / "before.raw")
        virtkit.images.rebase(top, None)
        with virtkit.images.open(top) as img:
            assert img.backing_file is None
        assert _export(qemu_img, top, tmp_path / "after.raw") == before
        assert qemu_img("check", top).returncode == 0


class TestCommit:
    """commit() as qemu-img commit."""

    def test_commit_into_qcow2_base(
        self, chain: tuple[Path, Path, Path], tmp_path: Path, qemu_img: Run
    ) -> None:
        """The base takes the overlay's data and zeroes; the overlay is emptied but reads the same."""
        base1, _, top = chain
        before = _export(qemu_img, top, tmp_path / "before.raw")
        virtkit.images.commit(top)
        assert _export(qemu_img, base1, tmp_path / "base.raw") == before
        assert _export(qemu_img, top, tmp_path / "top.raw") == before
        assert qemu_img("check", base1).returncode == 0
        assert qemu_img("check", top).returncode == 0
        assert _data_ranges(qemu_img, top) == []

    def test_commit_into_raw_base(self, tmp_path: Path, qemu_img: Run) -> None:
        """Committing onto a raw backing file writes the overlay's bytes into it."""
        base = tmp_path / "base.raw"
        qemu_img("create", "-f", "raw", base, "2M")
        top = tmp_path / "top.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
        _qemu_io(top, "qcow2", "write -P 0x42 4096 8192")
        virtkit.images.commit(top)
        assert base.read_bytes()[4096 : 4096 + 8192] == b"\x42" * 8192
        assert qemu_img("check", top).returncode == 0

    def test_commit_without_backing_refused(self, tmp_path: Path, qemu_img: Run) -> None:
        """An image with no backing file cannot be committed."""
        img = tmp_path / "solo.qcow2"
        qemu_img("create", "-f", "qcow2", img, "1M")
        with pytest.raises(virtkit.ImageError, match="no backing file"):
            virtkit.images.commit(img)


class TestConvertOntoBacking:
    """convert(..., backing=...) as qemu-img convert -B."""

    def test_only_differences_are_stored(self, tmp_path: Path, qemu_img: Run) -> None:
        """The new overlay stores only clusters that differ from its backing file, zeroes too."""
        base = tmp_path / "base.qcow2"
        qemu_img("create", "-f", "qcow2", base, "2M")
        _qemu_io(base, "qcow2", "write -P 0x11 0 1M")
        src = tmp_path / "src.raw"
        qemu_img("convert", "-O", "raw", base, src)
        _qemu_io(src, "raw", "write -P 0x22 128k 64k", "write -z 512k 64k")
        out = tmp_path / "out.qcow2"
        virtkit.images.convert(src, out, backing="base.qcow2", backing_format="qcow2")
        assert qemu_img("compare", "-F", "raw", out, src).returncode == 0
        assert qemu_img("check", out).returncode == 0
        assert _data_ranges(qemu_img, out) == [(128 * 1024, 192 * 1024)]


class TestChainEdges:
    """rebase/commit corner cases."""

    def test_commit_keeps_overlay_with_snapshots_consistent(
        self, chain: tuple[Path, Path, Path], tmp_path: Path, qemu_img: Run
    ) -> None:
        """An overlay with an internal snapshot keeps it; base and overlay both read the data."""
        base1, _, top = chain
        qemu_img("snapshot", "-c", "keep", top)
        before = _export(qemu_img, top, tmp_path / "before.raw")
        virtkit.images.commit(top)
        assert _export(qemu_img, base1, tmp_path / "base.raw") == before
        assert _export(qemu_img, top, tmp_path / "top.raw") == before
        assert "keep" in qemu_img("snapshot", "-l", top).stdout
        assert qemu_img("check", top).returncode == 0

    def test_rebase_onto_raw_backing_probed(
        self,
        chain: tuple[Path, Path, Path],
        tmp_path: Path,
        qemu_img: Run,
        qemu_img_info: Callable[[Path], Any],
    ) -> None:
        """Rebasing onto a raw file the caller names records format raw and keeps contents."""
        _, _, top = chain
        raw = tmp_path / "new.raw"
        qemu_img("create", "-f", "raw", raw, "4M")
        _qemu_io(raw, "raw", "write -P 0x5e 1M 1M")
        before = _export(qemu_img, top, tmp_path / "before.raw")
        virtkit.images.rebase(top, "new.raw")
        assert qemu_img_info(top)["backing-filename-format"] == "raw"
        assert _export(qemu_img, top, tmp_path / "after.raw") == before
        assert qemu_img("check", top).returncode == 0

    def test_progress_of_commit_and_rebase(
        self, chain: tuple[Path, Path, Path], tmp_path: Path
    ) -> None:
        """commit and rebase report progress ending at their totals."""
        _, _, top = chain
        seen: list[tuple[int, int]] = []
        virtkit.images.rebase(top, "base2.qcow2", backing_format="qcow2",
                              progress=lambda d, t: seen.append((d, t)))  # fmt: skip
        assert seen and seen[-1][0] == seen[-1][1] == 4 * MiB
        seen.clear()
        virtkit.images.commit(top, progress=lambda d, t: seen.append((d, t)))
        assert seen and seen[-1][0] == seen[-1][1] > 0

"""The raw driver: sparse files, hole punching, block status, checked against qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit.images import raw
from virtkit.images.base import Extent

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20


def _qemu_map(qemu_img: Run, path: Path) -> list[tuple[int, int, str]]:
    """qemu-img map as (start, length, "data"/"zero") runs, adjacent runs merged."""
    runs: list[tuple[int, int, str]] = []
    for entry in json.loads(qemu_img("map", "--output=json", "-U", path).stdout):
        kind = "data" if entry["data"] else "zero"
        if runs and runs[-1][2] == kind:
            start, length, _ = runs[-1]
            runs[-1] = (start, length + entry["length"], kind)
        else:
            runs.append((entry["start"], entry["length"], kind))
    return runs


def _ours(img: virtkit.images.Image) -> list[tuple[int, int, str]]:
    return [(e.start, e.length, e.kind) for e in img.block_status()]


class TestCreate:
    """Creating raw images."""

    def test_create_is_sparse(self, tmp_path: Path, qemu_img_info: Callable[[Path], Any]) -> None:
        """A new raw image has its full virtual size and allocates nothing, as qemu-img's."""
        path = tmp_path / "a.raw"
        with virtkit.images.create(path, "64M", format="raw") as img:
            assert img.virtual_size == 64 * MiB
            assert img.info().actual_size == 0
        info = qemu_img_info(path)
        assert info["format"] == "raw"
        assert info["virtual-size"] == 64 * MiB
        assert info["actual-size"] == 0

    def test_create_refuses_existing_file(self, tmp_path: Path) -> None:
        """create() never overwrites a file."""
        path = tmp_path / "a.raw"
        path.write_bytes(b"keep me")
        with pytest.raises(virtkit.ImageError, match="exists"):
            virtkit.images.create(path, "1M", format="raw")
        assert path.read_bytes() == b"keep me"

    def test_full_preallocation_allocates(self, tmp_path: Path) -> None:
        """preallocation=full writes every byte; falloc reserves the blocks."""
        for mode in ("full", "falloc"):
            path = tmp_path / f"{mode}.raw"
            with raw.create(path, 2 * MiB, preallocation=mode) as img:
                assert img.info().actual_size >= 2 * MiB
                assert img.read(0, 4096) == bytes(4096)

    def test_unknown_option_refused(self, tmp_path: Path) -> None:
        """Raw has no cluster size or compat option; asking is a ConfigError and creates nothing."""
        with pytest.raises(virtkit.ConfigError, match="compat"):
            raw.create(tmp_path / "x.raw", MiB, compat="1.1")
        with pytest.raises(virtkit.ConfigError, match="preallocation"):
            raw.create(tmp_path / "y.raw", MiB, preallocation="metadata")
        assert not (tmp_path / "x.raw").exists()
        assert not (tmp_path / "y.raw").exists()


class TestData:
    """Reads, writes, zeroes and discards."""

    def test_round_trip_matches_qemu_io(self, tmp_path: Path) -> None:
        """Bytes we write at odd offsets are what qemu-io reads back."""
        path = tmp_path / "a.raw"
        with virtkit.images.create(path, "1M", format="raw") as img:
            img.write(1000, b"\xab" * 3000)
            assert img.read(999, 3002) == b"\0" + b"\xab" * 3000 + b"\0"
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "read -P 0xab 1000 3000", "-c", "read -P 0 0 1000",
             str(path)],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0
        assert "Pattern verification failed" not in proc.stdout

    def test_reads_qemu_written_data(self, tmp_path: Path, qemu_img: Run) -> None:
        """Data written by qemu-io reads back identically through virtkit."""
        path = tmp_path / "a.raw"
        qemu_img("create", "-f", "raw", path, "1M")
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 65536 8192", str(path)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        with virtkit.images.open(path) as img:
            assert img.format == "raw"
            assert img.read(65536, 8192) == b"\x5a" * 8192
            assert img.read(0, 65536) == bytes(65536)

    def test_out_of_range_refused(self, tmp_path: Path) -> None:
        """Reads and writes past the end or at negative offsets raise ImageError."""
        with virtkit.images.create(tmp_path / "a.raw", 4096, format="raw") as img:
            with pytest.raises(virtkit.ImageError, match="past the end"):
                img.read(4000, 200)
            with pytest.raises(virtkit.ImageError, match="past the end"):
                img.write(4095, b"ab")
            with pytest.raises(virtkit.ImageError, match="negative"):
                img.read(-1, 1)
            assert img.read(4096, 0) == b""
            assert os.path.getsize(tmp_path / "a.raw") == 4096

    def test_write_zeroes_punches_hole(self, tmp_path: Path, qemu_img: Run) -> None:
        """write_zeroes frees the blocks; reads give zeroes; qemu-img map shows a hole."""
        path = tmp_path / "a.raw"
        with virtkit.images.create(path, "1M", format="raw") as img:
            img.write(0, b"\xff" * (256 * 1024))
            before = img.info().actual_size
            img.write_zeroes(64 * 1024, 128 * 1024)
            assert img.info().actual_size == before - 128 * 1024
            assert img.read(64 * 1024, 128 * 1024) == bytes(128 * 1024)
            assert img.read(0, 64 * 1024) == b"\xff" * (64 * 1024)
            ours = _ours(img)
        assert ours == _qemu_map(qemu_img, path)
        assert ours[:3] == [
            (0, 64 * 1024, "data"),
            (64 * 1024, 128 * 1024, "zero"),
            (192 * 1024, 64 * 1024, "data"),
        ]

    def test_unaligned_write_zeroes_keeps_neighbours(self, tmp_path: Path) -> None:
        """Zeroing a range that splits file-system blocks leaves the bytes around it intact."""
        with virtkit.images.create(tmp_path / "a.raw", 65536, format="raw") as img:
            img.write(0, b"\x11" * 65536)
            img.write_zeroes(100, 9000)
            data = img.read(0, 65536)
        assert data == b"\x11" * 100 + bytes(9000) + b"\x11" * (65536 - 9100)

    def test_discard_reads_zero(self, tmp_path: Path) -> None:
        """discard on raw frees the range; it then reads as zeroes."""
        with virtkit.images.create(tmp_path / "a.raw", "1M", format="raw") as img:
            img.write(0, b"\x01" * 65536)
            img.discard(0, 65536)
            assert img.read(0, 65536) == bytes(65536)
            assert img.info().actual_size == 0

    def test_block_status_subrange(self, tmp_path: Path) -> None:
        """block_status over a sub-range is clipped to it and covers it exactly."""
        with virtkit.images.create(tmp_path / "a.raw", "1M", format="raw") as img:
            img.write(8192, b"x" * 4096)
            extents = list(img.block_status(4096, 16384))
        assert extents == [
            Extent(4096, 4096, "zero"),
            Extent(8192, 4096, "data"),
            Extent(12288, 8192, "zero"),
        ]


class TestState:
    """Read-only, closed, resize, info, check and snapshots."""

    def test_read_only_refuses_writes(self, tmp_path: Path) -> None:
        """An image opened read-only raises ImageError on every kind of write."""
        path = tmp_path / "a.raw"
        virtkit.images.create(path, "1M", format="raw").close()
        with virtkit.images.open(path) as img:
            assert not img.writable
            for call in (
                lambda: img.write(0, b"x"),
                lambda: img.write_zeroes(0, 512),
                lambda: img.discard(0, 512),
                lambda: img.resize("2M"),
            ):
                with pytest.raises(virtkit.ImageError, match="read-only"):
                    call()

    def test_closed_image_refuses_io(self, tmp_path: Path) -> None:
        """After close() reads raise ImageError; close() again is harmless."""
        img = virtkit.images.create(tmp_path / "a.raw", "1M", format="raw")
        img.close()
        img.close()
        assert img.closed
        with pytest.raises(virtkit.ImageError, match="closed"):
            img.read(0, 1)

    def test_resize(self, tmp_path: Path, qemu_img_info: Callable[[Path], Any]) -> None:
        """Growing reads zeroes; shrinking needs shrink=True, as qemu-img resize --shrink."""
        path = tmp_path / "a.raw"
        with virtkit.images.create(path, "1M", format="raw") as img:
            img.write(MiB - 4, b"tail")
            img.resize("2M")
            assert img.read(MiB - 4, 8) == b"tail" + bytes(4)
            with pytest.raises(virtkit.ImageError, match="shrink=True"):
                img.resize(4096)
            img.resize(4096, shrink=True)
            assert img.virtual_size == 4096
        assert qemu_img_info(path)["virtual-size"] == 4096

    def test_info_matches_qemu_img(
        self, tmp_path: Path, qemu_img_info: Callable[[Path], Any]
    ) -> None:
        """info().to_json() has qemu-img's format, virtual-size and actual-size."""
        path = tmp_path / "a.raw"
        with virtkit.images.create(path, "3M", format="raw") as img:
            img.write(MiB, b"z" * 20000)
            img.flush()
            ours = img.info().to_json()
            theirs = qemu_img_info(path)
        for key in ("format", "virtual-size", "actual-size"):
            assert ours[key] == theirs[key], key

    def test_check_and_snapshots(self, tmp_path: Path) -> None:
        """Raw checks clean, lists no snapshots, and refuses to take one."""
        with virtkit.images.create(tmp_path / "a.raw", "1M", format="raw") as img:
            assert img.check().ok
            assert img.snapshots == ()
            with pytest.raises(virtkit.UnsupportedFeatureError, match="snapshot"):
                img.create_snapshot("s1")
            with pytest.raises(virtkit.UnsupportedFeatureError):
                img.revert_snapshot("s1")

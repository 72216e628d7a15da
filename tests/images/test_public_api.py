"""The public virtkit.images surface: create/open/convert round trips in every format pair."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
import virtkit.images

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20
FORMATS = ["raw", "qcow2"]

_PATTERN = [(0, b"\x01" * 512), (70000, b"hello world" * 300), (3 * MiB + 17, b"\xfe" * 65536)]


def _fill(img: virtkit.images.Image) -> None:
    for offset, data in _PATTERN:
        img.write(offset, data)


def _assert_pattern(img: virtkit.images.Image) -> None:
    for offset, data in _PATTERN:
        assert img.read(offset, len(data)) == data
    assert img.read(MiB, 4096) == bytes(4096)


class TestSurface:
    """Names and dispatch."""

    def test_exported_names(self) -> None:
        """virtkit.images exports the documented entry points and records."""
        for name in ("create", "open", "convert", "measure", "rebase", "commit", "Image",
                     "Extent", "ImageInfo", "CheckResult", "SnapshotInfo"):  # fmt: skip
            assert name in virtkit.images.__all__
            assert callable(getattr(virtkit.images, name))

    def test_unknown_format(self, tmp_path: Path) -> None:
        """An unknown format is an UnsupportedFeatureError naming it."""
        with pytest.raises(virtkit.UnsupportedFeatureError, match="vmdk"):
            virtkit.images.create(tmp_path / "x", "1M", format="vmdk")  # type: ignore[arg-type]

    def test_open_missing_file(self, tmp_path: Path) -> None:
        """Opening a file that does not exist is an ImageError naming the path."""
        with pytest.raises(virtkit.ImageError, match="nope"):
            virtkit.images.open(tmp_path / "nope.qcow2")


@pytest.mark.parametrize("fmt", FORMATS)
class TestRoundTrip:
    """create -> write -> close -> open -> read, per format, checked by qemu-img."""

    def test_create_write_reopen(
        self, tmp_path: Path, fmt: str, qemu_img: Run, qemu_img_info: Callable[[Path], Any]
    ) -> None:
        """What we write reads back after reopening, qemu-img agrees on size and format."""
        path = tmp_path / f"disk.{fmt}"
        with virtkit.images.create(path, "4M", format=fmt) as img:  # type: ignore[arg-type]
            assert img.format == fmt
            _fill(img)
        with virtkit.images.open(path) as img:
            assert img.format == fmt
            assert img.virtual_size == 4 * MiB
            assert not img.writable
            _assert_pattern(img)
        info = qemu_img_info(path)
        assert info["format"] == fmt
        assert info["virtual-size"] == 4 * MiB
        if fmt == "qcow2":
            assert qemu_img("check", path).returncode == 0

    def test_reads_qemu_img_image(self, tmp_path: Path, fmt: str, qemu_img: Run) -> None:
        """An image qemu-io wrote reads back byte-exactly through virtkit.images.open."""
        path = tmp_path / f"q.{fmt}"
        qemu_img("create", "-f", fmt, path, "4M")
        subprocess.run(
            ["qemu-io", "-f", fmt, "-c", "write -P 0x61 4096 12288", str(path)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        with virtkit.images.open(path) as img:
            assert img.read(0, 4096 + 12288 + 4096) == (bytes(4096) + b"\x61" * 12288 + bytes(4096))

    @pytest.mark.parametrize("dst_fmt", FORMATS)
    def test_convert_round_trip(
        self, tmp_path: Path, fmt: str, dst_fmt: str, qemu_img: Run
    ) -> None:
        """convert between every pair keeps the bytes (qemu-img compare) and is sparse."""
        src = tmp_path / f"src.{fmt}"
        with virtkit.images.create(src, "8M", format=fmt) as img:  # type: ignore[arg-type]
            _fill(img)
        dst = tmp_path / f"dst.{dst_fmt}"
        virtkit.images.convert(src, dst, format=dst_fmt)
        with virtkit.images.open(dst) as out:
            assert out.format == dst_fmt
            _assert_pattern(out)
            assert out.info().actual_size < 2 * MiB
        assert qemu_img("compare", src, dst).returncode == 0
        if dst_fmt == "qcow2":
            assert qemu_img("check", dst).returncode == 0

    def test_writable_open_and_flush(self, tmp_path: Path, fmt: str, qemu_img: Run) -> None:
        """After flush() another reader (qemu-img with -U) sees the data."""
        path = tmp_path / f"f.{fmt}"
        virtkit.images.create(path, "1M", format=fmt).close()  # type: ignore[arg-type]
        with virtkit.images.open(path, writable=True) as img:
            img.write(512, b"flushed!")
            img.flush()
            raw = tmp_path / "peek.raw"
            qemu_img("convert", "-U", "-O", "raw", path, raw)
            assert raw.read_bytes()[512:520] == b"flushed!"

"""qcow2 overlays over VMDK, VHD, VHDX and VDI bases, as qemu-img makes and reads them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import virtkit
from virtkit import images

SIZE = 8 * 1024**2


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("vmdk", []), ("vpc", ["-o", "subformat=dynamic"]), ("vhdx", []), ("vdi", [])],
)
def test_overlay_reads_through_a_foreign_base(tmp_path: Path, fmt: str, options: list[str]) -> None:
    """Bytes come from the base until the overlay has its own, exactly as qemu-img reads them."""
    raw = tmp_path / "src.raw"
    data = bytearray(os.urandom(SIZE))
    data[SIZE // 2 :] = bytes(SIZE // 2)
    raw.write_bytes(data)
    base = tmp_path / f"base.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, *options, str(raw), str(base))
    top = tmp_path / "top.qcow2"
    with images.open(base, format=fmt) as b:  # type: ignore[arg-type]
        size = b.virtual_size
    with images.create(top, size, backing=base.name, backing_format=fmt) as img:  # type: ignore[arg-type]
        img.write(4096, b"overlay!")
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", str(top), str(expected))
    with images.open(top) as img:
        assert img.read(0, size) == expected.read_bytes()
        assert img.read(4096, 8) == b"overlay!"


def test_unknown_backing_format_is_refused(tmp_path: Path) -> None:
    """A backing format without a reader is a ConfigError naming the choices."""
    (tmp_path / "b.img").write_bytes(bytes(512))
    with pytest.raises(virtkit.ConfigError, match="vmdk"):
        images.create(tmp_path / "t.qcow2", "1M", backing="b.img", backing_format="qed")  # type: ignore[arg-type]

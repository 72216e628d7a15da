"""VDI: native reads of static and dynamic disks checked against qemu-img 7.2, hostile headers."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qcow2_helpers import qemu_io, qemu_raw
from vhdx_helpers import MiB, vdi_patch

import virtkit

Run = Callable[..., subprocess.CompletedProcess[str]]

WRITES = ("write -P 0xab 0 64k", "write -P 0xcd 1M 4k", "write -P 0x11 3000000 3000",
          "write -z 2M 128k", "write -P 0x5a 3M 1k")  # fmt: skip
# Header field offsets (QEMU's VdiHeader).
DISK_SIZE, BLOCKS_ALLOCATED, UUID_PARENT, OFFSET_BMAP, VERSION = 0x170, 0x184, 0x1B8, 0x154, 0x44


def _qemu_vdi(qemu_img: Run, path: Path, size: str, static: str = "off") -> Path:
    qemu_img("create", "-q", "-f", "vdi", "-o", f"static={static}", path, size)
    return path


class TestReadMatrix:
    """Images qemu-img makes read byte for byte as ``qemu-img convert -O raw`` reads them."""

    @pytest.mark.parametrize("static", ["off", "on"])
    @pytest.mark.parametrize("size", ["4M", "5243392", "1M", "512"])
    def test_read_info_convert(
        self,
        tmp_path: Path,
        qemu_img: Run,
        qemu_img_info: Callable[[Path], dict[str, Any]],
        static: str,
        size: str,
    ) -> None:
        """read(), info(), block_status and a convert to qcow2 agree with qemu-img."""
        path = _qemu_vdi(qemu_img, tmp_path / "a.vdi", size, static)
        n = int(size.rstrip("M")) * MiB if size.endswith("M") else int(size)
        if n >= 4 * MiB:
            writes: tuple[str, ...] = (*WRITES, f"write -P 0x66 {n - 1024} 1k")
        elif n >= MiB:
            writes = ("write -P 0xab 0 64k", "write -z 4k 4k", f"write -P 0x5a {n - 1024} 1k")
        else:
            writes = ("write -P 0x77 0 512",)
        qemu_io(path, *writes, fmt="vdi")
        want = qemu_raw(qemu_img, path, tmp_path / "ref.raw")
        with virtkit.images.open(path) as img:
            assert img.format == "vdi" and img.virtual_size == n
            assert img.read(0, n) == want
            ours = img.info().to_json()
            ours["filename"] = str(path)
            assert ours == qemu_img_info(path)
            assert list(ours) == list(qemu_img_info(path))  # qemu-img's key order too
            kinds = {e.kind for e in img.block_status()}
            assert kinds <= ({"data"} if static == "on" else {"data", "zero"})
            for ext in img.block_status():
                if ext.kind == "zero":
                    assert want[ext.start : ext.start + ext.length] == bytes(ext.length)
            assert img.check().ok
        virtkit.images.convert(path, tmp_path / "out.qcow2")
        qemu_img("compare", "-f", "vdi", "-F", "qcow2", path, tmp_path / "out.qcow2")
        virtkit.images.convert(path, tmp_path / "out.vhdx", format="vhdx")
        qemu_img("compare", "-f", "vdi", "-F", "vhdx", path, tmp_path / "out.vhdx")

    def test_huge_sparse_disk(self, tmp_path: Path, qemu_img: Run) -> None:
        """A 2 TiB dynamic disk with one written block: block status and check stay cheap."""
        path = _qemu_vdi(qemu_img, tmp_path / "big.vdi", "2T")
        qemu_io(path, "write -P 7 1T 4k", fmt="vdi")
        with virtkit.images.open(path) as img:
            kinds = [(e.kind, e.length) for e in img.block_status()]
            assert kinds == [("zero", 1 << 40), ("data", MiB), ("zero", (1 << 40) - MiB)]
            assert img.check().ok
            assert img.read((1 << 40) - 2, 4) == b"\0\0\x07\x07"

    def test_odd_disk_size_rounds_up(
        self, tmp_path: Path, qemu_img: Run, qemu_img_info: Callable[[Path], dict[str, Any]]
    ) -> None:
        """A disk size that is not a sector multiple (VBoxManage convertfromraw) rounds up, as QEMU."""
        path = _qemu_vdi(qemu_img, tmp_path / "a.vdi", "2M")
        vdi_patch(path, DISK_SIZE, "<Q", 2 * MiB - 1000)
        with virtkit.images.open(path) as img:
            assert img.virtual_size == 2 * MiB - 512 == qemu_img_info(path)["virtual-size"]

    def test_read_only(self, tmp_path: Path, qemu_img: Run) -> None:
        """Writes, writable opens and creating VDI are UnsupportedFeatureErrors."""
        path = _qemu_vdi(qemu_img, tmp_path / "a.vdi", "2M")
        with pytest.raises(virtkit.UnsupportedFeatureError):
            virtkit.images.open(path, writable=True)
        with virtkit.images.open(path) as img, pytest.raises(virtkit.UnsupportedFeatureError):
            img.write(0, b"x")
        with pytest.raises(virtkit.UnsupportedFeatureError, match="does not create"):
            virtkit.images.create(tmp_path / "b.vdi", "1M", format="vdi")


class TestHostile:
    """Damaged headers and block maps: VirtkitErrors, and check() agrees with qemu-img check."""

    def test_differencing_refused_like_qemu(self, tmp_path: Path, qemu_img: Run) -> None:
        """A parent UUID (a differencing VDI) is refused by both."""
        path = _qemu_vdi(qemu_img, tmp_path / "a.vdi", "2M")
        vdi_patch(path, UUID_PARENT, "<16s", b"\x01" * 16)
        with pytest.raises(virtkit.UnsupportedFeatureError, match="differencing"):
            virtkit.images.open(path)
        assert qemu_img("info", path, check=False).returncode != 0

    @pytest.mark.parametrize(
        "case",
        [
            (VERSION, "<I", 0x00020000, virtkit.UnsupportedFeatureError),
            (OFFSET_BMAP, "<I", 0x201, virtkit.UnsupportedFeatureError),
            (OFFSET_BMAP, "<I", 0x7FFFFE00, virtkit.CorruptImageError),
            (0x180, "<I", 0xFFFFFFFF, virtkit.UnsupportedFeatureError),  # blocks_in_image
            (0x180, "<I", 1, virtkit.UnsupportedFeatureError),  # map smaller than the disk
            (0x178, "<I", 4096, virtkit.UnsupportedFeatureError),  # block size
            (0x40, "<I", 0, virtkit.CorruptImageError),  # signature
        ],
        ids=lambda case: f"{case[0]:#x}={case[2]:#x}",
    )
    def test_bad_header(
        self, tmp_path: Path, qemu_img: Run, case: tuple[int, str, int, type[Exception]]
    ) -> None:
        """Each damaged field is refused with the right error, naming VDI; qemu-img refuses too."""
        offset, code, value, error = case
        path = _qemu_vdi(qemu_img, tmp_path / "a.vdi", "4M")
        vdi_patch(path, offset, code, value)
        with pytest.raises(error, match="VDI"):
            virtkit.images.open(path, format="vdi")
        if offset != OFFSET_BMAP or value != 0x7FFFFE00:  # QEMU reads a map past EOF as zeroes
            assert qemu_img("info", "-f", "vdi", path, check=False).returncode != 0

    def test_check_matches_qemu(self, tmp_path: Path, qemu_img: Run) -> None:
        """A block index used twice, one out of range and a wrong count: qemu-img's corruptions."""
        path = _qemu_vdi(qemu_img, tmp_path / "a.vdi", "4M")
        qemu_io(path, "write -P 1 0 4k", "write -P 2 1M 4k", fmt="vdi")
        with path.open("r+b") as fh:
            fh.seek(0x200 + 8)
            fh.write(struct.pack("<II", 0, 70))  # block 2 -> index 0 (dup), block 3 -> 70
        with virtkit.images.open(path) as img:
            result = img.check()
            assert img.read(2 * MiB, 4) == b"\x01" * 4  # shares block 0's data, as QEMU reads
            assert img.read(3 * MiB, 4) == bytes(4)  # past the end of the file: zeroes
        proc = qemu_img("check", "--output=json", path, check=False)
        assert result.corruptions == json.loads(proc.stdout)["corruptions"] == 3
        assert not result.ok

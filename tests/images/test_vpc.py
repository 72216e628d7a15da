"""VHD/VPC: fixed and dynamic read with QEMU 7.2's size rules, fixed write, against qemu-img."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import virtkit
from virtkit.images.vpc import layout

Run = Callable[..., subprocess.CompletedProcess[str]]
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def _qemu_io(path: Path, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True, timeout=120)


def _pattern_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    _qemu_io(path, "raw", "write -P 0x11 0 4k", "write -P 0x22 3M 70k",
             f"write -P 0x33 {size - 1024} 1k")  # fmt: skip
    return path


def _info(qemu_img: Run, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        qemu_img("info", "--output=json", "-U", "-f", "vpc", path).stdout
    )
    return out


def _runs(entries: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    runs: list[tuple[int, int, str]] = []
    for start, length, kind in entries:
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, kind)
        else:
            runs.append((start, length, kind))
    return runs


def _same_raw(qemu_img: Run, image: Path, tmp: Path) -> None:
    theirs, ours = tmp / "theirs.raw", tmp / "ours.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", image, theirs)
    virtkit.images.convert(image, ours, format="raw", src_format="vpc")
    assert ours.read_bytes() == theirs.read_bytes()


def _set_footer(path: Path, at: int, **fields: Any) -> None:
    """Rewrite footer fields (and its checksum) at file offset ``at``."""
    data = bytearray(path.read_bytes())
    footer = layout.Footer.unpack(bytes(data[at : at + 512]))
    for name, value in fields.items():
        setattr(footer, name, value)
    data[at : at + 512] = footer.pack()
    path.write_bytes(bytes(data))


class TestRead:
    """Fixed and dynamic VHDs read exactly as qemu-img reads them."""

    @pytest.mark.parametrize("sub", ["dynamic", "fixed"])
    @pytest.mark.parametrize("size", [5 * MiB + 3 * 512, 9 * MiB])
    def test_matrix(self, sub: str, size: int, qemu_img: Run, tmp_path: Path) -> None:
        """Bytes, info() and block status match qemu-img -f vpc."""
        src = _pattern_raw(tmp_path / "src.raw", size)
        image = tmp_path / "d.vhd"
        qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}", src, image)
        assert virtkit.images.probe_format(image) == ("vpc" if sub == "dynamic" else "raw")
        _same_raw(qemu_img, image, tmp_path)
        theirs = _info(qemu_img, image)
        with virtkit.images.open(image, format="vpc") as img:
            ours = img.info().to_json()
            mine = _runs([(e.start, e.length, "data" if e.kind == "data" else "zero")
                          for e in img.block_status()])  # fmt: skip
            assert img.check().ok
        qmap = json.loads(qemu_img("map", "--output=json", "-f", "vpc", image).stdout)
        assert mine == _runs([(e["start"], e["length"], "zero" if e["zero"] else "data")
                              for e in qmap])  # fmt: skip
        theirs.pop("actual-size")
        ours.pop("actual-size")
        assert ours == theirs

    @pytest.mark.parametrize(
        ("creator", "chs_rule"),
        [
            (b"vpc ", True),
            (b"qemu", True),
            (b"xyzw", True),
            (b"win ", False),
            (b"d2v ", False),
            (b"tap\0", False),
            (b"CTXS", False),
            (b"qem2", False),
        ],
    )
    @pytest.mark.parametrize("sub", ["fixed", "dynamic"])
    def test_size_rules(
        self, creator: bytes, chs_rule: bool, sub: str, qemu_img: Run, tmp_path: Path
    ) -> None:
        """Geometry or current_size decides the size by creator app, as QEMU 7.2's vpc_open."""
        image = tmp_path / "d.vhd"
        qemu_img("create", "-f", "vpc", "-o", f"subformat={sub}", image, "10M")
        chs_size = 10514432  # 20 cyl x 16 x 63 ... as qemu-img rounds 10 MiB
        at = image.stat().st_size - 512
        for pos in [0, at] if sub == "dynamic" else [at]:
            _set_footer(image, pos, creator_app=creator, current_size=10 * MiB)
        with virtkit.images.open(image, format="vpc") as img:
            assert img.virtual_size == (chs_size if chs_rule else 10 * MiB)
            assert img.virtual_size == _info(qemu_img, image)["virtual-size"]

    def test_max_geometry_means_current_size(self, qemu_img: Run, tmp_path: Path) -> None:
        """With 65535x16x255 the size is current_size whatever the creator."""
        image = tmp_path / "d.vhd"
        qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", image, "10M")
        _set_footer(image, image.stat().st_size - 512, cyls=65535, heads=16, secs_per_cyl=255,
                    current_size=8 * MiB)  # fmt: skip
        with virtkit.images.open(image, format="vpc") as img:
            assert img.virtual_size == 8 * MiB == _info(qemu_img, image)["virtual-size"]

    def test_larger_than_2040_gib_refused(self, qemu_img: Run, tmp_path: Path) -> None:
        """A footer claiming more than 2040 GiB is refused (QEMU: EFBIG)."""
        image = tmp_path / "d.vhd"
        qemu_img("create", "-f", "vpc", image, "10M")
        for pos in (0, image.stat().st_size - 512):
            _set_footer(image, pos, creator_app=b"win ", current_size=3 << 40)
        assert qemu_img("info", "-f", "vpc", image, check=False).returncode
        with pytest.raises(virtkit.CorruptImageError, match="2040"):
            virtkit.images.open(image, format="vpc")

    def test_refusals(self, qemu_img: Run, tmp_path: Path) -> None:
        """Dynamic disks open read-only; differencing disks are refused, not read parentless."""
        image = tmp_path / "d.vhd"
        qemu_img("create", "-f", "vpc", image, "4M")
        with pytest.raises(virtkit.UnsupportedFeatureError, match="fixed"):
            virtkit.images.open(image, writable=True)
        with virtkit.images.open(image) as img, pytest.raises(virtkit.ImageError):
            img.write(0, b"x")
        _set_footer(image, 0, type=layout.TYPE_DIFFERENCING)
        with pytest.raises(virtkit.UnsupportedFeatureError, match="differencing"):
            virtkit.images.open(image)


class TestFixedWrite:
    """Fixed VHDs written by virtkit: qemu-img's geometry, or exact sizes for Azure."""

    @pytest.mark.parametrize(
        "size", [1 * MiB, 10 * MiB, 127 * MiB + 512, 4 * GiB, 32 * GiB, 100 * GiB, 2040 * GiB]
    )
    def test_footer_like_qemu_img(self, size: int, qemu_img: Run, tmp_path: Path) -> None:
        """Geometry, sizes and fields equal qemu-img create -f vpc -o subformat=fixed's."""
        theirs = tmp_path / "q.vhd"
        qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", theirs, str(size))
        ours = tmp_path / "o.vhd"
        virtkit.images.create(ours, size, format="vpc").close()
        assert ours.stat().st_size == theirs.stat().st_size
        a = layout.Footer.unpack(ours.read_bytes()[-512:] if size < GiB else _tail(ours))
        b = layout.Footer.unpack(theirs.read_bytes()[-512:] if size < GiB else _tail(theirs))
        assert layout.footer_checksum_ok(a.pack())
        for name in ("features", "version", "data_offset", "creator_app", "creator_os",
                     "orig_size", "current_size", "cyls", "heads", "secs_per_cyl", "type"):  # fmt: skip
            assert getattr(a, name) == getattr(b, name), name

    def test_convert_and_force_size(self, qemu_img: Run, tmp_path: Path) -> None:
        """convert to fixed VHD: qemu-img compare is identical; force_size keeps the exact size."""
        src = tmp_path / "s.qcow2"
        qemu_img("create", "-f", "qcow2", src, "24M")
        _qemu_io(src, "qcow2", "write -P 0x5c 1M 300k", "write -P 0x5d 23M 1M")
        plain = tmp_path / "p.vhd"
        virtkit.images.convert(src, plain, format="vpc", subformat="fixed")
        qemu_img("compare", "-F", "vpc", src, plain)
        assert _info(qemu_img, plain)["virtual-size"] > 24 * MiB  # CHS rounding, as qemu-img
        azure = tmp_path / "a.vhd"
        virtkit.images.convert(src, azure, format="vpc", subformat="fixed", force_size=True)
        qemu_img("compare", "-F", "vpc", src, azure)
        assert _info(qemu_img, azure)["virtual-size"] == 24 * MiB
        assert azure.stat().st_size == 24 * MiB + 512
        footer = layout.Footer.unpack(azure.read_bytes()[-512:])
        assert footer.creator_app == b"qem2"
        assert footer.current_size % MiB == 0
        with virtkit.images.open(azure, format="vpc") as img:
            assert img.read(23 * MiB, 4096) == b"\x5d" * 4096

    @pytest.mark.parametrize("force_size", [False, True])
    def test_libvhdi_reads_ours(self, force_size: bool, qemu_img: Run, tmp_path: Path) -> None:
        """libyal's libvhdi (Microsoft's spec, not QEMU's code) reads our fixed VHD byte for byte."""
        src = _pattern_raw(tmp_path / "src.raw", 12 * MiB)
        dst = tmp_path / "out.vhd"
        virtkit.images.convert(src, dst, format="vpc", subformat="fixed", force_size=force_size,
                               src_format="raw")  # fmt: skip
        with virtkit.images.open(dst, format="vpc") as img:
            size = img.virtual_size
        assert size == 12 * MiB if force_size else size > 12 * MiB
        expected = src.read_bytes() + bytes(size - 12 * MiB)
        assert _libyal_vhd(dst) == (size, hashlib.sha256(expected).hexdigest())

    def test_libvhdi_reads_dynamic_like_us(self, qemu_img: Run, tmp_path: Path) -> None:
        """A dynamic VHD made by qemu-img: libvhdi and virtkit read the same bytes."""
        src = _pattern_raw(tmp_path / "src.raw", 7 * MiB)
        image = tmp_path / "d.vhd"
        qemu_img("convert", "-f", "raw", "-O", "vpc", src, image)
        with virtkit.images.open(image) as img:
            ours = hashlib.sha256(img.read(0, img.virtual_size)).hexdigest()
            assert _libyal_vhd(image) == (img.virtual_size, ours)

    def test_bad_options(self, tmp_path: Path) -> None:
        """Dynamic output, odd sizes and unknown options are refused with no file left."""
        for kwargs, error in (
            ({"subformat": "dynamic"}, virtkit.UnsupportedFeatureError),
            ({"subformat": "bogus"}, virtkit.ConfigError),
            ({"force_size": "yes"}, virtkit.ConfigError),
            ({"block_size": 4096}, virtkit.ConfigError),
        ):
            with pytest.raises(error):
                virtkit.images.create(tmp_path / "x.vhd", "1M", format="vpc", **kwargs)
            assert not (tmp_path / "x.vhd").exists()
        with pytest.raises(virtkit.ConfigError, match="empty"):
            virtkit.images.create(tmp_path / "x.vhd", 0, format="vpc")
        with pytest.raises(virtkit.ConfigError, match="512"):
            virtkit.images.create(tmp_path / "x.vhd", 1000, format="vpc")
        with pytest.raises(virtkit.ConfigError, match="2040"):
            virtkit.images.create(tmp_path / "x.vhd", 2041 * GiB, format="vpc", force_size=True)

    def test_writes_stay_off_the_footer(self, tmp_path: Path) -> None:
        """Writes are bounded by the virtual size; the footer survives and stays valid."""
        path = tmp_path / "w.vhd"
        with virtkit.images.create(path, 2 * MiB, format="vpc", force_size=True) as img:
            img.write(2 * MiB - 4, b"\xee" * 4)
            with pytest.raises(virtkit.ImageError, match="past the end"):
                img.write(2 * MiB - 2, b"\xee" * 4)
        assert layout.footer_checksum_ok(path.read_bytes()[-512:])
        with virtkit.images.open(path, format="vpc") as img:
            assert img.read(2 * MiB - 4, 4) == b"\xee" * 4


_LIBVHDI = """
import hashlib, sys
import pyvhdi
f = pyvhdi.file()
f.open(sys.argv[1])
size = f.get_media_size()
print(size, hashlib.sha256(f.read_buffer(size) if size else b"").hexdigest())
"""


def _libyal_vhd(path: Path) -> tuple[int, str]:
    """Media size and SHA-256 of a VHD as libyal's libvhdi (Debian's python3-libvhdi) reads it."""
    proc = subprocess.run(["/usr/bin/python3", "-c", _LIBVHDI, str(path)],
                          capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    size, digest = proc.stdout.split()
    return int(size), digest


def _tail(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-512, 2)
        return fh.read()


def test_geometry_table() -> None:
    """The CHS algorithm from the VHD specification, on its boundary cases."""
    assert layout.geometry(20480) == (301, 4, 17)
    assert layout.geometry(65535 * 16 * 63) == (16191, 16, 255)
    assert layout.geometry(10**12) == (65535, 16, 255)
    assert layout.FOOTER.size == 85 and layout.DYN_HEADER.size == 576


@given(st.binary(min_size=512, max_size=512))
def test_footer_pack_unpack(raw: bytes) -> None:
    """A footer packs back to its own fields with a checksum that verifies."""
    footer = layout.Footer.unpack(raw)
    packed = footer.pack()
    assert layout.footer_checksum_ok(packed)
    assert (
        packed[:64] == raw[:64] and packed[68 : layout.FOOTER.size] == raw[68 : layout.FOOTER.size]
    )

"""Write matrix: virtkit-made qcow2 images pass qemu-img check and compare equal."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qcow2_helpers import qemu_io, qemu_raw

from virtkit import images
from virtkit.errors import ConfigError, CorruptImageError, ImageError

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
QemuInfo = Callable[[Path], dict[str, Any]]
SIZE = 4 * 1024 * 1024


def _exercise(img: images.Image, ref: bytearray, seed: int = 7) -> None:
    """A fixed mix of writes, zeroes, discards and compressed writes, mirrored in ``ref``."""
    rnd = random.Random(seed)
    cs = img.cluster_size
    size = len(ref)

    def write(off: int, data: bytes) -> None:
        img.write(off, data)
        ref[off : off + len(data)] = data

    write(0, b"\xab" * 65536)
    write(1, b"odd")
    write(cs - 3, b"straddles a cluster boundary")
    write(size - 1000, rnd.randbytes(1000))
    for _ in range(12):
        off = rnd.randrange(0, size - 1)
        n = min(rnd.randrange(1, 3 * cs + 7), size - off)
        write(off, rnd.randbytes(n))
    write(SIZE // 2, rnd.randbytes(300_000))  # a long run of whole clusters
    nz = min(3 * cs + 100, size // 3)
    img.write_zeroes(5000, nz)
    ref[5000 : 5000 + nz] = bytes(nz)
    start = 2 * 1024 * 1024 if cs < 2 * 1024 * 1024 else 0
    nd = min(4 * cs, size - start)
    img.discard(start, nd)
    # without a backing file, discarded whole clusters read as zeroes
    ref[start : start + nd] = bytes(nd)
    write(start + min(cs, nd // 2), b"again")
    if hasattr(img, "write_compressed"):
        block = (b"compressible " * (cs // 13 + 1))[:cs]
        at = size - 2 * cs
        img.write_compressed(at, block)
        ref[at : at + cs] = block
        img.write_compressed(at + cs, block[::-1])
        ref[at + cs : at + 2 * cs] = block[::-1]
        write(at + 10, b"overwrite inside a compressed cluster")
    assert img.read(0, size) == ref


def _verify(qemu_img: QemuImg, path: Path, ref: bytes, tmp_path: Path) -> None:
    reference = tmp_path / "reference.raw"
    reference.write_bytes(ref)
    qemu_img("check", path)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", path, reference)


class TestWriteMatrix:
    """Each creation variant, written by virtkit, is clean and equal by qemu-img."""

    @pytest.mark.parametrize(
        "opts",
        [
            {},
            {"compat": "0.10"},
            {"cluster_size": 512},
            {"cluster_size": 4096},
            {"cluster_size": 2 * 1024 * 1024},
            {"refcount_bits": 1},
            {"refcount_bits": 2},
            {"refcount_bits": 4},
            {"refcount_bits": 8},
            {"refcount_bits": 32},
            {"refcount_bits": 64},
            {"lazy_refcounts": True},
            {"extended_l2": True},
            {"extended_l2": True, "cluster_size": 16384},
            {"compression_type": "zstd"},
            {"preallocation": "metadata"},
            {"cluster_size": 512, "refcount_bits": 64},
        ],
        ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
    )
    def test_variant(
        self, qemu_img: QemuImg, qemu_img_info: QemuInfo, tmp_path: Path, opts: dict[str, Any]
    ) -> None:
        """Create, write every way, close: qemu-img check is clean and compare is equal."""
        path = tmp_path / "w.qcow2"
        ref = bytearray(SIZE)
        opts = dict(opts)
        cluster = opts.pop("cluster_size", None)
        with images.create(path, SIZE, "qcow2", cluster_size=cluster, **opts) as img:
            _exercise(img, ref)
            assert img.check().ok
        _verify(qemu_img, path, bytes(ref), tmp_path)
        info = qemu_img_info(path)
        data = info["format-specific"]["data"]
        assert info["virtual-size"] == SIZE
        assert info["cluster-size"] == (cluster or 65536)
        assert data["refcount-bits"] == opts.get("refcount_bits", 16)
        assert data["compat"] == opts.get("compat", "1.1")
        assert data.get("compression-type", "zlib") == opts.get("compression_type", "zlib")
        if data["compat"] == "1.1":
            assert data["extended-l2"] == opts.get("extended_l2", False)
            assert data["lazy-refcounts"] == opts.get("lazy_refcounts", False)
        with images.open(path) as img:
            ours = img.info().to_json()
        for key in ("virtual-size", "cluster-size", "format", "dirty-flag"):
            assert ours[key] == info[key]
        assert ours["format-specific"]["data"] == data

    def test_reopen_and_keep_writing(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Writes after a reopen reuse freed clusters and stay consistent."""
        path = tmp_path / "r.qcow2"
        ref = bytearray(SIZE)
        with images.create(path, SIZE) as img:
            _exercise(img, ref, seed=1)
        with images.open(path, writable=True) as img:
            _exercise(img, ref, seed=2)
        _verify(qemu_img, path, bytes(ref), tmp_path)


class TestBackingWrites:
    """Copy-on-write from qcow2 and raw backing files."""

    @pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
    @pytest.mark.parametrize("compat", ["0.10", "1.1", "1.1+extended_l2"])
    def test_cow_over_backing(
        self, qemu_img: QemuImg, tmp_path: Path, base_fmt: str, compat: str
    ) -> None:
        """Partial-cluster writes copy the rest of the cluster from the backing file."""
        base = tmp_path / f"base.{base_fmt}"
        qemu_img("create", "-q", "-f", base_fmt, base, str(SIZE - 1024 * 1024))
        qemu_io(base, "write -P 0x3c 0 3M", fmt=base_fmt)
        ref = bytearray(qemu_raw(qemu_img, base, tmp_path / "b.raw", "-f", base_fmt))
        ref += bytes(SIZE - len(ref))
        base_ref = bytes(ref)
        top = tmp_path / "top.qcow2"
        with images.create(
            top,
            SIZE,
            "qcow2",
            backing=base.name,
            backing_format=base_fmt,  # type: ignore[arg-type]
            compat=compat.split("+", maxsplit=1)[0],
            extended_l2=compat.endswith("extended_l2"),
        ) as img:
            assert img.backing_file == base.name
            assert img.read(0, SIZE) == ref
            for off, data in ((100, b"A" * 10), (70000, b"B" * 70000), (SIZE - 10, b"C" * 10)):
                img.write(off, data)
                ref[off : off + len(data)] = data
            img.write_zeroes(200_000, 140_000)
            ref[200_000:340_000] = bytes(140_000)
            half = SIZE // 2
            img.discard(0, half)  # v3: zero flags hide the backing; v2: it shows again
            ref[:half] = base_ref[:half] if compat == "0.10" else bytes(half)
            assert img.read(0, SIZE) == ref
        _verify(qemu_img, top, bytes(ref), tmp_path)

    def test_size_defaults_to_backing(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Creating without a size takes the backing file's virtual size."""
        base = tmp_path / "b.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "3M")
        with images.create(tmp_path / "t.qcow2", backing="b.qcow2", backing_format="qcow2") as t:
            assert t.virtual_size == 3 * 1024 * 1024
        info = qemu_img("info", tmp_path / "t.qcow2").stdout
        assert "backing file format: qcow2" in info


class TestResize:
    """Growing and shrinking the virtual disk."""

    def test_grow_across_l1_boundary(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Growing past what the L1 table maps moves the L1 table; data survives."""
        path = tmp_path / "g.qcow2"
        with images.create(path, "1M", cluster_size=512) as img:
            img.write(1000, b"keep me")
            img.resize("64M")
            img.write(60 * 1024 * 1024, b"far away")
            assert img.read(1000, 7) == b"keep me"
        qemu_img("check", path)
        assert "64 MiB" in qemu_img("info", path).stdout
        qemu_io(path, "read -P 0x6b 1000 1")  # 'k'

    def test_shrink_refuses_to_drop_data(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """Shrinking over stored data needs shrink=True, and then frees the clusters."""
        path = tmp_path / "s.qcow2"
        with images.create(path, SIZE) as img:
            img.write(SIZE - 65536, b"x" * 65536)
            with pytest.raises(ImageError, match="shrink=True"):
                img.resize(SIZE // 2)
            img.resize(SIZE // 2, shrink=True)
            assert img.virtual_size == SIZE // 2
            img.resize(SIZE)
            assert img.read(SIZE - 65536, 65536) == bytes(65536)
        qemu_img("check", path)

    def test_grow_hides_longer_backing(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """After shrink+grow, the new range reads zeroes even where the backing has data."""
        base = tmp_path / "b.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "2M")
        qemu_io(base, "write -P 0x55 0 2M")
        top = tmp_path / "t.qcow2"
        with images.create(top, "1M", backing="b.qcow2", backing_format="qcow2") as img:
            img.resize("2M")
            assert img.read(1024 * 1024, 4096) == bytes(4096)
            assert img.read(0, 4096) == b"\x55" * 4096
        qemu_img("check", top)


class TestCreateOptions:
    """Option validation in create."""

    @pytest.mark.parametrize(
        "opts",
        [
            {"cluster_size": 1000},
            {"cluster_size": 4 * 1024 * 1024},
            {"refcount_bits": 3},
            {"compat": "0.10", "refcount_bits": 8},
            {"compat": "0.10", "extended_l2": True},
            {"extended_l2": True, "cluster_size": 4096},
            {"compression_type": "lz4"},
            {"preallocation": "full"},
        ],
    )
    def test_bad_options(self, tmp_path: Path, opts: dict[str, Any]) -> None:
        """Bad option values raise ConfigError and leave no file behind."""
        path = tmp_path / "bad.qcow2"
        with pytest.raises(ConfigError):
            images.create(path, "1M", **opts)
        assert not path.exists()


class TestCorruptFlag:
    """Corruption found while writing marks the image corrupt and stops writes."""

    def test_l2_entry_pointing_at_header(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """A COPIED L2 entry aimed at the L1 table is caught before data overwrites it."""
        path = tmp_path / "c.qcow2"
        with images.create(path, "1M") as img:
            img.write(0, b"d" * 512)
            l1_off = img.hdr.l1_table_offset  # type: ignore[attr-defined]
            l2_off = img.l1[0] & 0x00FFFFFFFFFFFE00  # type: ignore[attr-defined]
        with path.open("r+b") as fh:  # entry 0 -> host cluster of the L1 table, COPIED
            fh.seek(l2_off)
            fh.write(((1 << 63) | l1_off).to_bytes(8, "big"))
        with images.open(path, writable=True) as img:
            with pytest.raises(CorruptImageError):
                img.write(0, b"evil")
            with pytest.raises(CorruptImageError, match="marked corrupt"):
                img.write(100_000, b"more")
        assert "corrupt: true" in qemu_img("info", path).stdout


class TestHeaderRewrite:
    """Rewriting the header keeps what virtkit does not understand."""

    def test_unknown_extension_survives_backing_change(
        self, qemu_img: QemuImg, tmp_path: Path
    ) -> None:
        """set_backing_file keeps an unknown header extension byte for byte."""
        path = tmp_path / "e.qcow2"
        with images.create(path, "1M"):
            pass
        raw = bytearray(path.read_bytes())
        ext_at = 112  # first extension (feature table) follows the 112-byte header
        unknown = (0x12345678).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"hello\0\0\0"
        raw[ext_at:ext_at] = unknown
        del raw[65536 : 65536 + len(unknown)]  # keep the cluster layout
        path.write_bytes(bytes(raw))
        qemu_img("check", path)
        (tmp_path / "base.raw").write_bytes(bytes(1024 * 1024))
        with images.open(path, writable=True) as img:
            img.set_backing_file("base.raw", "raw")  # type: ignore[attr-defined]
        data = path.read_bytes()[:65536]
        assert unknown in data
        info = qemu_img("info", path).stdout
        assert "backing file: base.raw" in info and "backing file format: raw" in info
        qemu_img("check", path)
        with images.open(path) as img:
            assert img.backing_file == "base.raw"
            assert img.read(0, 10) == bytes(10)


class TestCompressedPacking:
    """Compressed clusters share host clusters and spill into the next, as QEMU packs them."""

    @pytest.mark.parametrize("ctype", ["zlib", "zstd"])
    def test_dense_packing(self, qemu_img: QemuImg, tmp_path: Path, ctype: str) -> None:
        """Half-compressible clusters take about half the space, and stay check-clean."""
        path = tmp_path / "p.qcow2"
        rnd = random.Random(3)
        ref = bytearray(SIZE)
        with images.create(path, SIZE, compression_type=ctype) as img:
            cs = img.cluster_size
            for i in range(24):
                block = rnd.randbytes(cs // 2) + bytes(cs // 2)
                img.write_compressed(i * cs, block)  # type: ignore[attr-defined]
                ref[i * cs : (i + 1) * cs] = block
            assert img.read(0, SIZE) == ref
            used = img.check().image_end_offset
        assert used is not None and used < 24 * cs * 0.6 + 6 * cs
        _verify(qemu_img, path, bytes(ref), tmp_path)

    def test_repair_clears_corrupt_flag(self, qemu_img: QemuImg, tmp_path: Path) -> None:
        """A corrupt-flagged image refuses writes until a clean repair clears the flag."""
        path = tmp_path / "f.qcow2"
        with images.create(path, "1M") as img:
            img.write(0, b"fine")
        with path.open("r+b") as fh:
            fh.seek(72)
            fh.write((2).to_bytes(8, "big"))  # incompatible bit 1: corrupt
        with images.open(path, writable=True) as img:
            assert img.info().format_specific["corrupt"] is True
            with pytest.raises(CorruptImageError, match="marked corrupt"):
                img.write(0, b"no")
            assert img.check(repair=True).ok
            img.write(0, b"ok")
        assert "corrupt: false" in qemu_img("info", path).stdout
        qemu_img("check", path)

"""VHDX: native reads checked against qemu-img 7.2, writes qemu-img reads back, hostile input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qcow2_helpers import qemu_io, qemu_raw
from vhdx_helpers import MiB, dirty_log, headers, meta_of, qemu_style_entry, set_headers

import virtkit
from virtkit.images.vhdx import layout as L

Run = Callable[..., subprocess.CompletedProcess[str]]

#: qemu-io writes every read-matrix image gets: data, a zeroed range, a tail sector.
WRITES = ("write -P 0xab 0 64k", "write -P 0xcd 1M 4k", "write -P 0x11 9437184 3000",
          "write -z 2M 128k", "write -P 0x5a 3M 1k")  # fmt: skip


def _qemu_vhdx(qemu_img: Run, path: Path, size: str, *opts: str) -> Path:
    qemu_img("create", "-q", "-f", "vhdx", *opts, path, size)
    return path


class TestReadMatrix:
    """Images qemu-img makes read byte for byte as ``qemu-img convert -O raw`` reads them."""

    @pytest.mark.parametrize(
        ("size", "opts"),
        [
            ("12M", ("-o", "subformat=dynamic")),
            ("12M", ("-o", "subformat=fixed")),
            ("10485248", ("-o", "subformat=dynamic,block_size=1M")),  # not block-aligned
            ("33M", ("-o", "subformat=dynamic,block_size=32M,block_state_zero=off")),
            ("10M", ("-o", "subformat=fixed,block_size=4M,log_size=2M")),
        ],
        ids=["dynamic", "fixed", "odd-1M-blocks", "32M-blocks", "fixed-4M-log2M"],
    )
    def test_read_info_convert(
        self,
        tmp_path: Path,
        qemu_img: Run,
        qemu_img_info: Callable[[Path], dict[str, Any]],
        size: str,
        opts: tuple[str, ...],
    ) -> None:
        """read(), info() and a virtkit convert to qcow2 all agree with qemu-img."""
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", size, *opts)
        qemu_io(path, *WRITES, fmt="vhdx")
        want = qemu_raw(qemu_img, path, tmp_path / "ref.raw")
        with virtkit.images.open(path) as img:
            assert img.format == "vhdx"
            assert img.read(0, img.virtual_size) == want
            ours = img.info().to_json()
            ours["filename"] = str(path)
            theirs = qemu_img_info(path)
            assert ours == theirs
            assert list(ours) == list(theirs)  # qemu-img's key order too
            extents = list(img.block_status())
        assert sum(e.length for e in extents) == len(want)
        for ext in extents:  # what block_status calls zero really reads as zero
            if ext.kind == "zero":
                assert want[ext.start : ext.start + ext.length] == bytes(ext.length)
        virtkit.images.convert(path, tmp_path / "out.qcow2")
        qemu_img("compare", "-f", "vhdx", "-F", "qcow2", path, tmp_path / "out.qcow2")

    def test_4k_logical_sectors(self, tmp_path: Path, qemu_img: Run) -> None:
        """4096-byte logical sectors (Hyper-V's 4Kn disks) read; qemu-img 7.2 refuses them."""
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "8M", "-o", "block_size=1M")
        qemu_io(path, "write -P 0x42 4096 8k", "write -P 0x43 7M 4k", fmt="vhdx")
        want = qemu_raw(qemu_img, path, tmp_path / "ref.raw")  # the payload does not change
        meta: Any = meta_of(path)
        table = path.read_bytes()[meta.metadata_offset : meta.metadata_offset + 65536]
        for i in range(struct.unpack_from("<H", table, 10)[0]):
            guid, off, _len, _f, _r = L.META_ENTRY.unpack_from(table, 32 + 32 * i)
            if guid == L.LOGICAL_SECTOR_GUID:
                with path.open("r+b") as fh:
                    fh.seek(meta.metadata_offset + off)
                    fh.write(struct.pack("<I", 4096))
        assert meta_of(path).logical_sector == 4096  # type: ignore[attr-defined]
        assert qemu_img("info", path, check=False).returncode != 0  # QEMU: "not supported"
        with virtkit.images.open(path) as img:
            assert img.read(0, img.virtual_size) == want
            assert img.check().ok

    def test_huge_sparse_disk(self, tmp_path: Path, qemu_img: Run) -> None:
        """A 60 TiB disk with one written block: block status, check and reads stay cheap."""
        path = _qemu_vhdx(qemu_img, tmp_path / "big.vhdx", "60T")
        qemu_io(path, "write -P 7 40T 4k", fmt="vhdx")
        with virtkit.images.open(path) as img:
            kinds = [(e.kind, e.length) for e in img.block_status()]
            assert kinds == [("zero", 40 << 40), ("data", 64 * MiB),
                             ("zero", (20 << 40) - 64 * MiB)]  # fmt: skip
            assert img.check().ok and img.check().allocated_clusters == 1
            assert img.read((40 << 40) - 2, 4) == b"\0\0\x07\x07"

    @pytest.mark.parametrize(("zero", "kind"), [("on", "zero"), ("off", "unallocated")])
    def test_block_states(self, tmp_path: Path, qemu_img: Run, zero: str, kind: str) -> None:
        """Unwritten blocks are zero (state ZERO) or unallocated (NOT_PRESENT), written ones data."""
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "24M", "-o",
                          f"block_size=8M,block_state_zero={zero}")  # fmt: skip
        qemu_io(path, "write -P 1 9M 4k", fmt="vhdx")
        with virtkit.images.open(path) as img:
            got = [(e.start, e.length, e.kind) for e in img.block_status(include_backing=False)]
            assert got == [(0, 8 * MiB, kind), (8 * MiB, 8 * MiB, "data"),
                           (16 * MiB, 8 * MiB, kind)]  # fmt: skip
            assert [e.kind for e in img.block_status()] == ["zero", "data", "zero"]

    def test_writable_open_refused(self, tmp_path: Path, qemu_img: Run) -> None:
        """Updating an existing VHDX needs its log; virtkit refuses instead of risking it."""
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "8M")
        with pytest.raises(virtkit.UnsupportedFeatureError, match="read-only"):
            virtkit.images.open(path, writable=True)
        with virtkit.images.open(path) as img, pytest.raises(virtkit.ImageError):
            img.write(0, b"x")


class TestWrite:
    """virtkit writes dynamic (and fixed) VHDX that qemu-img reads back identical and checks clean."""

    @pytest.mark.parametrize(
        ("size", "options"),
        [
            ("50M", {}),
            ("20971008", {"block_size": 1 << 20}),  # odd size, 1 MiB blocks
            ("70M", {"block_size": 32 << 20}),
            ("9M", {"subformat": "fixed"}),
        ],
        ids=["default", "odd-1M", "32M-blocks", "fixed"],
    )
    def test_convert_to_vhdx(
        self, tmp_path: Path, qemu_img: Run, size: str, options: dict[str, Any]
    ) -> None:
        """convert(format="vhdx") from a sparse qcow2: identical, clean, sparse."""
        src = tmp_path / "src.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", src, size)
        n = int(size.rstrip("M")) * MiB if size.endswith("M") else int(size)
        qemu_io(src, "write -P 0x5a 0 3M", f"write -P 0x33 {n - 4096} 4096",
                f"write -P 0x77 {n // 2 + 100} 1000")  # fmt: skip
        dst = tmp_path / "dst.vhdx"
        seen: list[tuple[int, int]] = []
        virtkit.images.convert(src, dst, format="vhdx", progress=lambda d, t: seen.append((d, t)),
                               **options)  # fmt: skip
        assert seen[-1] == (n, n)
        qemu_img("check", "-f", "vhdx", dst)
        qemu_img("compare", "-f", "qcow2", "-F", "vhdx", src, dst)
        info = json.loads(qemu_img("info", "--output=json", dst).stdout)
        assert info["format"] == "vhdx" and info["virtual-size"] == n
        if options.get("block_size"):
            assert info["cluster-size"] == options["block_size"]
        if not options.get("subformat"):  # dynamic: only written blocks take space
            bs = info["cluster-size"]
            assert dst.stat().st_size <= 5 * MiB + 4 * bs + 3 * MiB
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    def test_vhdx_round_trip_through_virtkit(self, tmp_path: Path, qemu_img: Run) -> None:
        """A VHDX qemu-img wrote, converted by virtkit to VHDX and back to raw, is unchanged."""
        src = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "16M")
        qemu_io(src, *WRITES, fmt="vhdx")
        virtkit.images.convert(src, tmp_path / "b.vhdx", format="vhdx")
        qemu_img("compare", src, tmp_path / "b.vhdx")
        virtkit.images.convert(tmp_path / "b.vhdx", tmp_path / "c.raw", format="raw")
        assert (tmp_path / "c.raw").read_bytes() == qemu_raw(qemu_img, src, tmp_path / "r.raw")

    def test_create_options_checked(self, tmp_path: Path) -> None:
        """Bad sizes, block sizes and subformats are ConfigErrors naming the option."""
        for kwargs, field in (
            ({"size": 1000}, "size"),
            ({"size": MiB, "block_size": 3 * MiB}, "block_size"),
            ({"size": MiB, "subformat": "streamOptimized"}, "subformat"),
        ):
            with pytest.raises(virtkit.ConfigError) as err:
                virtkit.images.create(tmp_path / "x.vhdx", format="vhdx", **kwargs)
            assert err.value.field == field
        assert os.listdir(tmp_path) == []

    def test_create_refuses_existing_file(self, tmp_path: Path) -> None:
        """create never replaces a file, and leaves no temporary behind."""
        (tmp_path / "x.vhdx").write_bytes(b"keep")
        with pytest.raises(virtkit.ImageError, match="exists"):
            virtkit.images.create(tmp_path / "x.vhdx", "8M", format="vhdx")
        assert (tmp_path / "x.vhdx").read_bytes() == b"keep"
        assert os.listdir(tmp_path) == ["x.vhdx"]


class TestDifferencing:
    """Differencing disks: parent locator -> backing file, under the allow policy."""

    def _chain(self, tmp_path: Path, qemu_img: Run) -> tuple[Path, Path, bytearray]:
        base = _qemu_vhdx(qemu_img, tmp_path / "base.vhdx", "12M", "-o", "block_size=1M")
        qemu_io(base, "write -P 0x11 0 3M", "write -P 0x22 10M 1M", fmt="vhdx")
        want = bytearray(qemu_raw(qemu_img, base, tmp_path / "base.raw"))
        child = tmp_path / "child.vhdx"
        with virtkit.images.create(child, format="vhdx", backing="base.vhdx") as img:
            img.write(MiB + 512, b"C" * 1000)
            img.write(5 * MiB, b"D" * 4096)
        want[MiB + 512 : MiB + 1512] = b"C" * 1000
        want[5 * MiB : 5 * MiB + 4096] = b"D" * 4096
        return base, child, want

    def test_reads_through_parent(self, tmp_path: Path, qemu_img: Run) -> None:
        """A child reads its own blocks and its parent's, and converts flattened."""
        _base, child, want = self._chain(tmp_path, qemu_img)
        with virtkit.images.open(child) as img:
            assert img.backing_file == ".\\base.vhdx"
            assert img.info().backing_filename == ".\\base.vhdx"
            assert img.read(0, img.virtual_size) == want
            own = [(e.start, e.length) for e in img.block_status(include_backing=False)
                   if e.kind == "data"]  # fmt: skip
            assert own == [(MiB, MiB), (5 * MiB, MiB)]
            chain = list(img.block_status())
            assert any(e.from_backing for e in chain)
        virtkit.images.convert(child, tmp_path / "flat.raw", format="raw")
        assert (tmp_path / "flat.raw").read_bytes() == want

    def test_partially_present_block(self, tmp_path: Path, qemu_img: Run) -> None:
        """A partially present block reads the sectors its bitmap marks here, the rest from the parent."""
        _base, child, want = self._chain(tmp_path, qemu_img)
        meta: Any = meta_of(child)
        size = child.stat().st_size
        with child.open("r+b") as fh:  # block 2 (parent data 0x11): 1 MiB of 0xEE, bitmap next
            fh.seek(size)
            fh.write(b"\xee" * MiB)
            bitmap = bytearray(MiB)
            spb = MiB // 512
            for sector in (0, 1, 2, 7, 100):
                bit = 2 * spb + sector
                bitmap[bit // 8] |= 1 << (bit % 8)
            fh.write(bitmap)
            fh.seek(meta.bat_offset + 2 * 8)
            fh.write(struct.pack("<Q", L.bat_entry(L.PAYLOAD_PARTIALLY_PRESENT, size)))
            fh.seek(meta.bat_offset + meta.chunk_ratio * 8)
            fh.write(struct.pack("<Q", L.bat_entry(L.SB_PRESENT, size + MiB)))
        for sector in (0, 1, 2, 7, 100):
            at = 2 * MiB + sector * 512
            want[at : at + 512] = b"\xee" * 512
        with virtkit.images.open(child) as img:
            assert img.read(0, img.virtual_size) == want
            assert img.read(2 * MiB + 3 * 512 - 10, 20) == b"\xee" * 10 + b"\x11" * 10
            own = [(e.start, e.length) for e in img.block_status(2 * MiB, MiB,
                   include_backing=False) if e.kind == "data"]  # fmt: skip
            assert own == [(2 * MiB, 1536), (2 * MiB + 3584, 512), (2 * MiB + 51200, 512)]
            assert img.check().ok

    def test_parent_outside_folder_needs_allow(self, tmp_path: Path, qemu_img: Run) -> None:
        """A parent outside the child's folder opens only when allowed."""
        (tmp_path / "p").mkdir()
        (tmp_path / "c").mkdir()
        base = _qemu_vhdx(qemu_img, tmp_path / "p" / "base.vhdx", "4M")
        qemu_io(base, "write -P 0x42 0 1M", fmt="vhdx")
        child = tmp_path / "c" / "child.vhdx"
        virtkit.images.create(child, format="vhdx", backing="../p/base.vhdx",
                              allow_backing=(tmp_path / "p",)).close()  # fmt: skip
        with pytest.raises(virtkit.ImageError, match="outside"):
            virtkit.images.open(child)
        with virtkit.images.open(child, allow_backing=[tmp_path / "p"]) as img:
            assert img.read(0, 4) == b"\x42" * 4

    def test_modified_parent_refused(self, tmp_path: Path, qemu_img: Run) -> None:
        """A parent written after the child was made (new data write GUID) is refused."""
        base, child, _want = self._chain(tmp_path, qemu_img)
        qemu_io(base, "write -P 0x99 0 512", fmt="vhdx")  # QEMU gives it a new data GUID
        with pytest.raises(virtkit.ImageError, match="modified"):
            virtkit.images.open(child)

    def test_missing_parent(self, tmp_path: Path, qemu_img: Run) -> None:
        """A child whose parent is gone says which file it looked for."""
        base, child, _want = self._chain(tmp_path, qemu_img)
        base.unlink()
        with pytest.raises(virtkit.ImageError, match="does not exist"):
            virtkit.images.open(child)


class TestLog:
    """A dirty log is replayed in memory exactly as qemu-img replays it into the file."""

    def _dirty(self, tmp_path: Path, qemu_img: Run) -> tuple[Path, bytes]:
        """A file whose BAT update and some data live only in a two-entry log."""
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "8M", "-o", "block_size=1M")
        qemu_io(path, "write -P 0x61 0 12k", fmt="vhdx")
        meta: Any = meta_of(path)
        data = bytearray(path.read_bytes())
        bat_sector = bytes(data[meta.bat_offset : meta.bat_offset + 4096])
        block0 = struct.unpack_from("<Q", bat_sector, 0)[0] & L.OFFSET_MASK
        data[meta.bat_offset : meta.bat_offset + 4096] = bytes(4096)  # the BAT update never landed
        path.write_bytes(bytes(data))
        guid = os.urandom(16)
        size = len(data)
        first = qemu_style_entry(guid, 7, [(meta.bat_offset, bat_sector)], [], size)
        second = qemu_style_entry(
            guid, 8, [(block0 + 8192, b"\x7e" * 4096)], [(block0, 4096)], size
        )
        set_headers(path, log_guid=guid, log_version=0)
        log_offset = headers(path)[0].log_offset
        with path.open("r+b") as fh:
            fh.seek(log_offset)
            fh.write(first + second)
        return path, path.read_bytes()

    def test_replayed_like_qemu(self, tmp_path: Path, qemu_img: Run) -> None:
        """virtkit reads a dirty file as qemu-img reads it after 'check -r all', file untouched."""
        path, before = self._dirty(tmp_path, qemu_img)
        proc = qemu_img("info", path, check=False)  # qemu-img will not read it read-only
        assert proc.returncode != 0 and "replay" in proc.stderr.lower()
        copy = tmp_path / "copy.vhdx"
        copy.write_bytes(before)
        qemu_img("check", "-r", "all", copy, check=False)  # QEMU's own replay, into the copy
        want = qemu_raw(qemu_img, copy, tmp_path / "ref.raw")
        assert want[:4096] == bytes(4096) and want[4096:8192] == b"a" * 4096
        assert want[8192:12288] == b"\x7e" * 4096
        with virtkit.images.open(path) as img:
            assert img.read(0, img.virtual_size) == want
            assert img.check().ok
        virtkit.images.convert(path, tmp_path / "out.qcow2")
        qemu_img("compare", copy, tmp_path / "out.qcow2")
        assert path.read_bytes() == before  # a read-only open wrote nothing

    def test_bad_checksum_entry_ignored(self, tmp_path: Path, qemu_img: Run) -> None:
        """An entry whose CRC fails is not part of any sequence: nothing is replayed."""
        path, _ = self._dirty(tmp_path, qemu_img)
        log_offset = headers(path)[0].log_offset
        with path.open("r+b") as fh:  # damage the first entry's data sector
            fh.seek(log_offset + 4096 + 100)
            fh.write(b"\x00\x01")
        with virtkit.images.open(path) as img:  # the second entry alone: zero + 0x7e, no BAT
            assert img.read(0, 12288) == bytes(12288)

    def test_log_guid_without_entries_opens(self, tmp_path: Path, qemu_img: Run) -> None:
        """A log GUID with no valid entry behind it needs no replay."""
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "8M")
        qemu_io(path, "write -P 0x61 0 4k", fmt="vhdx")
        dirty_log(path, entries=False)
        with virtkit.images.open(path) as img:
            assert img.read(0, 4) == b"aaaa"

    def test_too_large_log_refused(self, tmp_path: Path, qemu_img: Run) -> None:
        """A dirty log too long to replay in memory is refused, naming the replay."""
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "8M")
        dirty_log(path)
        set_headers(path, log_length=64 << 20)
        with pytest.raises(virtkit.UnsupportedFeatureError, match="replay") as err:
            virtkit.images.open(path)
        assert err.value.feature == "vhdx log replay"


class TestHostile:
    """Damaged metadata: CorruptImageError or UnsupportedFeatureError, never a crash."""

    def _image(self, tmp_path: Path, qemu_img: Run) -> Path:
        path = _qemu_vhdx(qemu_img, tmp_path / "a.vhdx", "8M", "-o", "block_size=1M")
        qemu_io(path, "write -P 0x61 0 1M", fmt="vhdx")
        return path

    def _patch(self, path: Path, offset: int, data: bytes) -> None:
        with path.open("r+b") as fh:
            fh.seek(offset)
            fh.write(data)

    def test_both_headers_bad(self, tmp_path: Path, qemu_img: Run) -> None:
        """Two headers with bad checksums: no valid header."""
        path = self._image(tmp_path, qemu_img)
        self._patch(path, L.HEADER1_OFFSET + 20, b"\xff")
        self._patch(path, L.HEADER2_OFFSET + 20, b"\xff")
        with pytest.raises(virtkit.CorruptImageError, match="no valid header"):
            virtkit.images.open(path, format="vhdx")

    def test_newest_valid_header_wins(self, tmp_path: Path, qemu_img: Run) -> None:
        """One damaged header: the other still opens the file."""
        path = self._image(tmp_path, qemu_img)
        newest = max(range(2), key=lambda i: headers(path)[i].sequence)
        self._patch(path, (L.HEADER1_OFFSET, L.HEADER2_OFFSET)[newest] + 20, b"\xff")
        with virtkit.images.open(path) as img:
            assert img.read(0, 2) == b"aa"

    def test_bat_entry_past_eof(self, tmp_path: Path, qemu_img: Run) -> None:
        """A BAT entry pointing past the end of the file is named, with its offset."""
        path = self._image(tmp_path, qemu_img)
        meta: Any = meta_of(path)
        self._patch(path, meta.bat_offset, struct.pack("<Q", L.bat_entry(6, 1 << 40)))
        with virtkit.images.open(path) as img:
            with pytest.raises(virtkit.CorruptImageError, match="outside the file") as err:
                img.read(0, 512)
            assert err.value.offset == meta.bat_offset
            assert not img.check().ok

    def test_bat_entry_over_metadata(self, tmp_path: Path, qemu_img: Run) -> None:
        """A block placed over the BAT itself is refused."""
        path = self._image(tmp_path, qemu_img)
        meta: Any = meta_of(path)
        self._patch(path, meta.bat_offset, struct.pack("<Q", L.bat_entry(6, meta.bat_offset)))
        with virtkit.images.open(path) as img, pytest.raises(virtkit.CorruptImageError,
                                                              match="metadata"):  # fmt: skip
            img.read(0, 512)

    def test_huge_region_and_counts(self, tmp_path: Path, qemu_img: Run) -> None:
        """A region table entry count past 2047 or overlapping regions are corrupt."""
        path = self._image(tmp_path, qemu_img)
        data = bytearray(
            path.read_bytes()[L.REGION1_OFFSET : L.REGION1_OFFSET + L.REGION_TABLE_SIZE]
        )
        entries = [L.RegionEntry(*L.REGION_ENTRY.unpack_from(data, 16 + 32 * i)) for i in range(2)]
        overlapping = [entries[0], L.RegionEntry(entries[1].guid, entries[0].file_offset,
                                                 entries[1].length, 1)]  # fmt: skip
        for table in (L.pack_region_table(overlapping),):
            self._patch(path, L.REGION1_OFFSET, table)
            self._patch(path, L.REGION2_OFFSET, table)
            with pytest.raises(virtkit.CorruptImageError, match="overlaps"):
                virtkit.images.open(path)

    def test_unknown_required_region(self, tmp_path: Path, qemu_img: Run) -> None:
        """A required region virtkit does not know is UnsupportedFeatureError, as the spec says."""
        path = self._image(tmp_path, qemu_img)
        data = path.read_bytes()[L.REGION1_OFFSET : L.REGION1_OFFSET + L.REGION_TABLE_SIZE]
        entries = [L.RegionEntry(*L.REGION_ENTRY.unpack_from(data, 16 + 32 * i)) for i in range(2)]
        table = L.pack_region_table([*entries, L.RegionEntry(b"\x01" * 16, 64 * MiB, MiB, 1)])
        self._patch(path, L.REGION1_OFFSET, table)
        with pytest.raises(virtkit.UnsupportedFeatureError):
            virtkit.images.open(path)

    def test_block_size_and_virtual_size_bounds(self, tmp_path: Path, qemu_img: Run) -> None:
        """Block sizes outside 1..256 MiB and a virtual size past 64 TiB are refused."""
        path = self._image(tmp_path, qemu_img)
        meta: Any = meta_of(path)
        table = path.read_bytes()[meta.metadata_offset : meta.metadata_offset + 65536]
        items = {}
        for i in range(struct.unpack_from("<H", table, 10)[0]):
            guid, off, _len, _f, _r = L.META_ENTRY.unpack_from(table, 32 + 32 * i)
            items[guid] = meta.metadata_offset + off
        original = path.read_bytes()
        for where, value in ((items[L.FILE_PARAMS_GUID], struct.pack("<I", 512 * MiB)),
                             (items[L.VIRTUAL_SIZE_GUID], struct.pack("<Q", 1 << 60)),
                             (items[L.LOGICAL_SECTOR_GUID], struct.pack("<I", 1000))):  # fmt: skip
            path.write_bytes(original)
            self._patch(path, where, value)
            with pytest.raises(virtkit.CorruptImageError):
                virtkit.images.open(path)

    def test_not_vhdx(self, tmp_path: Path) -> None:
        """A file without the signature, opened as vhdx, is corrupt, not a crash."""
        path = tmp_path / "x.vhdx"
        path.write_bytes(b"\0" * 4096)
        with pytest.raises(virtkit.CorruptImageError):
            virtkit.images.open(path, format="vhdx")

"""The declarative qcow2 structures: decode and encode are exact inverses."""

from __future__ import annotations

import struct
import tempfile
from array import array
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from virtkit.images.qcow2 import layout, metadata
from virtkit.images.storage import FileStorage

_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)


class TestHeader:
    """The header table is used both ways."""

    @given(fields=st.tuples(*([_u64] * 3)), small=st.tuples(*([_u32] * 6)))
    def test_v3_round_trip(self, fields: tuple[int, ...], small: tuple[int, ...]) -> None:
        """encode(decode(b)) == b for any 112-byte v3 header (tail bytes kept)."""
        raw = (
            layout.MAGIC
            + struct.pack(">IQIIQ", 3, fields[0], small[0], small[1], fields[1])
            + struct.pack(">IIQQIIQ", small[2], small[3], fields[2], 0, small[4], small[5], 0)
            + struct.pack(">QQQII", 1, 2, 3, 4, 112)
            + bytes([1]) + bytes(7)
        )  # fmt: skip
        hdr = layout.decode_header(raw, path="x")
        assert hdr.compression_type == 1
        assert layout.encode_header(hdr) == raw

    @given(raw=st.binary(min_size=72, max_size=72))
    def test_v2_round_trip(self, raw: bytes) -> None:
        """A v2 header (72 bytes) survives decode+encode byte for byte."""
        raw = layout.MAGIC + struct.pack(">I", 2) + raw[8:]
        assert layout.encode_header(layout.decode_header(raw, path="x")) == raw


class TestSnapshotEntry:
    """Snapshot table entries encode as QEMU writes them and parse back."""

    @given(
        name=st.text(min_size=1, max_size=40),
        vm=st.integers(0, 2**40),
        disk=st.integers(0, 2**50),
        clock=_u64,
    )
    def test_round_trip(self, name: str, vm: int, disk: int, clock: int) -> None:
        """An entry written by encode() reads back equal through the table parser."""
        entry = layout.SnapshotEntry(
            l1_table_offset=0, l1_size=0, id="7", name=name, date_sec=5, date_nsec=6,
            vm_clock_nsec=clock, vm_state_size=vm, disk_size=disk, icount=None,
        )  # fmt: skip
        blob = entry.encode(version=3)
        assert len(blob) % 8 == 0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "t"
            path.write_bytes(bytes(512) + blob)
            hdr = layout.Header(cluster_bits=9, nb_snapshots=1, snapshots_offset=512)
            st_ = FileStorage(path, writable=False, lock=False)
            try:
                (back,), size = metadata.read_snapshot_table(st_, hdr)
            finally:
                st_.close()
        assert back == entry and size == len(blob)


class TestRefcountBlocks:
    """Refcount blocks of every width decode and encode exactly."""

    @given(bits=st.sampled_from([1, 2, 4, 8, 16, 32, 64]), data=st.data())
    def test_round_trip(self, bits: int, data: st.DataObject) -> None:
        """decode then encode gives the same bytes, and entries are LSB-first."""
        raw = data.draw(st.binary(min_size=64, max_size=64))
        values = layout.decode_refblock(raw, bits)
        assert len(values) == 64 * 8 // bits
        assert layout.encode_refblock(values, bits) == raw
        if bits < 8:
            assert values[0] == raw[0] & ((1 << bits) - 1)
        elif bits >= 8:
            assert values[0] == int.from_bytes(raw[: bits // 8], "big")

    def test_u64_tables(self) -> None:
        """L1/L2/refcount tables are big-endian on disk, native in memory."""
        table = array("Q", [1, 2**63, 0x0123456789ABCDEF])
        raw = layout.encode_u64_table(table)
        assert raw[:8] == (1).to_bytes(8, "big")
        assert layout.decode_u64_table(raw) == table

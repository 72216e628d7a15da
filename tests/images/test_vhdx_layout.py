"""VHDX and VDI structures round-trip, CRC-32C is the Castagnoli CRC, and a bounded fuzz of both."""

from __future__ import annotations

import importlib.util
import random
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtkit.images.vdi import layout as VL
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx.crc import crc32c

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_images.py"


def _fuzz() -> ModuleType:
    if "fuzz_images" in sys.modules:
        return sys.modules["fuzz_images"]
    spec = importlib.util.spec_from_file_location("fuzz_images", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_images"] = module
    spec.loader.exec_module(module)
    return module


class TestLayout:
    """Each structure is described once and used both ways."""

    @settings(deadline=None)
    @given(st.binary(min_size=L.HEADER.size, max_size=L.HEADER.size))
    def test_header_round_trip(self, raw: bytes) -> None:
        """unpack then pack gives back the bytes (with the checksum recomputed)."""
        hdr = L.Header.unpack(raw)
        packed = hdr.pack()
        again = L.Header.unpack(packed)
        assert packed[8 : L.HEADER.size] == raw[8:]
        assert packed[:4] == raw[:4]
        assert crc32c(packed[:4] + bytes(4) + packed[8:]) == again.checksum

    @given(st.binary(min_size=512, max_size=512))
    def test_vdi_header_round_trip(self, raw: bytes) -> None:
        """The VDI header packs back to the same 512 bytes."""
        assert VL.VdiHeader.unpack(raw).pack() == raw

    @settings(max_examples=20, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.binary(min_size=16, max_size=16),
                st.integers(0, 2**64 - 1),
                st.integers(0, 2**32 - 1),
                st.integers(0, 2**32 - 1),
            ),
            max_size=20,
        )
    )
    def test_region_table_round_trip(self, entries: list[tuple[bytes, int, int, int]]) -> None:
        """A packed region table lists its entries back, under a valid checksum."""
        table = L.pack_region_table([L.RegionEntry(*e) for e in entries])
        sig, crc, count, _ = L.REGION_HEADER.unpack_from(table, 0)
        assert (sig, count) == (L.REGION_SIGNATURE, len(entries))
        assert crc32c(table[:4] + bytes(4) + table[8:]) == crc
        got = [L.REGION_ENTRY.unpack_from(table, 16 + 32 * i) for i in range(count)]
        assert got == entries

    def test_crc32c_vectors(self) -> None:
        """The RFC 3720 test vectors, and it differs from zlib's IEEE CRC-32."""
        assert crc32c(b"123456789") == 0xE3069283
        assert crc32c(bytes(32)) == 0x8A9136AA
        assert crc32c(b"\xff" * 32) == 0x62A8AB43
        assert crc32c(bytes(range(32))) == 0x46DD794E
        assert crc32c(b"5678", crc32c(b"1234")) == crc32c(b"12345678")
        assert crc32c(b"123456789") != zlib.crc32(b"123456789")

    @pytest.mark.parametrize(("size", "bs", "parent", "want"),
                             [(10 << 20, 8 << 20, False, 2), (1 << 40, 1 << 20, False, 1048576 + 255),
                              (12 << 20, 1 << 20, True, 4097), (0, 1 << 20, False, 0)])  # fmt: skip
    def test_bat_entries(self, size: int, bs: int, parent: bool, want: int) -> None:
        """The BAT entry count follows QEMU's vhdx_calc_bat_entries."""
        assert L.bat_entries(size, bs, 512, parent=parent) == want


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """VHDX (dynamic, fixed, child) and VDI (dynamic, static) seeds, mapped."""
    fuzz = _fuzz()
    work = tmp_path_factory.mktemp("seeds")
    raw = work / "data.raw"
    fuzz._run("qemu-img", "create", "-f", "raw", raw, "2M")
    fuzz._run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 65536", "-c",
              "write -P 0x33 1M 5000", raw)  # fmt: skip
    made: dict[str, object] = fuzz.make_vhdx_vdi_seeds(work, raw)
    return made


class TestBoundedFuzz:
    """A short structure-aware fuzz of the VHDX and VDI seeds only (the shared run mixes all)."""

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
    @given(rng_seed=st.integers(0, 2**32 - 1), count=st.integers(1, 3))
    def test_mutated(
        self, seeds: dict[str, object], tmp_path: Path, rng_seed: int, count: int
    ) -> None:
        """Mutated VHDX/VDI files work or raise a VirtkitError, within time and memory bounds."""
        fuzz = _fuzz()
        rng = random.Random(rng_seed)
        seed = seeds[rng.choice(sorted(seeds))]
        data, notes = fuzz.mutate(seed, rng, count)
        path = fuzz.write_input(tmp_path / "fz", seed, data)
        try:
            fuzz.run_bounded(path, write=False)
        except BaseException as exc:
            raise AssertionError(f"{getattr(seed, 'name', '?')} {notes}: {exc!r}") from exc

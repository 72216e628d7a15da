"""A corpus of malformed qcow2 images (one kind of damage each) and a bounded fuzz run.

Each case starts from a valid image made by qemu-img, applies one kind of
damage, and must raise the expected :class:`virtkit.VirtkitError` subclass on
open or on use, within a time bound (SIGALRM) and a memory bound (tracemalloc
peak) - never an IndexError, struct.error, MemoryError or a hang.
"""

from __future__ import annotations

import importlib.util
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import virtkit

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_images.py"


def _load_fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_images", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_images"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
Seeds = dict[str, "fuzz.Seed"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    """Valid qemu-img images (v2, v3 with snapshot+bitmap, compressed, backing...), mapped."""
    made: Seeds = fuzz.make_seeds(tmp_path_factory.mktemp("seeds"))
    return made


def _field(seed: fuzz.Seed, prefix: str) -> fuzz.Field:
    return next(f for f in seed.fields if f.name.startswith(prefix))


def _u(data: bytes, fld: fuzz.Field) -> int:
    value: int = struct.unpack_from(fld.code, data, fld.offset)[0]
    return value


def _set(seed: fuzz.Seed, data: bytes, prefix: str, value: int | Callable[[int], int]) -> bytes:
    fld = _field(seed, prefix)
    new = value(_u(data, fld)) if callable(value) else value
    out = bytearray(data)
    struct.pack_into(fld.code, out, fld.offset, new)
    return bytes(out)


def _passwd_backing(seed: fuzz.Seed, data: bytes) -> bytes:
    off = _u(data, _field(seed, "backing_file_offset"))
    name = b"/etc/passwd"
    out = bytearray(data)
    out[off : off + len(name)] = name
    struct.pack_into(">I", out, 16, len(name))
    return bytes(out)


def _compressed_past_eof(seed: fuzz.Seed, data: bytes) -> bytes:
    """Make the first compressed L2 entry claim 255 extra sectors starting near EOF."""
    fld = next(f for f in seed.fields if f.name.startswith("l2@") and _u(data, f) & (1 << 62))
    x = 62 - (16 - 8)  # cluster_bits 16: offset in bits 0..53, sector count above
    entry = (1 << 62) | (0xFF << x) | ((len(data) - 512) & ((1 << x) - 1))
    out = bytearray(data)
    struct.pack_into(">Q", out, fld.offset, entry)
    return bytes(out)


def _l2_into_reftable(seed: fuzz.Seed, data: bytes) -> bytes:
    """Point the first data cluster at the refcount table (metadata read as guest data).

    (Host offset 0 cannot express "into the header": the spec reads it as unallocated.)
    """
    reftable = _u(data, _field(seed, "refcount_table_offset"))
    return _set(seed, data, "l2@", (1 << 63) | reftable)


def _compressed_into_header(seed: fuzz.Seed, data: bytes) -> bytes:
    """Make the first compressed L2 entry point at the image header (offset 0x68)."""
    fld = next(f for f in seed.fields if f.name.startswith("l2@") and _u(data, f) & (1 << 62))
    out = bytearray(data)
    struct.pack_into(">Q", out, fld.offset, (1 << 62) | 0x68)
    return bytes(out)


def _ext_len_past_cluster(seed: fuzz.Seed, data: bytes) -> bytes:
    return _set(seed, data, "ext0.len", 0x100000)


def _grain_garbage(seed: fuzz.Seed, data: bytes) -> bytes:
    """Overwrite the first compressed grain's zlib stream with bytes that do not inflate."""
    fld = _field(seed, "grain@")
    out = bytearray(data)
    out[fld.offset + 4 : fld.offset + 36] = b"\xff" * 32
    return bytes(out)


def _vpc_hyperv_huge(seed: fuzz.Seed, data: bytes) -> bytes:
    """A Hyper-V footer (current_size decides) claiming 3 TiB: past VHD's 2040 GiB."""
    out = bytearray(_set(seed, _set(seed, data, "footer.creator_app", 0x77696E20),
                         "footer.current_size", 3 << 40))  # fmt: skip
    return bytes(out)


Damage = Callable[[fuzz.Seed, bytes], bytes]
Corrupt = virtkit.CorruptImageError
Unsupported = virtkit.UnsupportedFeatureError

# (case id, seed, damage, expected error class, message fragment or None)
Case = tuple[str, str, Damage, type[virtkit.ImageError], str | None]
CASES: list[Case] = [
    ("bad_magic", "v3", lambda s, d: b"QFI\x00" + d[4:], Corrupt, None),
    ("version_4", "v3", lambda s, d: _set(s, d, "version", 4), Unsupported, "4"),
    ("version_1", "v3", lambda s, d: _set(s, d, "version", 1), Unsupported, "1"),
    ("truncated_header", "v3", lambda s, d: d[:50], Corrupt, None),
    ("header_length_short", "v3", lambda s, d: _set(s, d, "header_length", 40), Corrupt, None),
    ("cluster_bits_8", "v3", lambda s, d: _set(s, d, "cluster_bits", 8), Corrupt, None),
    ("cluster_bits_30", "v3", lambda s, d: _set(s, d, "cluster_bits", 30), Corrupt, None),
    ("refcount_order_7", "v3", lambda s, d: _set(s, d, "refcount_order", 7), Corrupt, None),
    ("crypt_method_aes", "v2", lambda s, d: _set(s, d, "crypt_method", 1), Unsupported, None),
    (
        "incompat_bit_30",
        "v3",
        lambda s, d: _set(s, d, "incompatible_features", 1 << 30),
        Unsupported,
        "30",
    ),
    (
        "l1_offset_unaligned",
        "v3",
        lambda s, d: _set(s, d, "l1_table_offset", lambda v: v + 8),
        Corrupt,
        None,
    ),
    ("l1_offset_huge", "v3", lambda s, d: _set(s, d, "l1_table_offset", 1 << 50), Corrupt, None),
    ("l1_size_2_31", "v3", lambda s, d: _set(s, d, "l1_size", 1 << 31), Corrupt, None),
    ("l1_size_too_small", "v3", lambda s, d: _set(s, d, "l1_size", 0), Corrupt, None),
    (
        "l1_entry_past_eof",
        "v3",
        lambda s, d: _set(s, d, "l1[0]", (1 << 63) | (1 << 45)),
        Corrupt,
        None,
    ),
    (
        "l2_entry_past_eof",
        "v2",
        lambda s, d: _set(s, d, "l2@", (1 << 63) | (1 << 40)),
        Corrupt,
        None,
    ),
    ("l2_entry_into_refcount_table", "v2", _l2_into_reftable, Corrupt, None),
    ("l2_entry_unaligned", "v2", lambda s, d: _set(s, d, "l2@", lambda v: v + 512), Corrupt, None),
    (
        "refcount_table_overlaps_header",
        "v3",
        lambda s, d: _set(s, d, "refcount_table_offset", 0),
        Corrupt,
        None,
    ),
    (
        "refcount_table_huge",
        "v3",
        lambda s, d: _set(s, d, "refcount_table_clusters", 1 << 30),
        Corrupt,
        None,
    ),
    ("snapshot_count_2_20", "v3", lambda s, d: _set(s, d, "nb_snapshots", 1 << 20), Corrupt, None),
    (
        "snapshot_table_past_eof",
        "v3",
        lambda s, d: _set(s, d, "snapshots_offset", 1 << 40),
        Corrupt,
        None,
    ),
    (
        "snapshot_l1_size_huge",
        "v3",
        lambda s, d: _set(s, d, "snap0.l1_size", 1 << 31),
        Corrupt,
        None,
    ),
    ("header_extension_past_cluster", "v3", _ext_len_past_cluster, Corrupt, None),
    (
        "backing_name_huge",
        "overlay",
        lambda s, d: _set(s, d, "backing_file_size", 0xFFFFFFFF),
        Corrupt,
        None,
    ),
    (
        "backing_name_past_cluster",
        "overlay",
        lambda s, d: _set(s, d, "backing_file_offset", 0xFFF0),
        Corrupt,
        None,
    ),
    ("compressed_size_past_eof", "compressed", _compressed_past_eof, Corrupt, None),
    ("compressed_entry_into_header", "compressed", _compressed_into_header, Corrupt, None),
    ("virtual_size_2_62", "v3", lambda s, d: _set(s, d, "size", 1 << 62), Corrupt, None),
    # VMDK (monolithicSparse and streamOptimized made by qemu-img)
    ("vmdk_version_4", "vmdk-sparse", lambda s, d: _set(s, d, "version", 4), Unsupported, "4"),
    ("vmdk_cowd", "vmdk-sparse", lambda s, d: b"COWD" + d[4:], Unsupported, "COWD"),
    ("vmdk_not_kdmv", "vmdk-sparse", lambda s, d: b"KDMX" + d[4:], Corrupt, "createType"),
    ("vmdk_gtes_1024", "vmdk-sparse", lambda s, d: _set(s, d, "num_gtes", 1024), Corrupt, None),
    ("vmdk_granularity_0", "vmdk-sparse", lambda s, d: _set(s, d, "granularity", 0), Corrupt, None),
    (
        "vmdk_granularity_4m",
        "vmdk-sparse",
        lambda s, d: _set(s, d, "granularity", 1 << 22),
        Corrupt,
        "granularity",
    ),
    (
        "vmdk_capacity_2_62",
        "vmdk-sparse",
        lambda s, d: _set(s, d, "capacity", 1 << 62),
        Corrupt,
        None,
    ),
    (
        "vmdk_gd_past_eof",
        "vmdk-sparse",
        lambda s, d: _set(s, d, "gd_offset", 1 << 40),
        Corrupt,
        None,
    ),
    ("vmdk_gt_past_eof", "vmdk-sparse", lambda s, d: _set(s, d, "gd[0]", 1 << 30), Corrupt, None),
    ("vmdk_stream_truncated", "vmdk-vstream", lambda s, d: d[:-1536], Corrupt, "footer"),
    (
        "vmdk_stream_footer_magic",
        "vmdk-vstream",
        lambda s, d: d[:-1024] + b"XXXX" + d[-1020:],
        Corrupt,
        "footer",
    ),
    ("vmdk_grain_size_0", "vmdk-stream", lambda s, d: _set(s, d, "grain@", 0), Corrupt, "size"),
    (
        "vmdk_grain_size_huge",
        "vmdk-stream",
        lambda s, d: _set(s, d, "grain@", 0xFFFFFFF0),
        Corrupt,
        "size",
    ),
    ("vmdk_grain_not_zlib", "vmdk-stream", lambda s, d: _grain_garbage(s, d), Corrupt, "inflate"),
    (
        "vmdk_stream_compression_2",
        "vmdk-vstream",
        lambda s, d: _set(s, d, "footer.compress_algorithm", 2),
        Unsupported,
        "compression",
    ),
    # VHD (dynamic and fixed made by qemu-img)
    (
        "vpc_dyn_header_past_eof",
        "vpc-dynamic",
        lambda s, d: _set(s, d, "footer.data_offset", 1 << 40),
        Corrupt,
        None,
    ),
    (
        "vpc_block_size_1000",
        "vpc-dynamic",
        lambda s, d: _set(s, d, "dyn.block_size", 1000),
        Corrupt,
        "block size",
    ),
    (
        "vpc_bat_too_small",
        "vpc-dynamic",
        lambda s, d: _set(s, d, "dyn.max_table_entries", 0),
        Corrupt,
        "small",
    ),
    (
        "vpc_bat_huge",
        "vpc-dynamic",
        lambda s, d: _set(s, d, "dyn.max_table_entries", 0xFFFFFFFF),
        Corrupt,
        None,
    ),
    (
        "vpc_bat_past_eof",
        "vpc-dynamic",
        lambda s, d: _set(s, d, "dyn.table_offset", 1 << 40),
        Corrupt,
        None,
    ),
    (
        "vpc_no_sparse_cookie",
        "vpc-dynamic",
        lambda s, d: d[:512] + b"x" + d[513:],
        Corrupt,
        "cxsparse",
    ),
    (
        "vpc_differencing",
        "vpc-dynamic",
        lambda s, d: _set(s, d, "footer.type", 4),
        Unsupported,
        "differencing",
    ),
    ("vpc_fixed_no_footer", "vpc-fixed", lambda s, d: d[:-512] + bytes(512), Corrupt, "conectix"),
    ("vpc_fixed_too_big", "vpc-fixed", _vpc_hyperv_huge, Corrupt, "2040"),
]

# Bounds for every input: seconds of wall time (SIGALRM) and traced peak memory.
fuzz.TIME_LIMIT_S = 10
fuzz.MEMORY_LIMIT = 64 << 20


def _run_case(path: Path) -> BaseException | None:
    """Exercise the image under the bounds; return what it raised (None if it worked)."""
    try:
        fuzz.run_bounded(path, swallow=False, write=False)
    except BaseException as exc:  # the test inspects every kind
        return exc
    return None


class TestCorpus:
    """Each kind of damage gives its own clear error, bounded in time and memory."""

    @pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES])
    def test_damage_is_reported(self, seeds: Seeds, tmp_path: Path, case: Case) -> None:
        """Opening or reading the damaged image raises the expected VirtkitError subclass."""
        _, seed_name, damage, expected, fragment = case
        seed = seeds[seed_name]
        path = fuzz.write_input(tmp_path, seed, damage(seed, seed.data))
        outcome = _run_case(path)
        assert isinstance(outcome, expected), f"expected {expected.__name__}, got {outcome!r}"
        assert outcome.path == str(path) or str(path) in str(outcome)
        if fragment is not None:
            assert fragment in str(outcome)

    def test_backing_to_etc_passwd_is_not_read(self, seeds: Seeds, tmp_path: Path) -> None:
        """A backing file name pointing at /etc/passwd is refused, not opened as raw data."""
        seed = seeds["overlay"]
        path = fuzz.write_input(tmp_path, seed, _passwd_backing(seed, seed.data))
        outcome = _run_case(path)
        assert isinstance(outcome, virtkit.ImageError), repr(outcome)
        assert not isinstance(outcome, virtkit.CorruptImageError)
        assert "/etc/passwd" in str(outcome)

    def test_seeds_are_valid(self, seeds: Seeds, tmp_path: Path) -> None:
        """Every undamaged seed opens and reads cleanly (the corpus damages valid images)."""
        for name, seed in seeds.items():
            path = fuzz.write_input(tmp_path / name, seed, seed.data)
            assert fuzz.run_bounded(path) == "ok", name  # reads, writes, snapshots


def _run_writes(path: Path) -> BaseException | None:
    """Open writable and write/zero once, under the time and memory bounds."""

    def writes() -> str:
        with virtkit.images.open(path, writable=True, format="qcow2") as img:
            img.write_zeroes(0, 4096)
            img.write(img.virtual_size // 3, b"\xa5" * 5000)
        return "ok"

    old = fuzz.exercise
    fuzz.exercise = lambda p, **kw: writes()
    try:
        fuzz.run_bounded(path)
    except BaseException as exc:  # the test inspects every kind
        return exc
    finally:
        fuzz.exercise = old
    return None


class TestWritesOnDamagedImages:
    """Writing to a damaged image refuses with CorruptImageError instead of doing harm.

    Regression cases found by scripts/fuzz_images.py's write phase.
    """

    def test_write_through_l2_entry_past_eof(self, seeds: Seeds, tmp_path: Path) -> None:
        """A data cluster past EOF is not written in place (it would grow the file to 1 TiB)."""
        seed = seeds["v2"]
        path = fuzz.write_input(tmp_path, seed, _set(seed, seed.data, "l2@", (1 << 63) | (1 << 40)))
        outcome = _run_writes(path)
        assert path.stat().st_size < 1 << 30, "the write went 1 TiB into the file"
        assert isinstance(outcome, virtkit.CorruptImageError), repr(outcome)

    def test_unaligned_refcount_block_offset(self, seeds: Seeds, tmp_path: Path) -> None:
        """A refcount table entry of 0x1 (unaligned) is reported, not looped on forever."""
        seed = seeds["v3"]
        path = fuzz.write_input(tmp_path, seed, _set(seed, seed.data, "reftable[0]", 1))
        outcome = _run_writes(path)
        assert isinstance(outcome, virtkit.CorruptImageError), repr(outcome)


class TestBoundedFuzz:
    """A short structure-aware fuzz run (read side): any input works or raises a VirtkitError.

    The write side runs in scripts/fuzz_images.py campaigns; what it found is
    pinned in TestWritesOnDamagedImages.
    """

    @settings(
        max_examples=80,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(rng_seed=st.integers(0, 2**32 - 1), count=st.integers(1, 3))
    def test_mutated_images(self, seeds: Seeds, tmp_path: Path, rng_seed: int, count: int) -> None:
        """Structure-aware mutations of valid images never escape as a non-virtkit error."""
        rng = random.Random(rng_seed)
        seed = seeds[rng.choice(sorted(seeds))]
        data, notes = fuzz.mutate(seed, rng, count)
        path = fuzz.write_input(tmp_path / "fz", seed, data)
        try:
            fuzz.run_bounded(path, write=False)
        except BaseException as exc:
            raise AssertionError(f"{seed.name} {notes}: {exc!r}") from exc


class TestCheckFindsDanglingPointers:
    """Pointers past the end of the file read as zeroes (as in QEMU) and check() reports them."""

    def test_vmdk_grain_past_eof(self, seeds: Seeds, tmp_path: Path) -> None:
        """A grain-table entry past EOF: reads give zeroes, check() and qemu-img check complain."""
        seed = seeds["vmdk-sparse"]
        path = fuzz.write_input(tmp_path, seed, _set(seed, seed.data, "gt@", 1 << 24))
        with virtkit.images.open(path, format="vmdk") as img:
            assert img.read(0, 4096) == bytes(4096)
            result = img.check()
        assert not result.ok and result.corruptions >= 1
        assert "past the end" in result.problems[0].message
        proc = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, check=False)
        assert proc.returncode != 0

    def test_vpc_block_past_eof(self, seeds: Seeds, tmp_path: Path) -> None:
        """A BAT entry past EOF reads zeroes and check() reports the block."""
        seed = seeds["vpc-dynamic"]
        path = fuzz.write_input(tmp_path, seed, _set(seed, seed.data, "bat[0]", 1 << 24))
        with virtkit.images.open(path, format="vpc") as img:
            assert img.read(0, 4096) == bytes(4096)
            result = img.check()
        assert result.corruptions == 1


# --- damaged persistent bitmaps (the "v3" seed has bitmap bm0) ---------------------------
def _dir_entry(seed: fuzz.Seed, data: bytes, at: int, fmt: str, value: int) -> bytes:
    """Set the field at byte ``at`` of the first bitmap directory entry."""
    doff = _u(data, _field(seed, "bitmaps.dir_offset"))
    out = bytearray(data)
    struct.pack_into(fmt, out, doff + at, value)
    return bytes(out)


def _table_entry(seed: fuzz.Seed, data: bytes, value: Callable[[int], int]) -> bytes:
    """Change the first entry of the first bitmap's table."""
    doff = _u(data, _field(seed, "bitmaps.dir_offset"))
    table = struct.unpack_from(">Q", data, doff)[0]
    out = bytearray(data)
    struct.pack_into(">Q", out, table, value(struct.unpack_from(">Q", data, table)[0]))
    return bytes(out)


# (case id, damage, message fragment): each must raise CorruptImageError when read
BITMAP_CASES: list[tuple[str, Damage, str]] = [
    ("nb_zero", lambda s, d: _set(s, d, "bitmaps.nb", 0), "zero bitmaps"),
    ("nb_too_many", lambda s, d: _set(s, d, "bitmaps.nb", 2), "fewer bitmaps"),
    ("nb_65536", lambda s, d: _set(s, d, "bitmaps.nb", 65536), "65535"),
    ("dir_size_huge", lambda s, d: _set(s, d, "bitmaps.dir_size", 1 << 40), "size"),
    ("dir_past_eof", lambda s, d: _set(s, d, "bitmaps.dir_offset", 1 << 40), "end of the file"),
    ("dir_unaligned", lambda s, d: _set(s, d, "bitmaps.dir_offset", lambda v: v + 8), "misplaced"),
    ("dir_in_header", lambda s, d: _set(s, d, "bitmaps.dir_offset", 0), "misplaced"),
    ("type_2", lambda s, d: _dir_entry(s, d, 16, ">B", 2), "type 2"),
    ("reserved_flag", lambda s, d: _dir_entry(s, d, 12, ">I", 1 << 5 | 2), "reserved flags"),
    ("granularity_40", lambda s, d: _dir_entry(s, d, 17, ">B", 40), "granularity"),
    ("granularity_8", lambda s, d: _dir_entry(s, d, 17, ">B", 8), "granularity"),
    ("extra_data", lambda s, d: _dir_entry(s, d, 20, ">I", 8), "broken bitmap directory"),
    ("name_past_end", lambda s, d: _dir_entry(s, d, 18, ">H", 2000), "past its end"),
    ("table_size_0", lambda s, d: _dir_entry(s, d, 8, ">I", 0), "table"),
    ("table_size_huge", lambda s, d: _dir_entry(s, d, 8, ">I", 1 << 28), "table"),
    ("table_size_wrong", lambda s, d: _dir_entry(s, d, 8, ">I", 2), "disk size needs"),
    ("table_unaligned", lambda s, d: _dir_entry(s, d, 0, ">Q", 4096 + 8), "table"),
    ("table_past_eof", lambda s, d: _dir_entry(s, d, 0, ">Q", 1 << 40), "end of the file"),
    ("entry_reserved", lambda s, d: _table_entry(s, d, lambda v: v | 2), "reserved bits"),
    ("entry_high_bits", lambda s, d: _table_entry(s, d, lambda v: v | 1 << 60), "reserved bits"),
    ("entry_ones_and_data", lambda s, d: _table_entry(s, d, lambda v: 1 | 1 << 30), "all-ones"),
    ("entry_unaligned", lambda s, d: _table_entry(s, d, lambda v: 0x10200), "unaligned"),
    ("data_past_eof", lambda s, d: _table_entry(s, d, lambda v: 1 << 40), "outside the file"),
]


def _read_bitmaps(path: Path) -> str:
    with virtkit.images.open(path, format="qcow2") as img:
        for info in img.bitmaps():
            img.bitmap_extents(info.name)
    return "ok"


def _bounded(path: Path, work: Callable[[Path], str]) -> BaseException | None:
    old = fuzz.exercise
    fuzz.exercise = lambda p, **kw: work(p)
    try:
        fuzz.run_bounded(path)
    except BaseException as exc:  # the test inspects every kind
        return exc
    finally:
        fuzz.exercise = old
    return None


class TestBitmapDamage:
    """Damaged bitmap metadata: reading is refused with the reason; writing drops the bitmaps."""

    @pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in BITMAP_CASES])
    def test_read_refused(
        self, seeds: Seeds, tmp_path: Path, case: tuple[str, Damage, str]
    ) -> None:
        """Listing and reading the bitmaps raises CorruptImageError naming the problem."""
        _, damage, fragment = case
        seed = seeds["v3"]
        path = fuzz.write_input(tmp_path, seed, damage(seed, seed.data))
        outcome = _bounded(path, _read_bitmaps)
        assert isinstance(outcome, virtkit.CorruptImageError), repr(outcome)
        assert fragment in str(outcome)
        assert str(path) in str(outcome)

    @pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in BITMAP_CASES[::3]])
    def test_write_drops_bitmaps(
        self, seeds: Seeds, tmp_path: Path, case: tuple[str, Damage, str]
    ) -> None:
        """A write still works; the bitmaps that cannot be kept are dropped (autoclear cleared)."""
        _, damage, _ = case
        seed = seeds["v3"]
        path = fuzz.write_input(tmp_path, seed, damage(seed, seed.data))

        def write(p: Path) -> str:
            with virtkit.images.open(p, writable=True, format="qcow2") as img:
                img.write(4096, b"w" * 4096)
                assert img.bitmaps() == ()
            with virtkit.images.open(p, format="qcow2") as img:
                assert img.read(4096, 4096) == b"w" * 4096
                assert "bitmaps" not in img.info().format_specific
            return "ok"

        assert _bounded(path, write) is None
        proc = subprocess.run(
            ["qemu-img", "check", str(path)], capture_output=True, text=True, check=False
        )
        assert proc.returncode in (0, 3), proc.stdout + proc.stderr  # QEMU opens it again


class TestBoundedFuzzVmdkVpc:
    """The bounded fuzz run again, on the VMDK and VHD seeds only (read side)."""

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(rng_seed=st.integers(0, 2**32 - 1), count=st.integers(1, 3))
    def test_mutated_images(self, seeds: Seeds, tmp_path: Path, rng_seed: int, count: int) -> None:
        """Mutated VMDK/VHD images never escape as a non-virtkit error, in time and memory."""
        rng = random.Random(rng_seed)
        names = sorted(n for n in seeds if n.startswith(("vmdk-", "vpc-")))
        seed = seeds[rng.choice(names)]
        data, notes = fuzz.mutate(seed, rng, count)
        path = fuzz.write_input(tmp_path / "fz", seed, data)
        try:
            fuzz.run_bounded(path, write=False)
        except BaseException as exc:
            raise AssertionError(f"{seed.name} {notes}: {exc!r}") from exc

"""qcow2 amend (compat up/down, lazy_refcounts, refcount_bits) next to qemu-img amend.

Each case amends two copies of the same file, one with virtkit and one with
qemu-img 7.2: both must succeed or both refuse, qemu-img must find our result
clean, showing the guest the same bytes (the active disk and every snapshot)
and reporting the same format-specific information. A crash after any write
of an amend leaves the old or the new image, never a corrupt one.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtkit import ConfigError, CorruptImageError, ImageError, UnsupportedFeatureError
from virtkit.images.qcow2 import metadata
from virtkit.images.qcow2.amend import amend, amend_open
from virtkit.images.qcow2.image import Qcow2Image
from virtkit.images.storage import FileStorage

pytestmark = pytest.mark.qemu


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, check=False, timeout=120
    )


def qemu_io(path: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=60)


def spec(path: Path) -> dict[str, Any]:
    out = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    return dict(out["format-specific"]["data"])


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    """v3 and v2 overlays over one base: data, zero clusters (allocated and not), a
    compressed cluster, a snapshot sharing L2 tables, writes after it."""
    base = tmp_path / "base.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", base, "8M").returncode == 0
    qemu_io(base, "write -P 5 0 8M")
    for compat in ("1.1", "0.10"):
        top = tmp_path / f"top-{compat}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b", base.name,
                 "-F", "qcow2", top)  # fmt: skip
        zeros = ["write -z 0 64k", "write -P 7 64k 64k", "write -z 64k 64k"]
        qemu_io(top, *(zeros if compat == "1.1" else []), "write -P 1 1M 128k")
        qemu_io(top, "write -c -P 9 3M 64k")
        assert qemu_img("snapshot", "-c", "s1", top).returncode == 0
        qemu_io(top, *(["write -z 2M 64k"] if compat == "1.1" else []), "write -P 2 1M 4k")
    plain = tmp_path / "plain.qcow2"  # no backing file: unallocated zero clusters just go
    qemu_img("create", "-q", "-f", "qcow2", plain, "4M")
    qemu_io(plain, "write -P 3 0 192k", "write -z 64k 64k", "write -z 1M 64k")
    qemu_img("snapshot", "-c", "s1", plain)
    return tmp_path


CASES = [
    ("top-1.1", {"compat": "0.10"}),
    ("top-1.1", {"refcount_bits": 8}),
    ("top-1.1", {"refcount_bits": 2}),
    ("top-1.1", {"refcount_bits": 64}),
    ("top-1.1", {"refcount_bits": 1}),  # the snapshot's clusters have refcount 2
    ("top-1.1", {"lazy_refcounts": True}),
    ("top-1.1", {"refcount_bits": 8, "compat": "0.10"}),
    ("top-0.10", {"compat": "1.1"}),
    ("top-0.10", {"compat": "v3", "lazy_refcounts": True, "refcount_bits": 4}),
    ("top-0.10", {"lazy_refcounts": True}),
    ("top-0.10", {"refcount_bits": 32}),
    ("top-0.10", {"compat": "0.10"}),
    ("plain", {"compat": "0.10"}),
    ("plain", {"refcount_bits": 4, "lazy_refcounts": True}),
]


def _qemu_option(options: dict[str, Any]) -> str:
    words = {True: "on", False: "off"}
    return ",".join(f"{k}={words[v] if isinstance(v, bool) else v}" for k, v in options.items())


@pytest.mark.parametrize(("name", "options"), CASES, ids=[_qemu_option(c[1]) for c in CASES])
def test_amend_matches_qemu_img(images_dir: Path, name: str, options: dict[str, Any]) -> None:
    """Same success or refusal as qemu-img; a clean result with the same guest bytes."""
    src = images_dir / f"{name}.qcow2"
    ours, theirs = images_dir / "ours.qcow2", images_dir / "theirs.qcow2"
    shutil.copy(src, ours)
    shutil.copy(src, theirs)
    their_status = qemu_img("amend", "-o", _qemu_option(options), theirs).returncode
    try:
        amend(ours, **options)
    except (ConfigError, ImageError):
        our_status = 1
        assert ours.read_bytes() == src.read_bytes()  # a refusal changes nothing
    else:
        our_status = 0
    assert our_status == their_status
    assert qemu_img("check", ours).returncode == 0, qemu_img("check", ours).stdout
    assert qemu_img("compare", ours, src).returncode == 0
    assert spec(ours) == spec(theirs)
    # the snapshot still shows what it showed
    for path in (ours, theirs):
        assert qemu_img("snapshot", "-a", "s1", path).returncode == 0
    assert qemu_img("compare", ours, theirs).returncode == 0
    assert qemu_img("check", ours).returncode == 0


def test_downgrade_writes_out_zero_clusters(images_dir: Path) -> None:
    """v2 has no zero flag: over a backing file a zero cluster must become real zeros."""
    top = images_dir / "top-1.1.qcow2"
    amend(top, compat="0.10")
    assert spec(top)["compat"] == "0.10"
    zero_over_backing = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 64k", "-c", "read -P 0 64k 64k",
         "-c", "read -P 0 2M 64k", "-c", "read -P 5 4M 64k", str(top)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "Pattern verification failed" not in zero_over_backing.stdout
    assert zero_over_backing.returncode == 0


def _strip_snapshot_extra(path: Path) -> None:
    """Rewrite the (single) snapshot entry of a v2 image without extra data (old QEMU)."""
    data = bytearray(path.read_bytes())
    table = struct.unpack_from(">Q", data, 64)[0]
    fixed = struct.Struct(">QIHHIIQII")
    l1_off, l1_size, id_len, name_len, sec, nsec, clock, state, extra = fixed.unpack_from(
        data, table
    )
    assert extra >= 16  # qemu-img writes the extra data; make it an old-style entry
    ident = data[table + fixed.size + extra : table + fixed.size + extra + id_len + name_len]
    entry = fixed.pack(l1_off, l1_size, id_len, name_len, sec, nsec, clock, state, 0) + ident
    entry += bytes(-len(entry) % 8)
    old_len = fixed.size + extra + id_len + name_len
    data[table : table + old_len + (-old_len % 8)] = entry + bytes(
        old_len + (-old_len % 8) - len(entry)
    )
    path.write_bytes(bytes(data))


def test_upgrade_adds_snapshot_extra_data(images_dir: Path) -> None:
    """A v2 snapshot entry without extra data gets the disk size v3 requires."""
    path = images_dir / "top-0.10.qcow2"
    _strip_snapshot_extra(path)
    assert qemu_img("check", path).returncode == 0
    amend(path, compat="1.1")
    assert qemu_img("check", path).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert [s["name"] for s in info["snapshots"]] == ["s1"]
    st = FileStorage(path, writable=False)
    try:
        snaps, _ = metadata.read_snapshot_table(st, metadata.load(st).header)
    finally:
        st.close()
    assert snaps[0].disk_size == 8 << 20


def test_refusals_name_what_is_wrong(images_dir: Path) -> None:
    """Bad values and what v2 cannot hold are refused with the reason, changing nothing."""
    path = images_dir / "top-1.1.qcow2"
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="compatibility level"):
        amend(path, compat="0.9")
    with pytest.raises(ConfigError, match="power of two"):
        amend(path, refcount_bits=3)
    with pytest.raises(ConfigError, match="lazy refcounts only supported"):
        amend(path, compat="0.10", lazy_refcounts=True)
    with pytest.raises(ConfigError, match="lazy_refcounts"):
        amend(path, lazy_refcounts="yes")  # type: ignore[arg-type]
    assert qemu_img("bitmap", "--add", path, "b0").returncode == 0
    before = path.read_bytes()
    with pytest.raises(UnsupportedFeatureError, match="bitmaps"):
        amend(path, compat="0.10")
    assert path.read_bytes() == before
    raw = images_dir / "r.raw"
    raw.write_bytes(bytes(65536))
    with pytest.raises(ImageError):
        amend(raw, compat="1.1")


def test_corrupt_image_is_refused(images_dir: Path) -> None:
    """An image with a corruption is not rebuilt (its errors would be cemented)."""
    path = images_dir / "plain.qcow2"
    data = bytearray(path.read_bytes())
    reftable = struct.unpack_from(">Q", data, 48)[0]
    block = struct.unpack_from(">Q", data, reftable)[0]
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    cluster = struct.unpack_from(">Q", data, l2)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">H", data, block + 2 * (cluster // 65536), 0)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="repair"):
        amend(path, refcount_bits=8)


class Crash(BaseException):
    """The simulated death of the process."""


class CrashingStorage(FileStorage):
    """Dies before its ``limit``-th write (a limit of 0 never dies)."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path, writable=True, lock=False)
        self.limit = limit
        self.writes = 0

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Count writes; crash instead of the ``limit``-th one."""
        self.writes += 1
        if self.writes == self.limit:
            raise Crash
        super().pwrite(offset, data)


def _amend_crashing(path: Path, limit: int, options: dict[str, Any]) -> int:
    st = CrashingStorage(path, limit)
    img = Qcow2Image(st, metadata.load(st), writable=True, cache="writethrough")
    try:
        amend_open(img, **options)
    except Crash:
        return -1
    finally:
        st.close()
    return st.writes


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("top-1.1", {"compat": "0.10"}),
        ("top-1.1", {"refcount_bits": 8}),
        ("top-0.10", {"compat": "1.1", "refcount_bits": 4}),
    ],
    ids=["downgrade", "refcount-width", "upgrade+width"],
)
def test_a_crash_after_any_write_leaves_a_consistent_image(
    images_dir: Path, name: str, options: dict[str, Any]
) -> None:
    """Dying before the k-th write, for every k: qemu-img check finds no corruption and
    the guest sees the same bytes (the active disk and the snapshot)."""
    src = images_dir / f"{name}.qcow2"
    work = images_dir / "crash.qcow2"
    shutil.copy(src, work)
    total = _amend_crashing(work, 0, options)
    assert total > 2
    for limit in range(1, total + 1):
        shutil.copy(src, work)
        assert _amend_crashing(work, limit, options) == -1
        check = qemu_img("check", work)
        assert check.returncode in (0, 3), (limit, check.stdout)  # clean, or leaks only
        assert qemu_img("compare", work, src).returncode == 0, limit
        assert qemu_img("snapshot", "-a", "s1", work).returncode == 0
        shutil.copy(src, images_dir / "src-s1.qcow2")
        qemu_img("snapshot", "-a", "s1", images_dir / "src-s1.qcow2")
        assert qemu_img("compare", work, images_dir / "src-s1.qcow2").returncode == 0, limit


class PowerLossStorage(FileStorage):
    """Loses the power at its ``limit``-th write or flush: the writes made since the last
    completed ``flush()`` are undone (all of them, or with ``keep`` a seeded random subset
    survives, as a disk cache may reorder them); flushed writes stay."""

    def __init__(self, path: Path, limit: int, keep: float = 0.0, seed: int = 0) -> None:
        super().__init__(path, writable=True, lock=False)
        self.limit = limit
        self.keep = keep
        self.rng = random.Random(seed)
        self.events = 0
        self.undo: list[tuple[int, bytes]] = []
        self.flushed_size = self.size()

    def _event(self) -> None:
        self.events += 1
        if self.events == self.limit:
            self._lose_power()
            raise Crash

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Remember what the write covers, then write (unless the power goes now)."""
        self._event()
        self.undo.append((offset, self.pread(offset, len(data))))
        super().pwrite(offset, data)

    def flush(self) -> None:
        """What was written is durable now (unless the power goes during the flush)."""
        self._event()
        super().flush()
        self.undo.clear()
        self.flushed_size = self.size()

    def _lose_power(self) -> None:
        for offset, old in reversed(self.undo):
            if self.rng.random() >= self.keep:
                super().pwrite(offset, old)
        if self.keep == 0.0 and self.size() > self.flushed_size:
            self.truncate(self.flushed_size)
        self.undo.clear()


def _amend_losing_power(
    path: Path, limit: int, options: dict[str, Any], keep: float, seed: int = 0
) -> int:
    st = PowerLossStorage(path, limit, keep=keep, seed=seed)
    img = Qcow2Image(st, metadata.load(st), writable=True, cache="writethrough")
    try:
        amend_open(img, **options)
    except Crash:
        return -1
    finally:
        st.close()
    return st.events


@pytest.mark.parametrize("keep", [0.0, 0.5], ids=["all-lost", "half-kept"])
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("top-1.1", {"compat": "0.10"}),
        ("top-1.1", {"refcount_bits": 8}),
        ("top-0.10", {"compat": "1.1", "refcount_bits": 4}),
        ("old-v2", {"compat": "1.1"}),
    ],
    ids=["downgrade", "refcount-width", "upgrade+width", "upgrade-snapshot-table"],
)
def test_a_power_loss_after_any_write_leaves_a_consistent_image(
    images_dir: Path, name: str, options: dict[str, Any], keep: float
) -> None:
    """The unflushed writes lost (all, or a random half kept) at every write and every
    flush: qemu-img check finds no corruption and the guest sees the same bytes."""
    if name == "old-v2":  # a snapshot entry without extra data: the table is rewritten
        shutil.copy(images_dir / "top-0.10.qcow2", images_dir / "old-v2.qcow2")
        _strip_snapshot_extra(images_dir / "old-v2.qcow2")
    src = images_dir / f"{name}.qcow2"
    work = images_dir / "power.qcow2"
    shutil.copy(src, work)
    total = _amend_losing_power(work, 0, options, keep)
    seeds = range(6) if keep else range(1)  # several random survivor sets per point
    for limit in range(1, total + 1):
        for seed in seeds:
            shutil.copy(src, work)
            assert _amend_losing_power(work, limit, options, keep, seed) == -1
            check = qemu_img("check", work)
            assert check.returncode in (0, 3), (limit, seed, check.stdout)
            assert qemu_img("compare", work, src).returncode == 0, (limit, seed)

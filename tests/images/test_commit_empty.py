"""Qcow2Image.make_empty and commit's emptying step, checked against qemu-img.

After emptying, the overlay stores nothing (``qemu-img map`` shows every range
from the backing file), reads what its base reads (``qemu-img compare``),
passes ``qemu-img check`` without leaks and ends at its last used cluster;
commit leaves base and overlay as ``qemu-img commit`` does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
import virtkit.images
import virtkit.images.qcow2
from virtkit.images.qcow2.image import Qcow2Image
from virtkit.testing import faults

Run = Callable[..., subprocess.CompletedProcess[str]]
KiB, MiB = 1 << 10, 1 << 20

#: qemu-io writes that give an overlay data in several L2 tables (at 4 KiB clusters),
#: zero clusters over base data, a compressed cluster and a partial cluster.
OVERLAY_WRITES = (
    "write -P 0x22 1M 3M",
    "write -z 100k 8k",
    "write -c -P 0x33 6M 64k",
    "write -P 0x44 7M 1000",
)

#: qemu-img create -o options per image variant
VARIANTS = {
    "v3-4k": "cluster_size=4096",
    "v3-64k": "cluster_size=65536",
    "v2": "compat=0.10,cluster_size=4096",
    "extended-l2": "extended_l2=on,cluster_size=65536",
    "refcount-1": "refcount_bits=1,cluster_size=4096",
}


def _qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    exe = shutil.which("qemu-io")
    assert exe is not None, "qemu-io is not installed (qemu-utils)"
    argv = [exe, "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    proc = subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def _chain(qemu_img: Run, folder: Path, options: str, base_fmt: str = "qcow2") -> tuple[Path, Path]:
    """An 8 MiB base (data in its first 3 MiB) and an overlay with OVERLAY_WRITES."""
    folder.mkdir(exist_ok=True)
    base = folder / f"base.{base_fmt}"
    base_opts = ["-o", options] if base_fmt == "qcow2" else []
    qemu_img("create", "-q", "-f", base_fmt, *base_opts, base, "8M")
    _qemu_io(base, "write -P 0x11 0 3M", fmt=base_fmt)
    top = folder / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, "-b", base.name, "-F", base_fmt, top)
    _qemu_io(top, *OVERLAY_WRITES)
    return base, top


def _image_with(qemu_img: Run, path: Path, options: str, size: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, size)
    return path


def _check(qemu_img: Run, path: Path) -> dict[str, Any]:
    """qemu-img check --output=json; it must report no problem at all."""
    proc = qemu_img("check", "--output=json", path, check=False)
    report: dict[str, Any] = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    return report


def _stored_ranges(qemu_img: Run, path: Path) -> list[dict[str, Any]]:
    """The qemu-img map entries the image itself answers for (depth 0, data or zeroes)."""
    out = json.loads(qemu_img("map", "--output=json", path).stdout)
    return [e for e in out if e["depth"] == 0 and e["present"]]


def _open(path: Path, writable: bool = True) -> Qcow2Image:
    return virtkit.images.qcow2.open(path, writable=writable)


def _raw(qemu_img: Run, path: Path, out: Path, *extra: str) -> bytes:
    qemu_img("convert", *extra, "-O", "raw", path, out)
    return out.read_bytes()


class TestMakeEmpty:
    """make_empty() drops every mapping of the active disk."""

    @pytest.mark.parametrize("variant", sorted(VARIANTS))
    def test_overlay_reads_through_to_base(
        self, tmp_path: Path, qemu_img: Run, variant: str
    ) -> None:
        """The emptied overlay equals its base, stores nothing and checks clean."""
        base, top = _chain(qemu_img, tmp_path, VARIANTS[variant])
        assert _stored_ranges(qemu_img, top)  # the overlay had its own data
        img = _open(top)
        with img:
            img.make_empty()
            exts = list(img.block_status(include_backing=False))
            assert {e.kind for e in exts} == {"unallocated"}
            assert img.read(MiB, 4096) == b"\x11" * 4096
        assert qemu_img("compare", top, base).returncode == 0
        assert _stored_ranges(qemu_img, top) == []
        report = _check(qemu_img, top)
        assert top.stat().st_size == report["image-end-offset"]

    def test_many_l1_batches(self, tmp_path: Path, qemu_img: Run) -> None:
        """A 512-byte-cluster disk of 256 MiB (8192 L1 entries) is emptied batch by batch."""
        base = _image_with(qemu_img, tmp_path / "base.qcow2", "cluster_size=512", "256M")
        _qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 250M 64k")
        top = tmp_path / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
                 "-b", "base.qcow2", "-F", "qcow2", top)  # fmt: skip
        _qemu_io(top, "write -P 0x21 512k 1M", "write -P 0x22 130M 64k", "write -z 250M 4k")
        img = _open(top)
        with img:
            assert len(img.l1) == 8192
            img.make_empty()
        assert qemu_img("compare", top, base).returncode == 0
        assert _stored_ranges(qemu_img, top) == []
        _check(qemu_img, top)

    def test_without_backing_reads_zeroes(self, tmp_path: Path, qemu_img: Run) -> None:
        """Without a backing file the emptied image reads as zeroes everywhere."""
        path = tmp_path / "solo.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "8M")
        _qemu_io(path, *OVERLAY_WRITES)
        img = _open(path)
        with img:
            img.make_empty()
            assert img.read(0, 8 * MiB) == bytes(8 * MiB)
        blank = tmp_path / "blank.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", blank, "8M")
        assert qemu_img("compare", path, blank).returncode == 0
        assert _stored_ranges(qemu_img, path) == []
        _check(qemu_img, path)

    def test_snapshot_keeps_its_data(self, tmp_path: Path, qemu_img: Run) -> None:
        """An internal snapshot keeps the clusters it shares; reverting brings them back."""
        base, top = _chain(qemu_img, tmp_path, VARIANTS["v3-4k"])
        before = _raw(qemu_img, top, tmp_path / "before.raw")
        qemu_img("snapshot", "-c", "keep", top)
        img = _open(top)
        with img:
            img.make_empty()
            assert img.read_snapshot("keep", MiB, 4096) == b"\x22" * 4096
        assert qemu_img("compare", top, base).returncode == 0
        _check(qemu_img, top)
        assert _raw(qemu_img, top, tmp_path / "snap.raw", "-l", "keep") == before
        qemu_img("snapshot", "-a", "keep", top)
        assert _raw(qemu_img, top, tmp_path / "reverted.raw") == before
        _check(qemu_img, top)

    def test_bitmaps_survive(self, tmp_path: Path, qemu_img: Run) -> None:
        """Persistent bitmaps keep their clusters and stay consistent; the image checks clean."""
        base, top = _chain(qemu_img, tmp_path, VARIANTS["v3-64k"])
        qemu_img("bitmap", "--add", top, "track")
        img = _open(top)
        with img:
            img.make_empty()
        assert qemu_img("compare", top, base).returncode == 0
        _check(qemu_img, top)
        info = json.loads(qemu_img("info", "--output=json", top).stdout)
        bitmaps = info["format-specific"]["data"]["bitmaps"]
        assert [(b["name"], b["flags"]) for b in bitmaps] == [("track", ["auto"])]
        with _open(top) as img:  # as qemu-img commit: emptying marks nothing
            assert img.bitmap_extents("track") == []

    def test_image_stays_usable(self, tmp_path: Path, qemu_img: Run) -> None:
        """After emptying, writes allocate afresh and qemu-io reads them back."""
        _base, top = _chain(qemu_img, tmp_path, VARIANTS["v3-4k"])
        img = _open(top)
        with img:
            img.make_empty()
            img.write(5 * MiB + 100, b"\x5a" * 10000)
            img.write_compressed(6 * MiB, b"\x5b" * 4096)
        _qemu_io(top, "read -P 0x5a 5242980 10000", "read -P 0x5b 6M 4k", "read -P 0x11 0 1M")
        _check(qemu_img, top)

    def test_read_only_refused(self, tmp_path: Path, qemu_img: Run) -> None:
        """A read-only image cannot be emptied; nothing changes."""
        _base, top = _chain(qemu_img, tmp_path, VARIANTS["v3-64k"])
        stored = _stored_ranges(qemu_img, top)
        img = _open(top, writable=False)
        with img, pytest.raises(virtkit.ImageError, match="read-only"):
            img.make_empty()
        assert _stored_ranges(qemu_img, top) == stored

    def test_refcount_underflow_is_corruption(self, tmp_path: Path, qemu_img: Run) -> None:
        """A mapped cluster with refcount zero stops make_empty before the L1 is touched."""
        _base, top = _chain(qemu_img, tmp_path, VARIANTS["v3-64k"])
        stored = _stored_ranges(qemu_img, top)
        img = _open(top)
        with img:
            host = next(e for e in img.mapper.runs(MiB, 4096)).host
            img.refs.update([(host >> img.cb, -1)])  # damage: the data cluster looks free
            with pytest.raises(virtkit.CorruptImageError, match="refcount"):
                img.make_empty()
            assert img.corrupt
        assert _stored_ranges(qemu_img, top) == stored
        assert "corrupt: true" in qemu_img("info", top).stdout


class TestMakeEmptyPowerLoss:
    """A power cut at any write of make_empty leaves leaks at worst, never corruption."""

    def test_power_loss_sweep(self, tmp_path: Path, qemu_img: Run) -> None:
        """Cut at every write: qemu-img check finds no corruption; finishing the job works."""
        pristine = tmp_path / "pristine"
        # 512-byte clusters: the refcounts of the overlay's data span some 25 refcount blocks
        base, top = _chain(qemu_img, pristine, "cluster_size=512")
        work = tmp_path / "work"
        shutil.copytree(pristine, work)
        with faults.inject(faults.Recorder(), only=work) as rec:
            img = _open(work / top.name)
            with img:
                img.make_empty()
        assert rec.writes >= 3
        # keep=0: every unflushed write lost; keep=0.5: any subset of them survives
        cuts = [(n, 0.0) for n in range(1, rec.writes + 1)]
        cuts += [(n, 0.5) for n in range(3, rec.writes + 1, 3)]
        for n, keep in cuts:
            shutil.rmtree(work)
            shutil.copytree(pristine, work)
            with faults.inject(faults.PowerLoss(n, keep=keep, seed=n), only=work) as plan:
                img = _open(work / top.name)
                with pytest.raises(faults.SimulatedCrash):
                    img.make_empty()
            assert plan.crashed is not None
            proc = qemu_img("check", "--output=json", work / top.name, check=False)
            report = json.loads(proc.stdout)
            assert proc.returncode in (0, 3), (
                f"cut at write {n} (keep {keep}): {proc.stdout}{proc.stderr}"
            )
            assert report.get("corruptions", 0) == 0, f"cut at write {n} (keep {keep}): {report}"
            img = _open(work / top.name)
            with img:
                img.check(repair=True)
                img.make_empty()
            _check(qemu_img, work / top.name)
            assert qemu_img("compare", work / top.name, work / base.name).returncode == 0


class TestCommitEmpties:
    """commit() ends like qemu-img commit: base updated, overlay emptied in place."""

    @pytest.mark.parametrize(
        ("variant", "base_fmt"),
        [("v3-4k", "qcow2"), ("v2", "qcow2"), ("extended-l2", "qcow2"), ("v3-64k", "raw")],
    )
    def test_matches_qemu_img_commit(
        self, tmp_path: Path, qemu_img: Run, variant: str, base_fmt: str
    ) -> None:
        """Our commit and qemu-img commit leave equal bases and equal, empty overlays."""
        qbase, qtop = _chain(qemu_img, tmp_path / "qemu", VARIANTS[variant], base_fmt)
        vbase, vtop = _chain(qemu_img, tmp_path / "ours", VARIANTS[variant], base_fmt)
        before = _raw(qemu_img, vtop, tmp_path / "before.raw")
        qemu_img("commit", "-q", qtop)
        virtkit.images.commit(vtop)
        fmt = ["-f", base_fmt, "-F", base_fmt]
        assert qemu_img("compare", *fmt, vbase, qbase).returncode == 0
        assert qemu_img("compare", vtop, qtop).returncode == 0
        assert _raw(qemu_img, vbase, tmp_path / "vbase.raw", "-f", base_fmt) == before
        assert _raw(qemu_img, vtop, tmp_path / "vtop.raw") == before
        assert _stored_ranges(qemu_img, vtop) == _stored_ranges(qemu_img, qtop) == []
        _check(qemu_img, vtop)
        if base_fmt == "qcow2":
            _check(qemu_img, vbase)
        # the overlay was emptied in place, not replaced: same inode
        assert vtop.exists()

    def test_overlay_kept_in_place(self, tmp_path: Path, qemu_img: Run) -> None:
        """commit empties the overlay file itself (same inode), keeping its options."""
        _base, top = _chain(qemu_img, tmp_path, "compat=0.10,cluster_size=4096")
        inode = top.stat().st_ino
        virtkit.images.commit(top)
        assert top.stat().st_ino == inode
        info = json.loads(qemu_img("info", "--output=json", top).stdout)
        assert info["cluster-size"] == 4096
        assert info["format-specific"]["data"]["compat"] == "0.10"
        assert info["backing-filename"] == "base.qcow2"

    def test_commit_with_snapshot_empties_active_layer(self, tmp_path: Path, qemu_img: Run) -> None:
        """As qemu-img commit: the active layer is emptied, the snapshot keeps its data."""
        base, top = _chain(qemu_img, tmp_path, VARIANTS["v3-4k"])
        before = _raw(qemu_img, top, tmp_path / "before.raw")
        qemu_img("snapshot", "-c", "keep", top)
        virtkit.images.commit(top)
        assert _stored_ranges(qemu_img, top) == []
        assert qemu_img("compare", top, base).returncode == 0
        assert _raw(qemu_img, top, tmp_path / "snap.raw", "-l", "keep") == before
        _check(qemu_img, top)

    def test_drop_deletes_overlay(self, tmp_path: Path, qemu_img: Run) -> None:
        """drop=True deletes the overlay after the base took its data."""
        base, top = _chain(qemu_img, tmp_path, VARIANTS["v3-64k"])
        before = _raw(qemu_img, top, tmp_path / "before.raw")
        virtkit.images.commit(top, drop=True)
        assert not top.exists()
        assert _raw(qemu_img, base, tmp_path / "base.raw") == before
        _check(qemu_img, base)

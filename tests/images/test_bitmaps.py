"""Persistent dirty bitmaps kept up to date: virtkit and QEMU see the same dirty granules.

Oracles: ``qemu-img info``/``check``/``bitmap``, ``qemu-io``, and a paused
``qemu-system-x86_64 -S`` with the image as a drive, asked over QMP for
``query-block`` (each bitmap's dirty byte count) and
``x-debug-block-dirty-bitmap-sha256`` (a hash of the exact bits).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tracemalloc
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_helpers import qemu_io

import virtkit
from virtkit import images
from virtkit.errors import ConfigError, ImageError, UnsupportedFeatureError
from virtkit.testing import faults

Run = Callable[..., subprocess.CompletedProcess[str]]
MiB = 1 << 20
SIZE = 64 * MiB


# --- the oracles ---------------------------------------------------------------------------
def _paused_qemu(exe: str) -> list[str]:
    """A paused QEMU with no devices, no display and no machine."""
    return [exe, "-S", "-display", "none", "-nodefaults", "-machine", "none"]


def qmp_session(
    path: Path, commands: Iterable[dict[str, Any]], *, readonly: bool = False
) -> list[Any]:
    """Run a paused QEMU with ``path`` as drive ``d0`` and answer ``commands`` over QMP.

    Returns the ``return`` value of each command (errors fail the test).
    """
    exe = shutil.which("qemu-system-x86_64")
    assert exe is not None, "qemu-system-x86_64 is not installed (qemu-system-x86)"
    drive = f"file={path},if=none,id=d0,format=qcow2,node-name=n0"
    if readonly:
        drive += ",readonly=on,file.locking=off"
    cmds = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    proc = subprocess.run(
        [*_paused_qemu(exe), "-drive", drive, "-qmp", "stdio"],
        input="".join(json.dumps(c) + "\n" for c in cmds),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    answers = [r for r in replies if "return" in r or "error" in r]
    errors = [r["error"] for r in answers if "error" in r]
    assert not errors, f"QMP errors: {errors}\n{proc.stderr}"
    assert len(answers) == len(cmds), proc.stdout + proc.stderr
    return [r["return"] for r in answers[1:-1]]


def qemu_view(path: Path, names: list[str], *, readonly: bool = False) -> dict[str, Any]:
    """QEMU's view of each bitmap: ``{"count", "sha256", "recording", ...}`` by name."""
    cmds: list[dict[str, Any]] = [{"execute": "query-block"}]
    cmds += [
        {"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "n0", "name": n}}
        for n in names
    ]
    out = qmp_session(path, cmds, readonly=readonly)
    (dev,) = [d for d in out[0] if d["device"] == "d0"]
    listed = dev.get("inserted", {}).get("dirty-bitmaps") or dev.get("dirty-bitmaps", [])
    view = {b["name"]: dict(b) for b in listed}
    for name, sha in zip(names, out[1:], strict=True):
        view[name]["sha256"] = sha["sha256"]
    return view


class Model:
    """The dirty granules a bitmap must hold, and their hash as QEMU computes it."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.gran = granularity
        self.granules: set[int] = set()

    def touch(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if end > offset:
            self.granules.update(range(offset // self.gran, -(-end // self.gran)))

    def extents(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for g in sorted(self.granules):
            start, length = g * self.gran, min(self.gran, self.size - g * self.gran)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
        return out

    @property
    def count(self) -> int:
        """Dirty bytes as QEMU counts them: whole granules, also the last, partial one."""
        return len(self.granules) * self.gran

    @property
    def sha256(self) -> str:
        """QEMU's ``hbitmap_sha256``: the bits, least significant first, in 64-bit words."""
        granules = -(-self.size // self.gran)
        buf = bytearray(-(-granules // 64) * 8)
        for g in self.granules:
            buf[g // 8] |= 1 << (g % 8)
        return hashlib.sha256(buf).hexdigest()


def _image(qemu_img: Run, path: Path, *bitmaps: tuple[str, ...], options: str = "") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), path, str(SIZE))
    for args in bitmaps:
        qemu_img("bitmap", "--add", *args[1:], path, args[0])
    return path


def _flags(qemu_img: Run, path: Path) -> dict[str, list[str]]:
    out = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    listed = out["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: b["flags"] for b in listed}


def _check_clean(qemu_img: Run, path: Path) -> None:
    proc = qemu_img("check", "--output=json", path, check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report


def _same_as_qemu(qemu_img: Run, path: Path, models: Mapping[str, Model | None]) -> None:
    """Our extents and QEMU's counts and bit hashes equal the models (None: never recording)."""
    with images.open(path) as img:
        for name, model in models.items():
            want = model.extents() if model is not None else []
            assert img.bitmap_extents(name) == want, name
    view = qemu_view(path, list(models))
    for name, model in models.items():
        count = model.count if model is not None else 0
        assert view[name]["count"] == count, (name, view[name])
        if model is not None:
            assert view[name]["sha256"] == model.sha256, name
    _check_clean(qemu_img, path)


# --- virtkit writes, QEMU reads -------------------------------------------------------------
WRITES: list[tuple[str, int, int]] = [
    ("write", 0, 100),  # the first bytes only
    ("write", 5 * MiB - 3, 70_000),  # unaligned, across granules and clusters
    ("zeroes", 9 * MiB, 2 * MiB),
    ("discard", 20 * MiB, 256 << 10),
    ("write", SIZE - 512, 512),  # the last sector
    ("compressed", 30 * MiB, 65536),
]


def _apply(img: images.Image, kind: str, offset: int, length: int) -> None:
    if kind == "write":
        img.write(offset, bytes([0x5A]) * length)
    elif kind == "zeroes":
        img.write_zeroes(offset, length)
    elif kind == "discard":
        img.discard(offset, length)
    else:
        img.write_compressed(offset, b"c" * length)  # type: ignore[attr-defined]


class TestVirtkitWritesQemuSees:
    """Writes through virtkit set exactly the granules QEMU's bitmaps would hold."""

    @pytest.mark.parametrize("options", ["", "cluster_size=4096", "extended_l2=on"])
    def test_every_kind_of_write(self, tmp_path: Path, qemu_img: Run, options: str) -> None:
        """Writes, zeroes, discards and compressed writes mark every enabled bitmap."""
        path = _image(
            qemu_img,
            tmp_path / "w.qcow2",
            ("default",),
            ("fine", "-g", "512"),
            ("coarse", "-g", "4M"),
            ("off", "--disable"),
            options=options,
        )
        with images.open(path) as img:
            default_gran = img.bitmaps()[0].granularity
        models = {
            "default": Model(SIZE, default_gran),
            "fine": Model(SIZE, 512),
            "coarse": Model(SIZE, 4 * MiB),
        }
        with images.open(path, writable=True) as img:
            for kind, offset, size in WRITES:
                length = img.cluster_size if kind == "compressed" else size
                _apply(img, kind, offset, length)
                for m in models.values():
                    m.touch(offset, length)
            listed = {b.name: b for b in img.bitmaps()}
            assert listed["fine"].count == models["fine"].count
            assert not listed["off"].enabled and listed["off"].count == 0
        assert _flags(qemu_img, path) == {
            "default": ["auto"],
            "fine": ["auto"],
            "coarse": ["auto"],
            "off": [],
        }
        _same_as_qemu(qemu_img, path, {**models, "off": None})

    def test_flush_leaves_bitmaps_consistent(self, tmp_path: Path, qemu_img: Run) -> None:
        """After flush() the bitmaps are consistent on disk; the next write flags them again."""
        path = _image(qemu_img, tmp_path / "f.qcow2", ("b",))
        model = Model(SIZE, 65536)
        with images.open(path, writable=True) as img:
            img.write(MiB, b"x" * 10)
            model.touch(MiB, 10)
            assert _flags(qemu_img, path) == {"b": ["in-use", "auto"]}
            img.flush()
            assert _flags(qemu_img, path) == {"b": ["auto"]}
            view = qemu_view(path, ["b"], readonly=True)
            assert (view["b"]["count"], view["b"]["sha256"]) == (model.count, model.sha256)
            img.write(3 * MiB, b"y")
            model.touch(3 * MiB, 1)
            assert _flags(qemu_img, path) == {"b": ["in-use", "auto"]}
        _same_as_qemu(qemu_img, path, {"b": model})

    def test_reads_and_no_writes_change_nothing(self, tmp_path: Path, qemu_img: Run) -> None:
        """Opening writable, reading and closing leaves the file's bitmaps untouched."""
        path = _image(qemu_img, tmp_path / "r.qcow2", ("b",))
        qemu_io(path, "write 0 4k")
        before = path.read_bytes()
        with images.open(path, writable=True) as img:
            img.read(0, MiB)
            img.flush()
        assert path.read_bytes() == before

    def test_killed_writer_leaves_bitmap_inconsistent(self, tmp_path: Path, qemu_img: Run) -> None:
        """A process dying after a write leaves the bitmap in-use: both tools call it unusable."""
        path = _image(qemu_img, tmp_path / "k.qcow2", ("b",))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child dies without closing
            img = images.open(path, writable=True)
            img.write(0, b"z" * 4096)
            img.flush()
            img.write(MiB, b"z" * 4096)
            os._exit(0)
        os.waitpid(pid, 0)
        assert _flags(qemu_img, path) == {"b": ["in-use", "auto"]}
        view = qemu_view(path, [])
        assert view["b"]["inconsistent"] is True
        with images.open(path, writable=True) as img:
            (info,) = img.bitmaps()
            assert info.inconsistent and info.count == 0
            with pytest.raises(ImageError, match="inconsistent"):
                img.bitmap_extents("b")
            with pytest.raises(ImageError, match="inconsistent"):
                img.clear_bitmap("b")
            with pytest.raises(ImageError, match="inconsistent"):
                img.resize(2 * SIZE)
            img.write(2 * MiB, b"w")  # the inconsistent bitmap stays as it is
            assert img.bitmaps()[0].inconsistent
        assert _flags(qemu_img, path) == {"b": ["in-use", "auto"]}
        with images.open(path, writable=True) as img:
            img.remove_bitmap("b")
            assert img.bitmaps() == ()
        assert _flags(qemu_img, path) == {}
        _check_clean(qemu_img, path)


# --- QEMU writes, virtkit reads -------------------------------------------------------------
class TestQemuWritesVirtkitReads:
    """Bitmaps QEMU kept up to date read back as the same dirty extents."""

    def test_qemu_io_writes(self, tmp_path: Path, qemu_img: Run) -> None:
        """qemu-io's writes (data, zeroes, discard) show in bitmap_extents."""
        path = _image(qemu_img, tmp_path / "q.qcow2", ("b",), ("f", "-g", "4k"))
        models = {"b": Model(SIZE, 65536), "f": Model(SIZE, 4096)}
        writes = [(0, 4096), (3 * MiB + 100, 130_000), (40 * MiB, MiB), (SIZE - 4096, 4096)]
        qemu_io(
            path,
            "write 0 4k",
            f"write {3 * MiB + 100} 130000",
            f"write -z {40 * MiB} 1M",
            f"discard {SIZE - 4096} 4k",
        )
        for off, length in writes:
            for m in models.values():
                m.touch(off, length)
        _same_as_qemu(qemu_img, path, models)

    def test_running_qemu_adds_and_marks(self, tmp_path: Path, qemu_img: Run) -> None:
        """A bitmap added over QMP in a running QEMU, then written, reads back the same."""
        path = _image(qemu_img, tmp_path / "m.qcow2")
        add = {"node": "n0", "name": "live", "persistent": True, "granularity": 16384}
        hmp = "human-monitor-command"
        out = qmp_session(
            path,
            [
                {"execute": "block-dirty-bitmap-add", "arguments": add},
                {"execute": hmp, "arguments": {"command-line": 'qemu-io d0 "write 1M 8k"'}},
                {"execute": hmp, "arguments": {"command-line": 'qemu-io d0 "write 5000 1"'}},
                {
                    "execute": "x-debug-block-dirty-bitmap-sha256",
                    "arguments": {"node": "n0", "name": "live"},
                },
            ],
        )
        model = Model(SIZE, 16384)
        model.touch(MiB, 8192)
        model.touch(5000, 1)
        assert out[-1]["sha256"] == model.sha256
        with images.open(path) as img:
            assert [(b.name, b.granularity, b.enabled) for b in img.bitmaps()] == [
                ("live", 16384, True)
            ]
            assert img.bitmap_extents("live") == model.extents()


# --- qemu-img bitmap's operations ----------------------------------------------------------
class TestBitmapCommands:
    """add / remove / clear / enable / disable / merge, as qemu-img bitmap does them."""

    def test_add_matches_qemu_img(self, tmp_path: Path, qemu_img: Run) -> None:
        """Bitmaps we add list like qemu-img's, and record our later writes."""
        ours = tmp_path / "ours.qcow2"
        theirs = _image(qemu_img, tmp_path / "theirs.qcow2", ("a",), ("b", "-g", "1M", "--disable"))
        with images.create(ours, SIZE) as img:
            info = img.add_bitmap("a")
            assert (info.name, info.granularity, info.enabled, info.count) == ("a", 65536, True, 0)
            img.add_bitmap("b", granularity="1M", disabled=True)
        assert _flags(qemu_img, ours) == _flags(qemu_img, theirs) == {"a": ["auto"], "b": []}
        info_ours = json.loads(qemu_img("info", "--output=json", ours).stdout)
        info_theirs = json.loads(qemu_img("info", "--output=json", theirs).stdout)
        assert info_ours["format-specific"] == info_theirs["format-specific"]
        _check_clean(qemu_img, ours)
        model = Model(SIZE, 65536)
        with images.open(ours, writable=True) as img:
            img.write(7 * MiB, b"n" * 3)
            model.touch(7 * MiB, 3)
        _same_as_qemu(qemu_img, ours, {"a": model, "b": None})

    def test_clear_enable_disable_remove(self, tmp_path: Path, qemu_img: Run) -> None:
        """Each operation leaves what qemu-img's would, and a clean image."""
        path = _image(qemu_img, tmp_path / "o.qcow2", ("a",), ("b",), ("c", "-g", "8k"))
        qemu_io(path, "write 0 1M")
        with images.open(path, writable=True) as img:
            img.clear_bitmap("a")
            img.disable_bitmap("b")
            img.write(2 * MiB, b"q")
            img.enable_bitmap("b")
            img.write(4 * MiB, b"q")
            img.remove_bitmap("c")
        assert _flags(qemu_img, path) == {"a": ["auto"], "b": ["auto"]}
        a, b = Model(SIZE, 65536), Model(SIZE, 65536)
        a.touch(2 * MiB, 1)
        a.touch(4 * MiB, 1)
        b.touch(0, MiB)
        b.touch(4 * MiB, 1)
        _same_as_qemu(qemu_img, path, {"a": a, "b": b})

    def test_merge_within_and_across_images(self, tmp_path: Path, qemu_img: Run) -> None:
        """--merge, also from another image and across granularities, as qemu-img."""
        ours = _image(qemu_img, tmp_path / "ours.qcow2", ("t", "-g", "128k"), ("s",))
        theirs = _image(qemu_img, tmp_path / "theirs.qcow2", ("t", "-g", "128k"), ("s",))
        other = _image(qemu_img, tmp_path / "other.qcow2", ("x", "-g", "4k"))
        for p in (ours, theirs):
            qemu_io(p, f"write {MiB} 4k")
            qemu_img("bitmap", "--disable", p, "s")
            qemu_io(p, f"write {9 * MiB} 4k")
        qemu_io(other, f"write {20 * MiB + 4096} 4k")
        with images.open(ours, writable=True) as img:
            img.merge_bitmap("s", "t")
            img.merge_bitmap("x", "t", source_image=other)
        qemu_img("bitmap", "--merge", "s", theirs, "t")
        qemu_img("bitmap", "--merge", "x", "-b", other, "-F", "qcow2", theirs, "t")
        t = Model(SIZE, 128 << 10)
        for off in (MiB, 9 * MiB, 20 * MiB + 4096):
            t.touch(off, 4096)
        view_ours = qemu_view(ours, ["t", "s"])
        view_theirs = qemu_view(theirs, ["t", "s"])
        assert view_ours == view_theirs
        assert (view_ours["t"]["count"], view_ours["t"]["sha256"]) == (t.count, t.sha256)
        _check_clean(qemu_img, ours)

    def test_bad_requests(self, tmp_path: Path, qemu_img: Run) -> None:
        """Bad names, granularities, duplicates, read-only and v2 images are refused clearly."""
        path = _image(qemu_img, tmp_path / "e.qcow2", ("a",))
        with images.open(path, writable=True) as img:
            with pytest.raises(ImageError, match="already exists"):
                img.add_bitmap("a")
            with pytest.raises(ConfigError, match="granularity"):
                img.add_bitmap("g", granularity=3000)
            with pytest.raises(ConfigError, match="granularity"):
                img.add_bitmap("g", granularity=256)
            with pytest.raises(ConfigError, match="name"):
                img.add_bitmap("")
            with pytest.raises(ConfigError, match="1023"):
                img.add_bitmap("n" * 1024)
            with pytest.raises(ConfigError):
                img.add_bitmap(7)  # type: ignore[arg-type]
            with pytest.raises(ImageError, match="no bitmap named"):
                img.remove_bitmap("nope")
            with pytest.raises(ImageError, match="no bitmap named"):
                img.merge_bitmap("nope", "a")
            other = _image(qemu_img, tmp_path / "small.qcow2", ("a",))
            qemu_img("resize", "--shrink", other, "32M")
            with pytest.raises(ImageError, match="sizes"):
                img.merge_bitmap("a", "a", source_image=other)
        with images.open(path) as img, pytest.raises(ImageError, match="read-only"):
            img.add_bitmap("z")
        v2 = tmp_path / "v2.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
        with images.open(v2, writable=True) as img:
            assert img.bitmaps() == ()
            with pytest.raises(UnsupportedFeatureError, match="v2"):
                img.add_bitmap("a")
        raw = tmp_path / "r.raw"
        with images.create(raw, "1M", format="raw") as img:
            assert img.bitmaps() == ()
            with pytest.raises(UnsupportedFeatureError, match="raw"):
                img.add_bitmap("a")
        _check_clean(qemu_img, path)
        assert _flags(qemu_img, path) == {"a": ["auto"]}

    def test_too_many_bits_for_qemu(self, tmp_path: Path) -> None:
        """A bitmap over QEMU's 512 MiB limit needs a larger granularity."""
        with images.create(tmp_path / "big.qcow2", "4P", cluster_size="2M") as img:
            with pytest.raises(ConfigError, match="larger granularity"):
                img.add_bitmap("b", granularity=512)
            assert img.add_bitmap("b", granularity="1M").granularity == MiB


class TestBounds:
    """Bitmap data in memory follows what the file holds, not the disk size."""

    def test_all_ones_bitmap_of_a_huge_disk(self, tmp_path: Path, qemu_img: Run) -> None:
        """512 MiB of set bits (QEMU's limit), all as all-ones table entries: small and quick."""
        path = _image(qemu_img, tmp_path / "h.qcow2", options="")
        qemu_img("resize", path, "2T")
        qemu_img("bitmap", "--add", "-g", "512", path, "fine")
        raw = bytearray(path.read_bytes())
        at = raw.find(bytes.fromhex("23852875"), 0, 65536)
        doff = struct.unpack_from(">Q", raw, at + 24)[0]
        toff, tsize = struct.unpack_from(">QI", raw, doff)
        assert tsize == 8192
        struct.pack_into(f">{tsize}Q", raw, toff, *([1] * tsize))  # every cluster: all ones
        path.write_bytes(raw)
        tracemalloc.start()
        try:
            with images.open(path) as img:
                (info,) = img.bitmaps()
                extents = img.bitmap_extents("fine")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert extents == [(0, 2 << 40)] and info.count == 2 << 40
        assert peak < 32 << 20, f"peak {peak} bytes"
        view = qemu_view(path, ["fine"])
        assert view["fine"]["count"] == 2 << 40


# --- resize and snapshots ----------------------------------------------------------------------
class TestSizeAndSnapshots:
    """Bitmaps follow a resize and a revert, and the image stays clean for qemu-img."""

    def test_grow_and_shrink(self, tmp_path: Path, qemu_img: Run) -> None:
        """After growing, writes past the old end are recorded; shrinking drops the tail bits."""
        path = _image(qemu_img, tmp_path / "g.qcow2", ("b",), ("s", "-g", "512"))
        big = 3 * SIZE + 512
        with images.open(path, writable=True) as img:
            img.write(SIZE - 10, b"e" * 10)
            img.resize(big)
            img.write(2 * SIZE, b"n" * 5000)
            img.write(big - 1, b"t")
        b, s = Model(big, 65536), Model(big, 512)
        for m in (b, s):
            m.touch(SIZE - 10, 10)
            m.touch(2 * SIZE, 5000)
            m.touch(big - 1, 1)
        _same_as_qemu(qemu_img, path, {"b": b, "s": s})
        with images.open(path, writable=True) as img:
            img.resize(SIZE // 2, shrink=True)
        small_b, small_s = Model(SIZE // 2, 65536), Model(SIZE // 2, 512)
        _same_as_qemu(qemu_img, path, {"b": small_b, "s": small_s})

    def test_snapshots_with_bitmaps(self, tmp_path: Path, qemu_img: Run) -> None:
        """Snapshots can be taken and deleted; a revert is refused, as qemu-img refuses it."""
        path = _image(qemu_img, tmp_path / "s.qcow2", ("b",))
        model = Model(SIZE, 65536)
        with images.open(path, writable=True) as img:
            img.write(0, b"a" * 4096)
            img.create_snapshot("s1")
            img.create_snapshot("s2")
            img.write(MiB, b"b")
            img.delete_snapshot("s2")
            with pytest.raises(ImageError, match="dirty bitmaps"):
                img.revert_snapshot("s1")
            assert img.read(MiB, 1) == b"b"  # nothing was reverted
        model.touch(0, 4096)
        model.touch(MiB, 1)
        _same_as_qemu(qemu_img, path, {"b": model})
        proc = qemu_img("snapshot", "-a", "s1", path, check=False)
        assert proc.returncode != 0 and "dirty bitmaps" in proc.stderr
        with images.open(path, writable=True) as img:
            img.remove_bitmap("b")
            img.revert_snapshot("s1")
            assert img.read(MiB, 1) == b"\0"


def test_bitmaps_on_closed_image(tmp_path: Path) -> None:
    """Bitmap calls on a closed image are an ImageError."""
    img = images.create(tmp_path / "c.qcow2", "1M")
    img.close()
    with pytest.raises(virtkit.ImageError, match="closed"):
        img.bitmaps()


# --- crashes and power loss while bitmaps are written ---------------------------------------
def _workload(path: Path) -> None:
    """Write a second area and flush (bitmaps stored), grow, write again, then close."""
    with images.open(path, writable=True) as img:
        img.write(10 * MiB, b"B" * 70_000)
        img.flush()
        img.resize(SIZE + 4 * MiB)
        img.write(SIZE + MiB, b"C")
        img.add_bitmap("new", granularity=4096)
        img.write(2 * MiB, b"D")


def _outcomes(path: Path) -> set[tuple[tuple[int, int], ...]]:
    """The bitmap contents a consistent ``b`` may hold after a cut of :func:`_workload`."""
    steps = [(0, 4096), (10 * MiB, 70_000), (SIZE + MiB, 1), (2 * MiB, 1)]
    out = set()
    for k in range(len(steps) + 1):
        for size in (SIZE, SIZE + 4 * MiB):
            m = Model(size, 65536)
            for off, length in steps[:k]:
                m.touch(off, length)
            out.add(tuple(m.extents()))
    return out


class TestCrashWhileStoring:
    """Cut at every write (or lose the unflushed ones): never corrupt, never a wrong bitmap."""

    @pytest.mark.parametrize("power_loss", [False, True], ids=["crash", "power-loss"])
    def test_cut_at_each_write(self, tmp_path: Path, qemu_img: Run, power_loss: bool) -> None:
        """Each cut leaves a clean image (leaks at most) whose bitmap is consistent and right, or in-use."""
        seed = _image(qemu_img, tmp_path / "seed.qcow2", ("b",))
        qemu_io(seed, "write 0 4k")
        path = tmp_path / "cut.qcow2"
        path.write_bytes(seed.read_bytes())
        with faults.inject(faults.Recorder(), only=path) as rec:
            _workload(path)
        allowed = _outcomes(path)
        seen = {"consistent": 0, "in-use": 0}
        for n in range(1, rec.writes + 1):
            path.write_bytes(seed.read_bytes())
            plan: faults.CrashAfter = faults.PowerLoss(n) if power_loss else faults.CrashAfter(n)
            with pytest.raises(faults.SimulatedCrash), faults.inject(plan, only=path):
                _workload(path)
            proc = qemu_img("check", "--output=json", path, check=False)
            assert proc.returncode in (0, 3), f"cut at write {n}: {proc.stdout}{proc.stderr}"
            flags = _flags(qemu_img, path)
            with images.open(path) as img:
                info = {b.name: b for b in img.bitmaps()}
                if info["b"].inconsistent:
                    assert flags["b"] == ["in-use", "auto"]
                    seen["in-use"] += 1
                    continue
                got = tuple(img.bitmap_extents("b"))
            assert got in allowed, f"cut at write {n}: {got}"
            seen["consistent"] += 1
        print(f"bitmap store cut at each of {rec.writes} writes: {seen}")
        assert seen["consistent"] and seen["in-use"]


# --- random operation sequences against the model and QEMU ----------------------------------
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "zeroes", "discard", "flush", "clear", "toggle", "reopen"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * MiB),
    ),
    max_size=12,
)


class TestRandomSequences:
    """Any sequence of writes, flushes, clears and toggles leaves what the model predicts."""

    @settings(max_examples=20, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(ops=_OPS, gran_bits=st.integers(9, 22))
    def test_model(
        self, tmp_path: Path, qemu_img: Run, ops: list[tuple[str, int, int]], gran_bits: int
    ) -> None:
        """virtkit's extents and QEMU's bit hash equal the model after each sequence."""
        path = tmp_path / f"m{gran_bits}.qcow2"
        path.unlink(missing_ok=True)
        model = Model(SIZE, 1 << gran_bits)
        enabled = True
        img = images.create(path, SIZE, cluster_size=4096)
        try:
            img.add_bitmap("m", granularity=1 << gran_bits)
            for kind, offset, asked in ops:
                length = min(asked, SIZE - offset)
                if kind in ("write", "zeroes", "discard"):
                    _apply(img, kind, offset, length)
                    if enabled:
                        model.touch(offset, length)
                elif kind == "flush":
                    img.flush()
                elif kind == "clear":
                    img.clear_bitmap("m")
                    model.granules.clear()
                elif kind == "toggle":
                    enabled = not enabled
                    (img.enable_bitmap if enabled else img.disable_bitmap)("m")
                else:
                    img.close()
                    img = images.open(path, writable=True)
                assert img.bitmap_extents("m") == model.extents()
        finally:
            img.close()
        view = qemu_view(path, ["m"])
        assert (view["m"]["count"], view["m"]["sha256"]) == (model.count, model.sha256)
        assert view["m"]["recording"] is enabled

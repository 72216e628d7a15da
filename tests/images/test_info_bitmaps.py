"""info().format_specific["bitmaps"] as qemu-img info reports it, and measure built on it.

Images get persistent dirty bitmaps from ``qemu-img bitmap --add``; the oracle
is ``qemu-img info --output=json`` (and ``qemu-img measure``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import virtkit
import virtkit.images
from virtkit.images import locking
from virtkit.images.qcow2 import layout

Run = Callable[..., subprocess.CompletedProcess[str]]


def _theirs(qemu_img: Run, path: Path) -> dict[str, Any]:
    """qemu-img info's format-specific data."""
    out: dict[str, Any] = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    data: dict[str, Any] = out["format-specific"]["data"]
    return data


def _ours(path: Path) -> dict[str, Any]:
    with virtkit.images.open(path) as img:
        return img.info().format_specific


def _assert_same(qemu_img: Run, path: Path) -> dict[str, Any]:
    """Our format-specific dict equals qemu-img's, key order included; return it."""
    theirs = _theirs(qemu_img, path)
    with virtkit.images.open(path) as img:
        ours = img.info().to_json()["format-specific"]
    assert ours == {"type": "qcow2", "data": theirs}
    assert json.dumps(ours["data"]) == json.dumps(theirs)
    return theirs


def _image(qemu_img: Run, path: Path, options: str = "", size: str = "64M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), path, size)
    return path


class TestInfoBitmaps:
    """The bitmaps list: name, granularity and flags, as qemu-img info."""

    @pytest.mark.parametrize("options", ["", "cluster_size=4096", "extended_l2=on"])
    def test_several_bitmaps_match_qemu_img(
        self, tmp_path: Path, qemu_img: Run, options: str
    ) -> None:
        """Bitmaps of several granularities, one disabled, are listed in directory order."""
        path = _image(qemu_img, tmp_path / "b.qcow2", options)
        qemu_img("bitmap", "--add", path, "default")
        qemu_img("bitmap", "--add", "-g", "512", path, "fine")
        qemu_img("bitmap", "--add", "-g", "2M", "--disable", path, "coarse-off")
        qemu_img("bitmap", "--add", "-g", "128k", path, "ünïcode name")
        theirs = _assert_same(qemu_img, path)
        cluster = 4096 if "4096" in options else 65536  # the default granularity
        assert theirs["bitmaps"] == [
            {"flags": ["auto"], "name": "default", "granularity": cluster},
            {"flags": ["auto"], "name": "fine", "granularity": 512},
            {"flags": [], "name": "coarse-off", "granularity": 2 << 20},
            {"flags": ["auto"], "name": "ünïcode name", "granularity": 128 << 10},
        ]

    def test_no_bitmaps_no_key(self, tmp_path: Path, qemu_img: Run) -> None:
        """Images without bitmaps (v3 and v2) have no bitmaps key, like qemu-img."""
        for options in ("", "compat=0.10"):
            path = _image(qemu_img, tmp_path / f"n{len(options)}.qcow2", options)
            assert "bitmaps" not in _assert_same(qemu_img, path)

    def test_removed_and_disabled_bitmaps(self, tmp_path: Path, qemu_img: Run) -> None:
        """Removing one bitmap and disabling another shows in the list; removing all drops it."""
        path = _image(qemu_img, tmp_path / "r.qcow2")
        qemu_img("bitmap", "--add", path, "a")
        qemu_img("bitmap", "--add", path, "b")
        qemu_img("bitmap", "--remove", path, "a")
        qemu_img("bitmap", "--disable", path, "b")
        assert [b["flags"] for b in _assert_same(qemu_img, path)["bitmaps"]] == [[]]
        qemu_img("bitmap", "--remove", path, "b")
        assert "bitmaps" not in _assert_same(qemu_img, path)

    def test_in_use_after_qemu_killed(self, tmp_path: Path, qemu_img: Run) -> None:
        """A QEMU killed while writing leaves its bitmaps in-use; we report that too."""
        path = _image(qemu_img, tmp_path / "k.qcow2")
        qemu_img("bitmap", "--add", path, "live")
        qemu_img("bitmap", "--add", "--disable", path, "frozen")
        exe = shutil.which("qemu-io")
        assert exe is not None, "qemu-io is not installed (qemu-utils)"
        proc = subprocess.Popen(
            [exe, "-f", "qcow2", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(400):  # wait until it holds the write lock and marked the bitmaps
                if locking.probe(path).writer and _theirs(qemu_img, path)["bitmaps"][0]["flags"][
                    :1
                ] == ["in-use"]:
                    break
                time.sleep(0.025)
            else:
                raise AssertionError("qemu-io never opened the image")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        theirs = _assert_same(qemu_img, path)
        assert [b["flags"] for b in theirs["bitmaps"]] == [["in-use", "auto"], ["in-use"]]

    def test_our_write_marks_in_use(self, tmp_path: Path, qemu_img: Run) -> None:
        """Our first write flags every bitmap in-use; close() leaves them consistent again."""
        path = _image(qemu_img, tmp_path / "w.qcow2")
        qemu_img("bitmap", "--add", path, "b0")
        with virtkit.images.open(path, writable=True) as img:
            img.write(0, b"x" * 4096)
            assert img.info().format_specific["bitmaps"][0]["flags"] == ["in-use", "auto"]
            assert _theirs(qemu_img, path)["bitmaps"][0]["flags"] == ["in-use", "auto"]
        assert _assert_same(qemu_img, path)["bitmaps"][0]["flags"] == ["auto"]

    def test_with_external_data_file(self, tmp_path: Path, qemu_img: Run) -> None:
        """Bitmaps and data-file fields together, in qemu-img's order."""
        path = _image(qemu_img, tmp_path / "d.qcow2", f"data_file={tmp_path / 'd.raw'}")
        qemu_img("bitmap", "--add", path, "x")
        assert "data-file" in _assert_same(qemu_img, path)

    def test_stale_extension_is_not_listed(self, tmp_path: Path, qemu_img: Run) -> None:
        """With the bitmaps autoclear bit cleared (an old writer), nothing is listed."""
        path = _image(qemu_img, tmp_path / "s.qcow2")
        qemu_img("bitmap", "--add", path, "old")
        with path.open("r+b") as fh:
            fh.seek(layout.OFF_AUTOCLEAR)
            fh.write(bytes(8))
        assert "bitmaps" not in _assert_same(qemu_img, path)

    def test_damaged_directory_is_corruption(self, tmp_path: Path, qemu_img: Run) -> None:
        """A bitmap directory offset past the end of the file raises CorruptImageError."""
        path = _image(qemu_img, tmp_path / "c.qcow2")
        qemu_img("bitmap", "--add", path, "b")
        raw = bytearray(path.read_bytes()[:65536])
        at = raw.find(layout.EXT_BITMAPS.to_bytes(4, "big"))
        assert at > 0
        # extension: type u32, length u32, nb_bitmaps u32, reserved u32, dir size u64, dir offset
        with path.open("r+b") as fh:
            fh.seek(at + 8 + 16)
            fh.write((1 << 40).to_bytes(8, "big"))
        with virtkit.images.open(path) as img, pytest.raises(virtkit.CorruptImageError) as info:
            img.info()
        assert info.value.offset == 1 << 40


class TestMeasureBitmaps:
    """measure's bitmaps figure comes from the info() list and equals qemu-img measure."""

    def _measure_both(self, qemu_img: Run, path: Path) -> tuple[dict[str, int], dict[str, int]]:
        theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", path).stdout)
        return virtkit.images.measure(path, "qcow2"), theirs

    def test_in_use_and_disabled_bitmaps_counted(self, tmp_path: Path, qemu_img: Run) -> None:
        """Bitmaps flagged in-use by our write, and disabled ones, count as qemu-img counts."""
        path = _image(qemu_img, tmp_path / "m.qcow2", size="100M")
        qemu_img("bitmap", "--add", "-g", "4096", path, "a")
        qemu_img("bitmap", "--add", "--disable", path, "b")
        with virtkit.images.open(path, writable=True) as img:
            img.write(1 << 20, b"y" * 65536)
        ours, theirs = self._measure_both(qemu_img, path)
        assert theirs["bitmaps"] > 0
        assert ours == theirs

    def test_stale_bitmaps_not_counted(self, tmp_path: Path, qemu_img: Run) -> None:
        """A stale bitmaps extension (autoclear bit cleared) counts nothing, as qemu-img."""
        path = _image(qemu_img, tmp_path / "st.qcow2")
        qemu_img("bitmap", "--add", "-g", "512", path, "stale")
        with path.open("r+b") as fh:
            fh.seek(layout.OFF_AUTOCLEAR)
            fh.write(bytes(8))
        ours, theirs = self._measure_both(qemu_img, path)
        assert theirs["bitmaps"] == 0
        assert ours == theirs

"""Each `virtkit image` command next to its qemu-img namesake, on the same files.

Exit codes and JSON must match, so a script can switch between the two.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtkit.cli import main

pytestmark = pytest.mark.qemu


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, check=False, timeout=120
    )


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=60)


class Both:
    """Run the same arguments through qemu-img and `virtkit image` (in-process)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def virtkit(self, *args: str | Path) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = main(["image", *map(str, args)])
        out, err = self.capsys.readouterr()
        return status, out, err

    def run(self, *args: str | Path) -> tuple[tuple[int, str], tuple[int, str]]:
        theirs = qemu_img(*args)
        status, out, _ = self.virtkit(*args)
        return (theirs.returncode, theirs.stdout), (status, out)

    def json(self, *args: str | Path) -> tuple[Any, Any]:
        (their_rc, their_out), (our_rc, our_out) = self.run(*args)
        assert their_rc == our_rc, (args, their_out, our_out)
        return json.loads(their_out), json.loads(our_out)


@pytest.fixture
def both(capsys: pytest.CaptureFixture[str]) -> Both:
    return Both(capsys)


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base.qcow2 (data, a zero cluster, a snapshot) <- top.qcow2 (data); cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "64M")
    qemu_io(base, "write -P 1 0 64k", "write -z 1M 64k", "write -P 3 2M 192k")
    assert qemu_img("snapshot", "-c", "first", base).returncode == 0
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -P 2 128k 64k", "write -P 4 2M 4k")
    return tmp_path


def _qcow2_u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


def _damage(path: Path, how: str) -> None:
    """Make a leak (unreference the first data cluster) or a corruption (drop its refcount)."""
    data = bytearray(path.read_bytes())
    l1 = _qcow2_u64(data, 40)
    l2 = _qcow2_u64(data, l1) & 0x00FFFFFFFFFFFE00
    cluster = _qcow2_u64(data, l2) & 0x00FFFFFFFFFFFE00
    assert cluster, "no data cluster to damage"
    if how == "leak":
        struct.pack_into(">Q", data, l2, 0)
    else:
        reftable = _qcow2_u64(data, 48)
        block = _qcow2_u64(data, reftable)
        struct.pack_into(">H", data, block + 2 * (cluster // 65536), 0)
    path.write_bytes(bytes(data))


class TestInfo:
    def test_info_json_matches(self, both: Both, chain: Path) -> None:
        """info --output=json of an overlay and of a base with a snapshot: qemu-img's very text."""
        for name in ("top.qcow2", "base.qcow2"):
            (their_rc, theirs), (our_rc, ours) = both.run("info", "--output=json", name)
            assert (our_rc, ours) == (their_rc, theirs), name

    def test_info_raw_and_backing_chain(self, both: Both, chain: Path) -> None:
        """info of a raw file and info --backing-chain (a list) match qemu-img's."""
        qemu_img("create", "-f", "raw", "r.raw", "3M")
        theirs, ours = both.json("info", "--output=json", "-f", "raw", "r.raw")
        assert ours == theirs
        theirs, ours = both.json("info", "--output=json", "--backing-chain", "top.qcow2")
        assert ours == theirs

    def test_info_human_sizes(self, both: Both, chain: Path) -> None:
        """Human output prints sizes as qemu-img does ("64 MiB (67108864 bytes)")."""
        (_, theirs), (_, ours) = both.run("info", "top.qcow2")
        assert "virtual size: 64 MiB (67108864 bytes)" in ours
        their_lines = [line for line in theirs.splitlines() if not line.startswith("disk size")]
        our_lines = [line for line in ours.splitlines() if not line.startswith("disk size")]
        assert our_lines == their_lines


class TestCheck:
    def test_clean(self, both: Both, chain: Path) -> None:
        """A clean image: exit 0, the same JSON text (keys in qemu-img's order)."""
        (their_rc, theirs), (our_rc, ours) = both.run("check", "--output=json", "top.qcow2")
        assert (our_rc, ours) == (their_rc, theirs) == (0, theirs)

    @pytest.mark.parametrize(("how", "status"), [("leak", 3), ("corrupt", 2)])
    def test_damaged(self, both: Both, chain: Path, how: str, status: int) -> None:
        """A leak exits 3 and a corruption 2, as qemu-img; the JSON counts match."""
        _damage(chain / "base.qcow2", how)
        theirs, ours = both.json("check", "--output=json", "base.qcow2")
        assert ours == theirs
        (their_rc, _), (our_rc, our_out) = both.run("check", "base.qcow2")
        assert our_rc == their_rc == status
        assert ("leaked clusters were found" if how == "leak" else "errors were found") in our_out

    def test_repair_leaks(self, both: Both, chain: Path) -> None:
        """check -r leaks fixes the leak: exit 0 and the same JSON as qemu-img on a copy."""
        _damage(chain / "base.qcow2", "leak")
        shutil.copy(chain / "base.qcow2", chain / "copy.qcow2")
        theirs = json.loads(qemu_img("check", "-r", "leaks", "--output=json", "copy.qcow2").stdout)
        status, out, _ = both.virtkit("check", "-r", "leaks", "--output=json", "base.qcow2")
        assert status == 0
        ours = json.loads(out)
        theirs["filename"] = ours["filename"]
        assert ours == theirs

    def test_raw_has_nothing_to_check(self, both: Both, chain: Path) -> None:
        """check on raw exits 63 for both."""
        qemu_img("create", "-f", "raw", "r.raw", "1M")
        (their_rc, _), (our_rc, _) = both.run("check", "r.raw")
        assert our_rc == their_rc == 63


class TestMapMeasureCompare:
    def test_map_json(self, both: Both, chain: Path) -> None:
        """map --output=json of a two-layer chain: qemu-img's very text, host offsets included."""
        (their_rc, theirs), (our_rc, ours) = both.run("map", "--output=json", "top.qcow2")
        assert (our_rc, ours) == (their_rc, theirs)
        assert '"offset": ' in ours

    def test_map_compressed_zero_and_small_clusters(self, both: Both, chain: Path) -> None:
        """Compressed clusters (no offset), allocated and plain zero clusters, 4 KiB clusters,
        v2: map (JSON and human) prints what qemu-img prints."""
        qemu_img("create", "-f", "qcow2", "c.qcow2", "8M")
        qemu_io(chain / "c.qcow2", "write -c -P 9 0 64k", "write -c -P 8 64k 64k",
                "write -P 1 128k 64k", "write -z 1M 64k", "write -P 3 2M 64k",
                "write -z 2M 64k")  # fmt: skip
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096,compat=0.10", "s.qcow2", "8M")
        qemu_io(chain / "s.qcow2", "write -P 1 0 192k", "write -P 2 1M 64k", "write -P 3 20k 4k")
        for name in ("c.qcow2", "s.qcow2"):
            for args in (("--output=json",), ()):
                (their_rc, theirs), (our_rc, ours) = both.run("map", *args, name)
                assert (our_rc, ours) == (their_rc, theirs), (name, args)

    def test_map_raw_with_offsets(self, both: Both, chain: Path) -> None:
        """map of a raw file, host offsets included, matches qemu-img's."""
        qemu_img("create", "-f", "raw", "r.raw", "1M")
        qemu_io(chain / "r.raw", "write -P 7 64k 4k", fmt="raw")
        theirs, ours = both.json("map", "--output=json", "-f", "raw", "r.raw")
        assert ours == theirs

    @pytest.mark.parametrize(
        "args",
        [
            ("-O", "qcow2", "top.qcow2"),
            ("-O", "qcow2", "-o", "cluster_size=4096", "base.qcow2"),
            ("-O", "raw", "base.qcow2"),
            ("-O", "qcow2", "--size", "10G"),
        ],
    )
    def test_measure_json(self, both: Both, chain: Path, args: tuple[str, ...]) -> None:
        """measure --output=json matches qemu-img's for files and --size."""
        theirs, ours = both.json("measure", "--output=json", *args)
        assert ours == theirs

    def test_compare(self, both: Both, chain: Path) -> None:
        """compare: identical 0, differing 1 (same offset message), missing file 2."""
        assert qemu_img("convert", "-O", "raw", "top.qcow2", "flat.raw").returncode == 0
        cases = [
            ("top.qcow2", "flat.raw"),
            ("base.qcow2", "top.qcow2"),
            ("top.qcow2", "missing.qcow2"),
        ]
        for a, b in cases:
            (their_rc, their_out), (our_rc, our_out) = both.run("compare", a, b)
            assert our_rc == their_rc, (a, b, their_out, our_out)
            if their_rc != 2:
                assert our_out == their_out, (a, b)
        assert [both.run("compare", *c)[1][0] for c in cases] == [0, 1, 2]

    def test_compare_sizes(self, both: Both, chain: Path) -> None:
        """Different sizes: a warning and identical, or (-s) a strict mismatch, as qemu-img."""
        qemu_img("create", "-f", "raw", "a.raw", "1M")
        qemu_img("create", "-f", "raw", "b.raw", "2M")
        for args in (("a.raw", "b.raw"), ("-s", "a.raw", "b.raw")):
            (their_rc, their_out), (our_rc, our_out) = both.run("compare", *args)
            assert (our_rc, our_out) == (their_rc, their_out), args
        qemu_io(chain / "b.raw", "write -P 9 1536k 512", fmt="raw")
        (their_rc, their_out), (our_rc, our_out) = both.run("compare", "a.raw", "b.raw")
        assert (our_rc, our_out) == (their_rc, their_out) == (1, their_out)


class TestWritingCommands:
    def test_create_defaults_to_raw(self, both: Both, chain: Path) -> None:
        """create x 1G with no -f makes a raw image, as qemu-img; -f before the size works."""
        assert both.virtkit("create", "ours", "1G")[0] == 0
        assert both.virtkit("create", "ours2", "-f", "raw", "1G")[0] == 0
        qemu_img("create", "theirs", "1G")
        for name in ("ours", "ours2"):
            info = json.loads(qemu_img("info", "--output=json", name).stdout)
            their = json.loads(qemu_img("info", "--output=json", "theirs").stdout)
            assert (info["format"], info["virtual-size"]) == (
                their["format"],
                their["virtual-size"],
            )

    def test_create_qcow2_with_backing(self, both: Both, chain: Path) -> None:
        """create -f qcow2 -b -F: qemu-img info of both results is the same but for the name."""
        both.virtkit("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "o1.qcow2")
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "o2.qcow2")
        a = json.loads(qemu_img("info", "--output=json", "o1.qcow2").stdout)
        b = json.loads(qemu_img("info", "--output=json", "o2.qcow2").stdout)
        for d in (a, b):
            d.pop("filename")
            d.pop("actual-size")
        assert a == b

    def test_convert_then_compare(self, both: Both, chain: Path) -> None:
        """convert -O qcow2 (and -c) gives an image qemu-img finds identical and clean."""
        for args in (("-O", "qcow2"), ("-O", "qcow2", "-c"), ()):
            assert both.virtkit("convert", *args, "top.qcow2", "out.img")[0] == 0
            assert qemu_img("compare", "top.qcow2", "out.img").returncode == 0
            fmt = "raw" if not args else "qcow2"
            assert json.loads(qemu_img("info", "--output=json", "out.img").stdout)["format"] == fmt
            if fmt == "qcow2":
                assert qemu_img("check", "out.img").returncode == 0
            (chain / "out.img").unlink()

    def test_convert_missing_folder_names_the_destination(self, both: Both, chain: Path) -> None:
        """A missing destination folder is an error naming the destination, not a temp file."""
        status, _, err = both.virtkit("convert", "top.qcow2", "nope/out.raw")
        assert status == 1
        assert "nope/out.raw" in err and ".tmp" not in err
        assert "Traceback" not in err

    def test_snapshot_list_matches(self, both: Both, chain: Path) -> None:
        """snapshot -l prints qemu-img's table, line for line."""
        (their_rc, theirs), (our_rc, ours) = both.run("snapshot", "-l", "base.qcow2")
        assert (our_rc, ours) == (their_rc, theirs)

    def test_snapshot_create_apply_delete(self, both: Both, chain: Path) -> None:
        """-c/-a/-d act on the file; qemu-img sees the result."""
        assert both.virtkit("snapshot", "-c", "mine", "top.qcow2")[0] == 0
        assert "mine" in qemu_img("snapshot", "-l", "top.qcow2").stdout
        qemu_io(chain / "top.qcow2", "write -P 8 0 64k")
        assert both.virtkit("snapshot", "-a", "mine", "top.qcow2")[0] == 0
        qemu_io(chain / "top.qcow2", "read -P 1 0 64k")  # back to the base's bytes
        assert both.virtkit("snapshot", "-d", "mine", "top.qcow2")[0] == 0
        assert "mine" not in qemu_img("snapshot", "-l", "top.qcow2").stdout

    def test_resize(self, both: Both, chain: Path) -> None:
        """resize +SIZE / SIZE / --shrink -SIZE give the sizes qemu-img gives."""
        qemu_img("create", "-f", "raw", "a.raw", "1M")
        qemu_img("create", "-f", "raw", "b.raw", "1M")
        steps = [("+1M",), ("4M",), ("--shrink", "-1M")]
        for step in steps:
            assert qemu_img("resize", "-f", "raw", "a.raw", *step).returncode == 0
            assert both.virtkit("resize", "-f", "raw", "b.raw", *step)[0] == 0
            assert (chain / "a.raw").stat().st_size == (chain / "b.raw").stat().st_size
        assert (chain / "b.raw").stat().st_size == 3 << 20

    def test_rebase_and_commit(self, both: Both, chain: Path) -> None:
        """rebase -b "" flattens like qemu-img; commit writes the overlay into its base."""
        shutil.copy(chain / "top.qcow2", chain / "flat.qcow2")
        assert both.virtkit("rebase", "-b", "", "flat.qcow2")[0] == 0
        assert qemu_img("compare", "flat.qcow2", "top.qcow2").returncode == 0
        assert "backing-filename" not in json.loads(
            qemu_img("info", "--output=json", "flat.qcow2").stdout
        )
        status, out, _ = both.virtkit("commit", "top.qcow2")
        assert (status, out) == (0, "Image committed.\n")
        assert qemu_img("compare", "base.qcow2", "flat.qcow2").returncode == 0
        assert qemu_img("check", "base.qcow2").returncode == 0

    def test_amend_size_and_backing(self, both: Both, chain: Path) -> None:
        """amend -o size= grows; -o backing_file= rewrites the header."""
        assert both.virtkit("amend", "-o", "size=128M", "base.qcow2")[0] == 0
        info = json.loads(qemu_img("info", "--output=json", "base.qcow2").stdout)
        assert info["virtual-size"] == 128 << 20
        shutil.copy(chain / "base.qcow2", chain / "base2.qcow2")
        status = both.virtkit("amend", "-o", "backing_file=base2.qcow2", "top.qcow2")[0]
        assert status == 0
        info = json.loads(qemu_img("info", "--output=json", "top.qcow2").stdout)
        assert info["backing-filename"] == "base2.qcow2"

    @pytest.mark.parametrize(
        "option",
        [
            "compat=0.10",
            "compat=v3",
            "lazy_refcounts=on",
            "refcount_bits=8",
            "refcount_bits=1",
            "compat=0.10,refcount_bits=8",
            "compat=0.9",
            "cluster_size=4096",
            "data_file=x.raw",
            "data_file_raw=on",
            "lazy_refcounts=maybe",
        ],
    )
    def test_amend_options_match_qemu_img(self, both: Both, chain: Path, option: str) -> None:
        """amend -o compat/lazy_refcounts/refcount_bits: qemu-img's exit code on a copy,
        a clean result showing the same bytes and the same format-specific info."""
        shutil.copy(chain / "base.qcow2", chain / "theirs.qcow2")
        their_rc = qemu_img("amend", "-o", option, "theirs.qcow2").returncode
        our_rc, _, err = both.virtkit("amend", "-o", option, "base.qcow2")
        assert our_rc == their_rc, err
        assert qemu_img("check", "base.qcow2").returncode == 0
        assert qemu_img("compare", "base.qcow2", "theirs.qcow2").returncode == 0
        ours, theirs = (
            json.loads(qemu_img("info", "--output=json", name).stdout)["format-specific"]
            for name in ("base.qcow2", "theirs.qcow2")
        )
        assert ours == theirs
        if our_rc:
            assert err.startswith("virtkit: error: ") and "Traceback" not in err

    def test_amend_usage_errors_match_qemu_img(self, both: Both, chain: Path) -> None:
        """No -o, and a raw image: exit 1 as qemu-img."""
        qemu_img("create", "-f", "raw", "r.raw", "1M")
        for args in (("top.qcow2",), ("-f", "raw", "-o", "size=2M", "r.raw")):
            (their_rc, _), (our_rc, _) = both.run("amend", *args)
            assert our_rc == their_rc == 1, args

    def test_dd(self, both: Both, chain: Path) -> None:
        """dd bs/count/skip produces the bytes and size qemu-img dd produces."""
        ops = ("bs=64k", "count=40", "skip=1")
        assert qemu_img("dd", "-O", "raw", "if=top.qcow2", "of=theirs.raw", *ops).returncode == 0
        assert both.virtkit("dd", "-O", "raw", "if=top.qcow2", "of=ours.raw", *ops)[0] == 0
        assert (chain / "ours.raw").read_bytes() == (chain / "theirs.raw").read_bytes()

    def test_version_and_help(self, both: Both, capsys: pytest.CaptureFixture[str]) -> None:
        """--version prints the version; every image command has --help text."""
        assert main(["--version"]) == 0
        assert "virtkit, version" in capsys.readouterr().out
        for command in ("info", "create", "check", "convert", "snapshot", "resize", "rebase",
                        "commit", "measure", "compare", "map", "amend", "dd"):  # fmt: skip
            assert main(["image", command, "--help"]) == 0
            out = capsys.readouterr().out
            assert f"Usage: virtkit image {command}" in out
            assert "qemu-img" in out


class TestBitmaps:
    def test_bitmap_commands_match_qemu_img(self, both: Both, chain: Path) -> None:
        """The same bitmap operations through both tools leave the same bitmaps (info JSON)."""
        for name in ("a.qcow2", "b.qcow2"):
            qemu_img("create", "-f", "qcow2", name, "16M")
        steps = [
            ("--add", "-g", "128k"),
            ("--add",),
            ("--disable",),
            ("--merge", "first"),
            ("--clear",),
            ("--enable",),
        ]
        names = ["first", "second", "second", "second", "first", "second"]
        for step, bitmap in zip(steps, names, strict=True):
            assert qemu_img("bitmap", *step, "a.qcow2", bitmap).returncode == 0, step
            status, _, err = both.virtkit("bitmap", *step, "b.qcow2", bitmap)
            assert status == 0, (step, err)
        ours = json.loads(qemu_img("info", "--output=json", "b.qcow2").stdout)
        theirs = json.loads(qemu_img("info", "--output=json", "a.qcow2").stdout)
        assert ours["format-specific"] == theirs["format-specific"]
        assert qemu_img("check", "b.qcow2").returncode == 0
        status, _, err = both.virtkit("bitmap", "--remove", "b.qcow2", "missing")
        assert status == 1 and "missing" in err


class TestForceShare:
    @pytest.mark.parametrize(
        "args",
        [
            ("info", "--output=json", "top.qcow2"),
            ("check", "--output=json", "top.qcow2"),
            ("map", "--output=json", "top.qcow2"),
            ("compare", "top.qcow2", "base.qcow2"),
            ("convert", "-O", "raw", "top.qcow2", "out.raw"),
            ("snapshot", "-l", "top.qcow2"),
            ("dd", "if=top.qcow2", "of=dd.raw", "bs=64k", "count=4"),
            ("measure", "--output=json", "-O", "qcow2", "top.qcow2"),
        ],
        ids=lambda a: a[0],
    )
    def test_an_image_in_use_needs_u(self, chain: Path, args: tuple[str, ...]) -> None:
        """While a writer holds the image: refused (an error naming the lock) without -U,
        read with -U; qemu-img's exit status in both cases (separate processes)."""
        import sys

        from virtkit import images

        ours = [sys.executable, "-m", "virtkit.cli", "image"]
        with images.open(chain / "top.qcow2", writable=True):
            for shared in ((), ("-U",)):
                argv = (args[0], *shared, *args[1:])
                theirs = qemu_img(*argv)
                (chain / "out.raw").unlink(missing_ok=True)
                (chain / "dd.raw").unlink(missing_ok=True)
                mine = subprocess.run(
                    [*ours, *argv], capture_output=True, text=True, timeout=120, check=False
                )
                assert mine.returncode == theirs.returncode, (argv, mine.stderr, theirs.stderr)
                assert "Traceback" not in mine.stderr
                if shared:  # compare exits 1: the two images differ
                    assert mine.returncode == (1 if args[0] == "compare" else 0), argv
                else:  # compare's errors are 2, as qemu-img's
                    assert mine.returncode == (2 if args[0] == "compare" else 1), argv
                    assert "lock" in mine.stderr


class TestOtherFormats:
    @pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vhdx", "vdi"])
    def test_info_and_check(self, both: Both, chain: Path, fmt: str) -> None:
        """info JSON (actual size aside) and check (exit code, JSON) as qemu-img: vpc has
        nothing to check (63); the others report no cluster counts."""
        name = f"x.{fmt}"
        assert qemu_img("create", "-f", fmt, name, "64M").returncode == 0
        qemu_io(chain / name, "write -P 7 1M 64k", fmt=fmt)
        theirs, ours = both.json("info", "--output=json", name)
        theirs.pop("actual-size")
        ours.pop("actual-size")
        assert ours == theirs
        (their_rc, their_out), (our_rc, our_out) = both.run("check", "--output=json", name)
        assert our_rc == their_rc == (63 if fmt == "vpc" else 0)
        assert our_out == their_out
        (their_rc, their_out), (our_rc, our_out) = both.run("check", name)
        assert (our_rc, our_out) == (their_rc, their_out)

    @pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vdi"])
    def test_map_json_but_host_offsets(self, both: Both, chain: Path, fmt: str) -> None:
        """map JSON as qemu-img's (unallocated ranges of formats without backing files are
        present zeroes), but for the host offsets, given for raw and qcow2 only."""
        name = f"x.{fmt}"
        qemu_img("create", "-f", fmt, name, "64M")
        qemu_io(chain / name, "write -P 7 1M 64k", "write -P 8 8M 64k", fmt=fmt)
        theirs, ours = both.json("map", "--output=json", name)
        for entry in theirs:
            entry.pop("offset", None)
        assert ours == theirs


class TestCreateOutput:
    @pytest.mark.parametrize(
        "args",
        [
            ("-f", "qcow2", "new.img", "64M"),
            ("-f", "qcow2", "-o", "compat=0.10", "new.img", "64M"),
            ("-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", "new.img", "64M"),
            ("-f", "qcow2", "-o", "refcount_bits=8,extended_l2=on", "new.img", "64M"),
            ("-f", "qcow2", "-o", "compression_type=zstd", "new.img", "64M"),
            ("-f", "qcow2", "-o", "preallocation=metadata", "new.img", "64M"),
            ("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "new.img"),
            ("-f", "raw", "new.img", "1G"),
            ("-f", "raw", "-o", "preallocation=falloc", "new.img", "1M"),
            ("-f", "vpc", "new.img", "1M"),
            ("-f", "vhdx", "new.img", "1M"),
        ],
        ids=lambda a: " ".join(a[1:-2]),
    )
    def test_formatting_line(self, both: Both, chain: Path, args: tuple[str, ...]) -> None:
        """create prints qemu-img's "Formatting ..." line, options in its order and defaults."""
        theirs = qemu_img("create", *args)
        (chain / "new.img").unlink()
        status, ours, err = both.virtkit("create", *args)
        assert (status, ours) == (theirs.returncode, theirs.stdout), err

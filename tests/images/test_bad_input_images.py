"""Bad arguments to every public image call raise a VirtkitError naming the argument.

The bar: nothing but a ``virtkit.VirtkitError`` subclass escapes a public call
given bad input (no TypeError, ValueError, OverflowError, OSError...), and the
message names the argument that was wrong. Wrong-type arguments are
``ConfigError``; file problems are ``ImageError``.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtkit import ConfigError, ImageError, UnsupportedFeatureError, VirtkitError, images
from virtkit.images import Image

#: Values that are never a valid offset, length or size.
NOT_INTS: list[Any] = [None, True, 1.5, "one", b"1", math.nan, math.inf, [], {}, object()]
#: Values that are never a valid file path.
NOT_PATHS: list[Any] = [None, True, False, 0, 1, -1, 2**70, 1.5, math.nan, b"x", [], {}, ""]
#: Values that are never bytes-like data.
NOT_BYTES: list[Any] = [None, True, 0, -1, 2**70, 1.5, math.nan, "text", "", [1, 2], {}, object()]
#: Values that are never a snapshot or backing file name.
NOT_NAMES: list[Any] = [None, True, 0, -1, 1.5, b"x", [], {}, object(), "", "a\0b"]

garbage = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


def _ids(values: list[Any]) -> list[str]:
    return [repr(v)[:20] for v in values]


def _names_arg(exc: BaseException, *words: str) -> None:
    text = str(exc)
    assert any(w in text for w in words), f"message does not name {words}: {text}"


@pytest.fixture(params=["qcow2", "raw"])
def img(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Image]:
    """A fresh writable 1 MiB image of each format."""
    with images.create(tmp_path / f"d.{request.param}", size="1MiB", format=request.param) as i:
        yield i


@pytest.fixture
def qimg(tmp_path: Path) -> Iterator[Any]:
    """A fresh writable 1 MiB qcow2 image with one snapshot "s1"."""
    with images.create(tmp_path / "q.qcow2", size="1MiB") as i:
        i.create_snapshot("s1")
        yield i


class TestPaths:
    """create / open / probe_format / convert / measure / rebase / commit reject non-paths."""

    CALLS: ClassVar[dict[str, Callable[[Any, Path], object]]] = {
        "create": lambda p, d: images.create(p, size="1MiB"),
        "create-raw": lambda p, d: images.create(p, size="1MiB", format="raw"),
        "open": lambda p, d: images.open(p),
        "probe_format": lambda p, d: images.probe_format(p),
        "convert-src": lambda p, d: images.convert(p, d / "out.qcow2"),
        "convert-dst": lambda p, d: images.convert(d / "base.qcow2", p),
        "measure": lambda p, d: images.measure(p),
        "rebase": lambda p, d: images.rebase(p, None),
        "commit": lambda p, d: images.commit(p),
    }

    @pytest.mark.parametrize("call", list(CALLS))
    @pytest.mark.parametrize("bad", NOT_PATHS, ids=_ids(NOT_PATHS))
    def test_non_path_is_config_error(self, call: str, bad: Any, tmp_path: Path) -> None:
        """A path that is not a str/PathLike (or is empty) is a ConfigError naming it."""
        images.create(tmp_path / "base.qcow2", size="1MiB").close()
        with pytest.raises(ConfigError) as info:
            self.CALLS[call](bad, tmp_path)
        # measure(None) means "no source": then it is the missing size that is named
        _names_arg(info.value, "'path'", "'src'", "'dst'", "'image'", "a source image or a size")

    @pytest.mark.parametrize("call", list(CALLS))
    def test_nul_byte_in_path_is_config_error(self, call: str, tmp_path: Path) -> None:
        """A path with a NUL byte is a ConfigError, not the OS's ValueError."""
        images.create(tmp_path / "base.qcow2", size="1MiB").close()
        with pytest.raises(ConfigError, match="NUL"):
            self.CALLS[call](str(tmp_path / "a\0b"), tmp_path)

    @pytest.mark.parametrize("fd", [0, 1, 2])
    def test_int_path_never_opens_a_file_descriptor(self, fd: int) -> None:
        """probe_format(1) is refused: it used to open and then close the process's stdout."""
        with pytest.raises(ConfigError, match="'path'"):
            images.probe_format(fd)  # type: ignore[arg-type]
        os.fstat(fd)  # still open
        sys.stdout.flush()

    @pytest.mark.parametrize("call", ["open", "probe_format", "convert-src", "measure", "commit"])
    def test_directory_or_missing_file_is_image_error(self, call: str, tmp_path: Path) -> None:
        """A directory or a missing file where an image is expected is an ImageError."""
        images.create(tmp_path / "base.qcow2", size="1MiB").close()
        for where in (tmp_path, tmp_path / "missing.qcow2"):
            with pytest.raises(ImageError):
                self.CALLS[call](where, tmp_path)

    def test_allow_backing_must_be_paths(self, tmp_path: Path) -> None:
        """open(allow_backing=...) with non-paths is a ConfigError naming allow_backing."""
        images.create(tmp_path / "a.qcow2", size="1MiB").close()
        for bad in (None, 5, [None], [b"x"]):
            with pytest.raises(ConfigError, match="allow_backing"):
                images.open(tmp_path / "a.qcow2", allow_backing=bad)  # type: ignore[arg-type]


class TestCreateOptions:
    """images.create: sizes, formats and options."""

    @pytest.mark.parametrize("fmt", ["qcow2", "raw"])
    @pytest.mark.parametrize(
        "bad", [*NOT_INTS, -1, "lots", "1.5B"], ids=_ids([*NOT_INTS, -1, "lots", "1.5B"])
    )
    def test_bad_size(self, fmt: str, bad: Any, tmp_path: Path) -> None:
        """A size that is not a byte count is a ConfigError naming 'size'; no file is left."""
        if bad is None and fmt == "qcow2":
            bad = "x"  # None is valid for qcow2 with a backing file; tested elsewhere
        with pytest.raises(ConfigError, match="'size'"):
            images.create(tmp_path / "x", size=bad, format=fmt)  # type: ignore[arg-type]
        assert not (tmp_path / "x").exists()

    @pytest.mark.parametrize("fmt", ["qcow2", "raw"])
    def test_huge_size(self, fmt: str, tmp_path: Path) -> None:
        """2**70 bytes is refused with a VirtkitError naming the size, not an OverflowError."""
        with pytest.raises(VirtkitError, match="size"):
            images.create(tmp_path / "x", size=2**70, format=fmt)  # type: ignore[arg-type]

    @pytest.mark.parametrize("bad", ["qed", "", "QCOW2", 3, [], {}], ids=repr)
    def test_unknown_format(self, bad: Any, tmp_path: Path) -> None:
        """An unknown or unhashable format names the format (None: from the name, see
        test_format_agreement)."""
        with pytest.raises(UnsupportedFeatureError, match="format"):
            images.create(tmp_path / "x", size="1MiB", format=bad)
        with pytest.raises(UnsupportedFeatureError, match="format"):
            images.convert(tmp_path / "x", tmp_path / "y", format=bad)
        with pytest.raises(UnsupportedFeatureError, match="format"):
            images.measure(size="1MiB", format=bad)

    @pytest.mark.parametrize("fmt", ["qcow2", "raw"])
    def test_unknown_option(self, fmt: str, tmp_path: Path) -> None:
        """An unknown keyword option is a ConfigError naming it, not a TypeError."""
        with pytest.raises(ConfigError, match="bogus"):
            images.create(tmp_path / "x", size="1MiB", format=fmt, bogus=1)  # type: ignore[arg-type]
        assert not (tmp_path / "x").exists()

    @pytest.mark.parametrize("option", ["compat", "compression_type", "preallocation"])
    @pytest.mark.parametrize("bad", [[], {}, 1, True, b"1.1"], ids=repr)
    def test_string_options_must_be_strings(self, option: str, bad: Any, tmp_path: Path) -> None:
        """compat=[] and friends are a ConfigError naming the option (was: unhashable TypeError)."""
        with pytest.raises(ConfigError, match=option):
            images.create(tmp_path / "x", size="1MiB", **{option: bad})

    @pytest.mark.parametrize("bad", NOT_NAMES, ids=_ids(NOT_NAMES))
    def test_bad_backing_name(self, bad: Any, tmp_path: Path) -> None:
        """backing= must be a non-empty str (was: AttributeError on .encode)."""
        if bad is None:
            return  # None means "no backing file"
        with pytest.raises(ConfigError, match="backing"):
            images.create(tmp_path / "x", size="1MiB", backing=bad)

    @pytest.mark.parametrize("bad", ["", "a\0b", 1, [], b"raw"], ids=repr)
    def test_bad_backing_format(self, bad: Any, tmp_path: Path) -> None:
        """backing_format= must be a non-empty str."""
        images.create(tmp_path / "b.raw", size="1MiB", format="raw").close()
        with pytest.raises(ConfigError, match="backing_format"):
            images.create(tmp_path / "x", backing="b.raw", backing_format=bad)

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(size=garbage, cluster=garbage)
    def test_garbage_sizes_never_escape(self, tmp_path: Path, size: Any, cluster: Any) -> None:
        """Any garbage for size / cluster_size gives a VirtkitError or a valid image."""
        path = tmp_path / "h.qcow2"
        try:
            images.create(path, size=size, cluster_size=cluster).close()
        except VirtkitError:
            assert not path.exists()
        else:
            path.unlink()


class TestImageMethods:
    """Every Image method validates offsets, lengths, data and names."""

    METHODS: ClassVar[dict[str, Callable[[Image, Any], object]]] = {
        "read-offset": lambda i, v: i.read(v, 1),
        "read-length": lambda i, v: i.read(0, v),
        "write-offset": lambda i, v: i.write(v, b"x"),
        "write_zeroes-offset": lambda i, v: i.write_zeroes(v, 512),
        "write_zeroes-length": lambda i, v: i.write_zeroes(0, v),
        "discard-offset": lambda i, v: i.discard(v, 512),
        "discard-length": lambda i, v: i.discard(0, v),
        "block_status-offset": lambda i, v: list(i.block_status(v)),
        "block_status-length": lambda i, v: list(i.block_status(0, v)),
    }

    @pytest.mark.parametrize("call", list(METHODS))
    @pytest.mark.parametrize("bad", NOT_INTS, ids=_ids(NOT_INTS))
    def test_non_int_offset_or_length(self, img: Image, call: str, bad: Any) -> None:
        """A non-int offset or length is a ConfigError naming offset/length."""
        if call == "block_status-length" and bad is None:
            return  # None: to the end of the disk
        with pytest.raises(ConfigError) as info:
            self.METHODS[call](img, bad)
        _names_arg(info.value, "'offset'", "'length'")

    @pytest.mark.parametrize("call", list(METHODS))
    @pytest.mark.parametrize("bad", [-1, 2**63, 2**70, (1 << 20) + 1], ids=repr)
    def test_out_of_range(self, img: Image, call: str, bad: int) -> None:
        """Negative, huge or past-the-end offsets/lengths are an ImageError, nothing written."""
        with pytest.raises(ImageError):
            self.METHODS[call](img, bad)
        assert img.read(0, 512) == bytes(512)

    @pytest.mark.parametrize("bad", NOT_BYTES, ids=_ids(NOT_BYTES))
    def test_write_data_must_be_bytes_like(self, img: Image, bad: Any) -> None:
        """write(0, "text") and friends are a ConfigError naming 'data'."""
        with pytest.raises(ConfigError, match="'data'"):
            img.write(0, bad)
        assert img.read(0, 16) == bytes(16)

    def test_write_accepts_every_buffer(self, img: Image) -> None:
        """bytes, bytearray, memoryview and typed memoryviews are all written byte for byte."""
        data = memoryview(bytes(range(16))).cast("I")
        img.write(0, data)
        img.write(16, bytearray(b"ab"))
        assert img.read(0, 18) == bytes(range(16)) + b"ab"

    @pytest.mark.parametrize("bad", NOT_INTS, ids=_ids(NOT_INTS))
    def test_resize_bad_size(self, img: Image, bad: Any) -> None:
        """resize() with a non-size is a ConfigError naming 'size'."""
        with pytest.raises(ConfigError, match="'size'"):
            img.resize(bad)
        assert img.virtual_size == 1 << 20

    @pytest.mark.parametrize("big", [2**63, 2**70])
    def test_resize_huge(self, img: Image, big: int) -> None:
        """A size past what a file can hold is a VirtkitError, not an OverflowError."""
        with pytest.raises(VirtkitError, match="size"):
            img.resize(big)
        assert img.virtual_size == 1 << 20

    @pytest.mark.parametrize("bad", NOT_NAMES, ids=_ids(NOT_NAMES))
    def test_snapshot_names(self, img: Image, bad: Any) -> None:
        """Snapshot calls with non-names raise a VirtkitError (raw: no snapshots at all)."""
        for call in (img.create_snapshot, img.revert_snapshot, img.delete_snapshot):
            with pytest.raises(VirtkitError):
                call(bad)
        assert img.snapshots == ()

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(offset=garbage | st.integers(), length=garbage | st.integers(), data=garbage)
    def test_garbage_never_escapes(self, img: Image, offset: Any, length: Any, data: Any) -> None:
        """Any garbage to read/write/write_zeroes/discard/block_status is a VirtkitError or works."""
        for call in (
            lambda: img.read(offset, length),
            lambda: img.write(offset, data),
            lambda: img.write_zeroes(offset, length),
            lambda: img.discard(offset, length),
            lambda: list(img.block_status(offset, length)),
        ):
            with contextlib.suppress(VirtkitError):
                call()


class TestQcow2Extras:
    """write_compressed, set_backing_file, read_snapshot and snapshot names on qcow2."""

    def test_duplicate_and_unknown_snapshot(self, qimg: Any) -> None:
        """A taken name or an unknown name is an ImageError naming the snapshot."""
        with pytest.raises(ImageError, match="s1"):
            qimg.create_snapshot("s1")
        for call in (qimg.revert_snapshot, qimg.delete_snapshot):
            with pytest.raises(ImageError, match="nope"):
                call("nope")
        with pytest.raises(ImageError, match="nope"):
            qimg.read_snapshot("nope", 0, 1)

    @pytest.mark.parametrize("bad", NOT_NAMES, ids=_ids(NOT_NAMES))
    def test_create_snapshot_bad_name(self, qimg: Any, bad: Any) -> None:
        """create_snapshot(non-str) is a ConfigError naming 'name' (was: AttributeError)."""
        with pytest.raises(ConfigError, match="'name'"):
            qimg.create_snapshot(bad)
        assert [s.name for s in qimg.snapshots] == ["s1"]

    @pytest.mark.parametrize(
        "bad",
        [-1, 2**70, 1.5, "state", [1], object()],
        ids=_ids([-1, 2**70, 1.5, "state", [1], object()]),
    )
    def test_vm_state_must_be_bytes(self, qimg: Any, bad: Any) -> None:
        """vm_state= must be bytes-like; -1 was reported as 'malformed image metadata'."""
        with pytest.raises(ConfigError, match="vm_state"):
            qimg.create_snapshot("s2", vm_state=bad)
        assert [s.name for s in qimg.snapshots] == ["s1"]

    @pytest.mark.parametrize("bad", NOT_BYTES, ids=_ids(NOT_BYTES))
    def test_write_compressed_data(self, qimg: Any, bad: Any) -> None:
        """write_compressed(0, non-bytes) is a ConfigError naming 'data'."""
        with pytest.raises(ConfigError, match="'data'"):
            qimg.write_compressed(0, bad)

    @pytest.mark.parametrize("bad", NOT_INTS, ids=_ids(NOT_INTS))
    def test_write_compressed_offset(self, qimg: Any, bad: Any) -> None:
        """write_compressed(non-int, ...) is a ConfigError naming 'offset'."""
        with pytest.raises(ConfigError, match="'offset'"):
            qimg.write_compressed(bad, bytes(qimg.cluster_size))

    def test_write_compressed_unaligned(self, qimg: Any) -> None:
        """An unaligned or partial compressed write is an ImageError saying why."""
        with pytest.raises(ImageError, match="aligned cluster"):
            qimg.write_compressed(512, bytes(qimg.cluster_size))
        with pytest.raises(ImageError, match="aligned cluster"):
            qimg.write_compressed(0, bytes(100))

    @pytest.mark.parametrize("bad", NOT_INTS, ids=_ids(NOT_INTS))
    def test_read_snapshot_offsets(self, qimg: Any, bad: Any) -> None:
        """read_snapshot with a non-int offset or length is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="'offset'"):
            qimg.read_snapshot("s1", bad, 1)
        with pytest.raises(ConfigError, match="'length'"):
            qimg.read_snapshot("s1", 0, bad)

    @pytest.mark.parametrize("bad", NOT_NAMES, ids=_ids(NOT_NAMES))
    def test_read_snapshot_name(self, qimg: Any, bad: Any) -> None:
        """read_snapshot with a non-name is a ConfigError naming 'name'."""
        with pytest.raises(ConfigError, match="'name'"):
            qimg.read_snapshot(bad, 0, 1)

    @pytest.mark.parametrize("bad", NOT_NAMES, ids=_ids(NOT_NAMES))
    def test_set_backing_file_name(self, qimg: Any, bad: Any) -> None:
        """set_backing_file(non-str) is a ConfigError naming 'backing'; header untouched."""
        if bad is None:
            return  # None removes the backing file
        with pytest.raises(ConfigError, match="backing"):
            qimg.set_backing_file(bad)
        assert qimg.backing_file is None

    @pytest.mark.parametrize("bad", [1, [], b"raw", "", "a\0b"], ids=repr)
    def test_set_backing_file_format(self, qimg: Any, bad: Any) -> None:
        """set_backing_file(name, bad format) is a ConfigError naming backing_format."""
        with pytest.raises(ConfigError, match="backing_format"):
            qimg.set_backing_file("b.raw", bad)
        assert qimg.backing_file is None


class TestStateMisuse:
    """Closed and read-only images refuse every operation with an ImageError."""

    CALLS: ClassVar[dict[str, Callable[[Image], object]]] = {
        "read": lambda i: i.read(0, 1),
        "write": lambda i: i.write(0, b"x"),
        "write_zeroes": lambda i: i.write_zeroes(0, 512),
        "discard": lambda i: i.discard(0, 512),
        "block_status": lambda i: list(i.block_status()),
        "flush": lambda i: i.flush(),
        "resize": lambda i: i.resize("2MiB"),
        "info": lambda i: i.info(),
        "check": lambda i: i.check(),
        "snapshots": lambda i: i.snapshots,
        "create_snapshot": lambda i: i.create_snapshot("a"),
        "revert_snapshot": lambda i: i.revert_snapshot("a"),
        "delete_snapshot": lambda i: i.delete_snapshot("a"),
    }
    WRITES = (
        "write",
        "write_zeroes",
        "discard",
        "resize",
        "create_snapshot",
        "revert_snapshot",
        "delete_snapshot",
    )

    @pytest.mark.parametrize("call", list(CALLS))
    def test_after_close(self, img: Image, call: str) -> None:
        """Every call on a closed image is an ImageError (raw snapshots: unsupported)."""
        img.close()
        with pytest.raises(ImageError):
            self.CALLS[call](img)
        img.close()  # still idempotent

    @pytest.mark.parametrize("call", WRITES)
    def test_read_only(self, img: Image, call: str) -> None:
        """Every write on a read-only image is an ImageError and the file is unchanged."""
        path = img.path
        img.close()
        before = Path(path).read_bytes()
        with images.open(path) as ro, pytest.raises(ImageError):
            self.CALLS[call](ro)
        assert Path(path).read_bytes() == before

    def test_check_repair_read_only(self, img: Image) -> None:
        """check(repair=True) on a read-only qcow2 image is an ImageError."""
        path = img.path
        img.close()
        with images.open(path) as ro:
            if ro.format == "qcow2":
                with pytest.raises(ImageError, match="writable"):
                    ro.check(repair=True)


class TestSwitches:
    """Boolean switches take True or False only: writable="no" must not open for writing."""

    @pytest.mark.parametrize("bad", ["no", "", 0, 1, None, [], 1.0], ids=repr)
    def test_switches(self, img: Image, bad: Any, tmp_path: Path) -> None:
        """open/check/resize/convert/rebase/commit switches refuse non-bools, naming them."""
        path = img.path
        with pytest.raises(ConfigError, match="'repair'"):
            img.check(repair=bad)
        with pytest.raises(ConfigError, match="'shrink'"):
            img.resize("512K", shrink=bad)
        assert img.virtual_size == 1 << 20
        img.close()
        for name in ("writable", "force_share"):
            with pytest.raises(ConfigError, match=f"'{name}'"):
                images.open(path, **{name: bad})
        with pytest.raises(ConfigError, match="'compress'"):
            images.convert(path, tmp_path / "out", compress=bad)
        assert not (tmp_path / "out").exists()
        with pytest.raises(ConfigError, match="'unsafe'"):
            images.rebase(path, None, unsafe=bad)
        with pytest.raises(ConfigError, match="'drop'"):
            images.commit(path, drop=bad)
        assert Path(path).exists()


class TestConvertArguments:
    """convert / measure / rebase / commit arguments besides paths."""

    @pytest.fixture
    def base(self, tmp_path: Path) -> Path:
        with images.create(tmp_path / "base.qcow2", size="1MiB") as i:
            i.write(0, b"data")
        return tmp_path / "base.qcow2"

    @pytest.mark.parametrize("bad", [1, "x", b"x", True, [], {}], ids=repr)
    def test_progress_must_be_callable(self, base: Path, bad: Any) -> None:
        """progress= that is not callable is a ConfigError naming it; no output is left."""
        out = base.parent / "out.qcow2"
        with pytest.raises(ConfigError, match="progress"):
            images.convert(base, out, progress=bad)
        assert not out.exists()
        with pytest.raises(ConfigError, match="progress"):
            images.rebase(base, None, progress=bad)
        with pytest.raises(ConfigError, match="progress"):
            images.commit(base, progress=bad)

    def test_convert_onto_itself(self, base: Path) -> None:
        """Converting an image onto itself is a ConfigError naming dst."""
        with pytest.raises(ConfigError, match="dst"):
            images.convert(base, base)
        assert images.open(base).read(0, 4) == b"data"

    @pytest.mark.parametrize("bad", NOT_NAMES, ids=_ids(NOT_NAMES))
    def test_rebase_backing_name(self, base: Path, bad: Any) -> None:
        """rebase(image, non-name) is a ConfigError naming 'backing'."""
        if bad is None:
            return  # None removes the backing file
        with pytest.raises(ConfigError, match="backing"):
            images.rebase(base, bad)
        with pytest.raises(ConfigError, match="backing"):
            images.rebase(base, bad, unsafe=True)

    def test_commit_without_backing(self, base: Path) -> None:
        """commit() of an image without a backing file is an ImageError."""
        with pytest.raises(ImageError, match="backing"):
            images.commit(base)

    def test_measure_needs_exactly_one_source(self, base: Path) -> None:
        """measure() with neither or both of src and size is a ConfigError."""
        with pytest.raises(ConfigError):
            images.measure()
        with pytest.raises(ConfigError):
            images.measure(base, size="1MiB")


_HUGE_READ = """
import resource, sys
from virtkit import ImageError, images
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
with images.open(sys.argv[1]) as img:
    try:
        img.read(0, 2 << 30)
    except ImageError as exc:
        print("ImageError:", exc)
"""


class TestMemory:
    """A read bigger than the memory the process may use is an ImageError, not a MemoryError."""

    @pytest.mark.parametrize("fmt", ["qcow2", "raw"])
    def test_read_too_big_for_memory(self, fmt: str, tmp_path: Path) -> None:
        """read(0, 2 GiB) under a 1 GiB address-space limit says so (qcow2 called it corrupt)."""
        path = tmp_path / f"big.{fmt}"
        images.create(path, size="4GiB", format=fmt).close()
        proc = subprocess.run(
            [sys.executable, "-c", _HUGE_READ, str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("ImageError:") and "memory" in proc.stdout, proc.stdout
        assert "malformed" not in proc.stdout

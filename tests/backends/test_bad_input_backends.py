"""Bad arguments to Hypervisor, Guest and Console calls raise a VirtkitError naming them.

Run on the emulator (in-process, fast); the QEMU-only entry points are in
tests/backends/qemu/test_bad_input_qemu.py.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import virtkit
from virtkit import ConfigError, Disk, Guest, Hypervisor, Machine, State, StateError, VirtkitError
from virtkit.testing import guests

#: Never a timeout: wrong types, NaN, negative numbers.
BAD_TIMEOUTS: list[Any] = [
    True,
    "1",
    b"1",
    [],
    {},
    object(),
    math.nan,
    -1,
    -0.5,
    -math.inf,
    -(2**70),
]
#: Never a snapshot or guest name.
BAD_NAMES: list[Any] = [None, True, 0, 1.5, b"x", [], {}, object(), "", "a\0b"]
#: Never a folder path.
BAD_PATHS: list[Any] = [True, 0, -1, 1.5, math.nan, b"x", [], {}, "", "a\0b"]


def _ids(values: list[Any]) -> list[str]:
    return [repr(v)[:20] for v in values]


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Hypervisor]:
    """An emulator connection with its guests under tmp_path."""
    hyp = virtkit.connect("emulator", root=tmp_path / "guests")
    yield hyp
    hyp.close()


@pytest.fixture
def echo(hv: Hypervisor, tmp_path: Path) -> Iterator[Guest]:
    """A defined (shut off) emulator guest booting the echo test guest."""
    disk = guests.write_disk(tmp_path / "echo.raw", "echo")
    guest = hv.define(Machine(name="echo", memory="16MiB", disks=(Disk(str(disk), format="raw"),)))
    yield guest
    if guest.state is not State.SHUTOFF:
        guest.kill()


@pytest.fixture
def running(echo: Guest) -> Guest:
    """The echo guest, started and printing."""
    echo.start()
    echo.console.expect("echo", timeout=10)
    return echo


def _id(value: Any) -> str:
    """A test id that is the same in every process (a bare object's repr holds its address)."""
    return "object()" if type(value) is object else repr(value)


class TestConnect:
    """virtkit.connect validates the backend name and its options."""

    @pytest.mark.parametrize("bad", [None, 1, "", "vmware", [], {}, b"qemu"], ids=_id)
    def test_unknown_backend(self, bad: Any) -> None:
        """An unknown or wrongly typed backend name is a ConfigError."""
        with pytest.raises(VirtkitError):
            virtkit.connect(bad)

    def test_unknown_option(self) -> None:
        """An unknown keyword option is a ConfigError naming it, not a TypeError."""
        with pytest.raises(ConfigError, match="bogus"):
            virtkit.connect("emulator", bogus=1)

    @pytest.mark.parametrize("bad", BAD_PATHS, ids=_ids(BAD_PATHS))
    def test_bad_root(self, bad: Any) -> None:
        """root= that is not a path (a NUL byte included) is a ConfigError naming 'root'."""
        with pytest.raises(ConfigError, match="'root'"):
            virtkit.connect("emulator", root=bad)

    def test_root_is_a_file(self, tmp_path: Path) -> None:
        """root= naming a regular file is a ConfigError naming 'root'."""
        (tmp_path / "f").write_text("")
        with pytest.raises(ConfigError, match="root"):
            virtkit.connect("emulator", root=tmp_path / "f")

    @pytest.mark.parametrize("option", ["host", "policy", "clock"])
    @pytest.mark.parametrize("bad", [1, "x", [], object()], ids=_id)
    def test_bad_option_values(self, option: str, bad: Any, tmp_path: Path) -> None:
        """host=, policy=, clock= with a wrong value is a ConfigError naming the option."""
        with pytest.raises(ConfigError, match=option):
            virtkit.connect("emulator", root=tmp_path, **{option: bad})


class TestHypervisorCalls:
    """define / undefine / guest with bad arguments."""

    @pytest.mark.parametrize("bad", [None, "vm", {"name": "vm"}, 1, object()], ids=_id)
    def test_define_needs_a_machine(self, hv: Hypervisor, bad: Any) -> None:
        """define(non-Machine) is a ConfigError; nothing is defined."""
        with pytest.raises(ConfigError, match="Machine"):
            hv.define(bad)
        assert hv.guests == ()

    @pytest.mark.parametrize("bad", BAD_PATHS, ids=_ids(BAD_PATHS))
    def test_define_bad_folder(self, hv: Hypervisor, bad: Any) -> None:
        """define(folder=non-path) is a ConfigError naming 'folder'; nothing is defined."""
        with pytest.raises(ConfigError, match="'folder'"):
            hv.define(Machine(name="vm", memory="16MiB"), folder=bad)
        assert hv.guests == ()

    def test_define_duplicate_name(self, hv: Hypervisor, echo: Guest) -> None:
        """Defining a second guest with a taken name is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="echo"):
            hv.define(Machine(name="echo", memory="16MiB"))
        assert hv.guests == (echo,)

    @pytest.mark.parametrize("bad", [None, "echo", 1, [], object()], ids=_id)
    def test_undefine_needs_a_guest(self, hv: Hypervisor, echo: Guest, bad: Any) -> None:
        """undefine(non-Guest) is a ConfigError naming 'guest' (was: AttributeError)."""
        with pytest.raises(ConfigError, match="guest"):
            hv.undefine(bad)
        assert hv.guests == (echo,)

    @pytest.mark.parametrize("bad", BAD_NAMES, ids=_ids(BAD_NAMES))
    def test_guest_lookup(self, hv: Hypervisor, bad: Any) -> None:
        """hv.guest(non-name) is a ConfigError naming 'name' (was: unhashable TypeError)."""
        with pytest.raises(ConfigError, match="'name'"):
            hv.guest(bad)

    def test_closed_connection(self, tmp_path: Path) -> None:
        """define() on a closed connection is a StateError."""
        hyp = virtkit.connect("emulator", root=tmp_path / "g")
        hyp.close()
        with pytest.raises(StateError, match="closed"):
            hyp.define(Machine(name="vm", memory="16MiB"))


class TestTimeouts:
    """wait / shutdown / console.expect reject timeouts that are not seconds >= 0."""

    @pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=_ids(BAD_TIMEOUTS))
    def test_stopped_guest(self, echo: Guest, bad: Any) -> None:
        """A bad timeout is a ConfigError naming 'timeout', also on a stopped guest."""
        with pytest.raises(ConfigError, match="'timeout'"):
            echo.wait(timeout=bad)
        with pytest.raises(ConfigError, match="'timeout'"):
            echo.console.expect("x", timeout=bad)
        with pytest.raises(ConfigError, match="'timeout'"):
            echo.shutdown(timeout=bad)

    @pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=_ids(BAD_TIMEOUTS))
    def test_running_guest(self, running: Guest, bad: Any) -> None:
        """On a running guest a bad timeout (NaN used to hang) fails at once; it keeps running."""
        with pytest.raises(ConfigError, match="'timeout'"):
            running.wait(timeout=bad)
        with pytest.raises(ConfigError, match="'timeout'"):
            running.console.expect("never printed", timeout=bad)
        with pytest.raises(ConfigError, match="'timeout'"):
            running.shutdown(timeout=bad)
        assert running.state is State.RUNNING

    @pytest.mark.parametrize("huge", [math.inf, 2**70, 1e300], ids=_id)
    def test_huge_timeout_means_no_limit(self, running: Guest, huge: float) -> None:
        """inf, 2**70 and 1e300 wait without limit (no OverflowError): the match arrives."""
        running.console.write(b"z")
        match = running.console.expect(b"z", timeout=huge)
        assert match.group(0) == b"z"

    def test_zero_timeout_polls(self, running: Guest) -> None:
        """timeout=0 is valid: a pattern not there yet is a TimeoutError at once."""
        with pytest.raises(virtkit.TimeoutError):
            running.console.expect("never printed", timeout=0)
        with pytest.raises(virtkit.TimeoutError):
            running.wait(timeout=0)


class TestConsole:
    """console.expect patterns and console.write data."""

    @pytest.mark.parametrize(
        "bad",
        [None, 1, 1.5, [], {}, object(), True],
        ids=_ids([None, 1, 1.5, [], {}, object(), True]),
    )
    def test_expect_bad_pattern(self, running: Guest, bad: Any) -> None:
        """expect(non-pattern) is a ConfigError saying what it needs."""
        with pytest.raises(ConfigError, match="str, bytes or compiled regex"):
            running.console.expect(bad, timeout=1)

    @pytest.mark.parametrize(
        "bad",
        [None, 1, 2**70, 1.5, [104, 105], {}, object(), True],
        ids=_ids([None, 1, 2**70, 1.5, [104, 105], {}, object(), True]),
    )
    def test_write_bad_data(self, running: Guest, bad: Any) -> None:
        """write(non-bytes) is a ConfigError naming 'data'; nothing is sent."""
        before = running.console.output
        with pytest.raises(ConfigError, match="'data'"):
            running.console.write(bad)
        running.console.write(b"k")  # the echo guest echoes it (a 'q' would power it off)
        running.console.expect(b"k", timeout=10)
        assert b"104" not in running.console.output[len(before) :]

    def test_write_to_stopped_guest(self, echo: Guest) -> None:
        """write() to a guest that is not running is a StateError."""
        with pytest.raises(StateError):
            echo.console.write(b"x")

    def test_expect_compiled_regex(self, running: Guest) -> None:
        """A compiled str regex is searched in the decoded output."""
        running.console.write(b"k9")
        assert running.console.expect(re.compile(r"k(\d)"), timeout=10).group(1) == "9"


class TestGuestCalls:
    """Snapshots, lifecycle misuse and helpers with bad arguments."""

    @pytest.mark.parametrize("bad", BAD_NAMES, ids=_ids(BAD_NAMES))
    def test_snapshot_names(self, echo: Guest, bad: Any) -> None:
        """snapshot/revert/delete_snapshot with a non-name are a ConfigError naming 'name'."""
        with pytest.raises(ConfigError, match="'name'"):
            echo.snapshot(bad, memory=False)
        with pytest.raises(ConfigError, match="'name'"):
            echo.revert(bad)
        with pytest.raises(ConfigError, match="'name'"):
            echo.delete_snapshot(bad)
        assert echo.snapshots == ()

    @pytest.mark.parametrize("bad", ["no", 0, None, 1.0], ids=_id)
    def test_snapshot_memory_switch(self, running: Guest, bad: Any) -> None:
        """snapshot(memory="no") is a ConfigError (it was read as True: a full snapshot)."""
        with pytest.raises(ConfigError, match="'memory'"):
            running.snapshot("s", memory=bad)
        assert running.snapshots == ()

    def test_duplicate_and_unknown_snapshot(self, echo: Guest) -> None:
        """A taken snapshot name or an unknown one is a ConfigError naming it."""
        echo.snapshot("s1", memory=False)
        with pytest.raises(ConfigError, match="s1"):
            echo.snapshot("s1", memory=False)
        for call in (echo.revert, echo.delete_snapshot):
            with pytest.raises(ConfigError, match="nope"):
                call("nope")
        assert [s.name for s in echo.snapshots] == ["s1"]

    def test_full_snapshot_of_stopped_guest(self, echo: Guest) -> None:
        """memory=True on a shut-off guest is a StateError."""
        with pytest.raises(StateError, match="memory=False"):
            echo.snapshot("s", memory=True)

    def test_lifecycle_misuse(self, running: Guest, hv: Hypervisor) -> None:
        """start/resume on a running guest and undefine of a running guest are StateErrors."""
        for call in (running.start, running.resume, lambda: hv.undefine(running)):
            with pytest.raises(StateError):
                call()
        running.kill()
        for call in (running.kill, running.pause, running.reset, running.resume):
            with pytest.raises(StateError):
                call()

    @pytest.mark.parametrize("bad", [None, "disk.raw", 1, object()], ids=_id)
    def test_disk_path_needs_a_device(self, echo: Guest, bad: Any) -> None:
        """disk_path(non-Disk) is a ConfigError naming 'disk' (was: AttributeError)."""
        with pytest.raises(ConfigError, match="disk"):
            echo.disk_path(bad)

    @pytest.mark.parametrize("bad", BAD_NAMES, ids=_ids(BAD_NAMES))
    def test_snapshot_dir_name(self, echo: Guest, bad: Any) -> None:
        """snapshot_dir(non-name) is a ConfigError naming 'name'."""
        with pytest.raises(ConfigError, match="'name'"):
            echo.snapshot_dir(bad)

    @pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/abs/escape"])
    def test_snapshot_dir_stays_inside_the_folder(
        self, echo: Guest, name: str, tmp_path: Path
    ) -> None:
        """snapshot_dir() refuses names that leave snapshots/state/ (it used to mkdir them)."""
        target = tmp_path / "abs"
        with pytest.raises(ConfigError, match="'name'"):
            echo.snapshot_dir(name.replace("/abs", str(target)))
        assert not target.exists()
        assert not (echo.folder / "snapshots" / "escape").exists()
        assert not (echo.folder / "escape").exists()

    def test_screen_text_of_stopped_guest(self, echo: Guest) -> None:
        """The emulator's screen_text() works or raises a VirtkitError on a stopped guest."""
        try:
            text = echo.screen_text()  # type: ignore[attr-defined]
        except VirtkitError:
            return
        assert isinstance(text, str)

    @settings(
        max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        value=st.one_of(
            st.none(),
            st.booleans(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(),
            st.text(max_size=4),
            st.binary(max_size=4),
            st.lists(st.integers(), max_size=2),
        )
    )
    def test_garbage_never_escapes(self, echo: Guest, value: Any) -> None:
        """Any garbage to the stopped guest's calls is a VirtkitError or works."""
        for call in (
            lambda: echo.wait(timeout=value),
            lambda: echo.console.expect(value, timeout=0),
            lambda: echo.console.expect("x", timeout=value),
            lambda: echo.snapshot(value, memory=False),
            lambda: echo.revert(value),
            lambda: echo.delete_snapshot(value),
        ):
            with contextlib.suppress(VirtkitError):
                call()
        for snap in echo.snapshots:
            echo.delete_snapshot(snap.name)

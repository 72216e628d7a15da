"""Bad input to the top-level public API raises a VirtkitError naming what was wrong.

Covers the model classes, ``virtkit.load``/``virtkit.save``,
``virtkit.provision`` and the ``virtkit`` command. Images are in
tests/images/test_bad_input_images.py, hypervisors and guests in
tests/backends/test_bad_input_backends.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import virtkit
from virtkit import CloudInit, ConfigError, ImageError, Machine, VirtkitError, images, provision
from virtkit.cli import main

#: Garbage for any field: wrong types, NaN/inf, huge and negative numbers, NUL bytes.
GARBAGE: list[Any] = [
    None, True, 1.5, "x", b"x", -1, 2**70, math.nan, math.inf, -math.inf, "", "a\0b",
    [], {}, object(), ("x",), [1], {"a": 1},
]  # fmt: skip
#: A valid set of required arguments for each public model class.
REQUIRED: dict[str, dict[str, Any]] = {
    "Machine": {"name": "vm"},
    "Disk": {"path": "d.qcow2"},
    "Nic": {},
    "CdRom": {},  # path=None is an empty drive
    "Serial": {},
    "Snapshot": {"name": "s"},
    "CloudInit": {"user_data": "#cloud-config\n"},
    "CpuTopology": {},
    "HostResources": {"cpus": 4, "memory": 2**32, "storage": 2**40},
    "AllocationPolicy": {},
    "PortForward": {"host_port": 2222, "guest_port": 22},
    "KernelBoot": {"kernel": "vmlinuz"},
}
BAD_PATHS: list[Any] = [None, True, 0, -1, 1.5, math.nan, b"x", [], {}, "", "a\0b"]


def _ids(values: list[Any]) -> list[str]:
    return [repr(v)[:20] for v in values]


def _id(value: Any) -> str:
    """A test id that is the same in every process (a bare object's repr holds its address)."""
    return "object()" if type(value) is object else repr(value)


class TestModel:
    """Every model field rejects garbage with a ConfigError naming the field."""

    @pytest.mark.parametrize("cls", list(REQUIRED))
    def test_every_field_rejects_garbage_by_name(self, cls: str) -> None:
        """Each field given each garbage value is a ConfigError naming the field, or accepted."""
        kind = getattr(virtkit, cls)
        for field in attrs.fields(kind):
            for bad in GARBAGE:
                try:
                    obj = kind(**{**REQUIRED[cls], field.name: bad})
                except ConfigError as exc:
                    named = exc.field
                else:
                    assert attrs.evolve(obj) == obj  # an accepted value makes a usable object
                    continue
                assert named is not None and named.split("[")[0].split(".")[0] in (
                    field.name,
                    "cpus",  # CpuTopology checks the product under the machine's name
                ), f"{cls}.{field.name}={bad!r} names {named!r}"

    @pytest.mark.parametrize("cls", list(REQUIRED))
    def test_unknown_and_missing_arguments(self, cls: str) -> None:
        """An unknown keyword or a missing required field is a ConfigError naming it (was TypeError)."""
        kind = getattr(virtkit, cls)
        with pytest.raises(ConfigError, match="bogus") as info:
            kind(**REQUIRED[cls], bogus=1)
        assert info.value.field == "bogus"
        with pytest.raises(ConfigError, match="bogus"):
            attrs.evolve(kind(**REQUIRED[cls]), bogus=1)
        for name in REQUIRED[cls]:
            partial = {k: v for k, v in REQUIRED[cls].items() if k != name}
            with pytest.raises(ConfigError, match=name) as info:
                kind(**partial)
            assert info.value.field == name

    def test_too_many_positional_arguments(self) -> None:
        """Too many positional arguments is a ConfigError naming the class."""
        with pytest.raises(ConfigError, match="PortForward"):
            virtkit.PortForward(1, 2, "tcp", "127.0.0.1", "extra")  # type: ignore[call-arg]

    @pytest.mark.parametrize("bad", GARBAGE, ids=_ids(GARBAGE))
    def test_boot_must_be_a_list(self, bad: Any) -> None:
        """Machine(boot=non-list) is a ConfigError naming 'boot' (was: TypeError not iterable)."""
        if bad in ([], ("x",)):
            return  # [] is valid; ("x",) is a list naming an unknown device, tested below
        with pytest.raises(ConfigError, match="boot"):
            Machine(name="vm", boot=bad)

    def test_boot_unknown_device(self) -> None:
        """A boot entry naming no device is a ConfigError naming boot[0]."""
        with pytest.raises(ConfigError, match=r"boot\[0\]"):
            Machine(name="vm", boot=["vda"])

    @pytest.mark.parametrize("field", ["disks", "cdroms", "nics"])
    @pytest.mark.parametrize("bad", GARBAGE, ids=_ids(GARBAGE))
    def test_device_lists_reject_garbage_items(self, field: str, bad: Any) -> None:
        """A device list holding garbage is a ConfigError naming the list."""
        with pytest.raises(ConfigError, match=field):
            Machine(name="vm", **{field: [bad]})

    @settings(max_examples=50, deadline=None)
    @given(
        value=st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=8),
            st.binary(max_size=4),
            st.lists(st.text(max_size=3), max_size=2),
        ),
        field=st.sampled_from(["name", "cpus", "memory", "firmware", "uuid", "labels", "arch"]),
    )
    def test_machine_garbage_never_escapes(self, value: Any, field: str) -> None:
        """Machine(**{field: garbage}) is a Machine or a ConfigError naming that field."""
        try:
            Machine(**{"name": "vm", field: value})
        except ConfigError as exc:
            error = exc
        else:
            return
        assert error.field is not None and error.field.startswith(field)


class TestBundle:
    """virtkit.load / virtkit.save with bad folders."""

    @pytest.mark.parametrize("bad", BAD_PATHS, ids=_ids(BAD_PATHS))
    def test_bad_folder(self, bad: Any) -> None:
        """A folder that is not a path is a ConfigError naming 'folder' (was: TypeError)."""
        with pytest.raises(ConfigError, match="'folder'"):
            virtkit.load(bad)
        with pytest.raises(ConfigError, match="'folder'"):
            virtkit.save(Machine(name="vm"), bad)

    @pytest.mark.parametrize("bad", [None, 5, "single/path", [None], [b"x"]], ids=_id)
    def test_bad_allow(self, bad: Any, tmp_path: Path) -> None:
        """allow= must be a list of paths; a single path or garbage is a ConfigError."""
        with pytest.raises(ConfigError, match="'allow'"):
            virtkit.save(Machine(name="vm"), tmp_path / "vm", allow=bad)
        assert not (tmp_path / "vm").exists()

    def test_save_needs_a_machine(self, tmp_path: Path) -> None:
        """save(non-Machine) is a ConfigError; nothing is written."""
        with pytest.raises(ConfigError, match="Machine"):
            virtkit.save({"name": "vm"}, tmp_path / "vm")  # type: ignore[arg-type]
        assert not (tmp_path / "vm").exists()

    def test_folder_is_a_file_or_missing(self, tmp_path: Path) -> None:
        """load() of a file or a missing folder, save() into a file: ConfigError."""
        (tmp_path / "f").write_text("")
        for where in (tmp_path / "f", tmp_path / "missing", tmp_path):
            with pytest.raises(ConfigError):
                virtkit.load(where)
        with pytest.raises(ConfigError):
            virtkit.save(Machine(name="vm"), tmp_path / "f")


class TestProvision:
    """virtkit.provision entry points with bad arguments."""

    MACHINE = Machine(name="vm", cloud_init=CloudInit(user_data="#cloud-config\n"))

    @pytest.mark.parametrize("bad", GARBAGE, ids=_ids(GARBAGE))
    def test_machine_argument(self, bad: Any, tmp_path: Path) -> None:
        """A non-Machine is a ConfigError naming 'machine' (was: AttributeError)."""
        for call in (
            lambda: provision.default_meta_data(bad),
            lambda: provision.seed_files(bad),
            lambda: provision.write_seed_iso(bad, tmp_path / "seed.iso"),
        ):
            with pytest.raises(ConfigError, match="'machine'"):
                call()
        assert not (tmp_path / "seed.iso").exists()

    @pytest.mark.parametrize("bad", [True, 1, "x", {}, object()], ids=_id)
    def test_cloud_init_argument(self, bad: Any) -> None:
        """seed_files(cloud_init=non-CloudInit) is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="cloud_init"):
            provision.seed_files(self.MACHINE, bad)

    @pytest.mark.parametrize("bad", [None, [], "user-data", 1, object()], ids=_id)
    def test_files_must_be_a_dict(self, bad: Any) -> None:
        """build_seed_iso(non-dict) is a ConfigError naming 'files'."""
        with pytest.raises(ConfigError, match="'files'"):
            provision.build_seed_iso(bad)

    @pytest.mark.parametrize("bad", [None, "text", 1, [], {}], ids=_id)
    def test_file_contents_must_be_bytes(self, bad: Any) -> None:
        """A seed file whose content is not bytes is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="user-data"):
            provision.build_seed_iso({"user-data": bad})

    def test_unknown_seed_file(self) -> None:
        """A file NoCloud does not read is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="vendor-data"):
            provision.build_seed_iso({"vendor-data": b"x"})

    @pytest.mark.parametrize("bad", BAD_PATHS, ids=_ids(BAD_PATHS))
    def test_bad_path(self, bad: Any) -> None:
        """write_seed_iso(machine, non-path) is a ConfigError naming 'path'."""
        with pytest.raises(ConfigError, match="'path'"):
            provision.write_seed_iso(self.MACHINE, bad)

    def test_path_is_a_directory(self, tmp_path: Path) -> None:
        """Writing the seed over a directory is an ImageError; the directory stays."""
        (tmp_path / "d").mkdir()
        with pytest.raises(ImageError):
            provision.write_seed_iso(self.MACHINE, tmp_path / "d")
        assert (tmp_path / "d").is_dir()

    def test_machine_without_cloud_init(self, tmp_path: Path) -> None:
        """A machine without cloud_init is a ConfigError naming cloud_init."""
        with pytest.raises(ConfigError, match="cloud_init"):
            provision.write_seed_iso(Machine(name="vm"), tmp_path / "s.iso")


class TestCli:
    """The virtkit command turns bad input into exit status 1 (or 2 for usage) with a message."""

    def _run(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
        status = main(argv)
        return status, capsys.readouterr().err

    def test_errors_name_the_problem(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Bad paths, sizes and options exit 1 with 'virtkit: error:' naming what was wrong."""
        q = tmp_path / "a.qcow2"
        images.create(q, size="1MiB").close()
        cases = {
            ("image", "info", "a\0b"): "NUL",
            ("image", "info", ""): "'path'",
            ("image", "info", str(tmp_path)): "Is a directory",
            ("image", "create", str(tmp_path / "x"), "lots"): "'size'",
            ("image", "create", str(tmp_path / "x"), "1M", "-o", "bogus=1"): "bogus",
            ("image", "create", str(tmp_path / "x"), "1M", "-o", "compat=on"): "compat",
            ("image", "create", str(tmp_path / "x"), "1M", "-o", "lazy_refcounts=maybe"): "lazy_refcounts",
            ("image", "create", str(tmp_path / "x"), "1M", "-b", ""): "backing",
            ("image", "convert", str(q), ""): "'dst'",
            ("image", "snapshot", str(q), "-a", "nope"): "nope",
            ("vm", "show", str(q)): "not a folder",
            ("vm", "run", str(tmp_path), "--backend", "bogus"): "",
        }  # fmt: skip
        for argv, fragment in cases.items():
            status, err = self._run(list(argv), capsys)
            assert status == 1, argv
            assert err.startswith("virtkit: error:") and fragment in err, (argv, err)
        assert not (tmp_path / "x").exists()

    def test_empty_snapshot_name_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`snapshot -c ""` is an error (it used to do nothing and exit 0)."""
        q = tmp_path / "a.qcow2"
        images.create(q, size="1MiB").close()
        for flag in ("-c", "-a", "-d"):
            status, err = self._run(["image", "snapshot", str(q), flag, ""], capsys)
            assert status == 1, (flag, err)
            assert err.startswith("virtkit: error:"), (flag, err)
            assert "'name'" in err or "snapshot" in err, (flag, err)
        assert images.open(q).snapshots == ()

    @pytest.mark.parametrize("value", ["nan", "-1"])
    def test_vm_run_bad_timeout(
        self, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--timeout nan (which never expired) and negative timeouts exit 1 before booting."""
        virtkit.save(Machine(name="vm", memory="16MiB"), tmp_path / "vm")
        status, err = self._run(["vm", "run", str(tmp_path / "vm"), "--timeout", value], capsys)
        assert status == 1 and "--timeout" in err

    def test_usage_errors_exit_2(self) -> None:
        """Missing arguments and invalid choices are usage errors (exit 2)."""
        for argv in ([], ["bogus"], ["image", "info"], ["vm", "run", "x", "--timeout", "abc"]):
            assert main(argv) == 2, argv

    def test_missing_file_from_a_real_process(self, tmp_path: Path) -> None:
        """The installed command reports a missing file as an error, exit 1, no traceback."""
        proc = subprocess.run(
            [sys.executable, "-m", "virtkit.cli", "image", "info", str(tmp_path / "missing")],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr and "missing" in proc.stderr


class TestOnlyVirtkitErrors:
    """A broad sweep: garbage to each module-level entry point raises only VirtkitErrors."""

    @settings(max_examples=60, deadline=None)
    @given(
        value=st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(),
            st.text(max_size=6),
            st.binary(max_size=6),
            st.lists(st.none(), max_size=2),
        )
    )
    def test_entry_points(self, value: Any) -> None:
        """connect/load/save/probe_format/open/measure/provision with garbage: VirtkitError only."""
        for call in (
            lambda: virtkit.connect(value),
            lambda: virtkit.load(value),
            lambda: images.probe_format(value),
            lambda: images.open(value),
            lambda: images.measure(size=value),
            lambda: provision.seed_files(value),
        ):
            try:
                result = call()
            except VirtkitError:
                continue
            if isinstance(result, (images.Image, virtkit.Hypervisor)):
                result.close()  # a garbage string that names an existing file or backend

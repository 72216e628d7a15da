"""A VM as its folder of files: exact round trips and hostile folders."""

from __future__ import annotations

import os
import string
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import virtkit
from virtkit import CdRom, CloudInit, CpuTopology, Disk, Machine, Nic, PortForward, Serial

labels = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=10)
text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30
)
names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
paths = st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\.(qcow2|raw|img)\Z")
sizes = st.one_of(st.none(), st.integers(1, 2**20).map(lambda n: n * 512))


@st.composite
def machines(draw: st.DrawFn) -> Machine:
    disk_paths = draw(st.lists(paths, max_size=4, unique=True))
    disks = [
        Disk(
            path=p,
            size=draw(sizes),
            bus=draw(st.sampled_from(["virtio", "ide", "sata", "scsi"])),
            read_only=draw(st.booleans()),
            cache=draw(st.sampled_from(["writeback", "none", "unsafe"])),
            discard=draw(st.sampled_from(["ignore", "unmap"])),
        )
        for p in disk_paths
    ]
    # a host port is forwarded once per machine (QEMU refuses two rules on one port)
    host_ports = iter(draw(st.lists(st.integers(1, 65535), max_size=4, unique=True)))
    nics = [
        Nic(
            model=draw(st.sampled_from(["virtio", "e1000"])),
            forwards=[
                PortForward(port, draw(st.integers(1, 65535)))
                for port in [next(host_ports, 0) for _ in range(draw(st.integers(0, 2)))]
                if port
            ],
        )
        for _ in range(draw(st.integers(0, 2)))
    ]
    cdroms = [CdRom(path=f"seed{i}.iso") for i in range(draw(st.integers(0, 2)))]
    cpus = draw(
        st.one_of(
            st.integers(1, 16),
            st.builds(CpuTopology, st.integers(1, 2), st.integers(1, 4), st.integers(1, 2)),
        )
    )
    m = Machine(
        name=draw(names),
        cpus=cpus,
        memory=draw(st.integers(1, 2**14)) * 1024**2,
        firmware=draw(st.sampled_from(["bios", "uefi"])),
        machine_type=draw(st.sampled_from(["pc", "q35"])),
        disks=disks,
        cdroms=cdroms,
        nics=nics,
        serial=Serial(
            enabled=draw(st.booleans()), log=draw(st.one_of(st.none(), st.just("console.log")))
        ),
        cloud_init=draw(
            st.one_of(st.none(), st.builds(CloudInit, text, st.one_of(st.none(), text)))
        ),
        labels=draw(st.dictionaries(labels, text, max_size=3)),
    )
    devices = list(m.device_names())
    boot = draw(st.lists(st.sampled_from(devices), unique=True, max_size=3)) if devices else []
    return attrs.evolve(m, boot=boot)


class TestRoundTrip:
    def test_issue_example(self, tmp_path: Path) -> None:
        """save() writes machine.toml, disks/ and snapshots/; load() gives the same machine."""
        m = Machine(name="web", cpus=2, memory="1GiB", disks=[Disk(path="root.raw", size="4GiB")])
        virtkit.save(m, tmp_path / "web")
        assert (tmp_path / "web" / "machine.toml").is_file()
        assert (tmp_path / "web" / "snapshots").is_dir()
        assert (tmp_path / "web" / "disks" / "root.raw").stat().st_size == 4 * 1024**3
        assert virtkit.load(tmp_path / "web") == m
        text = (tmp_path / "web" / "machine.toml").read_text()
        assert text.startswith("format-version = 2\n")
        assert 'memory = "1GiB"' in text

    @settings(
        max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(machine=machines())
    def test_hypothesis_round_trip(self, machine: Machine, tmp_path: Path) -> None:
        """load(save(m)) == m for generated machines."""
        folder = tmp_path / machine.name
        virtkit.save(machine, folder, create_disks=False)
        assert virtkit.load(folder) == machine

    def test_relocatable(self, tmp_path: Path) -> None:
        """A saved folder moved elsewhere loads the same and resolves its disks inside."""
        m = Machine(name="vm", disks=[Disk(path="root.raw", size="1MiB")])
        virtkit.save(m, tmp_path / "a")
        os.rename(tmp_path / "a", tmp_path / "b")
        assert virtkit.load(tmp_path / "b") == m

    def test_resave_is_atomic_replace(self, tmp_path: Path) -> None:
        """Saving again replaces machine.toml and leaves no temp file behind."""
        m = Machine(name="vm")
        virtkit.save(m, tmp_path)
        m2 = Machine(name="vm", uuid=m.uuid, memory="1GiB")
        virtkit.save(m2, tmp_path)
        assert virtkit.load(tmp_path) == m2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disks", "machine.toml", "snapshots"]


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "machine.toml").write_text(text)
    return folder


GOOD = 'format-version = 1\nname = "vm"\nuuid = "7d3c1b52-45c6-4a5c-a4e6-3c9a0e0f3a11"\n'


class TestBadFolders:
    """Each bad folder raises ConfigError naming the file and the key."""

    def test_missing_file(self, tmp_path: Path) -> None:
        """A folder without machine.toml."""
        with pytest.raises(virtkit.ConfigError, match=r"machine\.toml is missing") as info:
            virtkit.load(tmp_path)
        assert info.value.file is not None

    def test_not_a_folder(self, tmp_path: Path) -> None:
        """A path that is no folder."""
        with pytest.raises(virtkit.ConfigError, match="is not a folder"):
            virtkit.load(tmp_path / "nope")

    @pytest.mark.parametrize(
        ("text", "message", "field"),
        [
            ("name = [", "is not valid TOML", None),
            ('name = "vm"\n', "required key 'format-version' is missing", "format-version"),
            (
                'format-version = 3\nname = "vm"\n',
                "'format-version' is 3, newer than this virtkit understands",
                "format-version",
            ),
            (
                'format-version = "1"\nname = "vm"\n',
                "'format-version' must be a positive integer",
                "format-version",
            ),
            (GOOD + "colour = 1\n", "unknown key(s) colour", None),
            (GOOD.replace('"vm"', "5"), "must be str (got int 5)", "name"),
            (GOOD + "memory = true\n", "'memory' must be a size, not a bool", "memory"),
            (
                GOOD + "memory = 99999999999999999999\n",
                "'memory' must be from 1 MiB to 16 TiB",
                "memory",
            ),
            (GOOD + "cpus = 1.5\n", "must be int (got float 1.5)", "cpus"),
            (
                GOOD + '[[disks]]\npath = "a.qcow2"\nbus = "floppy"\n',
                "'bus' must be one of",
                "disks[0]",
            ),
            (
                GOOD + '[[disks]]\npath = "a.qcow2"\nwheels = 4\n',
                "unknown key(s) wheels",
                "disks[0]",
            ),
            (GOOD + '[[disks]]\nsize = "1GiB"\n', "required key 'path' is missing", "disks[0]"),
        ],
    )
    def test_bad_content(self, tmp_path: Path, text: str, message: str, field: str | None) -> None:
        """Malformed TOML, unknown keys, wrong types, newer versions."""
        folder = _write(tmp_path / "vm", text)
        with pytest.raises(virtkit.ConfigError) as info:
            virtkit.load(folder)
        assert message in str(info.value)
        assert info.value.file == str(folder / "machine.toml")
        if field is not None:
            assert info.value.field is not None
            assert info.value.field.startswith(field)

    @pytest.mark.parametrize("path", ["../../etc/shadow", "/etc/shadow", "sub/../../../x.qcow2"])
    def test_disk_path_escapes(self, tmp_path: Path, path: str) -> None:
        """A disk path that leaves the folder is refused on load."""
        folder = _write(tmp_path / "vm", GOOD + f'[[disks]]\npath = "{path}"\n')
        with pytest.raises(virtkit.ConfigError, match="points outside the VM folder") as info:
            virtkit.load(folder)
        assert info.value.field == "disks[0].path"

    def test_allowed_outside_path(self, tmp_path: Path) -> None:
        """An absolute disk path loads when the caller allows its location."""
        shared = tmp_path / "shared"
        shared.mkdir()
        folder = _write(tmp_path / "vm", GOOD + f'[[disks]]\npath = "{shared}/base.qcow2"\n')
        assert virtkit.load(folder, allow=[shared]).disks[0].path == f"{shared}/base.qcow2"

    def test_symlink_escape(self, tmp_path: Path) -> None:
        """A disk that is a symlink to a file outside the folder is refused."""
        folder = _write(tmp_path / "vm", GOOD + '[[disks]]\npath = "root.raw"\n')
        (folder / "disks").mkdir()
        secret = tmp_path / "secret.raw"
        secret.write_bytes(b"x" * 512)
        (folder / "disks" / "root.raw").symlink_to(secret)
        with pytest.raises(virtkit.ConfigError, match="points outside the VM folder"):
            virtkit.load(folder)

    def test_config_symlink_escape(self, tmp_path: Path) -> None:
        """machine.toml itself linking outside the folder is refused."""
        outside = tmp_path / "evil.toml"
        outside.write_text(GOOD)
        (tmp_path / "vm").mkdir()
        (tmp_path / "vm" / "machine.toml").symlink_to(outside)
        with pytest.raises(virtkit.ConfigError, match="link to a file outside"):
            virtkit.load(tmp_path / "vm")

    def test_backing_escape(self, tmp_path: Path) -> None:
        """A backing file escaping the folder is refused."""
        folder = _write(
            tmp_path / "vm", GOOD + '[[disks]]\npath = "a.qcow2"\nbacking = "../../../etc/passwd"\n'
        )
        with pytest.raises(virtkit.ConfigError, match="points outside") as info:
            virtkit.load(folder)
        assert info.value.field == "disks[0].backing"

    def test_huge_file(self, tmp_path: Path) -> None:
        """A machine.toml of megabytes is refused before parsing."""
        folder = _write(tmp_path / "vm", GOOD + "# " + "x" * (2 * 1024 * 1024) + "\n")
        with pytest.raises(virtkit.ConfigError, match="larger than"):
            virtkit.load(folder)

    def test_save_refuses_escaping_paths(self, tmp_path: Path) -> None:
        """save() refuses a relative disk path that climbs out of the folder."""
        m = Machine(name="vm", disks=[Disk(path="../../x.qcow2")])
        with pytest.raises(virtkit.ConfigError, match="points outside"):
            virtkit.save(m, tmp_path / "vm")
        assert not (tmp_path / "vm" / "machine.toml").exists()

"""Bundle format 2: v1 upgrade (with qemu-layers.json), hand edits kept, stable identity."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from test_bundle import machines

import virtkit
from virtkit import (
    CdRom,
    CloudInit,
    ConfigError,
    Disk,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    Snapshot,
    bundle,
    images,
)
from virtkit.bundle.upgrade import LEGACY_LAYERS

MIB = 1024**2
V1_UUID = "7d3c1b52-45c6-4a5c-a4e6-3c9a0e0f3a11"


def _v1_folder(folder: Path, original: Path) -> None:
    """A folder as the version-1 qemu backend left it after snapshots, copied from ``original``.

    Chain: root.qcow2 <- root.s1.qcow2 (holds full snapshot 'f1') <- root.s2.qcow2 (active);
    the disk-only snapshot 'd1' froze root.qcow2. The JSON names ``original``'s files.
    """
    disks = folder / "disks"
    disks.mkdir(parents=True)
    (folder / "snapshots").mkdir()
    with images.create(disks / "root.qcow2", "1MiB") as img:
        img.write(0, b"base")
    for name, below, data in (
        ("root.s1.qcow2", "root.qcow2", b"lay1"),
        ("root.s2.qcow2", "root.s1.qcow2", b"lay2"),
    ):
        with images.create(disks / name, backing=below, backing_format="qcow2") as img:
            img.write(0, data)
    with images.create(disks / "data.raw", "1MiB", "raw"):
        pass
    (folder / "machine.toml").write_text(
        "# a version-1 machine\n"
        "format-version = 1\n"
        'name = "old"\n'
        f'uuid = "{V1_UUID}"\n'
        'memory = "100MB"  # QEMU ran this as 96 MiB\n'
        '\n[[disks]]\npath = "root.qcow2"\nsize = "1MiB"\n'
        '\n[[disks]]\npath = "data.raw"\n'
    )
    (folder / "snapshots" / "_index.toml").write_text(
        'format-version = 1\ncurrent = "f1"\n\n'
        '[[snapshot]]\nname = "d1"\nkind = "disk"\nstate = "shutoff"\n'
        "created-at = 2026-01-01T00:00:00Z\n\n"
        '[[snapshot]]\nname = "f1"\nkind = "full"\nstate = "running"\n'
        'created-at = 2026-01-02T00:00:00Z\nparent = "d1"\n'
    )
    od = original / "disks"
    (folder / LEGACY_LAYERS).write_text(
        json.dumps(
            {
                "active": {"vda": str(od / "root.s2.qcow2")},
                "frozen": {"d1": {"vda": str(od / "root.qcow2")}},
                "full": {"f1": {"vda": str(od / "root.s1.qcow2")}},
                "counter": 2,
            }
        )
    )


class TestUpgradeFromV1:
    def test_load_upgrades_in_memory(self, tmp_path: Path) -> None:
        """A v1 folder loads as v2: layers from the JSON chain, memory as QEMU ran it; nothing written."""
        folder = tmp_path / "copy"
        _v1_folder(folder, tmp_path / "original-elsewhere")
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        m = virtkit.load(folder)
        assert m.disks[0].layers == ("root.s1.qcow2", "root.s2.qcow2")
        assert m.disks[0].active == "root.s2.qcow2"
        assert m.disks[1].layers == ()
        assert m.memory == 96 * MIB
        snaps = {s.name: s for s in bundle.load_snapshots(folder)}
        assert snaps["d1"].layers == {"vda": "root.qcow2"}
        assert snaps["f1"].layers == {"vda": "root.s1.qcow2"}
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before

    def test_identity_write_back_is_a_whole_upgrade(self, tmp_path: Path) -> None:
        """A v1 folder without a uuid: the load that writes the uuid back writes the folder
        as version 2 (index, machine.toml, then the JSON removed); the next load agrees."""
        folder = tmp_path / "vm"
        _v1_folder(folder, folder)
        config = folder / "machine.toml"
        config.write_text(config.read_text().replace(f'uuid = "{V1_UUID}"\n', ""))
        first = virtkit.load(folder)
        assert not (folder / LEGACY_LAYERS).exists()
        assert tomllib.loads(config.read_text())["format-version"] == 2
        assert tomllib.loads(config.read_text())["uuid"] == str(first.uuid)
        assert virtkit.load(folder) == first
        assert first.disks[0].layers == ("root.s1.qcow2", "root.s2.qcow2")
        snaps = {s.name: s.layers for s in bundle.load_snapshots(folder)}
        assert snaps == {"d1": {"vda": "root.qcow2"}, "f1": {"vda": "root.s1.qcow2"}}

    def test_save_writes_v2_and_drops_the_json(self, tmp_path: Path) -> None:
        """save() writes machine.toml and the index as version 2, keeps the comment, removes the JSON."""
        folder = tmp_path / "vm"
        _v1_folder(folder, folder)  # the JSON names this folder's own files
        m = virtkit.load(folder)
        snaps = bundle.load_snapshots(folder)
        virtkit.save(m, folder)
        assert not (folder / LEGACY_LAYERS).exists()
        text = (folder / "machine.toml").read_text()
        assert text.startswith("# a version-1 machine\nformat-version = 2\n")
        doc = tomllib.loads(text)
        assert doc["disks"][0]["layers"] == ["root.s1.qcow2", "root.s2.qcow2"]
        index = tomllib.loads((folder / "snapshots" / "_index.toml").read_text())
        assert index["format-version"] == 2
        assert index["current"] == "f1"
        # read back, by this process and by a fresh one
        assert virtkit.load(folder) == m
        assert bundle.load_snapshots(folder) == snaps
        assert bundle.current_snapshot(folder) == "f1"
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import virtkit,sys; m=virtkit.load(sys.argv[1]); print(m.disks[0].active, m.memory)",
                str(folder),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split() == ["root.s2.qcow2", str(96 * MIB)]

    def test_layer_bytes_seen_through_the_chain(self, tmp_path: Path) -> None:
        """The upgraded active layer opened with virtkit.images shows the top layer's bytes."""
        folder = tmp_path / "vm"
        _v1_folder(folder, tmp_path / "elsewhere")
        m = virtkit.load(folder)
        with images.open(bundle.resolve_disk(folder, m.disks[0].active)) as img:
            assert img.read(0, 4) == b"lay2"
        frozen = bundle.load_snapshots(folder)[0].layers["vda"]
        with images.open(bundle.resolve_disk(folder, frozen)) as img:
            assert img.read(0, 4) == b"base"

    @pytest.mark.parametrize(
        ("doc", "message"),
        [
            ("[", "not valid JSON"),
            ("[]", "must hold a JSON object"),
            ('{"active": {"vda": 5}}', "must map disk targets to file paths"),
            ('{"active": {"vda": "/x/disks/missing.qcow2"}}', "does not exist"),
            ('{"active": {"vda": "../../etc/passwd"}}', "points outside the VM folder"),
        ],
    )
    def test_bad_json(self, tmp_path: Path, doc: str, message: str) -> None:
        """A malformed or hostile qemu-layers.json is a ConfigError naming the file."""
        folder = tmp_path / "vm"
        _v1_folder(folder, folder)
        (folder / LEGACY_LAYERS).write_text(doc)
        with pytest.raises(ConfigError, match=message) as info:
            virtkit.load(folder)
        assert info.value.file is not None and info.value.file.endswith(LEGACY_LAYERS)

    def test_chain_that_does_not_reach_the_base(self, tmp_path: Path) -> None:
        """A JSON active layer whose backing chain does not lead to the disk's file is refused."""
        folder = tmp_path / "vm"
        _v1_folder(folder, folder)
        with images.create(folder / "disks" / "stray.qcow2", "1MiB"):
            pass
        (folder / LEGACY_LAYERS).write_text(
            json.dumps({"active": {"vda": str(folder / "disks" / "stray.qcow2")}})
        )
        with pytest.raises(ConfigError, match="has no backing file"):
            virtkit.load(folder)

    def test_v2_keys_in_a_v1_file(self, tmp_path: Path) -> None:
        """'layers' in a format-version 1 file is refused (it cannot have been written by v1)."""
        folder = tmp_path / "vm"
        folder.mkdir()
        (folder / "machine.toml").write_text(
            f'format-version = 1\nname = "a"\nuuid = "{V1_UUID}"\n'
            '[[disks]]\npath = "a.qcow2"\nlayers = ["b.qcow2"]\n'
        )
        with pytest.raises(ConfigError, match="need format-version = 2"):
            virtkit.load(folder)


HAND_WRITTEN = '''\
# web server: edited by hand
format-version = 2
name = "web"       # the DNS name
memory = "1G"      # written my way
cpus = 2

# the system disk
[[disks]]
path = "root.qcow2"  # keep this
size = "4GiB"

# a scratch disk
[[disks]]
path = "scratch.raw"
bus = "virtio"       # explicit default, kept

[[nics]]
forwards = [{host-port = 8080, guest-port = 80}]

[cloud-init]
user-data = """
#cloud-config
runcmd:
  - echo "hi" > /tmp/x
"""
'''


class TestHandEditable:
    def test_comments_and_order_survive_load_change_save(self, tmp_path: Path) -> None:
        """load -> change -> save keeps every comment and key order; only changes are written."""
        (tmp_path / "machine.toml").write_text(HAND_WRITTEN)
        m = virtkit.load(tmp_path)
        changed = attrs.evolve(
            m,
            cpus=4,
            disks=[attrs.evolve(m.disks[0], layers=["root.s1.qcow2"]), m.disks[1]],
            kernel=KernelBoot("boot/vmlinuz", append="console=ttyS0"),
        )
        bundle.write_machine(tmp_path, changed)
        text = (tmp_path / "machine.toml").read_text()
        for comment in (
            "# web server: edited by hand",
            "# the DNS name",
            "# written my way",
            "# the system disk",
            "# keep this",
            "# a scratch disk",
            "# explicit default, kept",
        ):
            assert comment in text
        assert 'memory = "1G"' in text  # unchanged value keeps its spelling
        assert "cpus = 4" in text
        assert 'layers = ["root.s1.qcow2"]' in text
        keys = [line.split("=")[0].strip() for line in text.splitlines() if "=" in line]
        # the written-back uuid goes where virtkit's order puts it (after name), not after
        # the comment that introduces the first [[disks]]
        assert keys[:5] == ["format-version", "name", "uuid", "memory", "cpus"]
        assert "# the system disk\n[[disks]]\n" in text
        assert '"""\n\n[kernel]\n' in text  # a new table after a multi-line string: blank line
        assert '"""\n#cloud-config\nruncmd:' in text  # still a multi-line string
        assert virtkit.load(tmp_path) == changed

    def test_short_file_stays_short(self, tmp_path: Path) -> None:
        """A 20-line hand-written file does not grow into every default (was 20 -> 45 lines)."""
        (tmp_path / "machine.toml").write_text(HAND_WRITTEN)
        before = len(HAND_WRITTEN.splitlines())
        virtkit.save(virtkit.load(tmp_path), tmp_path)
        after = (tmp_path / "machine.toml").read_text().splitlines()
        assert len(after) <= before + 2  # + the persisted uuid and MAC

    def test_fresh_file_omits_defaults(self, tmp_path: Path) -> None:
        """A saved machine writes only what differs from the defaults, user-data multi-line."""
        m = Machine(
            name="m",
            disks=[Disk(path="a.qcow2", size="1MiB"), Disk(path="b.qcow2", size="1MiB")],
            cdroms=[CdRom()],
            nics=[Nic(forwards=[PortForward(0, 22)])],
            cloud_init=CloudInit(user_data="#cloud-config\npackages: [nginx]\n"),
        )
        virtkit.save(m, tmp_path)
        text = (tmp_path / "machine.toml").read_text()
        for default in ("bus", "cache", "discard", "read-only", "target", "firmware", "serial"):
            assert default not in text, default
        assert '"""\n#cloud-config\npackages: [nginx]\n"""' in text
        assert "[[cdroms]]" in text
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("[") and i:
                assert lines[i - 1] == "", f"no blank line before {line}"
        assert virtkit.load(tmp_path) == m

    def test_unchanged_save_does_not_rewrite(self, tmp_path: Path) -> None:
        """Saving the machine a v2 file already says leaves the file untouched (same inode)."""
        m = Machine(name="m")
        virtkit.save(m, tmp_path)
        inode = (tmp_path / "machine.toml").stat().st_ino
        bundle.write_machine(tmp_path, m)
        assert (tmp_path / "machine.toml").stat().st_ino == inode

    def test_removed_and_defaulted_keys(self, tmp_path: Path) -> None:
        """A value set back to its default, or a removed disk, disappears from the file."""
        (tmp_path / "machine.toml").write_text(HAND_WRITTEN)
        m = virtkit.load(tmp_path)
        bundle.write_machine(tmp_path, attrs.evolve(m, cpus=1, disks=m.disks[:1], cloud_init=None))
        doc = tomllib.loads((tmp_path / "machine.toml").read_text())
        assert "cpus" not in doc and "cloud-init" not in doc
        assert len(doc["disks"]) == 1
        assert virtkit.load(tmp_path).disks == m.disks[:1]

    def test_write_machine_checks(self, tmp_path: Path) -> None:
        """write_machine needs a Machine and an existing folder; escaping paths are refused."""
        with pytest.raises(ConfigError, match="needs a Machine"):
            bundle.write_machine(tmp_path, "m")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="is not a folder"):
            bundle.write_machine(tmp_path / "nope", Machine(name="m"))
        virtkit.save(Machine(name="m"), tmp_path)
        bad = Machine(name="m", disks=[Disk(path="ok.qcow2", layers=["../../../etc/x.qcow2"])])
        with pytest.raises(ConfigError, match="points outside the VM folder") as info:
            bundle.write_machine(tmp_path, bad)
        assert info.value.field == "disks[0].layers[0]"


class TestIdentity:
    TEXT = (
        'format-version = 2\nname = "id"  # no uuid, no MACs\n[[nics]]\n[[nics]]\nmodel = "e1000"\n'
    )

    def test_two_loads_are_equal_and_persisted(self, tmp_path: Path) -> None:
        """Generated uuid and MACs are written back (comment kept); every load agrees."""
        (tmp_path / "machine.toml").write_text(self.TEXT)
        a = virtkit.load(tmp_path)
        b = virtkit.load(tmp_path)
        assert a == b
        doc = tomllib.loads((tmp_path / "machine.toml").read_text())
        assert doc["uuid"] == str(a.uuid)
        assert [n["mac"] for n in doc["nics"]] == [n.mac for n in a.nics]
        assert "# no uuid, no MACs" in (tmp_path / "machine.toml").read_text()

    def test_another_process_sees_the_same_identity(self, tmp_path: Path) -> None:
        """A second process loading the folder gets the same uuid."""
        (tmp_path / "machine.toml").write_text(self.TEXT)
        code = "import virtkit,sys; print(virtkit.load(sys.argv[1]).uuid)"
        outs = {
            subprocess.run(
                [sys.executable, "-c", code, str(tmp_path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for _ in range(2)
        }
        assert outs == {str(virtkit.load(tmp_path).uuid)}

    def test_read_only_folder_derives(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When the identity cannot be written back, it is derived, so loads still agree."""
        (tmp_path / "machine.toml").write_text(self.TEXT)

        def refuse(*_args: object) -> None:
            raise ConfigError("read-only file system")

        monkeypatch.setattr(bundle, "_store", refuse)
        a = virtkit.load(tmp_path)
        assert a == virtkit.load(tmp_path)
        assert (tmp_path / "machine.toml").read_text() == self.TEXT

    def test_derived_identity_is_stable(self, tmp_path: Path) -> None:
        """The read-only fallback gives the same values for the same file and place."""
        from virtkit.bundle import _derived

        (tmp_path / "machine.toml").write_text(self.TEXT)
        raw = (tmp_path / "machine.toml").read_bytes()
        m = Machine(name="id", nics=[Nic(), Nic()])
        a, b = _derived(m, raw, tmp_path), _derived(m, raw, tmp_path)
        assert a == b
        assert a.nics[0].mac != a.nics[1].mac
        assert _derived(m, raw, tmp_path / "x").uuid != a.uuid


class TestSnapshotRecords:
    def test_layers_round_trip(self, tmp_path: Path) -> None:
        """Snapshot records keep their layers in a v2 index."""
        snaps = [
            Snapshot(name="a", kind="disk", layers={"vda": "root.qcow2"}),
            Snapshot(name="b", parent="a"),
        ]
        bundle.save_snapshots(tmp_path, snaps, current="b")
        assert bundle.load_snapshots(tmp_path) == tuple(snaps)
        assert bundle.current_snapshot(tmp_path) == "b"


class TestMergeProperties:
    @settings(
        max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(first=machines(), second=machines())
    def test_any_rewrite_reads_back(
        self, tmp_path_factory: pytest.TempPathFactory, first: Machine, second: Machine
    ) -> None:
        """Whatever file a machine left, writing another machine over it reads back exactly."""
        folder = tmp_path_factory.mktemp("merge")
        virtkit.save(first, folder, create_disks=False)
        bundle.write_machine(folder, second)
        assert virtkit.load(folder) == second

    def test_inline_tables_are_merged(self, tmp_path: Path) -> None:
        """Disks written as an inline array stay inline; a change lands inside them."""
        (tmp_path / "machine.toml").write_text(
            'format-version = 2\nname = "i"\nuuid = "7d3c1b52-45c6-4a5c-a4e6-3c9a0e0f3a11"\n'
            'disks = [{path = "a.qcow2"}, {path = "b.qcow2"}]  # compact\n'
        )
        m = virtkit.load(tmp_path)
        changed = attrs.evolve(m, disks=[attrs.evolve(m.disks[0], layers=["a1.qcow2"]), m.disks[1]])
        bundle.write_machine(tmp_path, changed)
        text = (tmp_path / "machine.toml").read_text()
        assert "# compact" in text and "[[disks]]" not in text
        assert virtkit.load(tmp_path) == changed


def test_a_snapshots_creation_time_survives_reloads(tmp_path: Path) -> None:
    """A snapshot saved within the second it was taken keeps its time (it was left out as
    equal to the default, so every read of the folder gave it a new one)."""
    folder = tmp_path / "vm"
    virtkit.save(
        Machine(name="t", memory="32MiB", disks=[Disk(path="d.qcow2", size="1MiB")]), folder
    )
    with virtkit.connect("emulator") as hv:
        hv.define(virtkit.load(folder), folder=folder).snapshot("s1", memory=False)
    seen = []
    for _ in range(2):
        with virtkit.connect("emulator") as hv:
            guest = hv.define(virtkit.load(folder), folder=folder)
            seen.append([(s.name, s.created_at) for s in guest.snapshots])
    assert seen[0] == seen[1] and [name for name, _ in seen[0]] == ["s1"]
    assert "created-at" in (folder / "snapshots" / "_index.toml").read_text()

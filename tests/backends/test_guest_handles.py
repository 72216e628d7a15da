"""What define() checks and what a guest handle is worth: capability warnings, strict,
host ports (fixed and picked), Disk.size, allow=, dead handles, close().

Run on the real emulator backend (and qemu where the behaviour is the backend's own).
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import virtkit
from virtkit import (
    CapabilityWarning,
    CdRom,
    CloudInit,
    ConfigError,
    Disk,
    Machine,
    Nic,
    PortForward,
    State,
    StateError,
)
from virtkit.backends import Hypervisor
from virtkit.testing import guests


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Hypervisor]:
    hyp = virtkit.connect("emulator", root=tmp_path / "guests")
    yield hyp
    hyp.close()


@pytest.fixture
def qhv(tmp_path: Path) -> Iterator[Hypervisor]:
    hyp = virtkit.connect("qemu", accel="tcg", root=tmp_path / "qguests")
    yield hyp
    hyp.close()


def _disk(tmp_path: Path, guest: str = "counter", name: str | None = None) -> Disk:
    path = tmp_path / f"{name or guest}.qcow2"
    guests.write_disk(path, guest, format="qcow2")
    return Disk(path=str(path))


class TestCapabilities:
    def test_emulator_warns_about_each_ignored_device(self, hv: Hypervisor, tmp_path: Path) -> None:
        """NICs, CD-ROMs, cloud-init and extra vCPUs: one CapabilityWarning each, naming the
        field; the guest is defined and still runs. (Kernel boot is emulated, not ignored.)"""
        machine = Machine(
            name="many",
            memory="32MiB",
            cpus=2,
            disks=[_disk(tmp_path, "hello")],
            nics=[Nic(), Nic()],
            cdroms=[CdRom()],
            cloud_init=CloudInit(user_data="#cloud-config\n"),
        )
        with pytest.warns(CapabilityWarning) as record:
            guest = hv.define(machine)
        fields = sorted(
            str(w.message.field) for w in record if isinstance(w.message, CapabilityWarning)
        )  # type: ignore[union-attr]
        assert fields == sorted(["nics[0]", "nics[1]", "cdroms[0]", "cloud_init", "cpus"])
        assert all("emulator" in str(w.message) for w in record)
        guest.start()
        assert guest.wait(timeout=20) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["hello"]

    def test_strict_refuses_what_would_be_ignored(self, hv: Hypervisor, tmp_path: Path) -> None:
        """strict=True turns the first ignored device into a ConfigError; nothing is defined."""
        machine = Machine(name="strict", memory="32MiB", nics=[Nic()])
        with pytest.raises(ConfigError, match=r"nics\[0\]") as info:
            hv.define(machine, strict=True)
        assert info.value.field == "nics[0]"
        assert hv.guests == ()
        assert not (hv.root / "strict").exists()

    def test_strict_must_be_a_bool(self, hv: Hypervisor) -> None:
        """strict='yes' is a ConfigError naming 'strict'."""
        with pytest.raises(ConfigError, match="strict"):
            hv.define(Machine(name="s", memory="32MiB"), strict="yes")  # type: ignore[arg-type]

    def test_a_plain_machine_gives_no_warning(self, hv: Hypervisor, tmp_path: Path) -> None:
        """Nothing ignored, nothing said (strict passes too)."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hv.define(Machine(name="plain", memory="32MiB", disks=[_disk(tmp_path)]), strict=True)

    def test_qemu_runs_everything_without_warning(self, qhv: Hypervisor) -> None:
        """The qemu backend expresses NICs, CD-ROMs and vCPUs: strict=True defines it."""
        machine = Machine(name="full", memory="32MiB", cpus=2, nics=[Nic()], cdroms=[CdRom()])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            qhv.define(machine, strict=True)


class TestHostPorts:
    def _fwd(self, port: int) -> Nic:
        return Nic(forwards=[PortForward(host_port=port, guest_port=22)])

    def test_duplicate_fixed_port_is_a_config_error_naming_the_field(self, qhv: Hypervisor) -> None:
        """A second guest forwarding the same tcp host port is refused at define()."""
        qhv.define(Machine(name="a", memory="16MiB", nics=[self._fwd(22022)]))
        with pytest.raises(ConfigError, match="already forwarded by guest 'a'") as info:
            qhv.define(Machine(name="b", memory="16MiB", nics=[Nic(), self._fwd(22022)]))
        assert info.value.field == "nics[1].forwards[0].host_port"
        qhv.define(Machine(name="c", memory="16MiB", nics=[self._fwd(22023)]))  # other port: fine

    def test_every_other_guests_forward_counts(self, qhv: Hypervisor, tmp_path: Path) -> None:
        """Guests on one port but different addresses coexist; a third on either address, or on
        0.0.0.0 (all addresses), is refused at define() and never reaches QEMU."""
        for name, addr in (("a1", "127.0.0.1"), ("a2", "127.0.0.2")):
            fwd = PortForward(host_port=22030, guest_port=22, host_addr=addr)
            qhv.define(Machine(name=name, memory="16MiB", nics=[Nic(forwards=[fwd])]))
        for addr, owner in (("127.0.0.1", "a1"), ("0.0.0.0", "a1"), ("127.0.0.2", "a2")):
            fwd = PortForward(host_port=22030, guest_port=22, host_addr=addr)
            with pytest.raises(ConfigError, match=f"already forwarded by guest '{owner}'"):
                qhv.define(Machine(name="b", memory="16MiB", nics=[Nic(forwards=[fwd])]))
        assert not (tmp_path / "qguests" / "b").exists()

    def test_two_nics_of_one_machine_on_one_port_never_reach_qemu(
        self, qhv: Hypervisor, tmp_path: Path
    ) -> None:
        """Before, QEMU refused it at start ('Could not set up host forwarding rule'): now
        the Machine itself is a ConfigError naming the field, so no folder is made."""
        with pytest.raises(ConfigError, match="already forwarded by nics") as info:
            Machine(name="two", memory="16MiB", nics=[self._fwd(22040), self._fwd(22040)])
        assert info.value.field == "nics[1].forwards[0].host_port"
        guest = qhv.define(Machine(name="two", memory="16MiB", nics=[self._fwd(22041)]))
        with pytest.raises(ConfigError, match="already forwarded by nics"):
            guest.attach(self._fwd(22041))
        assert virtkit.load(guest.folder).nics == guest.machine.nics
        assert len(guest.machine.nics) == 1

    def test_zero_picks_free_ports_at_start_and_qemu_listens_on_them(self, qhv: Hypervisor) -> None:
        """host_port=0 in two guests: each gets its own free port at start, reported by
        guest.host_port() and guest.forwards, and QEMU really listens there."""
        a = qhv.define(Machine(name="za", memory="16MiB", nics=[self._fwd(0)]))
        b = qhv.define(Machine(name="zb", memory="16MiB", nics=[self._fwd(0)]))
        with pytest.raises(StateError, match="start it first"):
            a.host_port(22)
        a.start()
        b.start()
        pa, pb = a.host_port(22), b.host_port(22)
        assert pa != pb and pa > 0 and pb > 0
        assert a.forwards == (("net0", PortForward(host_port=pa, guest_port=22)),)
        assert f"hostfwd=tcp:127.0.0.1:{pa}-:22" in ",".join(a.qemu_argv())  # type: ignore[attr-defined]
        for port in (pa, pb):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # slirp accepts on the host side
        assert virtkit.load(a.folder).nics[0].forwards[0].host_port == 0  # the folder keeps 0
        with pytest.raises(ConfigError, match="no tcp port"):
            a.host_port(80)


class TestDiskSize:
    def test_larger_size_grows_the_image_at_define_and_start(
        self, hv: Hypervisor, tmp_path: Path
    ) -> None:
        """Disk.size above the image's size grows it (define); raising it later grows at start."""
        disk = _disk(tmp_path, "hello")
        guest = hv.define(
            Machine(name="grow", memory="32MiB", disks=[attrs.evolve(disk, size="2MiB")])
        )
        with guest.open_disk(0) as img:
            assert img.virtual_size == 2 * 1024**2
        bigger = attrs.evolve(guest.machine.disks[0], size="3MiB")
        guest._set_machine(attrs.evolve(guest.machine, disks=(bigger,)))
        guest.start()
        guest.wait(timeout=20)
        with guest.open_disk(0) as img:
            assert img.virtual_size == 3 * 1024**2
            assert img.read(510, 2) == b"\x55\xaa"

    def test_smaller_size_is_a_config_error_never_a_shrink(
        self, hv: Hypervisor, tmp_path: Path
    ) -> None:
        """Disk.size below the image's size: ConfigError naming disks[0].size; image untouched."""
        disk = _disk(tmp_path, "hello")
        with pytest.raises(ConfigError, match="never shrinks") as info:
            hv.define(
                Machine(name="shrink", memory="32MiB", disks=[attrs.evolve(disk, size="512KiB")])
            )
        assert info.value.field == "disks[0].size"
        with virtkit.images.open(disk.path) as img:
            assert img.virtual_size == 1024**2


class TestAllow:
    @pytest.mark.parametrize("backend", ["hv", "qhv"])
    def test_backing_outside_the_folder_needs_allow(
        self, backend: str, request: pytest.FixtureRequest, tmp_path: Path
    ) -> None:
        """An overlay inside the folder whose backing file lies elsewhere (a hand-made linked
        disk): define() refuses it (naming the disk and allow=), and accepts it with
        allow=[that folder]; it then boots, on the emulator and on qemu."""
        hv: Hypervisor = request.getfixturevalue(backend)
        base_dir = tmp_path / "elsewhere"
        base_dir.mkdir()
        guests.write_disk(base_dir / "base.qcow2", "hello", format="qcow2")
        folder = tmp_path / "vm"
        (folder / "disks").mkdir(parents=True)
        virtkit.images.create(
            folder / "disks" / "top.qcow2",
            format="qcow2",
            backing=str(base_dir / "base.qcow2"),
            backing_format="qcow2",
            allow_backing=[base_dir],
        ).close()
        machine = Machine(name="linked", memory="32MiB", disks=[Disk(path="top.qcow2")])
        with pytest.raises(ConfigError, match="allow") as info:
            hv.define(machine, folder=folder)
        assert info.value.field == "disks[0].path"
        guest = hv.define(machine, folder=folder, allow=[base_dir])
        guest.start()
        assert guest.wait(timeout=20) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["hello"]

    @pytest.mark.parametrize("bad", ["/x", 3, [3]])
    def test_allow_must_be_a_list_of_paths(self, hv: Hypervisor, bad: object) -> None:
        """A single path or non-paths in allow= are a ConfigError naming 'allow'."""
        with pytest.raises(ConfigError, match="allow"):
            hv.define(Machine(name="a", memory="32MiB"), allow=bad)  # type: ignore[arg-type]


class TestDeadHandles:
    def test_every_call_on_an_undefined_guest_is_a_state_error(
        self, hv: Hypervisor, tmp_path: Path
    ) -> None:
        """After undefine() the handle is dead: start, snapshot, media, attach, wait... all
        raise StateError saying so; it no longer starts."""
        guest = hv.define(Machine(name="dead", memory="32MiB", disks=[_disk(tmp_path)]))
        hv.undefine(guest)
        calls = {
            "start": guest.start,
            "kill": guest.kill,
            "pause": guest.pause,
            "snapshot": lambda: guest.snapshot("s", memory=False),
            "revert": lambda: guest.revert("s"),
            "delete_snapshot": lambda: guest.delete_snapshot("s"),
            "wait": lambda: guest.wait(timeout=1),
            "attach": lambda: guest.attach(Disk(path="x.qcow2", size="1MiB")),
            "detach": lambda: guest.detach("vda"),
            "undefine": lambda: hv.undefine(guest),
            "host_port": lambda: guest.host_port(22),
            "open_disk": lambda: guest.open_disk(0, writable=True),
            "wait_ready": lambda: guest.wait_ready(via="console", pattern=b"x", timeout=1),
            "addresses": lambda: guest.addresses(timeout=1),
            "quiesce": lambda: guest.quiesce(timeout=1).__enter__(),
        }
        for name, call in calls.items():
            with pytest.raises(StateError, match="undefined|dead"):
                call()
            assert guest.state is State.SHUTOFF, name

    def test_close_stops_every_guest_and_kills_the_handles(
        self, qhv: Hypervisor, tmp_path: Path
    ) -> None:
        """close() kills running QEMUs (paused ones too); the handles are dead afterwards."""
        running = qhv.define(Machine(name="r", memory="16MiB", disks=[_disk(tmp_path, name="r")]))
        paused = qhv.define(Machine(name="p", memory="16MiB", disks=[_disk(tmp_path, name="p")]))
        running.start()
        paused.start()
        paused.pause()
        pids = [running.pid, paused.pid]  # type: ignore[attr-defined]
        assert all(pids)
        qhv.close()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
        for guest in (running, paused):
            assert guest.state is State.SHUTOFF
            with pytest.raises(StateError, match="closed"):
                guest.start()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class TestFolderIsTheTruth:
    def test_a_size_raised_in_machine_toml_grows_the_disk_at_start(
        self, hv: Hypervisor, tmp_path: Path
    ) -> None:
        """Another process raises Disk.size in the folder: the stopped guest re-reads its folder
        at start() and grows the image (it used to do nothing)."""
        disk = _disk(tmp_path, "hello")
        guest = hv.define(Machine(name="edited", memory="32MiB", disks=[disk]))
        edited = attrs.evolve(guest.machine, disks=(attrs.evolve(disk, size="4MiB"),))
        virtkit.bundle.write_machine(guest.folder, edited)  # as `virtkit vm edit` would
        guest.start()
        assert guest.wait(timeout=20) is State.SHUTOFF
        assert guest.machine.disks[0].size == 4 * 1024**2
        with guest.open_disk(0) as img:
            assert img.virtual_size == 4 * 1024**2

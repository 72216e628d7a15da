"""Machine -> QEMU command line: deterministic, a dry run, and injection-proof on a real QEMU."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.backends.qemu.argv import AttachedDisk, LaunchSpec, build_argv, opt_value
from virtkit.model import CdRom, CpuTopology, Disk, Machine, Nic, PortForward, State
from virtkit.testing import guests

HOSTILE_NAMES = [
    "a,b.qcow2",
    "x=y,file=evil.qcow2",
    "-nographic.qcow2",
    ",driver=raw,",
]

HELLO = guests.OUTPUT["hello"].strip()


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


class TestArgv:
    def test_dry_run_is_deterministic_and_starts_nothing(
        self, hv: QemuHypervisor, tmp_path: Path
    ) -> None:
        """qemu_argv() twice gives the same list; nothing runs, the guest stays SHUTOFF."""
        m = Machine(
            name="dry",
            uuid="12345678-1234-5678-1234-567812345678",
            cpus=CpuTopology(sockets=1, cores=2, threads=1),
            memory="512MiB",
            disks=[
                Disk(path="root.qcow2", size="1MiB"),
                Disk(path="data.img", size="1MiB", bus="sata", cache="none"),
            ],
            cdroms=[CdRom(path="/tmp/x.iso")],
            nics=[Nic(mac="52:54:00:00:00:01", forwards=[PortForward(2222, 22)])],
            boot=("cdrom0", "vda"),
        )
        guest = hv.define(m)
        argv = guest.qemu_argv()
        assert argv == guest.qemu_argv()
        assert guest.state is State.SHUTOFF and guest.pid is None
        assert argv[0].endswith("qemu-system-x86_64")
        for flag in ("-nodefaults", "-no-user-config"):
            assert flag in argv
        assert _values(argv, "-display") == ["none"]
        assert _values(argv, "-smp") == ["cpus=2,sockets=1,cores=2,threads=1"]
        assert _values(argv, "-m") == ["size=512M"]
        assert _values(argv, "-uuid") == ["12345678-1234-5678-1234-567812345678"]
        blockdevs = [json.loads(v) for v in _values(argv, "-blockdev")]
        fmt = {b["node-name"]: b for b in blockdevs}
        assert fmt["drive-vda"]["driver"] == "qcow2" and fmt["drive-sda"]["driver"] == "raw"
        assert fmt["drive-sda-file"]["cache"] == {"direct": True, "no-flush": False}
        devices = [json.loads(v) for v in _values(argv, "-device")]
        by_id = {d.get("id"): d for d in devices}
        assert by_id["cdrom0"]["bootindex"] == 0 and by_id["vda"]["bootindex"] == 1
        assert by_id["sda"]["write-cache"] == "on"  # cache=none: O_DIRECT, guest cache on
        assert by_id["net0"]["mac"] == "52:54:00:00:00:01"
        assert _values(argv, "-netdev") == ["user,id=net-net0,hostfwd=tcp:127.0.0.1:2222-:22"]
        assert "-S" not in argv and "-S" in guest.qemu_argv(paused=True)

    @pytest.mark.parametrize(
        "name", ["a,b", "x=y", "line\nbreak", "-nographic", "guest,debug-threads=on"]
    )
    def test_hostile_vm_names_are_refused_before_any_command_line(self, name: str) -> None:
        """A VM name that could smuggle an option into '-name guest=...' is a ConfigError."""
        with pytest.raises(virtkit.ConfigError, match="name"):
            Machine(name=name)

    def test_label_values_never_reach_the_command_line(self, hv: QemuHypervisor) -> None:
        """Labels are metadata: even hostile ones do not appear in argv."""
        guest = hv.define(Machine(name="labels", labels={"k": "-S,x=1\n-nographic"}))
        assert not any("nographic" in a for a in guest.qemu_argv())

    def test_keyval_values_escape_commas_and_refuse_control_characters(self) -> None:
        """opt_value doubles commas (QEMU's escape) and rejects newlines with ConfigError."""
        assert opt_value("/run/a,b", what="path") == "/run/a,,b"
        with pytest.raises(virtkit.ConfigError, match="control characters"):
            opt_value("a\nb", what="path")

    def test_runtime_socket_paths_are_escaped(self) -> None:
        """A runtime dir containing a comma cannot add chardev options."""
        argv = build_argv(
            Machine(name="esc"),
            LaunchSpec(binary="qemu", accel="tcg", qmp_socket=Path("/r/a,server=on/qmp.sock")),
        )
        assert "socket,id=qmp,path=/r/a,,server=on/qmp.sock" in argv

    @pytest.mark.parametrize("name", HOSTILE_NAMES)
    def test_hostile_disk_paths_are_one_file_on_a_real_qemu(
        self,
        hv: QemuHypervisor,
        tmp_path: Path,
        sectors,
        name: str,  # type: ignore[no-untyped-def]
    ) -> None:
        """A disk path with ',', '=', a newline or a leading '-' is opened as that one file and boots."""
        folder = tmp_path / "odd dir,with=chars"
        folder.mkdir()
        from bootsectors import make_boot_disk

        disk = make_boot_disk(folder / name, sectors["hello"])
        guest = hv.define(
            Machine(name="hostile", memory="16MiB", disks=[Disk(path=str(disk), bus="ide")])
        )
        argv = guest.qemu_argv()
        assert "-nographic" not in argv
        guest.start()
        guest.console.expect(HELLO, timeout=30)
        assert guest.wait(timeout=30) is State.SHUTOFF
        nodes = [json.loads(v) for v in _values(argv, "-blockdev")]
        assert [n["filename"] for n in nodes if n["driver"] == "file"] == [str(disk)]

    def test_newline_in_a_disk_path_is_refused_by_the_model_and_inert_in_argv(
        self,
        tmp_path: Path,
        sectors,  # type: ignore[no-untyped-def]
    ) -> None:
        """The model rejects a newline in Disk.path; below it, -blockdev JSON keeps such a file one
        value: a real QEMU boots from 'line\\n-nographic.qcow2'."""
        with pytest.raises(virtkit.ConfigError, match="line breaks"):
            Disk(path="a\nb.qcow2")
        from bootsectors import make_boot_disk

        disk = make_boot_disk(tmp_path / "line\n-nographic.qcow2", sectors["hello"])
        machine = Machine(name="nl", memory="16MiB", disks=[Disk(path="x.qcow2", bus="ide")])
        spec = LaunchSpec(
            binary="qemu-system-x86_64",
            accel="tcg",
            disks=(AttachedDisk(machine.disks[0], disk),),
            paused=False,
            extra=("-serial", "stdio"),
        )
        argv = build_argv(machine, spec)
        proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert HELLO in proc.stdout


class TestDevicesOnARealQemu:
    def test_nics_cpu_model_and_buses_are_accepted_by_qemu(self, tmp_path: Path, sectors) -> None:  # type: ignore[no-untyped-def]
        """User-mode NIC with a port forward, a disconnected e1000, SATA and SCSI disks and a CPU
        model: QEMU starts with them and reports the MACs and CPU model we asked for."""
        from bootsectors import make_boot_disk

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with QemuHypervisor(accel="tcg", cpu_model="max", root=tmp_path / "g") as hyp:
            boot = make_boot_disk(tmp_path / "boot.qcow2", sectors["ignore-acpi"])
            extra = tmp_path / "extra.raw"
            extra.write_bytes(b"\0" * 1024**2)
            shared = tmp_path / "shared.raw"
            shared.write_bytes(b"\0" * 1024**2)
            machine = Machine(
                name="devices",
                memory="32MiB",
                disks=[
                    Disk(path=str(boot), bus="ide"),
                    Disk(path=str(extra), bus="sata"),
                    Disk(path=str(shared), bus="scsi", read_only=True, target="sdz"),
                ],
                nics=[
                    Nic(mac="52:54:00:aa:bb:01", forwards=[PortForward(port, 22)]),
                    Nic(model="e1000", mac="52:54:00:aa:bb:02", network="none"),
                ],
                boot=("hda",),
            )
            guest = hyp.define(machine)
            guest.start()
            guest.console.expect("ignoring ACPI", timeout=30)
            net = guest.qmp("human-monitor-command", {"command-line": "info network"})
            assert "52:54:00:aa:bb:01" in net and "52:54:00:aa:bb:02" in net
            usernet = guest.qmp("human-monitor-command", {"command-line": "info usernet"})
            assert "HOST_FORWARD" in usernet and str(port) in usernet
            socket.create_connection(("127.0.0.1", port), timeout=10).close()  # slirp listens
            cpus = guest.qmp("query-cpus-fast")
            assert cpus and cpus[0]["props"]["socket-id"] == 0
            model = guest.qmp("human-monitor-command", {"command-line": "info cpus"})
            assert model.strip()
            blocks = {b["qdev"].rsplit("/", 1)[-1]: b for b in guest.qmp("query-block")}
            assert blocks["sdz"]["inserted"]["ro"] is True
            guest.kill()

    def test_bad_cpu_model_is_a_config_error(self, tmp_path: Path) -> None:
        """A CPU model with option syntax in it is refused before anything runs."""
        with QemuHypervisor(accel="tcg", cpu_model="max,+vmx", root=tmp_path / "g") as hyp:
            guest = hyp.define(Machine(name="cpu"))
            with pytest.raises(virtkit.ConfigError, match="cpu_model"):
                guest.qemu_argv()

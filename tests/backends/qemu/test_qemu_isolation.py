"""Private files, process ownership, load, UEFI and admission checks of the qemu backend."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import Disk, Machine, State


def _machine(name: str, disk: Path, **kw: object) -> Machine:
    return Machine(name=name, memory="16MiB", disks=[Disk(path=str(disk), bus="ide")], **kw)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class TestPrivateFiles:
    def test_runtime_dir_and_sockets_are_private(self, hv: QemuHypervisor, boot_disk) -> None:  # type: ignore[no-untyped-def]
        """The per-guest runtime dir is 0700 and its QMP/console sockets 0600; all gone after kill."""
        guest = hv.define(_machine("priv", boot_disk("ignore-acpi")))
        guest.start()
        proc = guest._proc
        assert proc is not None
        runtime = proc.runtime_dir
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
        socks = sorted(runtime.iterdir())
        assert [s.name for s in socks] == ["console.sock", "qmp-sync.sock", "qmp.sock"]
        assert all(
            stat.S_ISSOCK(s.stat().st_mode) and stat.S_IMODE(s.stat().st_mode) == 0o600
            for s in socks
        )
        guest.kill()
        assert not runtime.exists()

    @pytest.mark.parametrize("via", ["setpriv", "prctl"])
    def test_qemu_dies_when_the_python_process_is_killed(
        self, tmp_path: Path, boot_disk, via: str
    ) -> None:  # type: ignore[no-untyped-def]
        """A Python process SIGKILLed while its guest runs takes its QEMU with it (PR_SET_PDEATHSIG,
        set by setpriv or, without it, by prctl in the child)."""
        disk = boot_disk("ignore-acpi")
        script = textwrap.dedent(
            f"""
            import os, signal, sys
            import virtkit.backends.qemu.process as P
            if {via!r} == "prctl":
                P._SETPRIV = None
            from virtkit.backends.qemu import QemuHypervisor
            from virtkit.model import Disk, Machine
            hv = QemuHypervisor(accel="tcg", root={str(tmp_path / "orphan")!r})
            g = hv.define(Machine(name="orphan", memory="16MiB", disks=[Disk(path={str(disk)!r}, bus="ide")]))
            g.start()
            g.console.expect("ignoring ACPI", timeout=30)
            print(g.pid, g._proc.runtime_dir, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        pid_text, runtime = out.stdout.split()
        pid = int(pid_text)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "QEMU outlived the Python process that started it"
        # a SIGKILLed process runs no cleanup: its runtime dir is the one thing left; remove it
        for child in Path(runtime).iterdir():
            child.unlink()
        Path(runtime).rmdir()

    def test_interpreter_exit_kills_qemu_and_removes_its_runtime_dir(
        self, tmp_path: Path, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """A script that exits without killing its guest leaves no QEMU and no runtime dir (atexit)."""
        disk = boot_disk("ignore-acpi")
        script = textwrap.dedent(
            f"""
            from virtkit.backends.qemu import QemuHypervisor
            from virtkit.model import Disk, Machine
            hv = QemuHypervisor(accel="tcg", root={str(tmp_path / "exit")!r})
            g = hv.define(Machine(name="left", memory="16MiB", disks=[Disk(path={str(disk)!r}, bus="ide")]))
            g.start()
            g.console.expect("ignoring ACPI", timeout=30)
            print(g.pid, g._proc.runtime_dir, flush=True)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        pid_text, runtime = out.stdout.split()
        assert not _alive(int(pid_text))
        assert not Path(runtime).exists()

    def test_frozen_layer_cannot_be_attached_writable_by_another_guest(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """After a disk snapshot, the frozen base belongs to the chain: a second guest gets ResourceError."""
        disk = boot_disk("ignore-acpi")
        first = hv.define(_machine("owner", disk))
        first.snapshot("s", memory=False)
        with pytest.raises(virtkit.ResourceError, match="layer"):
            hv.define(_machine("intruder", disk))


class TestAdmissionAndFirmware:
    def test_impossible_memory_is_a_resource_error(self, hv: QemuHypervisor) -> None:
        """A machine wanting more memory than the host has is refused at define()."""
        with pytest.raises(virtkit.ResourceError, match="memory"):
            hv.define(Machine(name="huge", memory="16TiB"))

    def test_uefi_guest_gets_a_private_nvram_copy(self, hv: QemuHypervisor) -> None:
        """firmware='uefi' boots OVMF from pflash with a per-guest 0600 variables file in its folder."""
        guest = hv.define(Machine(name="uefi", memory="64MiB", firmware="uefi"))
        guest.start()
        assert guest.state is State.RUNNING
        nvram = guest.folder / "OVMF_VARS.fd"
        assert nvram.is_file() and stat.S_IMODE(nvram.stat().st_mode) == 0o600
        assert any("pflash1" in a and str(nvram) in a for a in guest.qemu_argv())
        guest.kill()


class TestLoad:
    def test_four_guests_at_once_twice_release_everything(
        self, hv: QemuHypervisor, tmp_path: Path, sectors
    ) -> None:  # type: ignore[no-untyped-def]
        """Four TCG guests started and killed concurrently, twice: own consoles, allocation back to zero."""
        from bootsectors import make_boot_disk

        guests = [
            hv.define(
                _machine(f"load{i}", make_boot_disk(tmp_path / f"l{i}.qcow2", sectors["counter"]))
            )
            for i in range(4)
        ]

        async def cycle() -> None:
            await asyncio.gather(*(g.aio.start() for g in guests))
            await asyncio.gather(*(g.aio.console.expect("count 3\r\n", 30) for g in guests))
            assert hv.host.allocated_memory == 4 * 16 * 1024**2
            await asyncio.gather(*(g.aio.kill() for g in guests))

        for _ in range(2):
            asyncio.run(cycle())
        pids = {g.pid for g in guests}
        assert pids == {None}
        assert hv.host.allocated_memory == 0 and hv.host.allocated_cpus == 0
        for g in guests:
            out = g.console.output
            assert out.count(b"count 1\r\n") == 2  # each console saw exactly its own two runs
        assert len({os.fspath(g.folder) for g in guests}) == 4

"""`virtkit vm`: list, show, define, snapshots, run and console on the emulator and on qemu."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import virtkit
from virtkit.cli import main
from virtkit.testing import guests


def _vm(root: Path, guest: str, *, name: str | None = None, fmt: str = "raw") -> Path:
    folder = root / (name or guest)
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / f"boot.{fmt}", guest, format=fmt)
    virtkit.save(
        virtkit.Machine(
            name=name or guest, memory="2MiB", disks=[virtkit.Disk(f"boot.{fmt}", format=fmt)]
        ),
        folder,
    )
    return folder


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


class TestFolders:
    def test_list_and_show(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """list finds the VM folders under --root; show --json describes one."""
        _vm(tmp_path, "hello")
        _vm(tmp_path, "counter")
        (tmp_path / "not-a-vm").mkdir()
        status, out, _ = _run(capsys, "vm", "list", "--root", str(tmp_path), "--json")
        assert status == 0
        assert [(r["name"], r["state"]) for r in json.loads(out)] == [
            ("counter", "shut off"),
            ("hello", "shut off"),
        ]
        status, out, _ = _run(capsys, "vm", "list", "--root", str(tmp_path))
        assert "hello" in out and "counter" in out and "not-a-vm" not in out
        status, out, _ = _run(capsys, "vm", "show", str(tmp_path / "hello"), "--json")
        data = json.loads(out)
        assert (data["name"], data["memory"], data["disks"][0]["path"]) == (
            "hello",
            2 << 20,
            "boot.raw",
        )
        status, out, _ = _run(capsys, "vm", "show", str(tmp_path / "hello"))
        assert "memory: 2 MiB" in out

    def test_define_from_a_toml_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """define machine.toml creates ROOT/NAME with its disks (sized images created)."""
        src = tmp_path / "src"
        virtkit.save(
            virtkit.Machine(
                name="web", memory="8MiB", disks=[virtkit.Disk("root.qcow2", size="16MiB")]
            ),
            src,
        )
        root = tmp_path / "vms"
        root.mkdir()
        status, out, err = _run(
            capsys, "vm", "define", str(src / "machine.toml"), "--root", str(root)
        )
        assert status == 0, err
        assert "Domain 'web' defined" in out
        assert virtkit.load(root / "web").name == "web"
        with virtkit.images.open(root / "web" / "disks" / "root.qcow2") as img:
            assert img.virtual_size == 16 << 20

    @pytest.mark.parametrize("verb", ["start", "stop", "kill", "pause", "resume", "reset"])
    def test_lifecycle_verbs_need_a_persistent_backend(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str
    ) -> None:
        """On the in-process emulator, start/stop/... explain why and point at vm run/console."""
        folder = _vm(tmp_path, "hello")
        status, _, err = _run(capsys, "vm", verb, str(folder))
        assert status == 1
        assert "persistent hypervisor" in err and "vm run" in err
        assert "Traceback" not in err

    def test_libvirt_uri_is_routed_to_the_libvirt_backend(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--connect with a URI asks for the libvirt backend (an error, not a crash, if absent)."""
        status, _, err = _run(capsys, "vm", "--connect", "qemu+ssh://nowhere.invalid/system",
                              "list")  # fmt: skip
        assert status == 1
        assert "libvirt" in err
        assert "Traceback" not in err


class TestSnapshots:
    def test_create_list_revert_delete(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Disk snapshots of a VM folder: the revert brings the disk bytes back."""
        folder = _vm(tmp_path, "hello", fmt="qcow2")
        disk = folder / "disks" / "boot.qcow2"
        assert _run(capsys, "vm", "snapshot", "create", str(folder), "clean")[0] == 0
        with virtkit.images.open(disk, writable=True) as img:
            original = img.read(0, 512)
            img.write(0, b"\xff" * 512)
        status, out, _ = _run(capsys, "vm", "snapshot", "list", str(folder), "--json")
        rows = json.loads(out)
        assert [(r["name"], r["kind"], r["current"]) for r in rows] == [("clean", "disk", True)]
        assert _run(capsys, "vm", "snapshot", "revert", str(folder), "clean")[0] == 0
        with virtkit.images.open(disk) as img:
            assert img.read(0, 512) == original
        assert _run(capsys, "vm", "snapshot", "delete", str(folder), "clean")[0] == 0
        assert json.loads(_run(capsys, "vm", "snapshot", "list", str(folder), "--json")[1]) == []
        status, _, err = _run(capsys, "vm", "snapshot", "revert", str(folder), "clean")
        assert status == 1 and "clean" in err


def _cli(
    *args: str, stdin: bytes = b"", timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "virtkit.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


_CONNECT = [
    pytest.param("emulator", id="emulator"),
    pytest.param("qemu", id="qemu", marks=pytest.mark.qemu),
]


class TestRunAndConsole:
    @pytest.mark.parametrize("connect", _CONNECT)
    def test_console_with_piped_input(self, tmp_path: Path, connect: str) -> None:
        """Bytes on stdin reach the guest; it echoes and powers off; exit 0."""
        folder = _vm(tmp_path, "echo")
        argv = [sys.executable, "-m", "virtkit.cli", "vm", "--connect", connect, "console"]
        proc = subprocess.Popen(
            [*argv, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        seen = b""
        while b"echo ready" not in seen:
            chunk = proc.stdout.read1(4096)
            assert chunk, "the console ended before the guest was ready"
            seen += chunk
        proc.stdin.write(b"hello virtkit\rq")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert b"hello virtkit" in seen + out and b"bye" in seen + out
        assert b"Escape character is ^]" in err
        assert b"stopped: shutoff" in err

    @pytest.mark.parametrize("connect", _CONNECT)
    def test_console_escape_key_detaches(self, tmp_path: Path, connect: str) -> None:
        """Ctrl-] in the input detaches (the guest is killed: it ran in this process); exit 0."""
        folder = _vm(tmp_path, "counter")
        proc = _cli("vm", "--connect", connect, "console", str(folder), stdin=b"\x1d")
        assert proc.returncode == 0, proc.stderr
        assert b"stopped" not in proc.stderr
        assert b"Traceback" not in proc.stderr

    @pytest.mark.qemu
    def test_run_on_qemu(self, tmp_path: Path) -> None:
        """vm --connect qemu run streams the same bytes the emulator prints and exits 0."""
        folder = _vm(tmp_path, "hello", fmt="qcow2")
        proc = _cli("vm", "--connect", "qemu", "run", str(folder))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == guests.OUTPUT["hello"]


class TestInteractiveConsoleInTmux:
    def test_typing_and_escape_in_tmux(self, tmp_path: Path) -> None:
        """In a real terminal (tmux): typed lines are echoed, Ctrl-] detaches, the tty is restored."""
        if shutil.which("tmux") is None:  # a set-up bug, not a reason to skip
            pytest.fail("tmux is not installed: run scripts/setup.sh (it installs tmux)")
        folder = _vm(tmp_path, "echo")
        status_file = tmp_path / "status"
        session = f"virtkit-test-{time.monotonic_ns()}"
        tmux = ["tmux", "-L", session]
        command = (
            f"{sys.executable} -m virtkit.cli vm console {folder}; "
            f"echo $? > {status_file}; stty -a | grep -o -- '-\\?icanon' >> {status_file}"
        )
        subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "120", "-y", "30", command],
                       check=True, timeout=30)  # fmt: skip

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True, check=False).stdout  # fmt: skip

        def wait_for(text: str) -> None:
            deadline = time.monotonic() + 60
            while text not in screen():
                assert time.monotonic() < deadline, f"{text!r} not on screen:\n{screen()}"
                time.sleep(0.05)

        try:
            wait_for("echo ready")
            subprocess.run([*tmux, "send-keys", "-t", session, "-l", "typed in tmux"], check=True)
            subprocess.run([*tmux, "send-keys", "-t", session, "C-m"], check=True)
            wait_for("typed in tmux")
            subprocess.run([*tmux, "send-keys", "-t", session, "C-]"], check=True)
            deadline = time.monotonic() + 60
            while not status_file.exists() or len(status_file.read_text().split()) < 2:
                assert time.monotonic() < deadline, screen()
                time.sleep(0.05)
        finally:
            subprocess.run([*tmux, "kill-server"], check=False, timeout=30)
        status, icanon = status_file.read_text().split()
        assert status == "0"
        assert icanon == "icanon"  # canonical mode is back: the terminal was restored


class TestCopiesAndDevices:
    @pytest.mark.parametrize("full", [False, True])
    def test_clone_then_run(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], full: bool
    ) -> None:
        """vm clone (linked or --full) makes a folder that boots and prints what the source does."""
        src = _vm(tmp_path, "hello", fmt="qcow2")
        args = ["vm", "clone", str(src), str(tmp_path / "copy")] + (["--full"] if full else [])
        status, out, err = _run(capsys, *args)
        assert status == 0, err
        assert "Domain 'copy' cloned" in out
        clone = virtkit.load(tmp_path / "copy")
        assert clone.name == "copy" and clone.uuid != virtkit.load(src).uuid
        proc = _cli("vm", "run", str(tmp_path / "copy"))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == guests.OUTPUT["hello"]

    def test_attach_detach_change_media_on_a_folder(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """attach --disk/--nic, change-media and detach edit the stopped VM's folder."""
        folder = _vm(tmp_path, "hello")
        status, out, err = _run(
            capsys, "vm", "attach", str(folder), "--disk", "data.qcow2", "--size", "8M"
        )
        assert status == 0, err
        assert "Device attached: vdb" in out
        assert (folder / "disks" / "data.qcow2").is_file()
        assert _run(capsys, "vm", "attach", str(folder), "--nic")[0] == 0
        machine = virtkit.load(folder)
        assert [d.target for d in machine.disks] == ["vda", "vdb"]
        assert len(machine.nics) == 1
        assert _run(capsys, "vm", "detach", str(folder), "vdb")[0] == 0
        assert [d.target for d in virtkit.load(folder).disks] == ["vda"]
        status, _, err = _run(capsys, "vm", "change-media", str(folder), "cdrom0", "--eject")
        assert status == 1 and "cdrom0" in err  # the machine has no CD-ROM drive
        status, _, err = _run(capsys, "vm", "attach", str(folder))
        assert status == 2 and "--disk PATH or --nic" in err

    def test_migrate_needs_libvirt(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """vm migrate on the emulator is a clear error (libvirt moves guests between hosts)."""
        folder = _vm(tmp_path, "hello")
        status, _, err = _run(capsys, "vm", "migrate", str(folder), "qemu+ssh://b/system")
        assert status == 1 and "libvirt" in err


class TestAppliances:
    def test_export_then_import_ova(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """export-ova then import-ova gives a folder that boots like the original."""
        src = _vm(tmp_path, "hello", fmt="qcow2")
        status, out, err = _run(capsys, "vm", "export-ova", str(src), str(tmp_path / "h.ova"))
        assert status == 0, err
        assert (tmp_path / "h.ova").is_file()
        status, out, err = _run(
            capsys, "vm", "import-ova", str(tmp_path / "h.ova"), str(tmp_path / "back")
        )
        assert status == 0, err
        assert "imported into" in out
        assert "Traceback" not in err
        proc = _cli("vm", "run", str(tmp_path / "back"), "--timeout", "60")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == guests.OUTPUT["hello"]

    def test_import_of_a_missing_file_is_one_error_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A missing appliance: exit 1, one line naming it, no folder made."""
        status, _, err = _run(
            capsys, "vm", "import-ova", str(tmp_path / "nope.ova"), str(tmp_path / "x")
        )
        assert status == 1 and "nope.ova" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()

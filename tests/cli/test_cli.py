"""The `virtkit` command: thin over the public API, clear errors, honest exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import virtkit
from virtkit.cli import main
from virtkit.testing import guests


class TestImageCommands:
    def test_create_info_check_raw(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """create, info --json and check work on a raw image."""
        path = tmp_path / "d.raw"
        assert main(["image", "create", str(path), "1M", "-f", "raw"]) == 0
        assert main(["image", "info", "--json", str(path)]) == 0
        out = capsys.readouterr().out
        info = json.loads(out[out.index("{") :])
        assert info["format"] == "raw"
        assert info["virtual-size"] == 1024 * 1024
        assert main(["image", "check", str(path)]) == 63  # as qemu-img: raw has nothing to check
        assert "does not support checks" in capsys.readouterr().err

    def test_convert(self, tmp_path: Path) -> None:
        """convert copies the guest-visible bytes."""
        src = tmp_path / "a.raw"
        with virtkit.images.create(src, "1MiB", "raw") as img:
            img.write(4096, b"virtkit")
        assert main(["image", "convert", str(src), str(tmp_path / "b.raw"), "-O", "raw"]) == 0
        with virtkit.images.open(tmp_path / "b.raw") as img:
            assert img.read(4096, 7) == b"virtkit"

    def test_convert_fixed_vhd_with_force_size(self, tmp_path: Path) -> None:
        """-o force_size=on is a switch: the fixed VHD keeps the exact size (Azure's rule)."""
        src = tmp_path / "a.raw"
        virtkit.images.create(src, 3 * 1024**2 + 512 * 7, "raw").close()
        dst = tmp_path / "b.vhd"
        argv = ["image", "convert", str(src), str(dst), "-O", "vpc"]
        assert main([*argv, "-o", "subformat=fixed,force_size=on"]) == 0
        with virtkit.images.open(dst, format="vpc") as img:
            assert img.virtual_size == 3 * 1024**2 + 512 * 7

    def test_error_exit_code(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A virtkit error prints one line on stderr and exits 1."""
        assert main(["image", "info", str(tmp_path / "missing.qcow2")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("virtkit: error: cannot open")
        assert "missing.qcow2" in err

    def test_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A bad command line exits 2 with a usage message, no traceback."""
        assert main(["image", "frobnicate"]) == 2
        err = capsys.readouterr().err
        assert "No such command 'frobnicate'" in err
        assert "Traceback" not in err


class TestVmCommands:
    def test_show(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """vm show summarises a saved VM folder."""
        m = virtkit.Machine(
            name="web", cpus=2, memory="1GiB", disks=[virtkit.Disk(path="root.raw")]
        )
        virtkit.save(m, tmp_path)
        assert main(["vm", "show", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "name: web" in out
        assert "disk vda: root.raw (raw, virtio)" in out

    def test_show_bad_folder(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """vm show on a folder without machine.toml fails with the file named."""
        assert main(["vm", "show", str(tmp_path)]) == 1
        assert "machine.toml is missing" in capsys.readouterr().err

    def _vm(self, tmp_path: Path, guest: str) -> Path:
        folder = tmp_path / guest
        disk = folder / "disks" / "boot.raw"
        disk.parent.mkdir(parents=True)
        guests.write_disk(disk, guest)
        virtkit.save(
            virtkit.Machine(name=guest, memory="2MiB", disks=[virtkit.Disk(path="boot.raw")]),
            folder,
        )
        return folder

    def test_run_streams_console_until_poweroff(
        self, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        """vm run boots the folder on the emulator, prints the console and exits 0 on power-off."""
        folder = self._vm(tmp_path, "hello")
        assert main(["vm", "run", str(folder), "--timeout", "60"]) == 0
        out, err = capsysbinary.readouterr()
        assert out == guests.OUTPUT["hello"]
        assert b"stopped: shutoff" in err

    def test_run_times_out(
        self, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        """A guest still running at --timeout is killed and the command exits 1, naming the limit."""
        folder = self._vm(tmp_path, "counter")
        assert main(["vm", "run", str(folder), "--timeout", "0.5"]) == 1
        out, err = capsysbinary.readouterr()
        assert b"count 0" in out
        assert b"did not power off within 0.5 s" in err


class TestProgress:
    def _convert(self, tmp_path: Path, stderr_tty: bool) -> bytes:
        import os
        import pty
        import subprocess
        import sys

        src = tmp_path / "src.raw"
        src.write_bytes(os.urandom(1 << 20) * 8)
        argv = [sys.executable, "-m", "virtkit.cli", "image", "convert", "-p", "-O", "qcow2",
                str(src), str(tmp_path / "dst.qcow2")]  # fmt: skip
        if not stderr_tty:
            proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
            assert proc.returncode == 0 and proc.stdout == b""
            return proc.stderr
        master, slave = pty.openpty()
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave) as proc:
            os.close(slave)
            seen = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            assert proc.wait(timeout=120) == 0
            assert proc.stdout is not None and proc.stdout.read() == b""
        os.close(master)
        return seen

    def test_bar_with_rate_and_eta_on_a_terminal(self, tmp_path: Path) -> None:
        """-p on a terminal draws a rich bar on stderr: label, 100 %, sizes, rate, time left."""
        err = self._convert(tmp_path, stderr_tty=True)
        assert b"convert" in err and b"100%" in err
        assert b"8.0/8.0 MiB" in err
        assert b"/s" in err  # the transfer rate column
        assert b"0:00:00" in err  # the time-left column, at the end

    def test_no_bar_into_a_pipe(self, tmp_path: Path) -> None:
        """-p with stderr piped prints nothing at all."""
        assert self._convert(tmp_path, stderr_tty=False) == b""


def _with_tty_stderr(argv: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with stderr on a pseudo-terminal: (status, stdout, what the terminal got)."""
    import os
    import pty
    import subprocess

    master, slave = pty.openpty()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, cwd=cwd) as proc:
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.stdout is not None
        out = proc.stdout.read()
        status = proc.wait(timeout=180)
    os.close(master)
    return status, out, seen


def _random_qcow2(path: Path, guest: str | None = None) -> None:
    """A qcow2 image with 8 MiB of incompressible data (a boot sector guest when ``guest``)."""
    import os

    if guest is not None:
        guests.write_disk(path, guest, format="qcow2")
        with virtkit.images.open(path, writable=True) as image:
            image.resize(16 << 20)
            image.write(4 << 20, os.urandom(8 << 20))
        return
    with virtkit.images.create(path, 16 << 20, "qcow2") as image:
        image.write(4 << 20, os.urandom(8 << 20))


class TestProgressOnEveryLongCommand:
    """commit, vm clone, vm export-ova and vm import-ova draw the same bar as convert."""

    @staticmethod
    def _commands(tmp_path: Path) -> list[tuple[str, list[str]]]:
        import sys

        base = tmp_path / "base.qcow2"
        virtkit.images.create(base, 16 << 20, "qcow2").close()
        top = tmp_path / "top.qcow2"
        with virtkit.images.create(
            top, None, "qcow2", backing="base.qcow2", backing_format="qcow2"
        ) as image:
            import os

            image.write(4 << 20, os.urandom(8 << 20))
        folder = tmp_path / "vm"
        (folder / "disks").mkdir(parents=True)
        _random_qcow2(folder / "disks" / "boot.qcow2", "hello")
        virtkit.save(
            virtkit.Machine(name="vm", memory="2MiB", disks=[virtkit.Disk("boot.qcow2")]), folder
        )
        cli = [sys.executable, "-m", "virtkit.cli"]
        return [
            ("commit", [*cli, "image", "commit", "-p", str(top)]),
            ("clone", [*cli, "vm", "clone", "-p", "--full", str(folder), str(tmp_path / "c")]),
            ("export", [*cli, "vm", "export-ova", "-p", str(folder), str(tmp_path / "v.ova")]),
            (
                "import",
                [*cli, "vm", "import-ova", "-p", str(tmp_path / "v.ova"), str(tmp_path / "back")],
            ),
        ]

    def test_bars_on_a_terminal_none_into_a_pipe(self, tmp_path: Path) -> None:
        """On a terminal: label, 100 %, MiB sizes, rate; with stderr piped: nothing."""
        import shutil
        import subprocess

        tty_dir, pipe_dir = tmp_path / "tty", tmp_path / "pipe"
        for where in (tty_dir, pipe_dir):
            where.mkdir()
        for (label, argv), (_, piped) in zip(
            self._commands(tty_dir), self._commands(pipe_dir), strict=True
        ):
            status, _, err = _with_tty_stderr(argv, tty_dir)
            assert status == 0, (label, err)
            assert label.encode() in err and b"100%" in err, (label, err)
            assert b"MiB" in err and b"/s" in err, (label, err)  # sizes and the rate
            assert b"Traceback" not in err
            proc = subprocess.run(piped, capture_output=True, timeout=180, check=False)
            assert proc.returncode == 0, (label, proc.stderr)
            assert proc.stderr == b"", label
        assert (tty_dir / "back" / "machine.toml").is_file()
        shutil.rmtree(tmp_path)


class TestHelpEverywhere:
    def test_every_command_and_option_has_help(self) -> None:
        """Walk the whole command tree: no command and no visible option without help text."""
        import click

        from virtkit.cli import cli

        def walk(cmd: click.Command, path: str) -> list[tuple[str, click.Command]]:
            found = [(path, cmd)]
            if isinstance(cmd, click.Group):
                for name, sub in cmd.commands.items():
                    found += walk(sub, f"{path} {name}")
            return found

        commands = walk(cli, "virtkit")
        assert len(commands) > 40  # image and vm with all their verbs
        missing = [path for path, cmd in commands if not (cmd.help or "").strip()]
        missing += [
            f"{path} {'/'.join(p.opts)}"
            for path, cmd in commands
            for p in cmd.params
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()
        ]
        assert missing == []

    def test_bare_command_prints_usage_not_a_click_internal(self) -> None:
        """`virtkit` alone lists the command groups (no "required: group")."""
        import subprocess
        import sys

        proc = subprocess.run(
            [sys.executable, "-m", "virtkit.cli"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        text = proc.stdout + proc.stderr
        assert "Usage: virtkit" in text and "image" in text and "vm" in text
        assert "required" not in text and "Traceback" not in text

    def test_shell_completion_script(self) -> None:
        """click's completion: a bash function, and the image verbs offered for `virtkit image `."""
        import os
        import subprocess
        import sys

        run = [sys.executable, "-m", "virtkit.cli"]
        script = subprocess.run(
            run, env={**os.environ, "_VIRTKIT_COMPLETE": "bash_source"},
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert "_virtkit_completion" in script
        words = subprocess.run(
            run,
            env={**os.environ, "_VIRTKIT_COMPLETE": "bash_complete",
                 "COMP_WORDS": "virtkit image am", "COMP_CWORD": "2"},
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert "amend" in words

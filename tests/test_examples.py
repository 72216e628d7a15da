"""The examples stay true: the quickstart's boot bytes match their source, and it runs."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_quickstart() -> object:
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "quickstart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestQuickstart:
    def test_boot_bytes_match_source(self, tmp_path: Path) -> None:
        """The bytes in quickstart.py are what nasm makes of quickstart_guest.asm."""
        nasm = shutil.which("nasm")
        if nasm is None:
            pytest.fail("nasm is not installed: run the README test command")
        out = tmp_path / "guest.bin"
        subprocess.run(
            [nasm, "-f", "bin", str(EXAMPLES / "quickstart_guest.asm"), "-o", str(out)], check=True
        )
        assert out.read_bytes() == _load_quickstart().BOOT_SECTOR  # type: ignore[attr-defined]

    def test_runs(self, tmp_path: Path) -> None:
        """The quickstart boots its guest, snapshots, reverts, and leaves the VM folder."""
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "quickstart.py"), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Typed 'virtkit', guest echoed 'VIRTKIT'" in proc.stdout
        assert "Guest powered itself off: shutoff" in proc.stdout
        assert "| Hello from virtkit!" in proc.stdout
        assert (tmp_path / "hello" / "machine.toml").is_file()
        assert (tmp_path / "hello" / "snapshots" / "_index.toml").is_file()


class TestIncrementalBackup:
    def test_runs(self, tmp_path: Path) -> None:
        """Full backup, then incrementals of only the dirty extents; the chain restores the disk."""
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "incremental_backup.py"), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Restored from the backup chain equals the disk: True" in proc.stdout
        copied = [
            int(line.split("copied ")[1].split()[0])
            for line in proc.stdout.splitlines()
            if "copied" in line
        ]
        assert len(copied) == 2 and all(0 < c < 2 * 1024 * 1024 for c in copied)
        qemu_img = shutil.which("qemu-img")
        assert qemu_img is not None
        chain = tmp_path / "backup-2-incremental.qcow2"
        same = subprocess.run([qemu_img, "compare", tmp_path / "disk.qcow2", chain], check=False)
        assert same.returncode == 0  # qemu-img reads the backup chain as the disk too

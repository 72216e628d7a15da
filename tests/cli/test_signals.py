"""Ctrl-C and SIGTERM on a real `virtkit` process: exit 130/143, one line, nothing left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import virtkit
from virtkit.testing import guests

_WAIT = 60.0  # seconds any single step may take on a loaded machine


def _virtkit(
    *args: str, cwd: Path, stdin: int | None = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "virtkit.cli", *args],
        cwd=cwd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + _WAIT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes], sig: int) -> tuple[int, bytes, bytes]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=_WAIT)
    return proc.returncode, out, err


def _runtime_dirs(pid: int) -> list[str]:
    bases = {os.environ.get("XDG_RUNTIME_DIR") or "", tempfile.gettempdir()} - {""}
    return [d for base in bases for d in glob.glob(os.path.join(base, f"vkq-{pid}-*"))]


def _processes_using(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 160 MiB raw image of incompressible data: converting it with -c takes seconds."""
    path = tmp_path_factory.mktemp("src") / "big.raw"
    block = os.urandom(1 << 20)
    with path.open("wb") as fh:
        for _ in range(160):
            fh.write(block)
    return path


class TestConvert:
    @pytest.mark.parametrize(("sig", "status", "word"), [
        (signal.SIGINT, 130, b"interrupted"),
        (signal.SIGTERM, 143, b"terminated"),
    ])  # fmt: skip
    def test_signal_mid_convert(
        self, big_source: Path, tmp_path: Path, sig: int, status: int, word: bytes
    ) -> None:
        """The temp file is removed, the existing destination is untouched, no traceback."""
        dst = tmp_path / "out.qcow2"
        dst.write_bytes(b"the old destination")
        proc = _virtkit(
            "image", "convert", "-O", "qcow2", "-c", str(big_source), str(dst), cwd=tmp_path
        )
        _until(lambda: list(tmp_path.glob(".out.qcow2.*.tmp")), "the temporary file")
        time.sleep(0.2)  # well inside the copy
        rc, _, err = _stop(proc, sig)
        assert rc == status
        assert err.strip() == b"virtkit: " + word
        assert b"Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.qcow2"]
        assert dst.read_bytes() == b"the old destination"


def _vm(tmp_path: Path, guest: str, fmt: str = "raw") -> Path:
    folder = tmp_path / guest
    (folder / "disks").mkdir(parents=True)
    guests.write_disk(folder / "disks" / f"boot.{fmt}", guest, format=fmt)
    virtkit.save(
        virtkit.Machine(name=guest, memory="2MiB", disks=[virtkit.Disk(f"boot.{fmt}", format=fmt)]),
        folder,
    )
    return folder


def _read_until(proc: subprocess.Popen[bytes], marker: bytes) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + _WAIT
    os.set_blocking(proc.stdout.fileno(), False)
    while marker not in seen:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"{marker!r} not printed; got {seen[-300:]!r}")
        chunk = proc.stdout.read()
        if chunk:
            seen += chunk
        time.sleep(0.02)
    os.set_blocking(proc.stdout.fileno(), True)
    return seen


_BOTH_SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


class TestRunningVm:
    @pytest.mark.parametrize("command", ["run", "console"])
    @pytest.mark.parametrize(("sig", "status"), _BOTH_SIGNALS)
    def test_vm_on_the_emulator(self, tmp_path: Path, command: str, sig: int, status: int) -> None:
        """vm run / vm console of a counting guest stop on the signal with the right status and
        one line; the VM folder is as it was."""
        folder = _vm(tmp_path, "counter")
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        proc = _virtkit("vm", command, str(folder), cwd=tmp_path, stdin=subprocess.PIPE)
        _read_until(proc, b"count 1")
        rc, _, err = _stop(proc, sig)
        assert rc == status
        assert err.strip().splitlines()[-1].startswith(b"virtkit: ")
        assert b"Traceback" not in err
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before

    @pytest.mark.qemu
    @pytest.mark.parametrize("command", ["run", "console"])
    @pytest.mark.parametrize(("sig", "status"), _BOTH_SIGNALS)
    def test_qemu_guest_leaves_no_process_or_runtime_folder(
        self, tmp_path: Path, command: str, sig: int, status: int
    ) -> None:
        """On qemu, after the signal no QEMU process and no runtime folder remain."""
        folder = _vm(tmp_path, "counter", fmt="qcow2")
        disk = folder / "disks" / "boot.qcow2"
        proc = _virtkit(
            "vm", "--connect", "qemu", command, str(folder), cwd=tmp_path, stdin=subprocess.PIPE
        )
        _read_until(proc, b"count 1")
        assert _processes_using(disk), "QEMU is not running the disk"
        assert _runtime_dirs(proc.pid), "no runtime folder while running"
        rc, _, err = _stop(proc, sig)
        assert rc == status
        assert b"Traceback" not in err
        word = b"interrupted" if sig == signal.SIGINT else b"terminated"
        assert err.strip().splitlines()[-1] == b"virtkit: " + word
        _until(lambda: not _processes_using(disk), "QEMU to exit")
        assert _runtime_dirs(proc.pid) == []
        assert virtkit.images.open(disk).check().ok

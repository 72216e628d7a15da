"""The start path: query-kvm asked inside launch(), a QEMU already gone handled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from virtkit.backends.qemu import QemuHypervisor
from virtkit.backends.qemu.process import QemuProcess
from virtkit.backends.qemu.qmp import QmpSession
from virtkit.model import Disk, Machine


def _gone(tmp_path: Path, argv: list[str]) -> QemuProcess:
    """A process record whose QMP session never connected (QEMU already exited)."""
    session = QmpSession("gone", tmp_path / "qmp.sock", lambda name, data: None)
    return QemuProcess("gone", argv, tmp_path, session, lambda data: None, lambda info: None)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["qemu", "-accel", "kvm"], True),
        (["qemu", "-accel", "tcg"], False),
        (["qemu"], False),
    ],
    ids=["kvm", "tcg", "none"],
)
def test_query_kvm_after_qemu_left_falls_back_to_the_command_line(
    tmp_path: Path, argv: list[str], expected: bool
) -> None:
    """A guest that powered off at once: the accelerator comes from the argv, no error."""
    assert asyncio.run(_gone(tmp_path, argv)._query_kvm()) is expected


def test_start_reports_the_accelerator_without_a_separate_round_trip(
    hv: QemuHypervisor, boot_disk: Callable[..., Path]
) -> None:
    """start() fills guest.accelerator from the launch's own query-kvm (TCG here)."""
    guest = hv.define(
        Machine(name="accel", memory="16MiB", disks=[Disk(path=str(boot_disk("counter")))])
    )
    guest.start()
    proc = guest._proc
    assert proc is not None
    assert proc.kvm_enabled is False
    assert guest.accelerator == "tcg"
    guest.kill()

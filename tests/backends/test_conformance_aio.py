"""The conformance suite through the asyncio API, on both built-in backends."""

from __future__ import annotations

import pytest

from virtkit.testing.conformance_aio import AsyncConformanceSuite


class TestEmulatorAio(AsyncConformanceSuite):
    """The in-process emulator, driven through virtkit.aio."""

    backend = "emulator"
    disk_format = "qcow2"


@pytest.mark.qemu
class TestQemuAio(AsyncConformanceSuite):
    """qemu-system-x86_64 (TCG), driven through virtkit.aio."""

    backend = "qemu"
    connect_options = {"accel": "tcg"}  # noqa: RUF012 - read-only class setting
    timeout = 60.0

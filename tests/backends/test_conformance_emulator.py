"""The emulator backend runs the shared conformance suite."""

from __future__ import annotations

from typing import Any, ClassVar

from virtkit.testing.conformance import ConformanceSuite


class TestEmulator(ConformanceSuite):
    """The in-process emulator, wall clock."""

    backend = "emulator"
    timeout: ClassVar[float] = 10.0
    reports_boot_failure = True
    crashes_on_triple_fault = True


class TestEmulatorRaw(TestEmulator):
    """The same suite with raw disks (full snapshots copy raw disks into the snapshot)."""

    disk_format = "raw"


class TestEmulatorVirtualClock(TestEmulator):
    """The same suite with guest time driven by executed instructions."""

    connect_options: ClassVar[dict[str, Any]] = {"clock": "virtual"}

"""The qemu backend runs the shared conformance suite (TCG; real qemu-system-x86_64)."""

from __future__ import annotations

from typing import Any, ClassVar

from virtkit.testing.conformance import ConformanceSuite


class TestQemu(ConformanceSuite):
    """Every conformance test against ``virtkit.connect("qemu", accel="tcg")``."""

    backend = "qemu"
    connect_options: ClassVar[dict[str, Any]] = {"accel": "tcg"}
    # SeaBIOS retries booting forever (RUNNING) instead of reporting a failure,
    # and QEMU resets the machine on a triple fault (its default -action reboot=reset).
    reports_boot_failure = False
    crashes_on_triple_fault = False
    live_media = True
    hot_plug = True

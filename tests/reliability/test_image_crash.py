"""Crash consistency: a process cut off at any write leaves an image that only leaks.

Each public-API workload runs once to completion (under a
:class:`~virtkit.testing.faults.Recorder`, to count its writes), then again
from the same starting files cut off before write N, for a dense sample of N
(every N with ``-m slow`` or ``scripts/crash_campaign.py``). After each cut:
the image opens; real ``qemu-img check`` finds no corruption (leaks allowed;
the COPIED-flag window, which QEMU has too, only where it is provably
harmless); every byte a completed ``flush()`` acknowledged reads back;
``check(repair=True)`` reclaims the leaks and ``qemu-img check`` is then clean.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from image_workloads import DEFAULT_POINTS, WORKLOADS, run_sweep


class TestCrashAfterWrite:
    """CrashAfter(N): the write N never happens, nor anything after it."""

    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_sampled_crash_points(self, name: str, tmp_path: Path) -> None:
        """A dense sample of crash points leaves the image consistent, acknowledged data intact."""
        run_sweep(name, "crash", tmp_path, DEFAULT_POINTS)

    def test_crashes_leak_and_repair_reclaims(self, tmp_path: Path) -> None:
        """Cutting scattered writes short leaks clusters sometimes; repair always reclaims them."""
        figs = run_sweep("scattered", "crash", tmp_path, 30)
        assert 0 < figs.leaked < figs.tried

    @pytest.mark.slow
    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_every_crash_point(self, name: str, tmp_path: Path) -> None:
        """Every single write index of the workload is a survivable crash point."""
        run_sweep(name, "crash", tmp_path, None)

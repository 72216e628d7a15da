"""Power loss: writes not yet flushed are lost; flushed data and metadata survive.

``PowerLoss(N)`` drops, file by file, every write made since that file's last
``flush()`` and then kills the process at write N: what a volatile disk
cache does when the power goes. The reordered variant
(``PowerLoss(N, keep=0.5)``) keeps a random half of the unflushed writes, in
any combination, as a real disk cache may: only a ``flush()`` orders two
writes. The same checks as the crash tests follow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from image_workloads import DEFAULT_POINTS, WORKLOADS, run_sweep


class TestPowerLoss:
    """Every unflushed write lost."""

    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_sampled_power_losses(self, name: str, tmp_path: Path) -> None:
        """After a power loss at a sampled write the image is consistent and flushed data reads back."""
        run_sweep(name, "power", tmp_path, DEFAULT_POINTS)

    @pytest.mark.slow
    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_every_power_loss_point(self, name: str, tmp_path: Path) -> None:
        """A power loss at every write index leaves a consistent image."""
        run_sweep(name, "power", tmp_path, None)


class TestReorderedPowerLoss:
    """A random subset of the unflushed writes survives: only flushes order writes."""

    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_sampled_reordered_losses(self, name: str, tmp_path: Path) -> None:
        """Dependent metadata writes are separated by a flush, so any surviving subset is consistent."""
        run_sweep(name, "reorder", tmp_path, DEFAULT_POINTS)

    @pytest.mark.slow
    @pytest.mark.parametrize("name", sorted(WORKLOADS))
    def test_every_reordered_loss(self, name: str, tmp_path: Path) -> None:
        """Every write index, with a seeded random half of the unflushed writes kept."""
        run_sweep(name, "reorder", tmp_path, None)

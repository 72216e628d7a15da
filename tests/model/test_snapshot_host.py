"""Snapshot records and host resources."""

from __future__ import annotations

import datetime as dt

import pytest

import virtkit
from virtkit import AllocationPolicy, HostResources, Snapshot, SnapshotKind, State


class TestSnapshot:
    def test_defaults_and_conversion(self) -> None:
        """Enums convert from strings; naive datetimes are taken as UTC."""
        s = Snapshot(name="s1", kind="disk", state="paused", created_at=dt.datetime(2026, 1, 1))  # type: ignore[arg-type]
        assert s.kind is SnapshotKind.DISK
        assert s.state is State.PAUSED
        assert s.created_at.tzinfo is dt.UTC

    @pytest.mark.parametrize("name", ["", "a/b", " x", "x\n", "..", "a" * 129])
    def test_bad_names(self, name: str) -> None:
        """Snapshot names must be usable as file names."""
        with pytest.raises(virtkit.ConfigError, match="'name' must be 1-128 characters"):
            Snapshot(name=name)

    def test_bad_kind(self) -> None:
        """An unknown kind is refused."""
        with pytest.raises(virtkit.ConfigError, match="'kind' must be 'disk' or 'full'"):
            Snapshot(name="x", kind="memory")  # type: ignore[arg-type]


class TestHostResources:
    def test_detect(self) -> None:
        """detect() reads real positive figures from this host."""
        host = HostResources.detect()
        assert host.cpus >= 1
        assert host.memory > 64 * 1024**2
        assert host.storage > 0

    def test_validation(self) -> None:
        """Negative capacities and silly ratios are refused."""
        with pytest.raises(virtkit.ConfigError, match="'cpus' must be a non-negative integer"):
            HostResources(cpus=-1, memory="1GiB", storage="1GiB")
        with pytest.raises(virtkit.ConfigError, match="'memory_overcommit' must be a ratio"):
            AllocationPolicy(memory_overcommit=0)

"""The public surface: pinned so it never changes by accident."""

from __future__ import annotations

import pytest

import virtkit


class TestExports:
    def test_all_is_pinned(self) -> None:
        """virtkit.__all__ is exactly the documented public names."""
        assert sorted(virtkit.__all__) == sorted(
            [
                "clone", "connect", "load", "save", "images", "aio", "ova", "libvirt", "Fleet",
                "Console", "Guest", "Hypervisor",
                "AllocationPolicy", "CdRom", "CloudInit", "CpuTopology", "Disk",
                "HostResources", "HypervisorType", "KernelBoot", "Machine", "Nic", "PortForward",
                "Serial", "Share", "Snapshot", "SnapshotKind", "State",
                "BackendError", "BackendUnavailable", "CapabilityWarning", "ConfigError", "CorruptImageError",
                "ImageError", "ImageLockedError", "ResourceError", "StateError",
                "TimeoutError", "UnsupportedFeatureError", "VirtkitError",
            ]
        )  # fmt: skip

    def test_every_name_resolves_and_is_documented(self) -> None:
        """Each exported name exists and has a docstring."""
        for name in virtkit.__all__:
            obj = getattr(virtkit, name)
            assert obj.__doc__, name

    def test_error_hierarchy(self) -> None:
        """Every error is a VirtkitError; TimeoutError is also the builtin one."""
        for name in virtkit.__all__:
            obj = getattr(virtkit, name)
            if isinstance(obj, type) and name.endswith(("Error", "Unavailable")):
                assert issubclass(obj, virtkit.VirtkitError), name
        assert issubclass(virtkit.TimeoutError, TimeoutError)
        assert issubclass(virtkit.CorruptImageError, virtkit.ImageError)
        assert issubclass(virtkit.BackendUnavailable, virtkit.BackendError)


class TestConnect:
    def test_unknown_backend(self) -> None:
        """An unknown backend name is a ConfigError listing the known ones."""
        with pytest.raises(virtkit.ConfigError, match="known backends: emulator, qemu"):
            virtkit.connect("vmware")

    def test_broken_backend_is_unavailable_with_hint(self) -> None:
        """A backend whose module cannot be imported raises BackendUnavailable with its hint."""
        from virtkit.backends import _REGISTRY, register_backend

        register_backend("broken", "virtkit_no_such_module:Hv", hint="pip install it")
        try:
            with pytest.raises(virtkit.BackendUnavailable, match="hint: pip install it") as info:
                virtkit.connect("broken")
            assert info.value.hint == "pip install it"
        finally:
            del _REGISTRY["broken"]

"""The accelerator choice: forced, probed honestly, reported by the guest and QMP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor, accel
from virtkit.backends.qemu.accel import choose_accel, probe_image, probe_kvm
from virtkit.model import Disk, HypervisorType, Machine


class TestAccel:
    def test_forced_tcg_is_reported_by_the_guest_and_query_kvm(
        self, hv: QemuHypervisor, boot_disk
    ) -> None:  # type: ignore[no-untyped-def]
        """accel='tcg' runs TCG: guest.accelerator and QMP query-kvm agree, the hypervisor is type 2."""
        guest = hv.define(
            Machine(
                name="tcg",
                memory="16MiB",
                disks=[Disk(path=str(boot_disk("ignore-acpi")), bus="ide")],
            )
        )
        guest.start()
        assert guest.accelerator == "tcg"
        assert guest.qmp("query-kvm")["enabled"] is False
        assert hv.kind is HypervisorType.TYPE2
        guest.kill()

    def test_probe_image_is_a_boot_sector(self) -> None:
        """The probe guest is one 512-byte sector with the 0x55AA signature."""
        image = probe_image()
        assert len(image) == 512 and image[-2:] == b"\x55\xaa"

    def test_probe_reports_tcg_when_the_kvm_guest_fails(self, tmp_path: Path) -> None:
        """A QEMU whose KVM run fails gives TCG with the exit code in the reason (never an exception)."""
        fake = tmp_path / "qemu-fails"
        fake.write_text("#!/bin/sh\necho 'kvm: broken' >&2\nexit 3\n")
        fake.chmod(0o755)
        choice = probe_kvm(str(fake))
        assert choice.accel == "tcg"
        if Path("/dev/kvm").exists():
            assert "exit code 3" in choice.reason

    def test_probe_agrees_with_a_real_run(self) -> None:
        """The cached auto choice is KVM only if the probe guest completes under KVM on this host."""
        choice = choose_accel("qemu-system-x86_64", "auto")
        assert choice.accel in ("kvm", "tcg") and choice.reason
        assert choose_accel("qemu-system-x86_64", "auto") == choice  # cached per host
        assert choose_accel(str(shutil.which("qemu-system-x86_64")), "auto") == choice

    def test_cached_answer_is_per_host_binary(self, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        """The on-disk cache is keyed by the resolved binary: a name and its path share the
        answer; a cache written for one binary does not answer for another."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setattr(accel, "_memo", {})
        real = str(shutil.which("qemu-system-x86_64"))
        accel._store_cached(accel._host_key(real), accel.AccelChoice("tcg", "seeded"))
        assert choose_accel("qemu-system-x86_64", "auto").reason == "seeded"
        other = tmp_path / "qemu-fails"
        other.write_text("#!/bin/sh\nexit 3\n")
        other.chmod(0o755)
        assert choose_accel(str(other), "auto").reason != "seeded"

    def test_bad_accel_value_is_a_config_error(self) -> None:
        """accel must be auto, kvm or tcg."""
        with pytest.raises(virtkit.ConfigError, match="accel"):
            virtkit.connect("qemu", accel="hvf")

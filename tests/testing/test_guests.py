"""The boot-sector guest builder: sources, nasm, the cache, disk images."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from virtkit import images
from virtkit.errors import BackendError, BackendUnavailable, ConfigError, ImageError
from virtkit.testing import guests


class TestBuild:
    """Assembling the guests with nasm."""

    @pytest.mark.parametrize("name", sorted(guests.GUESTS))
    def test_every_guest_is_a_boot_sector(self, name: str, tmp_path: Path) -> None:
        """Each guest assembles to 512 bytes ending in 0x55AA (except no-signature)."""
        sector = guests.build(name, cache=tmp_path)
        assert len(sector) == 512
        assert sector[510:] == (b"\0\0" if name == "no-signature" else b"\x55\xaa")

    def test_source_is_shipped_text(self) -> None:
        """The NASM source is readable from the package."""
        text = guests.source("hello")
        assert '%include "common.inc"' in text
        assert "POWER_OFF" in text

    def test_cache_is_reused_and_keyed_by_source(self, tmp_path: Path) -> None:
        """A second build reads the cached file; a changed source gets its own entry."""
        first = guests.build("hello", cache=tmp_path)
        cached = list(tmp_path.glob("hello-*.bin"))
        assert len(cached) == 1
        cached[0].write_bytes(b"\x90" * 510 + b"\x55\xaa")  # prove it is read back
        assert guests.build("hello", cache=tmp_path) == b"\x90" * 510 + b"\x55\xaa"
        other = guests.assemble(guests.source("hello") + "\n; changed\n", cache=tmp_path)
        assert other == first
        assert len(list(tmp_path.glob("guest-*.bin"))) == 1

    def test_unknown_guest(self) -> None:
        """An unknown name is a ConfigError listing the known ones."""
        with pytest.raises(ConfigError, match="hello"):
            guests.build("nope")

    def test_nasm_errors_are_reported(self, tmp_path: Path) -> None:
        """Bad source raises BackendError carrying nasm's message."""
        with pytest.raises(BackendError) as info:
            guests.assemble("bits 16\n  mov ax, \n", cache=tmp_path)
        assert info.value.stderr_tail
        assert info.value.exit_code not in (None, 0)

    def test_missing_nasm_names_the_package(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without nasm on PATH the error says how to install it."""
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(BackendUnavailable) as info:
            guests.assemble("bits 16\n", cache=tmp_path / "cache")
        assert info.value.hint is not None
        assert "nasm" in info.value.hint

    def test_default_cache_dir_follows_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """VIRTKIT_GUEST_CACHE, else XDG_CACHE_HOME/virtkit/guests."""
        monkeypatch.setenv("VIRTKIT_GUEST_CACHE", str(tmp_path / "explicit"))
        assert guests.cache_dir() == tmp_path / "explicit"
        monkeypatch.delenv("VIRTKIT_GUEST_CACHE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert guests.cache_dir() == tmp_path / "xdg" / "virtkit" / "guests"


class TestWriteDisk:
    """Guests written into images through virtkit.images."""

    @pytest.mark.parametrize("fmt", ["raw", "qcow2"])
    def test_disk_image_holds_the_guest(
        self,
        fmt: str,
        tmp_path: Path,
        qemu_img: Callable[..., subprocess.CompletedProcess[str]],
    ) -> None:
        """Sector 0 is the boot sector, sector 1 the disk guest's data; qemu-img agrees."""
        path = guests.write_disk(tmp_path / f"d.{fmt}", "disk", format=fmt, size="2MiB")
        with images.open(path) as image:
            assert image.format == fmt
            assert image.virtual_size == 2 * 2**20
            assert image.read(0, 512) == guests.build("disk")
            assert image.read(512, len(guests.DISK_SECTOR1)) == guests.DISK_SECTOR1
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        assert info["format"] == fmt
        if fmt == "qcow2":
            qemu_img("check", path)

    def test_existing_file_is_not_overwritten(self, tmp_path: Path) -> None:
        """write_disk refuses to replace an image."""
        path = tmp_path / "d.raw"
        path.write_bytes(b"precious")
        with pytest.raises(ImageError):
            guests.write_disk(path, "hello")
        assert path.read_bytes() == b"precious"

    def test_bad_format(self, tmp_path: Path) -> None:
        """Only raw and qcow2 are offered."""
        with pytest.raises(ConfigError, match="format"):
            guests.write_disk(tmp_path / "d.vmdk", "hello", format="vmdk")

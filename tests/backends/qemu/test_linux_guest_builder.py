"""The Linux test guest builder: newc cpio writer, module dependency order, initramfs contents."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import virtkit
from virtkit.testing.linux import (
    DEFAULT_MODULES,
    READY_MARKER,
    LinuxKernel,
    build_initramfs,
    cpio_newc,
    fetch_kernel,
    module_load_order,
)


@pytest.fixture(scope="module")
def kernel() -> LinuxKernel:
    """The cached Debian cloud kernel."""
    return fetch_kernel()


class TestCpio:
    def test_archive_lists_and_extracts_with_gnu_cpio(self, tmp_path: Path) -> None:
        """cpio -t lists our entries; -i extracts file data, modes and symlinks exactly."""
        archive = cpio_newc(
            [
                ("dir", stat.S_IFDIR | 0o755, b"", 0),
                ("dir/file", stat.S_IFREG | 0o640, b"abc" * 5, 0),
                ("link", stat.S_IFLNK | 0o777, b"dir/file", 0),
            ]
        )
        assert len(archive) % 4 == 0 and archive.endswith(b"\0")
        cpio = shutil.which("cpio")
        assert cpio is not None, "cpio is installed by the test command"
        listing = subprocess.run([cpio, "-t"], input=archive, capture_output=True, check=True)
        assert listing.stdout.split() == [b"dir", b"dir/file", b"link"]
        subprocess.run(
            [cpio, "-i", "-d", "--no-absolute-filenames"], input=archive, cwd=tmp_path,
            capture_output=True, check=True,
        )  # fmt: skip
        assert (tmp_path / "dir/file").read_bytes() == b"abcabcabcabcabc"
        assert stat.S_IMODE((tmp_path / "dir/file").stat().st_mode) == 0o640
        assert os.readlink(tmp_path / "link") == "dir/file"


class TestModules:
    def test_dependencies_come_before_their_users(self, kernel: LinuxKernel) -> None:
        """Each module appears after everything its .modinfo depends on."""
        order = [name for name, _ in module_load_order(kernel.modules_dir, DEFAULT_MODULES)]
        assert set(DEFAULT_MODULES) <= set(order)
        for before, after in [
            ("virtio_ring", "virtio"),
            ("virtio", "virtio_pci"),
            ("virtio", "virtio_blk"),
            ("scsi_mod", "sr_mod"),
            ("cdrom", "sr_mod"),
            ("cdrom", "isofs"),
            ("libata", "ata_piix"),
        ]:
            assert order.index(before) < order.index(after)

    def test_unknown_module_is_a_config_error(self, kernel: LinuxKernel) -> None:
        """Asking for a module the kernel lacks names it."""
        with pytest.raises(virtkit.ConfigError, match="no_such_mod"):
            module_load_order(kernel.modules_dir, ["no_such_mod"])


class TestInitramfs:
    def test_contains_console_node_init_and_modules(
        self, kernel: LinuxKernel, tmp_path: Path
    ) -> None:
        """The gzipped archive has /dev/console (char 5:1), an executable /init printing the
        ready marker, busybox and every module."""
        path = build_initramfs(kernel, tmp_path / "initrd.gz")
        archive = gzip.decompress(path.read_bytes())
        listing = subprocess.run(
            ["cpio", "-t", "-v"], input=archive, capture_output=True, check=True
        ).stdout.decode()
        console = next(line for line in listing.splitlines() if line.endswith(" dev/console"))
        assert console.startswith("crw") and "5,   1" in console
        names = {line.split()[-1] for line in listing.splitlines()}
        assert {
            "init",
            "bin/busybox",
            "lib/modules/virtio_blk.ko",
            "lib/modules/sr_mod.ko",
        } <= names
        assert READY_MARKER.encode() in archive and b"acpid -f" in archive

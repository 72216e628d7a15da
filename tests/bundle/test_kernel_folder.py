"""A kernel-booted VM is a folder like any other: saved, loaded, moved and run by `virtkit vm run`.

The issue's symptom: ``KernelBoot`` was a ``define()`` argument only, so such a VM could not
be saved, loaded or run from the command line. Here the real test kernel (Debian's cloud
kernel, cached) and a busybox initramfs live inside the folder, ``machine.toml`` names them
relative to it, and ``virtkit vm --connect qemu run FOLDER`` boots the moved folder to a
guest that prints its command line and powers off.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import virtkit
from virtkit import KernelBoot, Machine
from virtkit.testing.linux import LINUX_CMDLINE, build_initramfs, fetch_kernel

pytestmark = pytest.mark.qemu

MARK = "vk-kernel-folder"


@pytest.fixture(scope="module")
def kernel_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VM folder holding its kernel and an initramfs that prints /proc/cmdline, powers off."""
    folder = tmp_path_factory.mktemp("kernel") / "kvm"
    (folder / "boot").mkdir(parents=True)
    kernel = fetch_kernel()
    shutil.copyfile(kernel.vmlinuz, folder / "boot" / "vmlinuz")
    build_initramfs(
        kernel, folder / "boot" / "initrd.gz", extra_init="cat /proc/cmdline; poweroff -f"
    )
    boot = KernelBoot("boot/vmlinuz", "boot/initrd.gz", f"{LINUX_CMDLINE} {MARK}=1")
    virtkit.save(Machine(name="kvm", memory="128MiB", kernel=boot), folder)
    return folder


class TestKernelBootFolder:
    def test_saved_relative_and_loaded_equal(self, kernel_folder: Path, tmp_path: Path) -> None:
        """[kernel] is in machine.toml with folder-relative paths; two loads agree, and a
        moved copy loads as the same machine."""
        text = (kernel_folder / "machine.toml").read_text()
        assert '[kernel]\nkernel = "boot/vmlinuz"\ninitrd = "boot/initrd.gz"\n' in text
        assert str(kernel_folder) not in text
        first = virtkit.load(kernel_folder)
        assert first == virtkit.load(kernel_folder)
        assert first.kernel == KernelBoot(
            "boot/vmlinuz", "boot/initrd.gz", f"{LINUX_CMDLINE} {MARK}=1"
        )
        moved = tmp_path / "elsewhere"
        shutil.copytree(kernel_folder, moved)
        assert virtkit.load(moved) == first

    def test_vm_run_boots_the_moved_folder(self, kernel_folder: Path, tmp_path: Path) -> None:
        """`virtkit vm --connect qemu run` on a moved copy boots its own kernel and initrd,
        streams the console (the command line from machine.toml) and exits 0 at power-off."""
        moved = tmp_path / "moved"
        shutil.copytree(kernel_folder, moved)
        cli = [sys.executable, "-m", "virtkit.cli", "vm", "--connect", "qemu", "run"]
        proc = subprocess.run(
            [*cli, "--timeout", "180", str(moved)],
            capture_output=True,
            timeout=240,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert f"{MARK}=1".encode() in proc.stdout
        assert b"Power down" in proc.stdout

    def test_define_reads_the_kernel_from_the_folder(self, kernel_folder: Path) -> None:
        """hv.define(load(folder), folder=folder) boots the folder's kernel: no kernel= argument."""
        hv = virtkit.connect("qemu", accel="tcg", root=kernel_folder.parent / "hv")
        try:
            guest = hv.define(virtkit.load(kernel_folder), folder=kernel_folder)
            guest.start()
            guest.console.expect(f"{MARK}=1", timeout=120)
            assert guest.wait(timeout=120) is virtkit.State.SHUTOFF
        finally:
            hv.close()

"""Host folders shared with the real Linux guest over virtio-9p (Debian's generic kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

import virtkit
from virtkit.backends.qemu import QemuHypervisor
from virtkit.model import KernelBoot, Machine, Share
from virtkit.testing.linux import (
    DEFAULT_MODULES,
    GENERIC_KERNEL_PACKAGE,
    LINUX_CMDLINE,
    PROMPT,
    READY_MARKER,
    build_initramfs,
    fetch_kernel,
)


@pytest.fixture(scope="module")
def ninep_boot(tmp_path_factory: pytest.TempPathFactory) -> KernelBoot:
    """Debian's generic kernel (the cloud kernel has no 9p) with the 9p modules."""
    kernel = fetch_kernel(package=GENERIC_KERNEL_PACKAGE)
    initrd = build_initramfs(
        kernel,
        tmp_path_factory.mktemp("ninep") / "initrd-9p.gz",
        modules=(*DEFAULT_MODULES, "9p", "9pnet_virtio"),
    )
    return KernelBoot(str(kernel.vmlinuz), str(initrd), LINUX_CMDLINE)


class TestShares:
    """A read-only and a writable share, mounted by tag in the guest."""

    def test_read_only_and_writable_shares(
        self, hv: QemuHypervisor, ninep_boot: KernelBoot, tmp_path: Path
    ) -> None:
        """The guest reads both; writing fails on the read-only one and reaches the host
        through the writable one."""
        ro, rw = tmp_path / "ro", tmp_path / "rw"
        ro.mkdir()
        rw.mkdir()
        (ro / "hello.txt").write_text("from the host\n")
        machine = Machine(
            name="shares",
            memory="256MiB",
            kernel=ninep_boot,
            shares=[Share(str(ro), "hostro"), Share(str(rw), "hostrw", read_only=False)],
        )
        guest = hv.define(machine)
        guest.start()
        guest.wait_ready(via="console", pattern=READY_MARKER, timeout=120)
        guest.console.expect(PROMPT, timeout=30)
        run = guest.console.run
        opts = "-t 9p -o trans=virtio,version=9p2000.L"
        run(f"mkdir -p /mnt/ro /mnt/rw && mount {opts} hostro /mnt/ro", prompt=PROMPT)
        assert guest.console.exit_status == 0
        run(f"mount {opts} hostrw /mnt/rw", prompt=PROMPT)
        assert guest.console.exit_status == 0
        assert run("cat /mnt/ro/hello.txt", prompt=PROMPT) == "from the host\n"
        run("echo nope > /mnt/ro/new.txt", prompt=PROMPT)
        assert guest.console.exit_status != 0
        assert not (ro / "new.txt").exists()
        run("echo from the guest > /mnt/rw/made.txt && sync", prompt=PROMPT)
        assert guest.console.exit_status == 0
        assert (rw / "made.txt").read_text() == "from the guest\n"
        guest.kill()

    def test_missing_folder_and_emulator(self, hv: QemuHypervisor, tmp_path: Path) -> None:
        """A share whose folder is missing fails at start naming it; the emulator warns."""
        machine = Machine(name="noshare", memory="32MiB", shares=[Share(str(tmp_path / "x"), "t")])
        guest = hv.define(machine)
        with pytest.raises(virtkit.ConfigError, match=r"shares\[0\]\.host_path"):
            guest.start()
        with (
            virtkit.connect("emulator") as emu,
            pytest.warns(virtkit.CapabilityWarning, match=r"shares\[0\]"),
        ):
            emu.define(machine)

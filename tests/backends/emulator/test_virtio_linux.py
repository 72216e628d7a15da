"""The real Linux guest uses the platform devices on the emulator (slow: each boots Linux).

With ``PLATFORM_DEVICES`` on and ``acpi=off`` dropped, Debian's cloud kernel
finds the virtio-mmio disk through the DSDT (``/init`` loads
``virtio_mmio`` and ``virtio_blk``), writes to it, and powers the machine
off through ACPI — by ``poweroff`` in the guest, or by the power button
(``guest.shutdown()``: the SCI, the kernel's fixed power button, busybox
``acpid``). The host then reads the bytes back with :mod:`virtkit.images`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virtkit import Disk, KernelBoot, Machine, State, images
from virtkit.backends.emulator import EmulatorGuest, EmulatorHypervisor
from virtkit.backends.emulator import machine as machine_module
from virtkit.testing.linux import (
    DEFAULT_MODULES,
    PROMPT,
    READY_MARKER,
    LinuxKernel,
    build_initramfs,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20
CMDLINE = "console=ttyS0 nolapic noapic nokaslr tsc=unstable panic=-1"
MESSAGE = b"written by Linux through virtio-mmio"


@pytest.fixture(scope="module")
def initrd(kernel: LinuxKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(
        kernel,
        tmp_path_factory.mktemp("initrd") / "initrd.gz",
        modules=(*DEFAULT_MODULES, "virtio_mmio"),
    )


@pytest.fixture
def shell(
    hv: EmulatorHypervisor,
    kernel: LinuxKernel,
    initrd: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[EmulatorGuest, Path]]:
    """The Linux guest at its shell prompt on the emulator, with a 16 MiB qcow2 disk."""
    monkeypatch.setattr(machine_module, "PLATFORM_DEVICES", True)
    disk = tmp_path / "data.qcow2"
    images.create(disk, 16 * MiB, format="qcow2").close()
    guest = hv.define(
        Machine(
            name="virtio-linux",
            memory="256MiB",
            kernel=KernelBoot(kernel=kernel.vmlinuz, initrd=initrd, append=CMDLINE),
            disks=[Disk(path=str(disk))],
        )
    )
    assert isinstance(guest, EmulatorGuest)
    guest.start()
    try:
        guest.console.expect("[vda] 32768 512-byte logical blocks", timeout=600)
        guest.console.expect(READY_MARKER, timeout=120)
        guest.console.expect(PROMPT, timeout=60)
        yield guest, disk
    finally:
        if guest.state is not State.SHUTOFF:
            guest.kill()


def _write_and_sync(guest: EmulatorGuest) -> None:
    console = guest.console
    # sector 8 of /dev/vda, padded to a whole sector, and read back through the page cache
    console.run(
        f"printf '{MESSAGE.decode()}' | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync 2>/dev/null",
        prompt=PROMPT,
        timeout=120,
    )
    assert console.exit_status == 0
    console.run("echo 3 > /proc/sys/vm/drop_caches", prompt=PROMPT, timeout=60)
    got = console.run(
        "dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 36", prompt=PROMPT
    )
    assert got == MESSAGE.decode()
    size = console.run("cat /sys/block/vda/size", prompt=PROMPT)
    assert size.strip() == str(16 * MiB // 512)


def _assert_on_disk(disk: Path) -> None:
    with images.open(disk) as image:
        sector = image.read(8 * 512, 512)
        assert sector == MESSAGE.ljust(512, b"\0")
        assert image.read(0, 8 * 512) == bytes(8 * 512)


def test_write_then_poweroff_in_the_guest(shell: tuple[EmulatorGuest, Path]) -> None:
    """dd to /dev/vda, ``poweroff`` (ACPI S5 via the DSDT's \\_S5), bytes read on the host."""
    guest, disk = shell
    _write_and_sync(guest)
    guest.console.write("poweroff -f\n")
    assert guest.wait(timeout=120) is State.SHUTOFF
    _assert_on_disk(disk)


def test_write_then_the_power_button(shell: tuple[EmulatorGuest, Path]) -> None:
    """guest.shutdown(): the SCI reaches Linux, acpid runs the PWRF action, the guest powers off."""
    guest, disk = shell
    _write_and_sync(guest)
    guest.shutdown(timeout=180)
    assert guest.state is State.SHUTOFF
    _assert_on_disk(disk)

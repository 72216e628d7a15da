"""The real Linux test guest on the emulator: Debian's cloud kernel to the busybox shell.

The kernel and the initramfs are the ones the qemu backend boots
(:mod:`virtkit.testing.linux`); the command line is
:data:`EMULATOR_CMDLINE`: the emulated PC has no APIC and (by default) no ACPI
tables. The runs use ``clock="virtual"``: guest time follows executed
instructions, so the boot does not depend on how busy the host is. A boot
to the prompt takes over a minute here, so those tests are ``slow``; the
default run checks that the kernel proper starts (tests/backends/emulator/
test_linux_boot.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virtkit import KernelBoot, Machine
from virtkit.backends.emulator import EmulatorHypervisor
from virtkit.testing.linux import PROMPT, READY_MARKER, LinuxKernel, build_initramfs, fetch_kernel

#: the kernel command line the emulator needs (no APIC, no ACPI tables)
EMULATOR_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 nolapic noapic acpi=off nokaslr"
BOOT_TIMEOUT = 600


@pytest.fixture(scope="module")
def kernel() -> LinuxKernel:
    return fetch_kernel()


@pytest.fixture(scope="module")
def initrd(kernel: LinuxKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(kernel, tmp_path_factory.mktemp("initrd") / "initrd.gz")


@pytest.mark.slow
def test_boot_to_the_shell_and_run_commands(
    vhv: EmulatorHypervisor, kernel: LinuxKernel, initrd: Path
) -> None:
    """/init loads its modules and starts the shell; commands typed on ttyS0 run (input
    through the UART's receive interrupt, output through its transmitter); the CPU Linux
    sees is the one the emulator presents; ``reboot -f`` resets the machine through the
    keyboard controller and the kernel boots again."""
    guest = vhv.define(
        Machine(
            name="linux-shell",
            memory="256MiB",
            kernel=KernelBoot(kernel=kernel.vmlinuz, initrd=initrd, append=EMULATOR_CMDLINE),
        )
    )
    guest.start()
    try:
        console = guest.console
        console.expect(READY_MARKER, timeout=BOOT_TIMEOUT)
        console.expect(PROMPT, timeout=60)
        assert console.run("echo hi", prompt=PROMPT, timeout=60) == "hi\n"
        assert console.exit_status == 0
        assert console.run("uname -r", prompt=PROMPT, timeout=60) == kernel.version + "\n"
        # a pipeline: fork, exec, pipes and wait in user space
        count = console.run("seq 1 500 | wc -l", prompt=PROMPT, timeout=60)
        assert count.strip() == "500"
        console.run("false", prompt=PROMPT, timeout=60)
        assert console.exit_status == 1
        cpuinfo = console.run("cat /proc/cpuinfo", prompt=PROMPT, timeout=60)
        assert "processor\t: 0" in cpuinfo
        assert "processor\t: 1" not in cpuinfo  # one vCPU
        before = console.output.count(b"Linux version 6.1")
        console.sendline("reboot -f")
        console.expect("Linux version 6.1", timeout=BOOT_TIMEOUT)
        assert console.output.count(b"Linux version 6.1") == before + 1
    finally:
        guest.kill()

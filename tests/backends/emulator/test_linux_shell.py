"""The real Linux test guest on the emulator: Debian's cloud kernel to the busybox shell.

The kernel, the initramfs and the command line are the ones the qemu
backend boots (:mod:`virtkit.testing.linux`): the CPU reports no local APIC
(so Linux stays on the 8259 PIC) and, without ACPI tables, Linux finds none
and goes on. Most runs use ``clock="virtual"``: guest time follows executed
instructions, so the boot does not depend on how busy the host is. A boot
to the prompt takes one to three minutes here, so these tests are ``slow``;
the default run checks that the kernel proper starts
(tests/backends/emulator/test_linux_boot.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virtkit import Guest, KernelBoot, Machine
from virtkit.backends.emulator import EmulatorHypervisor
from virtkit.backends.emulator import machine as machine_module
from virtkit.testing.linux import (
    LINUX_CMDLINE,
    PROMPT,
    READY_MARKER,
    LinuxKernel,
    build_initramfs,
)

#: a verbose command line (the kernel's log on ttyS0) that needs nothing the PC lacks
VERBOSE_CMDLINE = "console=ttyS0 acpi=off"
BOOT_TIMEOUT = 900


@pytest.fixture(scope="module")
def initrd(kernel: LinuxKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(kernel, tmp_path_factory.mktemp("initrd") / "initrd.gz")


def _machine(name: str, kernel: LinuxKernel, initrd: Path, append: str) -> Machine:
    boot = KernelBoot(kernel=kernel.vmlinuz, initrd=initrd, append=append)
    return Machine(name=name, memory="256MiB", kernel=boot)


@pytest.mark.slow
def test_boot_to_the_shell_run_commands_snapshot_and_reboot(
    vhv: EmulatorHypervisor, kernel: LinuxKernel, initrd: Path
) -> None:
    """With the qemu backend's own command line (LINUX_CMDLINE): /init loads its modules
    and starts the shell; commands typed on ttyS0 run (input through the UART's receive
    interrupt); a full snapshot at the prompt and a revert undo a command's effect;
    ``reboot -f`` resets the machine through the keyboard controller and Linux boots again."""
    guest = vhv.define(_machine("linux-shell", kernel, initrd, LINUX_CMDLINE))
    guest.start()
    try:
        console = guest.console
        console.expect(READY_MARKER, timeout=BOOT_TIMEOUT)
        console.expect(PROMPT, timeout=60)
        assert console.run("echo hi", prompt=PROMPT, timeout=60) == "hi\n"
        assert console.exit_status == 0
        assert console.run("uname -r", prompt=PROMPT, timeout=60) == kernel.version + "\n"
        # a pipeline: fork, exec, pipes and wait in user space
        assert console.run("seq 1 500 | wc -l", prompt=PROMPT, timeout=60).strip() == "500"
        console.run("false", prompt=PROMPT, timeout=60)
        assert console.exit_status == 1
        cpuinfo = console.run("cat /proc/cpuinfo", prompt=PROMPT, timeout=60)
        assert "processor\t: 0" in cpuinfo
        assert "processor\t: 1" not in cpuinfo  # one vCPU
        assert " apic " not in cpuinfo  # CPUID says there is no local APIC
        assert "cpu MHz\t\t: 1000." in cpuinfo  # the TSC calibrated against the PIT: 1 GHz

        guest.pause()
        guest.snapshot("prompt")
        guest.resume()
        assert console.run("echo made > /tmp/mark; cat /tmp/mark", prompt=PROMPT) == "made\n"
        guest.revert("prompt")
        guest.resume()
        gone = console.run("cat /tmp/mark 2>/dev/null || echo gone", prompt=PROMPT, timeout=60)
        assert gone == "gone\n"

        console.sendline("reboot -f")
        console.expect(READY_MARKER, timeout=BOOT_TIMEOUT)
        assert console.output.count(READY_MARKER.encode()) == 2
    finally:
        guest.kill()


@pytest.mark.slow
def test_boot_on_the_wall_clock(hv: EmulatorHypervisor, kernel: LinuxKernel, initrd: Path) -> None:
    """The default clock: guest time follows the host; the same kernel reaches the shell."""
    _boot_and_echo(hv.define(_machine("linux-wall", kernel, initrd, LINUX_CMDLINE)))


@pytest.mark.slow
def test_boot_through_the_decompressor(
    hv: EmulatorHypervisor, kernel: LinuxKernel, initrd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNPACK_KERNEL off: the bzImage's own decompressor runs in the emulator (the path
    for compressions the host does not unpack) and the kernel still reaches the shell."""
    monkeypatch.setattr(machine_module, "UNPACK_KERNEL", False)
    _boot_and_echo(hv.define(_machine("linux-decompressor", kernel, initrd, LINUX_CMDLINE)))


def _boot_and_echo(guest: Guest) -> None:
    """Start ``guest``, wait for its shell, check a command's output, kill it."""
    guest.start()
    try:
        guest.console.expect(READY_MARKER, timeout=BOOT_TIMEOUT)
        guest.console.expect(PROMPT, timeout=60)
        assert guest.console.run("echo hi", prompt=PROMPT, timeout=60) == "hi\n"
    finally:
        guest.kill()


@pytest.mark.slow
def test_two_virtual_clock_boots_print_the_same_bytes(
    vhv: EmulatorHypervisor, kernel: LinuxKernel, initrd: Path
) -> None:
    """clock="virtual": two boots of the verbose kernel to the shell prompt print
    byte-identical transcripts (printk timestamps, the TSC calibration, BogoMIPS, KASLR's
    choice included) at identical instruction counts."""
    transcripts = []
    for run in range(2):
        guest = vhv.define(_machine(f"linux-det{run}", kernel, initrd, VERBOSE_CMDLINE))
        guest.start()
        try:
            guest.console.expect(PROMPT, timeout=BOOT_TIMEOUT)
            guest.pause()
            pc = getattr(guest, "_pc", None)
            assert pc is not None
            mark = guest.console.output.index(PROMPT.encode()) + len(PROMPT)
            trace = [entry for entry in pc.trace if entry[0] < pc.clock.instructions]
            transcripts.append((guest.console.output[:mark], trace[:50]))
        finally:
            guest.kill()
    first, second = transcripts
    assert b"tsc: Detected 1000.0" in first[0]
    assert first == second

"""Bad arguments to the qemu backend's own entry points raise a VirtkitError naming them.

KernelBoot / define(kernel=...), qemu_argv(), the raw qmp() call and the
coroutine twins under guest.aio. One TCG guest per test at most, killed at
the end (the autouse no_leftovers fixture checks that nothing survives).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import virtkit
from virtkit import ConfigError, Disk, Machine, State, VirtkitError
from virtkit.backends.qemu import QemuHypervisor
from virtkit.backends.qemu.argv import KernelBoot
from virtkit.backends.qemu.guest import QemuGuest

BAD_PATHS: list[Any] = [None, True, 0, -1, 1.5, math.nan, b"x", [], {}, "", "a\0b"]
BAD_TIMEOUTS: list[Any] = [True, "1", [], math.nan, -1, -math.inf]


def _ids(values: list[Any]) -> list[str]:
    return [repr(v)[:20] for v in values]


def _id(value: Any) -> str:
    """A test id that is the same in every process (a bare object's repr holds its address)."""
    return "object()" if type(value) is object else repr(value)


class TestKernelBoot:
    """KernelBoot and define(kernel=...) check their arguments."""

    @pytest.mark.parametrize("bad", BAD_PATHS, ids=_ids(BAD_PATHS))
    def test_kernel_and_initrd_paths(self, bad: Any) -> None:
        """kernel= and initrd= that are not paths are a ConfigError naming them (was: TypeError)."""
        with pytest.raises(ConfigError, match="'kernel'"):
            KernelBoot(kernel=bad)
        if bad is not None:  # initrd=None means "no initrd"
            with pytest.raises(ConfigError, match="'initrd'"):
                KernelBoot(kernel="/boot/vmlinuz", initrd=bad)

    @pytest.mark.parametrize("bad", [None, 1, b"quiet", ["quiet"], "a\0b"], ids=_id)
    def test_append(self, bad: Any) -> None:
        """append= must be a str without NUL."""
        with pytest.raises(ConfigError, match="'append'"):
            KernelBoot(kernel="/boot/vmlinuz", append=bad)

    @pytest.mark.parametrize("bad", ["/boot/vmlinuz", 1, {"kernel": "x"}, object()], ids=_id)
    def test_define_kernel_must_be_kernelboot(self, hv: QemuHypervisor, bad: Any) -> None:
        """define(kernel=non-KernelBoot) is a ConfigError naming 'kernel'; nothing is defined."""
        with pytest.raises(ConfigError, match="'kernel'"):
            hv.define(Machine(name="k", memory="16MiB"), kernel=bad)
        assert hv.guests == ()

    def test_define_kernel_is_a_deprecated_alias(self, hv: QemuHypervisor, tmp_path: Path) -> None:
        """define(kernel=...) still works, warns DeprecationWarning, and lands in the machine
        (so the folder keeps it); with Machine.kernel set too it is a ConfigError."""
        boot = KernelBoot(kernel=tmp_path / "vmlinuz", append="console=ttyS0")
        with pytest.warns(DeprecationWarning, match="Machine"):
            guest = hv.define(Machine(name="k", memory="16MiB"), kernel=boot)
        assert guest.machine.kernel == boot
        assert virtkit.load(guest.folder, allow=[tmp_path]).kernel == boot
        assert "-kernel" in guest.qemu_argv()
        with pytest.raises(ConfigError, match="already has a kernel"):
            hv.define(Machine(name="k2", memory="16MiB", kernel=boot), kernel=boot)

    def test_missing_kernel_file_fails_to_start(self, hv: QemuHypervisor, tmp_path: Path) -> None:
        """A kernel file that does not exist makes start() a VirtkitError; the guest stays off."""
        guest = hv.define(
            Machine(name="k", memory="16MiB", kernel=KernelBoot(kernel=tmp_path / "missing"))
        )
        with pytest.raises(VirtkitError):
            guest.start()
        assert guest.state is not State.RUNNING


class TestArgvAndQmp:
    """qemu_argv(), qmp() and guest.aio on one guest."""

    @pytest.fixture
    def guest(self, hv: QemuHypervisor, boot_disk: Callable[[str], Path]) -> Iterator[QemuGuest]:
        """A defined (shut off) TCG guest booting the ignore-acpi test guest; killed after."""
        disk = boot_disk("ignore-acpi")
        g = hv.define(Machine(name="q", memory="16MiB", disks=[Disk(path=str(disk), bus="ide")]))
        assert isinstance(g, QemuGuest)
        yield g
        if g.state in (State.RUNNING, State.PAUSED):
            g.kill()

    @pytest.mark.parametrize("bad", BAD_PATHS, ids=_ids(BAD_PATHS))
    def test_qemu_argv_runtime_dir(self, guest: QemuGuest, bad: Any) -> None:
        """qemu_argv(runtime_dir=non-path) is a ConfigError naming runtime_dir."""
        if bad is None:
            assert guest.qemu_argv(runtime_dir=None)[0].endswith("qemu-system-x86_64")
            return
        with pytest.raises(ConfigError, match="'runtime_dir'"):
            guest.qemu_argv(runtime_dir=bad)

    def test_qmp_and_aio_on_a_running_guest(self, guest: QemuGuest) -> None:
        """Bad qmp()/aio arguments are ConfigErrors naming them; the guest keeps running."""
        guest.start()
        guest.console.expect("ignoring ACPI", timeout=30)
        for bad in (None, "", 1, b"query-status", [], object()):
            with pytest.raises(ConfigError, match="'command'"):
                guest.qmp(bad)
            with pytest.raises(ConfigError, match="'command'"):
                asyncio.run(guest.aio.qmp(bad))
        for bad in (True, 1.5, "x", b"x", [("a", 1)], {1: 2}):
            with pytest.raises(ConfigError, match="'arguments'"):
                guest.qmp("query-status", bad)
            with pytest.raises(ConfigError, match="'arguments'"):
                asyncio.run(guest.aio.qmp("query-status", bad))
        for bad in BAD_TIMEOUTS:
            with pytest.raises(ConfigError, match="'timeout'"):
                guest.qmp("query-status", timeout=bad)
            with pytest.raises(ConfigError, match="'timeout'"):
                asyncio.run(guest.aio.wait(timeout=bad))
            with pytest.raises(ConfigError, match="'timeout'"):
                asyncio.run(guest.aio.console.expect("never", timeout=bad))
            with pytest.raises(ConfigError, match="'timeout'"):
                asyncio.run(guest.aio.shutdown(timeout=bad))
        assert guest.qmp("query-status", timeout=math.inf)["running"] is True
        assert guest.state is State.RUNNING
        with pytest.raises(virtkit.BackendError):
            guest.qmp("no-such-command")
        asyncio.run(guest.aio.kill())
        assert guest.state is State.SHUTOFF

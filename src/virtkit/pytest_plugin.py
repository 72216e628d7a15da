"""pytest fixtures for testing VM definitions with virtkit (a ``pytest11`` plugin).

Installed with virtkit and loaded by pytest automatically. Fixtures:

``virtkit_hypervisor``
    A connection to the backend chosen by the ``virtkit_backend`` marker, else
    ``--virtkit-backend`` (default ``emulator``); its guests live under the
    test's ``tmp_path`` and are killed when the test ends.
``virtkit_guest``
    A factory: ``virtkit_guest(machine_or_folder, start=True)`` defines (and
    starts) a guest on ``virtkit_hypervisor``; every guest it made is killed
    and undefined after the test, pass or fail.
``virtkit_linux``
    A running real Linux guest on the qemu backend (Debian's cloud kernel and
    a busybox initramfs, both cached between runs), at its shell prompt.
``virtkit_vm_folder``
    A temporary, not yet existing VM folder path (``tmp_path / "vm"``).

When a test fails, each of its guests' console transcript and state are
added to the report. At the end of the session the plugin checks that no
guest is still running, no QEMU child process is left, no runtime folder
survives and no disk image of a guest is still held open; anything left is
reported and fails the run.

Markers: ``@pytest.mark.virtkit_backend("qemu", accel="tcg")`` picks the
backend (and its ``connect()`` options) for one test or class.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import virtkit

__all__ = [
    "LeakReport",
    "find_leaks",
    "virtkit_guest",
    "virtkit_hypervisor",
    "virtkit_linux",
    "virtkit_linux_boot",
    "virtkit_vm_folder",
]

_GUESTS = pytest.StashKey[list[virtkit.Guest]]()
_ALL_GUESTS: list[virtkit.Guest] = []
_TRANSCRIPT_LIMIT = 64 * 1024  # bytes of console output a failure report shows (the end)
_LIVE = (virtkit.State.RUNNING, virtkit.State.PAUSED)

GuestFactory = Callable[..., virtkit.Guest]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--virtkit-backend`` and the ``virtkit_backend`` ini setting."""
    group = parser.getgroup("virtkit", "virtkit: testing VM definitions")
    group.addoption(
        "--virtkit-backend",
        dest="virtkit_backend",
        default=None,
        metavar="NAME",
        help="backend for the virtkit_hypervisor fixture (default: emulator)",
    )
    group.addoption(
        "--virtkit-no-leak-check",
        dest="virtkit_leak_check",
        action="store_false",
        default=True,
        help="do not fail the run when guests, QEMU processes or runtime folders are left",
    )
    parser.addini("virtkit_backend", "default backend for virtkit_hypervisor", default="emulator")


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``virtkit_backend`` marker."""
    config.addinivalue_line(
        "markers",
        "virtkit_backend(name, **options): run this test's virtkit fixtures on backend NAME "
        "(options go to virtkit.connect)",
    )


def _backend_of(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    marker = request.node.get_closest_marker("virtkit_backend")
    if marker is not None:
        if len(marker.args) != 1 or not isinstance(marker.args[0], str):
            raise pytest.UsageError(
                f"@pytest.mark.virtkit_backend takes one backend name (got {marker.args!r})"
            )
        return marker.args[0], dict(marker.kwargs)
    chosen = request.config.getoption("virtkit_backend") or request.config.getini("virtkit_backend")
    return str(chosen), {}


@pytest.fixture
def virtkit_vm_folder(tmp_path: Path) -> Path:
    """A VM folder path for this test (``tmp_path / "vm"``; not created)."""
    return tmp_path / "vm"


@pytest.fixture
def virtkit_hypervisor(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[virtkit.Hypervisor]:
    """A hypervisor on the chosen backend, guests under ``tmp_path``; closed after the test."""
    name, options = _backend_of(request)
    options.setdefault("root", tmp_path / "virtkit-guests")
    hv = virtkit.connect(name, **options)
    try:
        yield hv
    finally:
        hv.close()


def _teardown(guest: virtkit.Guest) -> None:
    with contextlib.suppress(virtkit.VirtkitError):
        if guest.state in (*_LIVE, virtkit.State.CRASHED):
            guest.kill()
    with contextlib.suppress(virtkit.VirtkitError):
        guest.hypervisor.undefine(guest)


@pytest.fixture
def virtkit_guest(
    request: pytest.FixtureRequest, virtkit_hypervisor: virtkit.Hypervisor
) -> Iterator[GuestFactory]:
    """``virtkit_guest(machine | folder, *, start=True, folder=None)`` -> a defined guest.

    A folder (``str``/``Path`` holding ``machine.toml``) is loaded and the
    guest runs in it; a ``Machine`` gets ``folder`` or a folder under the
    hypervisor's root. Every guest made is killed and undefined afterwards.
    """
    made: list[virtkit.Guest] = request.node.stash.setdefault(_GUESTS, [])

    def make(
        what: virtkit.Machine | str | os.PathLike[str],
        *,
        start: bool = True,
        folder: str | os.PathLike[str] | None = None,
    ) -> virtkit.Guest:
        if isinstance(what, virtkit.Machine):
            machine = what
        elif isinstance(what, str | os.PathLike):
            machine = virtkit.load(what)
            folder = what if folder is None else folder
        else:
            raise virtkit.ConfigError(
                f"virtkit_guest() takes a Machine or a VM folder (got {type(what).__name__})",
                field="machine",
            )
        guest = virtkit_hypervisor.define(machine, folder=folder)
        made.append(guest)
        _ALL_GUESTS.append(guest)
        if start:
            guest.start()
        return guest

    try:
        yield make
    finally:
        for guest in reversed(made):
            _teardown(guest)


def _initramfs(kernel: Any) -> Path:
    from virtkit.testing import linux  # noqa: PLC0415 - only for the Linux fixture

    key = zlib.crc32(repr((linux.DEFAULT_MODULES, linux.LINUX_CMDLINE, kernel.version)).encode())
    out = linux.cache_dir() / f"initramfs-{kernel.version}-{key:08x}.gz"
    if not out.is_file():
        linux.build_initramfs(kernel, out)  # written atomically: a half file is never used
    return out


@pytest.fixture(scope="session")
def virtkit_linux_boot() -> virtkit.KernelBoot:
    """Direct-boot settings for the test Linux: cached kernel and initramfs (built once)."""
    from virtkit.testing import linux  # noqa: PLC0415

    kernel = linux.fetch_kernel()
    return virtkit.KernelBoot(kernel.vmlinuz, _initramfs(kernel), linux.LINUX_CMDLINE)


@pytest.fixture
def virtkit_linux(
    request: pytest.FixtureRequest, virtkit_linux_boot: virtkit.KernelBoot, tmp_path: Path
) -> Iterator[virtkit.Guest]:
    """A real Linux guest on qemu, booted to its ``vk#`` shell prompt; killed after."""
    from virtkit.testing import linux  # noqa: PLC0415

    made: list[virtkit.Guest] = request.node.stash.setdefault(_GUESTS, [])
    with virtkit.connect("qemu", root=tmp_path / "virtkit-linux") as hv:
        machine = virtkit.Machine(name="linux", memory="256MiB", kernel=virtkit_linux_boot)
        guest = hv.define(machine)
        made.append(guest)
        _ALL_GUESTS.append(guest)
        try:
            guest.start()
            guest.console.expect(linux.READY_MARKER, timeout=120)
            guest.console.expect(linux.PROMPT, timeout=60)
            yield guest
        finally:
            _teardown(guest)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, add each guest's state and console transcript to the report."""
    report = yield
    if report.failed:
        for guest in item.stash.get(_GUESTS, []):
            reason = f" ({guest.crash_reason})" if guest.crash_reason else ""
            output = guest.console.output
            cut = len(output) - _TRANSCRIPT_LIMIT
            text = output[max(cut, 0) :].decode("utf-8", "replace")
            if cut > 0:
                text = f"[... {cut} earlier bytes not shown ...]\n{text}"
            report.sections.append(
                (
                    f"virtkit guest {guest.name!r}: state {guest.state.value}{reason}",
                    f"console transcript ({len(output)} bytes):\n{text}",
                )
            )
    return report


@attrs.frozen
class LeakReport:
    """What :func:`find_leaks` found left behind."""

    #: guests still running or paused
    guests: tuple[str, ...] = ()
    #: QEMU processes that are children of this process (pid, command)
    processes: tuple[str, ...] = ()
    #: runtime folders of guests that still exist
    folders: tuple[str, ...] = ()
    #: guest disk images this process still holds open (and locked)
    open_images: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.guests or self.processes or self.folders or self.open_images)

    def lines(self) -> list[str]:
        """One line per leaked thing."""
        return (
            [f"guest still {g}" for g in self.guests]
            + [f"QEMU process still running: {p}" for p in self.processes]
            + [f"runtime folder left: {f}" for f in self.folders]
            + [f"disk image still open (locked): {i}" for i in self.open_images]
        )


def _qemu_children() -> list[str]:
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        is_child = len(fields) > 1 and int(fields[1]) == me and fields[0] != "Z"
        if is_child and "qemu" in os.path.basename(cmd):
            found.append(f"{entry.name} {cmd}")
    return found


def _open_files() -> set[str]:
    out = set()
    fd_dir = Path("/proc/self/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


def find_leaks(guests: list[virtkit.Guest]) -> LeakReport:
    """Check what ``guests`` (and QEMU children of this process) left behind."""
    live = tuple(f"{g.state.value}: {g.name}" for g in guests if g.state in _LIVE)
    folders: list[str] = []
    images: list[str] = []
    held = _open_files()
    for base in {os.environ.get("XDG_RUNTIME_DIR") or "", tempfile.gettempdir()} - {""}:
        # the qemu backend's per-launch runtime folders are named vkq-<pid>-<guest>-*
        folders += sorted(str(p) for p in Path(base).glob(f"vkq-{os.getpid()}-*"))
    for guest in guests:
        for disk in guest.machine.disks:
            with contextlib.suppress(virtkit.VirtkitError, OSError):
                path = os.path.realpath(guest.disk_path(disk))
                if path in held:
                    images.append(path)
    return LeakReport(live, tuple(_qemu_children()), tuple(folders), tuple(sorted(set(images))))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if guests, QEMU processes, runtime folders or open images are left."""
    del exitstatus
    guests = list(_ALL_GUESTS)
    _ALL_GUESTS.clear()
    if not session.config.getoption("virtkit_leak_check", True):
        return
    leaks = find_leaks(guests)
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "virtkit: left behind after the session", red=True)
        for line in leaks.lines():
            reporter.write_line(line)
    for guest in guests:  # clean up what we can, after reporting it
        _teardown(guest)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

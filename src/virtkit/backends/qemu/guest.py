"""``QemuGuest``: one machine run as a supervised QEMU process controlled over QMP.

The lifecycle rules live in :mod:`virtkit.backends.base`; this module only
implements the hooks. Every hook runs a coroutine on the backend's private
event loop (:mod:`virtkit.backends.qemu.qmp`), where the QMP session, the
console stream and the QEMU child live. QMP events are mapped onto the
shared state machine:

====================  ===============================================
QMP event             guest state
====================  ===============================================
``STOP``              PAUSED (when not caused by a virtkit operation)
``RESUME``            RUNNING (likewise)
``SHUTDOWN``          remembered; the process exit then gives SHUTOFF
``RESET``             counted (``guest.resets``); stays RUNNING
``GUEST_PANICKED``    CRASHED ("the guest kernel panicked")
process exit          SHUTOFF after a power-off or a virtkit stop,
                      else CRASHED with the exit status and stderr tail
====================  ===============================================

The QMP connection closing after a power-off is the normal end of a run.

Snapshots:

* full (``memory=True``): QEMU's ``snapshot-save`` / ``snapshot-load`` /
  ``snapshot-delete`` jobs; RAM and device state go into the first writable
  qcow2 disk, and every writable qcow2 disk gets an internal snapshot of the
  same name (so ``virtkit.images`` and ``qemu-img snapshot -l`` list it);
* disk-only (``memory=False``): external qcow2 overlays
  (``blockdev-add`` + ``blockdev-snapshot`` while running, ``qemu-img``
  while shut off), with revert (a fresh overlay on the frozen layer) and
  delete (``block-stream`` live, ``qemu-img rebase`` offline).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtkit.backends.base import Guest
from virtkit.backends.qemu.argv import (
    CACHE_MODES,
    AttachedDisk,
    KernelBoot,
    LaunchSpec,
    build_argv,
    node_name,
    shell_quote,
)
from virtkit.backends.qemu.layers import LayerState, qemu_img
from virtkit.backends.qemu.process import ExitInfo, QemuProcess, make_runtime_dir
from virtkit.backends.qemu.qmp import check_command, run_sync
from virtkit.errors import (
    BackendError,
    ConfigError,
    ImageError,
    StateError,
    TimeoutError,
)
from virtkit.images.args import check_path
from virtkit.model import CdRom, Disk, Machine, Snapshot, SnapshotKind, State

if TYPE_CHECKING:
    from virtkit.backends.qemu.aio import AsyncQemuGuest
    from virtkit.backends.qemu.hypervisor import QemuHypervisor

__all__ = ["QemuGuest"]

SEED_FILE = "cloud-init-seed.iso"
_JOB_TIMEOUT = 300.0


class QemuGuest(Guest):
    """A guest run by ``qemu-system-*``.

    Extra attributes beyond :class:`~virtkit.backends.base.Guest`:

    * :attr:`accelerator` - ``"kvm"`` or ``"tcg"`` of the current run
      (confirmed by QMP ``query-kvm``), ``None`` before the first start;
    * :attr:`pid` - QEMU's process id while it runs;
    * :meth:`qemu_argv` - the command line, without running anything;
    * :meth:`qmp` - run any QMP command;
    * :attr:`aio` - the same API as coroutines;
    * :meth:`disk_path` - the file a disk currently writes to (its top
      overlay after disk snapshots); :meth:`original_disk_path` - the file
      the machine names;
    * :attr:`last_exit` / :attr:`last_shutdown` - how the last QEMU run ended
      (exit status and stderr tail; the QMP ``SHUTDOWN`` event's data);
    * :attr:`resets` - guest resets seen (QMP ``RESET``).
    """

    hypervisor: QemuHypervisor

    def __init__(
        self,
        hypervisor: QemuHypervisor,
        machine: Machine,
        folder: Path,
        *,
        kernel: KernelBoot | None = None,
    ) -> None:
        super().__init__(hypervisor, machine, folder)
        self.kernel = kernel
        self.accelerator: str | None = None
        self.resets = 0
        self.last_exit: ExitInfo | None = None
        self._proc: QemuProcess | None = None
        self._quiet = 0  # > 0 while a virtkit operation causes STOP/RESUME events
        self.last_shutdown: Mapping[str, Any] | None = None  # data of QMP SHUTDOWN
        self._layers = LayerState.load(self.folder)
        self._nodes: dict[str, str] = {}
        self._aio: AsyncQemuGuest | None = None

    # -- introspection --------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs, else ``None``."""
        proc = self._proc
        return proc.pid if proc is not None and proc.alive else None

    @property
    def aio(self) -> AsyncQemuGuest:
        """The coroutine twin of this guest's API (``await guest.aio.start()``)."""
        if self._aio is None:
            from virtkit.backends.qemu.aio import AsyncQemuGuest  # noqa: PLC0415 - cycle

            self._aio = AsyncQemuGuest(self)
        return self._aio

    def disk_path(self, disk: Disk | CdRom) -> Path:
        """The file an attached image is read from and written to now.

        For a disk that has disk-only (external) snapshots this is its top
        overlay, whose backing chain leads to :meth:`original_disk_path`;
        ``virtkit.images.open()`` on it sees the guest's current disk.
        """
        if isinstance(disk, Disk):
            active = self._layers.active.get(str(disk.target))
            if active:
                return Path(active)
        return super().disk_path(disk)

    def original_disk_path(self, disk: Disk | CdRom) -> Path:
        """The image file named by the machine definition (the bottom of the chain)."""
        return super().disk_path(disk)

    def active_disk_path(self, disk: Disk) -> Path:
        """Same as :meth:`disk_path` for a disk: the file it currently writes to."""
        return self.disk_path(disk)

    def seed_path(self) -> Path | None:
        """Where the cloud-init seed ISO is written (when the machine has ``cloud_init``)."""
        return self.folder / SEED_FILE if self.machine.cloud_init is not None else None

    def _spec(self, runtime_dir: Path, *, paused: bool, accel: str) -> LaunchSpec:
        hv = self.hypervisor
        code, nvram = (None, None)
        if self.machine.firmware == "uefi":
            code, nvram = hv.ovmf_code(), self.folder / "OVMF_VARS.fd"
        return LaunchSpec(
            binary=hv.binary,
            accel=accel,
            disks=tuple(AttachedDisk(d, self.active_disk_path(d)) for d in self.machine.disks),
            cdroms=tuple(self.disk_path(c) for c in self.machine.cdroms),
            seed=self.seed_path(),
            qmp_socket=runtime_dir / "qmp.sock",
            console_socket=runtime_dir / "console.sock" if self.machine.serial.enabled else None,
            kernel=self.kernel,
            firmware_code=code,
            nvram=nvram,
            paused=paused,
            cpu_model=hv.cpu_model,
        )

    def qemu_argv(
        self, *, paused: bool = False, runtime_dir: str | os.PathLike[str] | None = None
    ) -> list[str]:
        """The QEMU command line for this guest, without running anything (a dry run).

        Args:
            paused: include ``-S`` (virtkit itself starts QEMU paused and
                continues it once QMP is connected).
            runtime_dir: where the QMP and console sockets would live
                (default: a placeholder ``$XDG_RUNTIME_DIR/vk-<name>``).

        Raises:
            ConfigError: the machine cannot be expressed (e.g. UEFI without OVMF),
                or ``runtime_dir`` is not a path.
        """
        base = (
            check_path(runtime_dir, "runtime_dir")
            if runtime_dir is not None
            else Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"vkq-{self.name}"
        )
        accel = self.hypervisor.accelerator.accel
        return build_argv(self.machine, self._spec(Path(base), paused=paused, accel=accel))

    def qemu_command_line(self) -> str:
        """:meth:`qemu_argv` as one shell-quoted line."""
        return shell_quote(self.qemu_argv())

    # -- checks before a launch ------------------------------------------------------
    def _check_files(self) -> None:
        for i, disk in enumerate(self.machine.disks):
            path = self.active_disk_path(disk)
            if not path.is_file():
                hint = (
                    "create it (virtkit.images.create) or give the Disk a size so define() "
                    "creates it"
                )
                raise ImageError(
                    f"disk 'disks[{i}]' ({disk.target}) has no image file: {path} does not "
                    f"exist; {hint}",
                    path=str(path),
                )
        for i, cd in enumerate(self.machine.cdroms):
            path = self.disk_path(cd)
            if not path.is_file():
                raise ImageError(
                    f"CD-ROM 'cdroms[{i}]' ({cd.target}) has no image file: {path} does not exist",
                    path=str(path),
                )
        if self.kernel is not None:
            boot_files = {"kernel": self.kernel.kernel, "initrd": self.kernel.initrd}
            for what, file in boot_files.items():
                if file is not None and not file.is_file():
                    raise ConfigError(f"{what} file {file} does not exist", field=what)
        if self.machine.cloud_init is not None:
            from virtkit.provision import write_seed_iso  # noqa: PLC0415 - optional layer

            seed = self.seed_path()
            assert seed is not None
            write_seed_iso(self.machine, seed)
        if self.machine.firmware == "uefi":
            nvram = self.folder / "OVMF_VARS.fd"
            if not nvram.exists():
                shutil.copyfile(self.hypervisor.ovmf_vars(), nvram)
                os.chmod(nvram, 0o600)

    # -- running QEMU ----------------------------------------------------------------------
    def _launch(self, *, paused: bool) -> None:
        """Start QEMU, wait until it connected QMP and the console, confirm the accelerator.

        QEMU connects both sockets during its initialisation, before any guest
        code runs, so no console output is lost; ``paused`` adds ``-S`` (used
        to restore a full snapshot into a fresh process).
        """
        if self._proc is not None:
            self._terminate()
        self._check_files()
        choice = self.hypervisor.accelerator
        runtime = make_runtime_dir(self.name)
        try:
            argv = build_argv(self.machine, self._spec(runtime, paused=paused, accel=choice.accel))
        except BaseException:
            shutil.rmtree(runtime, ignore_errors=True)
            raise
        self.last_shutdown = None
        self._nodes = {str(d.target): node_name(str(d.target)) for d in self.machine.disks}
        try:
            launch = self._run_launch(argv, runtime)
        except BaseException:
            shutil.rmtree(runtime, ignore_errors=True)  # launch() never ran or cleaned up
            raise
        self._proc = proc = launch
        try:
            if self.machine.serial.enabled:
                self.console.set_writer(self._write_console)
            kvm = run_sync(proc.qmp.execute("query-kvm"))
            self.accelerator = "kvm" if kvm.get("enabled") else "tcg"
        except BaseException:
            self._terminate()
            raise

    def _run_launch(self, argv: list[str], runtime: Path) -> QemuProcess:
        return run_sync(
            QemuProcess.launch(
                name=self.name,
                argv=argv,
                runtime_dir=runtime,
                qmp_socket=runtime / "qmp.sock",
                console_socket=runtime / "console.sock" if self.machine.serial.enabled else None,
                on_event=self._on_event,
                on_console=self.console.feed,
                on_exit=self._on_exit,
                timeout=self.hypervisor.start_timeout,
            )
        )

    def _write_console(self, data: bytes) -> None:
        proc = self._proc
        if proc is None or not proc.alive:
            raise StateError(f"cannot write to the console of {self.name!r}: QEMU is not running")
        from virtkit.backends.qemu.qmp import loop  # noqa: PLC0415 - tiny helper

        loop().call_soon_threadsafe(proc.write_console, data)

    def _terminate(self) -> None:
        """Stop QEMU (quit, then SIGKILL) and wait until it is reaped and cleaned up."""
        proc = self._proc
        if proc is None:
            return
        run_sync(proc.stop())
        self._proc = None
        self.console.set_writer(None)

    def _qmp_sync(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        proc = self._proc
        if proc is None or not proc.alive:
            raise StateError(f"QEMU for guest {self.name!r} is not running", action=command)
        return run_sync(proc.qmp.execute(command, args, timeout=timeout))

    def qmp(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run a raw QMP command on the running QEMU and return its result.

        Changing the run state behind virtkit's back (``stop``, ``cont``,
        ``quit``) is reported through the usual events.

        Raises:
            StateError: QEMU is not running.
            BackendError: QEMU refused the command.
            TimeoutError: no answer within ``timeout`` (default 30 s).
            ConfigError: ``command``, ``arguments`` or ``timeout`` has the wrong type.
        """
        timeout = check_command(command, arguments, timeout)
        return self._qmp_sync(command, arguments, timeout=timeout)

    # -- events from the loop thread ------------------------------------------------------
    def _on_event(self, name: str, data: Mapping[str, Any]) -> None:
        if name == "STOP":
            if not self._quiet:
                self._notify_paused()
        elif name == "RESUME":
            if not self._quiet:
                self._notify_resumed()
        elif name == "SHUTDOWN":
            self.last_shutdown = dict(data)
        elif name == "RESET":
            self.resets += 1
        elif name == "GUEST_PANICKED":
            action = data.get("action", "?")
            self._notify_crash(f"the guest kernel panicked (QMP GUEST_PANICKED, action {action})")

    def _on_exit(self, info: ExitInfo) -> None:
        self.last_exit = info
        self.console.set_writer(None)
        if info.expected:
            return
        if info.returncode == 0:
            # QEMU exits 0 after the guest powers off (SHUTDOWN event, guest=true) and
            # after a host-side quit or SIGTERM; anything else is a failure.
            self._notify_poweroff()
            return
        tail = info.stderr_tail or "(nothing on stderr)"
        self._notify_crash(f"QEMU exited unexpectedly ({info.describe()}); stderr tail:\n{tail}")

    # -- lifecycle hooks ---------------------------------------------------------------------
    def _do_start(self) -> None:
        self._launch(paused=False)

    @contextlib.contextmanager
    def _quietly(self) -> Any:
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _do_pause(self) -> None:
        with self._quietly():
            self._qmp_sync("stop")

    def _do_resume(self) -> None:
        with self._quietly():
            self._qmp_sync("cont")

    def _do_reset(self) -> None:
        self._qmp_sync("system_reset")

    def _do_shutdown(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            raise StateError(f"QEMU for guest {self.name!r} is not running", action="shutdown")
        self._qmp_sync("system_powerdown")

        async def wait() -> bool:
            assert proc.exited is not None
            try:
                await asyncio.wait_for(proc.exited.wait(), timeout)
            except builtins.TimeoutError:
                return False
            return True

        if not run_sync(wait()):
            raise TimeoutError(
                f"guest {self.name!r} did not power off within {timeout} s after the ACPI "
                "power button was pressed (does it run an ACPI daemon?); it keeps running: "
                "kill() stops it hard",
                timeout=timeout,
            )
        self._proc = None

    def _do_kill(self) -> None:
        self._terminate()

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self._terminate()
        super()._release()

    # -- snapshots ----------------------------------------------------------------------------
    def _writable_disks(self) -> list[Disk]:
        return [d for d in self.machine.disks if not d.read_only]

    def _full_nodes(self, action: str) -> list[str]:
        nodes = []
        for disk in self._writable_disks():
            path = self.active_disk_path(disk)
            if disk.format != "qcow2" and path == self.original_disk_path(disk):
                raise ConfigError(
                    f"cannot {action} a full snapshot: writable disk {disk.target} is raw, and "
                    "only qcow2 images hold internal snapshots (convert it, or attach it "
                    "read_only=True)",
                    field="disks",
                )
            nodes.append(self._nodes[str(disk.target)])
        if not nodes:
            raise ConfigError(
                f"cannot {action} a full snapshot: the guest has no writable qcow2 disk to hold "
                "the RAM and device state",
                field="disks",
            )
        return nodes

    def _snapshot_args(self, *, kind: str, tag: str, nodes: list[str]) -> dict[str, Any]:
        return {"job-id": self._job_id(kind), "tag": tag, "vmstate": nodes[0], "devices": nodes}

    def _job_id(self, kind: str) -> str:
        self._layers.counter += 1
        return f"vk-{kind}-{self._layers.counter}"

    def _do_snapshot(self, snap: Snapshot) -> None:
        if snap.kind is SnapshotKind.FULL:
            nodes = self._full_nodes("take")
            proc = self._proc
            assert proc is not None
            with self._quietly():
                run_sync(
                    proc.qmp.run_job(
                        "snapshot-save",
                        self._snapshot_args(kind="save", tag=snap.name, nodes=nodes),
                        timeout=_JOB_TIMEOUT,
                    )
                )
            self._layers.full[snap.name] = {
                str(d.target): str(self.active_disk_path(d)) for d in self._writable_disks()
            }
            self._layers.save(self.folder)
            return
        self._disk_snapshot(snap)

    def _do_revert(self, snap: Snapshot) -> None:
        if snap.kind is SnapshotKind.FULL:
            self._full_revert(snap)
        else:
            self._disk_revert(snap)

    def _do_delete_snapshot(self, snap: Snapshot) -> None:
        if snap.kind is SnapshotKind.FULL:
            self._full_delete(snap)
        else:
            self._disk_delete(snap)

    def _check_full_layers(self, snap: Snapshot, action: str) -> None:
        where = self._layers.full.get(snap.name, {})
        for disk in self._writable_disks():
            recorded = where.get(str(disk.target))
            if recorded is not None and recorded != str(self.active_disk_path(disk)):
                raise StateError(
                    f"cannot {action} full snapshot {snap.name!r}: disk {disk.target} has had "
                    "disk-only snapshots taken on top of it since; revert to or delete those "
                    "disk snapshots first",
                    action=action,
                )

    def _full_revert(self, snap: Snapshot) -> None:
        self._check_full_layers(snap, "revert to")
        live = (
            self._proc is not None
            and self._proc.alive
            and self.state in (State.RUNNING, State.PAUSED)
        )
        if not live:
            self._launch(paused=True)
        try:
            self._load_full(snap)
        except BaseException:
            if not live:  # do not leave a half-restored QEMU behind a SHUTOFF guest
                with contextlib.suppress(Exception):
                    self._terminate()
            raise

    def _load_full(self, snap: Snapshot) -> None:
        nodes = self._full_nodes("revert to")
        proc = self._proc
        assert proc is not None
        with self._quietly():
            run_sync(
                proc.qmp.run_job(
                    "snapshot-load",
                    self._snapshot_args(kind="load", tag=snap.name, nodes=nodes),
                    timeout=_JOB_TIMEOUT,
                )
            )
            status = self._qmp_sync("query-status")
            running = bool(status.get("running"))
            if snap.state is State.RUNNING and not running:
                self._qmp_sync("cont")
            elif snap.state is State.PAUSED and running:
                self._qmp_sync("stop")

    def _full_delete(self, snap: Snapshot) -> None:
        if self._proc is not None and self._proc.alive:
            nodes = self._full_nodes("delete")
            proc = self._proc
            run_sync(
                proc.qmp.run_job(
                    "snapshot-delete",
                    {"job-id": self._job_id("delete"), "tag": snap.name, "devices": nodes},
                    timeout=_JOB_TIMEOUT,
                )
            )
        else:
            where = self._layers.full.get(snap.name)
            paths = (
                [Path(p) for p in where.values()]
                if where
                else [self.active_disk_path(d) for d in self._writable_disks()]
            )
            for path in paths:
                if path.is_file():
                    listing = qemu_img(self.hypervisor.qemu_img, "snapshot", "-l", "-U", str(path))
                    if any(line.split()[1:2] == [snap.name] for line in listing.splitlines()[2:]):
                        qemu_img(self.hypervisor.qemu_img, "snapshot", "-d", snap.name, str(path))
        self._layers.full.pop(snap.name, None)
        self._layers.save(self.folder)

    # -- disk-only snapshots: external overlays -------------------------------------------------
    def _backing_of(self, path: Path) -> Path | None:
        import json  # noqa: PLC0415

        info = json.loads(
            qemu_img(self.hypervisor.qemu_img, "info", "-U", "--output=json", str(path))
        )
        full = info.get("full-backing-filename") or info.get("backing-filename")
        if not full:
            return None
        return Path(full) if os.path.isabs(full) else path.parent / full

    def _create_overlay(self, below: Path, fmt: str, size: int, overlay: Path) -> None:
        qemu_img(
            self.hypervisor.qemu_img, "create", "-q", "-f", "qcow2", "-F", fmt,
            "-b", os.path.relpath(below, overlay.parent), "-u", str(overlay), str(size),
        )  # fmt: skip

    def _virtual_size(self, path: Path) -> int:
        import json  # noqa: PLC0415

        info = json.loads(
            qemu_img(self.hypervisor.qemu_img, "info", "-U", "--output=json", str(path))
        )
        return int(info["virtual-size"])

    def _layer_format(self, disk: Disk, path: Path) -> str:
        return disk.format if path == self.original_disk_path(disk) else "qcow2"

    def _disk_snapshot(self, snap: Snapshot) -> None:
        try:
            self._add_overlays(snap)
        finally:
            # overlays already in place stay valid chains even if a later disk failed:
            # record the files as they are, so the state file never lies
            self._layers.save(self.folder)

    def _add_overlays(self, snap: Snapshot) -> None:
        live = self._proc is not None and self._proc.alive
        frozen: dict[str, str] = {}
        for disk in self._writable_disks():
            target = str(disk.target)
            below = self.active_disk_path(disk)
            fmt = self._layer_format(disk, below)
            overlay = self._layers.next_overlay(below, self.original_disk_path(disk))
            self._create_overlay(below, fmt, self._virtual_size(below), overlay)
            if live:
                node = f"{node_name(target)}-s{self._layers.counter}"
                direct, no_flush, _ = CACHE_MODES[disk.cache]
                cache = {"direct": direct, "no-flush": no_flush}
                try:
                    self._qmp_sync(
                        "blockdev-add",
                        {
                            "driver": "qcow2",
                            "node-name": node,
                            "cache": cache,
                            "discard": disk.discard,
                            "file": {"driver": "file", "filename": str(overlay), "cache": cache},
                            "backing": None,
                        },
                    )
                    self._qmp_sync(
                        "blockdev-snapshot", {"node": self._nodes[target], "overlay": node}
                    )
                except BaseException:
                    overlay.unlink(missing_ok=True)
                    raise
                self._nodes[target] = node
            frozen[target] = str(below)
            self._layers.active[target] = str(overlay)
        self._layers.frozen[snap.name] = frozen

    def layer_files(self) -> set[Path]:
        """Every image file this guest's disks use: originals, frozen layers, active overlays."""
        files = {self.original_disk_path(d) for d in self.machine.disks}
        return files | self._all_layers()

    def _all_layers(self) -> set[Path]:
        layers = {Path(p) for p in self._layers.active.values()}
        for frozen in self._layers.frozen.values():
            layers.update(Path(p) for p in frozen.values())
        return layers

    def _disk_revert(self, snap: Snapshot) -> None:
        if self._proc is not None:
            self._terminate()
        frozen = self._layers.frozen.get(snap.name, {})
        keep = {Path(p) for m in self._layers.frozen.values() for p in m.values()}
        for disk in self._writable_disks():
            target = str(disk.target)
            base = frozen.get(target)
            if base is None:
                continue
            current = self.active_disk_path(disk)
            overlay = self._layers.next_overlay(Path(base), self.original_disk_path(disk))
            self._create_overlay(
                Path(base),
                self._layer_format(disk, Path(base)),
                self._virtual_size(Path(base)),
                overlay,
            )
            self._layers.active[target] = str(overlay)
            if current not in keep and current != self.original_disk_path(disk):
                current.unlink(missing_ok=True)  # the discarded state after the snapshot
        self._layers.save(self.folder)

    def _layers_removed_by_delete(self, snap: Snapshot) -> dict[str, Path]:
        """disk target -> the layer file deleting disk snapshot ``snap`` would remove."""
        removed: dict[str, Path] = {}
        for target, layer in self._layers.frozen.get(snap.name, {}).items():
            disk = next((d for d in self.machine.disks if str(d.target) == target), None)
            if disk is None:
                continue
            layer_path = Path(layer)
            children = self._children_of(layer_path)
            if layer_path == self.original_disk_path(disk):
                if len(children) == 1:
                    removed[target] = children[0]
            else:
                removed[target] = layer_path
        return removed

    def _disk_delete(self, snap: Snapshot) -> None:
        frozen = self._layers.frozen.get(snap.name, {})
        live = self._proc is not None and self._proc.alive
        for target, doomed in self._layers_removed_by_delete(snap).items():
            for full_name, where in self._layers.full.items():
                if where.get(target) == str(doomed):
                    raise StateError(
                        f"cannot delete disk snapshot {snap.name!r}: it would merge away "
                        f"{doomed.name}, which holds full snapshot {full_name!r}; delete "
                        f"{full_name!r} first",
                        action="delete_snapshot",
                    )
        for disk in self._writable_disks():
            target = str(disk.target)
            layer = frozen.get(target)
            if layer is None:
                continue
            layer_path = Path(layer)
            children = self._children_of(layer_path)
            if layer_path == self.original_disk_path(disk) and len(children) == 1:
                # keep the machine's own file: merge the one layer above back into it
                self._commit_into(disk, children[0], layer_path, live=live, deleting=snap.name)
                continue
            below = self._backing_of(layer_path)
            chain = self._running_chain(disk) if live else []
            for child in children:
                if child in chain:
                    self._stream_live(disk, child, below)
                else:
                    args = ["rebase", "-q", "-f", "qcow2"]
                    if below is not None:
                        args += [
                            "-F",
                            self._layer_format(disk, below),
                            "-b",
                            os.path.relpath(below, child.parent),
                        ]
                    else:
                        args += ["-b", ""]
                    qemu_img(self.hypervisor.qemu_img, *args, str(child))
            if layer_path != self.original_disk_path(disk):
                layer_path.unlink(missing_ok=True)
        del self._layers.frozen[snap.name]
        self._layers.save(self.folder)

    def _children_of(self, layer: Path) -> list[Path]:
        """Tracked layers whose backing file is ``layer``."""
        want = os.path.realpath(layer)
        found = []
        for path in sorted(self._all_layers()):
            if path == layer or not path.is_file():
                continue
            backing = self._backing_of(path)
            if backing is not None and os.path.realpath(backing) == want:
                found.append(path)
        return found

    def _commit_into(self, disk: Disk, top: Path, base: Path, *, live: bool, deleting: str) -> None:
        """Merge layer ``top`` into its backing file ``base`` and drop ``top`` from the chain.

        Live: QEMU's ``block-commit`` (an active commit pivots the disk onto
        ``base`` with ``job-complete``); offline: ``qemu-img commit``.
        Bookkeeping that named ``top`` (the active layer, another snapshot's
        frozen layer) then names ``base``.
        """
        target = str(disk.target)
        is_active = top == self.active_disk_path(disk)
        fmt = self._layer_format(disk, base)
        if live and top in self._running_chain(disk):
            proc = self._proc
            assert proc is not None
            top_node, base_node = self._node_of(top), self._node_of(base)
            if top_node is None or base_node is None:
                raise BackendError(f"cannot find the QEMU block nodes for {top} and {base}")
            job_id = self._job_id("commit")
            args: dict[str, Any] = {
                "job-id": job_id,
                "device": self._nodes[target],
                "base-node": base_node,
            }
            if not is_active:
                args["top-node"] = top_node
                args["backing-file"] = os.path.relpath(base, top.parent)

            async def complete() -> None:
                await proc.qmp.execute("job-complete", {"id": job_id})

            run_sync(
                proc.qmp.run_job("block-commit", args, timeout=_JOB_TIMEOUT, on_ready=complete)
            )
            if is_active:
                self._nodes[target] = base_node
            if top_node.startswith(node_name(target)):  # added by us: monitor-owned
                with contextlib.suppress(BackendError, StateError):
                    self._qmp_sync("blockdev-del", {"node-name": top_node})
        else:
            qemu_img(self.hypervisor.qemu_img, "commit", "-q", "-d", "-f", "qcow2", str(top))
        for grandchild in self._children_of(top):  # same contents through base now
            qemu_img(
                self.hypervisor.qemu_img, "rebase", "-q", "-u", "-f", "qcow2", "-F", fmt,
                "-b", os.path.relpath(base, grandchild.parent), str(grandchild),
            )  # fmt: skip
        if is_active:
            self._layers.active.pop(target, None)
        for name, frozen in self._layers.frozen.items():
            if name != deleting and frozen.get(target) == str(top):
                frozen[target] = str(base)
        top.unlink(missing_ok=True)

    def _running_chain(self, disk: Disk) -> list[Path]:
        chain: list[Path] = []
        path: Path | None = self.active_disk_path(disk)
        while path is not None and len(chain) < 256:
            chain.append(path)
            path = self._backing_of(path)
        return chain

    def _node_of(self, path: Path) -> str | None:
        nodes = self._qmp_sync("query-named-block-nodes", {"flat": True})
        want = os.path.realpath(path)
        for node in nodes:
            name = _plain_filename(str(node.get("file", "")))
            if node.get("drv") != "file" and name and os.path.realpath(name) == want:
                return str(node["node-name"])
        return None

    def _stream_live(self, disk: Disk, child: Path, below: Path | None) -> None:
        node = self._node_of(child)
        if node is None:
            raise BackendError(f"cannot find the QEMU block node for {child}")
        args: dict[str, Any] = {"job-id": self._job_id("stream"), "device": node}
        if below is not None:
            base_node = self._node_of(below)
            if base_node is None:
                raise BackendError(f"cannot find the QEMU block node for {below}")
            args["base-node"] = base_node
            args["backing-file"] = os.path.relpath(below, child.parent)
        proc = self._proc
        assert proc is not None
        run_sync(proc.qmp.run_job("block-stream", args, timeout=_JOB_TIMEOUT))


def _plain_filename(name: str) -> str | None:
    """A node's file name; QEMU reports ``json:{...}`` for nodes opened with options."""
    if not name.startswith("json:"):
        return name
    import json  # noqa: PLC0415

    try:
        doc = json.loads(name[5:])
    except ValueError:
        return None
    inner = doc.get("file", doc)
    found = inner.get("filename") if isinstance(inner, dict) else None
    return str(found) if found else None

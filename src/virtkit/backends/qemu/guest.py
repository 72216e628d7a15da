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
import errno
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from virtkit.agent import AgentError, GuestAgent
from virtkit.backends.base import Guest
from virtkit.backends.files import NVRAM_FILE, SEED_FILE, kernel_file
from virtkit.backends.qemu.argv import (
    AGENT_PORT_ID,
    AttachedDisk,
    KernelBoot,
    LaunchSpec,
    build_argv,
    node_name,
    shell_quote,
)
from virtkit.backends.qemu.hotplug import Hotplug
from virtkit.backends.qemu.layers import Layers, qemu_img
from virtkit.backends.qemu.process import ExitInfo, QemuProcess, make_runtime_dir
from virtkit.backends.qemu.qmp import check_command, run_sync
from virtkit.bundle.atomic import atomic_write
from virtkit.errors import (
    ConfigError,
    ImageError,
    StateError,
    TimeoutError,
)
from virtkit.images.args import check_path
from virtkit.model import CdRom, Disk, Machine, Nic, Share, Snapshot, SnapshotKind, State

if TYPE_CHECKING:
    from virtkit.backends.qemu.aio import AsyncQemuGuest
    from virtkit.backends.qemu.hypervisor import QemuHypervisor

#: the guest agent channel's socket in the runtime folder
AGENT_SOCKET = "agent.sock"
#: in a full snapshot's folder: the guest's file systems were frozen when it was taken
QUIESCED_FILE = "quiesced"
#: seconds a revert to a quiesced full snapshot waits for the agent to thaw
_THAW_TIMEOUT = 30.0

__all__ = ["QemuGuest"]

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
    ) -> None:
        super().__init__(hypervisor, machine, folder)
        self.accelerator: str | None = None
        self.resets = 0
        self.last_exit: ExitInfo | None = None
        self._proc: QemuProcess | None = None
        self._quiet = 0  # > 0 while a virtkit operation causes STOP/RESUME events
        self.last_shutdown: Mapping[str, Any] | None = None  # data of QMP SHUTDOWN
        self._layers = Layers(self)
        self._hotplug = Hotplug(self)
        self._ids = 0  # for unique QMP job ids and node names
        self._nodes: dict[str, str] = {}
        self._aio: AsyncQemuGuest | None = None
        self._agent: GuestAgent | None = None

    # -- introspection --------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs, else ``None``."""
        proc = self._proc
        return proc.pid if proc is not None and proc.alive else None

    @property
    def agent(self) -> GuestAgent:
        """The QEMU guest agent in this guest (``Machine(agent=True)``).

        The client connects to the agent's virtio-serial channel on each
        launch; its calls need ``qemu-ga`` running in the guest.

        Raises:
            ConfigError: the machine has no agent channel.
        """
        if not self.machine.agent:
            raise ConfigError(
                f"guest {self.name!r} has no guest agent channel; define it with "
                "Machine(agent=True)",
                field="agent",
            )
        if self._agent is None:
            self._agent = GuestAgent(self._connect_agent, name=self.name)
        return self._agent

    def _connect_agent(self) -> socket.socket:
        proc = self._proc
        if proc is None or not proc.alive:
            raise OSError(errno.ENOTCONN, f"guest {self.name!r} is not running")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(proc.runtime_dir / AGENT_SOCKET))
        except OSError:
            sock.close()
            raise
        return sock

    @property
    def aio(self) -> AsyncQemuGuest:
        """The coroutine twin of this guest's API (``await guest.aio.start()``)."""
        if self._aio is None:
            from virtkit.backends.qemu.aio import AsyncQemuGuest  # noqa: PLC0415 - cycle

            self._aio = AsyncQemuGuest(self)
        return self._aio

    @property
    def kernel(self) -> KernelBoot | None:
        """Direct kernel boot, from ``Machine.kernel`` (paths resolved against the folder)."""
        boot = self.machine.kernel
        if boot is None:
            return None
        return KernelBoot(
            kernel=kernel_file(self.folder, boot.kernel),
            initrd=None if boot.initrd is None else kernel_file(self.folder, boot.initrd),
            append=boot.append,
        )

    def original_disk_path(self, disk: Disk | CdRom) -> Path:
        """The image file named by the machine definition (the bottom of the chain)."""
        if isinstance(disk, Disk):
            return self.base_disk_path(self._attached(disk))  # type: ignore[arg-type]
        return self.disk_path(disk)

    def active_disk_path(self, disk: Disk) -> Path:
        """Same as :meth:`disk_path` for a disk: the file it currently writes to."""
        return self.disk_path(disk)

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _live(self) -> bool:
        proc = self._proc
        return proc is not None and proc.alive

    def seed_path(self) -> Path | None:
        """Where the cloud-init seed ISO is written (when the machine has ``cloud_init``)."""
        return self.folder / SEED_FILE if self.machine.cloud_init is not None else None

    def _spec(self, runtime_dir: Path, *, paused: bool, accel: str) -> LaunchSpec:
        hv = self.hypervisor
        code, nvram = (None, None)
        if self.machine.firmware == "uefi":
            code, nvram = hv.ovmf_code(), self.folder / NVRAM_FILE
        return LaunchSpec(
            binary=hv.binary,
            accel=accel,
            disks=tuple(AttachedDisk(d, self.active_disk_path(d)) for d in self.machine.disks),
            cdroms=tuple(
                None if c.path is None else self.disk_path(c) for c in self.machine.cdroms
            ),
            seed=self.seed_path(),
            qmp_socket=runtime_dir / "qmp.sock",
            console_socket=runtime_dir / "console.sock" if self.machine.serial.enabled else None,
            agent_socket=runtime_dir / AGENT_SOCKET if self.machine.agent else None,
            shares=tuple((share, self.share_path(share)) for share in self.machine.shares),
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
        return build_argv(self.launch_machine(), self._spec(Path(base), paused=paused, accel=accel))

    def qemu_command_line(self) -> str:
        """:meth:`qemu_argv` as one shell-quoted line."""
        return shell_quote(self.qemu_argv())

    # -- checks before a launch ------------------------------------------------------
    def share_path(self, share: Share) -> Path:
        """The host folder of ``share`` (a relative ``host_path`` is relative to the VM folder)."""
        return Path(os.path.abspath(self.folder / share.host_path))

    def _check_files(self) -> None:
        for i, share in enumerate(self.machine.shares):
            if not self.share_path(share).is_dir():
                raise ConfigError(
                    f"'shares[{i}].host_path' {share.host_path!r} is not a folder on the host "
                    f"({self.share_path(share)})",
                    field=f"shares[{i}].host_path",
                    value=share.host_path,
                )
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
            if cd.path is None:
                continue
            path = self.disk_path(cd)
            if not path.is_file():
                raise ImageError(
                    f"CD-ROM 'cdroms[{i}]' ({cd.target}) has no image file: {path} does not exist",
                    path=str(path),
                )
        boot = self.kernel
        if boot is not None:
            boot_files = {"kernel": boot.kernel, "initrd": boot.initrd}
            for what, file in boot_files.items():
                if file is not None and not file.is_file():
                    raise ConfigError(f"{what} file {file} does not exist", field=f"kernel.{what}")
        if self.machine.cloud_init is not None:
            from virtkit.provision import write_seed_iso  # noqa: PLC0415 - optional layer

            seed = self.seed_path()
            assert seed is not None
            write_seed_iso(self.machine, seed)
        if self.machine.firmware == "uefi":
            nvram = self.folder / NVRAM_FILE
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
            argv = build_argv(
                self.launch_machine(), self._spec(runtime, paused=paused, accel=choice.accel)
            )
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
            self.accelerator = "kvm" if proc.kvm_enabled else "tcg"  # asked during launch
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
        proc = self._proc
        if proc is None or not proc.alive:
            raise StateError(f"QEMU for guest {self.name!r} is not running", action=command)
        return proc.qmp.call(command, arguments, timeout=timeout)  # the thin sync path

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
        elif name == "DEVICE_DELETED":
            self._hotplug.on_device_deleted(data)
        elif name == "VSERPORT_CHANGE":
            agent = self._agent
            if data.get("id") == AGENT_PORT_ID and data.get("open") is False and agent is not None:
                agent.abort(
                    "the guest closed the agent's port (qemu-ga exited, or the guest stops)"
                )
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

    def _do_change_media(self, drive: CdRom) -> None:
        self._hotplug.change_media(drive)

    def _do_attach(self, device: Disk | Nic) -> None:
        if isinstance(device, Nic) and any(f.host_port == 0 for f in device.forwards):
            device = self._with_ports(device)
        self._hotplug.attach(device)

    def _do_detach(self, device: Disk | Nic) -> None:
        self._hotplug.detach(device)

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
        return f"vk-{kind}-{self._next_id()}"

    def _do_snapshot(self, snap: Snapshot) -> Snapshot:
        if snap.kind is not SnapshotKind.FULL:
            # a disk-only snapshot has no RAM: flush the guest's file systems into it first
            with self.quiesce():
                return self._layers.snapshot(snap)
        nodes = self._full_nodes("take")
        marker = self.snapshot_dir(snap.name) / QUIESCED_FILE
        # frozen, the snapshot's disks hold all the guest wrote, usable without its RAM;
        # a revert to it thaws the restored guest (see _thaw_restored)
        with self.quiesce() as frozen:
            if frozen:
                atomic_write(marker, b"%d\n" % frozen)  # before the state that needs a thaw
            else:
                marker.unlink(missing_ok=True)
            self._save_full(snap, nodes)
        held = {str(d.target): self._layers.name(self.disk_path(d)) for d in self._writable_disks()}
        return attrs.evolve(snap, layers=held)

    def _save_full(self, snap: Snapshot, nodes: list[str]) -> None:
        proc = self._proc
        assert proc is not None
        uefi = self.machine.firmware == "uefi"
        with self._quietly():
            running = uefi and bool(self._qmp_sync("query-status").get("running"))
            if running:  # the variables and the RAM must be from the same instant
                self._qmp_sync("stop")
            try:
                if uefi:
                    self._save_nvram(snap)
                run_sync(
                    proc.qmp.run_job(
                        "snapshot-save",
                        self._snapshot_args(kind="save", tag=snap.name, nodes=nodes),
                        timeout=_JOB_TIMEOUT,
                    )
                )
            finally:
                if running:
                    self._qmp_sync("cont")

    def _save_nvram(self, snap: Snapshot) -> None:
        """Copy the UEFI variables into the snapshot's folder (vCPUs are stopped by the job)."""
        nvram = self.folder / NVRAM_FILE
        if nvram.is_file():
            atomic_write(self.snapshot_dir(snap.name) / NVRAM_FILE, nvram.read_bytes(), mode=0o600)

    def _restore_nvram(self, snap: Snapshot, *, live: bool) -> None:
        """Put the snapshot's UEFI variables back.

        Offline the file is replaced atomically before QEMU opens it; live
        QEMU has it open, so it is rewritten in place (QEMU's pflash reads it
        only at start; the snapshot restored its in-memory copy).
        """
        saved = self.snapshot_dir(snap.name) / NVRAM_FILE
        if self.machine.firmware != "uefi" or not saved.is_file():
            return
        data = saved.read_bytes()
        nvram = self.folder / NVRAM_FILE
        if not live:
            atomic_write(nvram, data, mode=0o600)
            return
        fd = os.open(nvram, os.O_WRONLY)
        try:
            os.write(fd, data)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _do_revert(self, snap: Snapshot) -> None:
        if snap.kind is SnapshotKind.FULL:
            self._full_revert(snap)
        else:
            self._layers.revert(snap)

    def _do_delete_snapshot(self, snap: Snapshot) -> None:
        if snap.kind is SnapshotKind.FULL:
            self._full_delete(snap)
        else:
            self._layers.delete(snap)

    def _check_full_layers(self, snap: Snapshot, action: str) -> None:
        for disk in self._writable_disks():
            recorded = snap.layers.get(str(disk.target))
            if recorded is not None and not self._layers.same(
                self._layers.path(recorded), self.disk_path(disk)
            ):
                raise StateError(
                    f"cannot {action} full snapshot {snap.name!r}: disk {disk.target} has had "
                    "disk-only snapshots taken on top of it since; revert to or delete those "
                    "disk snapshots first",
                    action=action,
                )

    def _full_revert(self, snap: Snapshot) -> None:
        self._check_full_layers(snap, "revert to")
        live = self._live() and self.state in (State.RUNNING, State.PAUSED)
        if not live:
            self._restore_nvram(snap, live=False)
            self._launch(paused=True)
        try:
            self._load_full(snap)
            if live:
                self._restore_nvram(snap, live=True)
        except BaseException:
            if not live:  # do not leave a half-restored QEMU behind a SHUTOFF guest
                with contextlib.suppress(Exception):
                    self._terminate()
            raise
        frozen = (self.snapshot_dir(snap.name) / QUIESCED_FILE).is_file()
        if frozen and self.machine.agent and snap.state is State.RUNNING:
            self._thaw_restored()

    def _thaw_restored(self) -> None:
        """Thaw a guest restored from a full snapshot taken with its file systems frozen.

        Raises:
            BackendError: its agent did not thaw them in time (the revert
                itself is done; ``guest.agent.fsthaw()`` may still succeed).
        """
        agent = self.agent
        agent.close()  # the agent is back at the snapshot's instant: resync first
        deadline = time.monotonic() + _THAW_TIMEOUT
        while True:
            try:
                agent.fsthaw(timeout=max(min(deadline - time.monotonic(), 5.0), 0.1))
                return
            except (AgentError, TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise AgentError(
                        f"guest {self.name!r} was reverted to a snapshot taken with its file "
                        f"systems frozen, and its agent did not thaw them within "
                        f"{_THAW_TIMEOUT:.0f} s: {exc} (call guest.agent.fsthaw())",
                        command="guest-fsfreeze-thaw",
                    ) from exc
                time.sleep(0.2)

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
        self._drop_snapshot_record(snap)  # first: a crash never leaves a record without its state
        if self._live():
            nodes = self._full_nodes("delete")
            proc = self._proc
            assert proc is not None
            run_sync(
                proc.qmp.run_job(
                    "snapshot-delete",
                    {"job-id": self._job_id("delete"), "tag": snap.name, "devices": nodes},
                    timeout=_JOB_TIMEOUT,
                )
            )
            return
        paths = (
            [self._layers.path(p) for p in snap.layers.values()]
            if snap.layers
            else [self.disk_path(d) for d in self._writable_disks()]
        )
        for path in paths:
            if path.is_file():
                listing = qemu_img(self.hypervisor.qemu_img, "snapshot", "-l", "-U", str(path))
                if any(line.split()[1:2] == [snap.name] for line in listing.splitlines()[2:]):
                    qemu_img(self.hypervisor.qemu_img, "snapshot", "-d", snap.name, str(path))

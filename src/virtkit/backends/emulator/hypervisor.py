"""``EmulatorHypervisor`` and ``EmulatorGuest``: the in-process backend.

Each guest is a :class:`~virtkit.backends.emulator.machine.PcMachine` whose
CPU runs on a worker thread of this process. The shared state machine in
:mod:`virtkit.backends.base` decides what is legal; this module turns each
lifecycle step into machine operations and keeps snapshots:

* disk-only: an internal snapshot in each qcow2 disk (``create_snapshot``
  of the image engine, visible to ``qemu-img snapshot -l``); a raw disk is
  copied into the snapshot's folder.
* full: the disk snapshot plus the machine state (CPU context, RAM,
  devices) in the snapshot's folder, see :mod:`.state`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any, ClassVar

from virtkit import images
from virtkit.backends.base import Guest, Hypervisor
from virtkit.backends.emulator.bootparams import LinuxBoot
from virtkit.backends.emulator.disks import DriveSpec
from virtkit.backends.emulator.machine import PcMachine
from virtkit.backends.emulator.state import load_machine, save_machine
from virtkit.backends.files import kernel_file
from virtkit.errors import BackendError, ConfigError, ImageError, StateError, TimeoutError
from virtkit.model import Disk, HypervisorType, Machine, Snapshot, SnapshotKind, State

__all__ = ["EmulatorGuest", "EmulatorHypervisor"]

CLOCKS = ("wall", "virtual")
_LIVE = (State.RUNNING, State.PAUSED)
_COPY_CHUNK = 1 << 20


class EmulatorHypervisor(Hypervisor):
    """Runs guests inside this Python process on an emulated PC.

    Args:
        clock: ``"wall"`` (guest time follows the host) or ``"virtual"``
            (guest time advances with executed instructions: runs are
            reproducible).
        root, host, policy: see :class:`virtkit.backends.base.Hypervisor`.

    Raises:
        ConfigError: an unknown clock.
    """

    name: ClassVar[str] = "emulator"

    def __init__(self, *, clock: str = "wall", **options: Any) -> None:
        _check_clock(clock)
        self.clock = clock
        super().__init__(**options)

    @classmethod
    def probe(cls, **options: object) -> None:
        """Check the options (unicorn itself is imported with this module)."""
        _check_clock(options.get("clock", "wall"))

    @property
    def kind(self) -> HypervisorType:
        """Type 2: a hosted hypervisor."""
        return HypervisorType.TYPE2

    def _ignored_devices(self, machine: Machine) -> list[tuple[str, str]]:
        """What the emulated PC cannot run: NICs, CD-ROMs, cloud-init, extra vCPUs, agent."""
        ignored = [
            (f"nics[{i}]", f"the emulated PC has no network card ({nic.name} is not attached)")
            for i, nic in enumerate(machine.nics)
        ]
        ignored += [
            (f"cdroms[{i}]", f"the emulated PC has no CD-ROM drive ({cd.target} is not attached)")
            for i, cd in enumerate(machine.cdroms)
        ]
        if machine.cloud_init is not None:
            ignored.append(("cloud_init", "no CD-ROM drive to attach the seed ISO to"))
        if machine.vcpus > 1:
            ignored.append(
                ("cpus", f"one vCPU is emulated; {machine.vcpus} count for admission control only")
            )
        if machine.agent:
            ignored.append(("agent", "the emulated PC has no virtio-serial port for a guest agent"))
        ignored += [
            (f"shares[{i}]", f"the emulated PC has no virtio-9p device ({share.tag} is not shared)")
            for i, share in enumerate(machine.shares)
        ]
        return ignored

    def _create_guest(self, machine: Machine, folder: Path) -> Guest:
        if machine.firmware != "bios":
            raise ConfigError(
                f"the emulator has a PC BIOS only; firmware {machine.firmware!r} needs the "
                "qemu backend",
                field="firmware",
                value=machine.firmware,
            )
        if machine.arch not in ("x86_64", "i686", "i386"):
            raise ConfigError(
                f"the emulator emulates x86 PCs; arch {machine.arch!r} is not supported",
                field="arch",
                value=machine.arch,
            )
        return EmulatorGuest(self, machine, folder)


def _check_clock(clock: object) -> None:
    if clock not in CLOCKS:
        raise ConfigError(
            f"'clock' must be 'wall' or 'virtual' (got {clock!r})", field="clock", value=clock
        )


class EmulatorGuest(Guest):
    """A guest on the emulator. Adds inspection the emulator can offer:
    :meth:`screen_text`, :attr:`serial_trace`, :attr:`instructions`,
    :meth:`snapshot_console_offset`.

    The emulated PC has one CPU (``Machine.cpus`` counts for admission
    only), boots disks only (CD-ROMs, NICs, cloud-init and kernel boot are
    not emulated: ``define()`` warns with :class:`~virtkit.CapabilityWarning`
    about each, or refuses them with ``strict=True``), and shows COM1 only
    when ``Machine.serial.enabled``. Disks with layers (external snapshots
    taken by the qemu backend, linked clones) run on their active layer.
    """

    hypervisor: EmulatorHypervisor

    def __init__(self, hypervisor: EmulatorHypervisor, machine: Machine, folder: Path) -> None:
        super().__init__(hypervisor, machine, folder)
        self._pc: PcMachine | None = None
        self._pc_lock = threading.Lock()
        self._lifecycle.add_listener(self._on_state)

    # -- inspection -------------------------------------------------------------------
    def screen_text(self) -> str:
        """The BIOS text screen (int 10h output and writes to 0xB8000)."""
        pc = self._pc
        return "" if pc is None else pc.screen_text()

    @property
    def serial_trace(self) -> list[tuple[int, bytes]]:
        """With ``clock="virtual"``: (instruction count, bytes) of the guest's output.

        The count is the machine's instruction counter at the start of the
        slice (at most ``SLICE_INSTRUCTIONS``) in which the bytes were sent.
        """
        pc = self._pc
        return [] if pc is None else list(pc.trace)

    def snapshot_console_offset(self, name: str) -> int:
        """How many console bytes the guest had printed when full snapshot ``name`` was taken.

        Output after reverting to it repeats ``console.output[offset:]`` of
        the original run, byte for byte.

        Raises:
            ConfigError: no full snapshot of that name.
        """
        snap = self._get_snapshot(name)
        path = self.snapshot_dir(name) / "console.json"
        if snap.kind is not SnapshotKind.FULL or not path.exists():
            raise ConfigError(f"{name!r} is not a full snapshot of {self.name!r}", field="name")
        return int(json.loads(path.read_text())["console_offset"])

    @property
    def instructions(self) -> int:
        """With ``clock="virtual"``: instructions executed (and idled) since power-on."""
        pc = self._pc
        return 0 if pc is None else pc.clock.instructions

    # -- machine construction ------------------------------------------------------------
    def _drive_specs(self) -> tuple[list[DriveSpec], list[str]]:
        """Disks in BIOS order (boot order first) and why other boot devices cannot boot."""
        m = self.machine
        disks = {str(d.target): d for d in m.disks}
        order = [name for name in m.boot if name in disks]
        order += [name for name in disks if name not in order]
        problems = []
        for name in m.boot:
            if name not in disks:
                problems.append(f"{name}: the emulator boots from disks only")
        specs = []
        for target in order:
            disk = disks[target]
            specs.append(
                DriveSpec(
                    name=str(target),
                    path=str(self.disk_path(disk)),
                    format=_active_format(disk),
                    read_only=disk.read_only,
                    allow=tuple(map(str, self.backing_roots())),
                )
            )
        return specs, problems

    def _linux_boot(self) -> LinuxBoot | None:
        """``Machine.kernel`` read and checked (paths resolved against the folder)."""
        boot = self.machine.kernel
        if boot is None:
            return None
        return LinuxBoot.from_files(
            kernel_file(self.folder, boot.kernel),
            None if boot.initrd is None else kernel_file(self.folder, boot.initrd),
            boot.append,
        )

    def _new_machine(self) -> PcMachine:
        specs, problems = self._drive_specs()
        pc = PcMachine(
            memory=self.machine.memory,
            drives=specs,
            boot_problems=problems,
            clock=self.hypervisor.clock,
            serial=self.machine.serial.enabled,
            output=self.console.feed,
            on_poweroff=self._notify_poweroff,
            on_crash=self._notify_crash,
            kernel=self._linux_boot(),
        )
        self.console.set_writer(pc.send_input)
        # input typed before the guest looks for it waits in the console (see Console.open)
        pc.uart.input_wanted = self.console.release_input
        return pc

    def _on_state(self, old: State, new: State) -> None:
        pc = self._pc
        if new in _LIVE and pc is not None:
            pc.release()  # the worker runs only once the state says so

    def _drop_machine(self) -> None:
        with self._pc_lock:
            pc, self._pc = self._pc, None
        if pc is not None:
            self.console.set_writer(None)
            pc.close()

    def _live_machine(self, action: str) -> PcMachine:
        pc = self._pc
        if pc is None or pc.finished is not None:
            raise StateError(f"cannot {action} guest {self.name!r}: it is no longer running")
        return pc

    # -- lifecycle hooks ---------------------------------------------------------------------
    def _do_start(self) -> None:
        self._drop_machine()
        pc = self._new_machine()
        try:
            pc.power_on()
            pc.start()
        except BaseException:
            pc.close()
            raise
        self._pc = pc

    def _do_pause(self) -> None:
        self._live_machine("pause").park()

    def _do_resume(self) -> None:
        self._live_machine("resume").unpark()

    def _do_reset(self) -> None:
        pc = self._live_machine("reset")
        pc.park()
        try:
            pc.hard_reset()
        finally:
            if self.state is State.RUNNING:
                pc.unpark()

    def _do_shutdown(self, timeout: float) -> None:
        pc = self._live_machine("shut down")
        pc.press_power_button()
        why = pc.wait_finished(timeout)
        if why is None:
            raise TimeoutError(
                f"guest {self.name!r} did not power off within {timeout} s of the ACPI power "
                "button; it keeps running (kill() stops it)",
                timeout=timeout,
            )
        if why == "crash":
            raise StateError(
                f"guest {self.name!r} crashed instead of powering off: {pc.crash_reason}",
                state=State.CRASHED,
                action="shutdown",
            )
        self._drop_machine()

    def _do_kill(self) -> None:
        self._drop_machine()

    def _release(self) -> None:
        self._drop_machine()
        super()._release()

    # -- snapshots ---------------------------------------------------------------------------------
    def _do_snapshot(self, snap: Snapshot) -> None:
        folder = self.snapshot_dir(snap.name)
        pc = self._pc if self.state in _LIVE else None
        if pc is not None:
            pc.park()
        try:
            self._snapshot_disks(snap.name, folder, pc)
            if snap.kind is SnapshotKind.FULL:
                if pc is None:
                    raise StateError(f"guest {self.name!r} is not running", action="snapshot")
                save_machine(pc, folder)
                offset = {"console_offset": len(self.console.output)}
                (folder / "console.json").write_text(json.dumps(offset))
        except BaseException:
            with contextlib.suppress(ImageError):
                self._delete_disk_snapshots(snap.name, folder, pc)
            raise
        finally:
            if pc is not None and self.state is State.RUNNING:
                pc.unpark()

    def _do_revert(self, snap: Snapshot) -> None:
        folder = self.snapshot_dir(snap.name)
        if snap.kind is SnapshotKind.DISK:
            self._drop_machine()
            self._revert_disks(snap.name, folder, None)
            return
        pc = self._pc if self.state in _LIVE else None
        if pc is None:
            self._drop_machine()
            pc = self._new_machine()
            fresh = True
        else:
            pc.park()
            fresh = False
        try:
            self._revert_disks(snap.name, folder, pc)
            load_machine(pc, folder)
        except BaseException:
            if fresh:
                pc.close()
            else:
                self._drop_machine()
                self._lifecycle.set(State.SHUTOFF)
                self.console.close("the guest could not be reverted")
            raise
        if fresh:
            self._pc = pc
            pc.start(parked=snap.state is State.PAUSED)
        elif snap.state is State.RUNNING:
            pc.unpark()

    def _do_delete_snapshot(self, snap: Snapshot) -> None:
        folder = self.snapshot_dir(snap.name)
        pc = self._pc if self.state in _LIVE else None
        if pc is not None:
            pc.park()
        try:
            self._delete_disk_snapshots(snap.name, folder, pc)
        finally:
            if pc is not None and self.state is State.RUNNING:
                pc.unpark()

    # -- disk snapshots ----------------------------------------------------------------------------
    def _images(self, pc: PcMachine | None) -> list[tuple[str, str, images.Image, bool]]:
        """(target, format, open image, whether we opened it) for every disk."""
        out: list[tuple[str, str, images.Image, bool]] = []
        open_by_name = {d.spec.name: d.image for d in pc.drives} if pc is not None else {}
        try:
            for disk in self.machine.disks:
                name = str(disk.target)
                if name in open_by_name:
                    out.append((name, _active_format(disk), open_by_name[name], False))
                else:
                    fmt = _active_format(disk)
                    image = images.open(
                        self.disk_path(disk),
                        writable=not disk.read_only,
                        format=fmt,  # type: ignore[arg-type]  # validated by the model
                        allow_backing=tuple(map(str, self.backing_roots())),
                    )
                    out.append((name, fmt, image, True))
        except BaseException:
            for _, _, image, owned in out:
                if owned:
                    image.close()
            raise
        return out

    def _snapshot_disks(self, name: str, folder: Path, pc: PcMachine | None) -> None:
        handles = self._images(pc)
        try:
            for target, fmt, image, _ in handles:
                image.flush()
                if fmt == "qcow2":
                    image.create_snapshot(name)
                else:
                    _copy_image(image, folder / f"disk-{target}.raw")
        finally:
            for _, _, image, owned in handles:
                if owned:
                    image.close()

    def _revert_disks(self, name: str, folder: Path, pc: PcMachine | None) -> None:
        handles = self._images(pc)
        try:
            for target, fmt, image, _ in handles:
                if fmt == "qcow2":
                    image.revert_snapshot(name)
                else:
                    copy = folder / f"disk-{target}.raw"
                    if not copy.exists():
                        raise BackendError(
                            f"snapshot {name!r} has no saved copy of raw disk {target} ({copy})"
                        )
                    _restore_image(copy, image)
                image.flush()
        finally:
            for _, _, image, owned in handles:
                if owned:
                    image.close()

    def _delete_disk_snapshots(self, name: str, folder: Path, pc: PcMachine | None) -> None:
        handles = self._images(pc)
        try:
            for _, fmt, image, _ in handles:
                if fmt == "qcow2" and any(s.name == name for s in image.snapshots):
                    image.delete_snapshot(name)
        finally:
            for _, _, image, owned in handles:
                if owned:
                    image.close()
        shutil.rmtree(folder, ignore_errors=True)


def _active_format(disk: Disk) -> str:
    """The format of the file a disk reads and writes: its overlays are qcow2."""
    return "qcow2" if disk.layers else disk.format


def _copy_image(image: images.Image, dest: Path) -> None:
    """Copy a raw disk's contents (sparse: zero runs are left as holes)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = image.virtual_size
    zero = bytes(_COPY_CHUNK)
    with open(dest, "wb") as fh:
        for offset in range(0, size, _COPY_CHUNK):
            data = image.read(offset, min(_COPY_CHUNK, size - offset))
            if data == zero[: len(data)]:
                fh.seek(len(data), 1)
            else:
                fh.write(data)
        fh.truncate(size)


def _restore_image(copy: Path, image: images.Image) -> None:
    """Write a saved raw copy back through the open image."""
    size = image.virtual_size
    with open(copy, "rb") as fh:
        for offset in range(0, size, _COPY_CHUNK):
            data = fh.read(min(_COPY_CHUNK, size - offset))
            image.write(offset, data)

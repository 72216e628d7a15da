"""``LibvirtGuest``: one machine as a persistent libvirt domain.

The lifecycle rules live in :mod:`virtkit.backends.base`; this module maps
the hooks onto libvirt calls and libvirt's domain events onto the shared
state machine:

========================================  =======================================
libvirt lifecycle event                   guest state
========================================  =======================================
``SUSPENDED`` (domain really paused)      PAUSED, unless a virtkit call caused it
``RESUMED`` (domain really running)       RUNNING, likewise
``STOPPED`` / ``SHUTDOWN``                SHUTOFF (the guest powered itself off)
``STOPPED`` / ``DESTROYED`` not by us     CRASHED ("destroyed outside virtkit")
``STOPPED`` / ``CRASHED``, ``FAILED``     CRASHED with the detail
``CRASHED`` (guest panic)                 CRASHED
========================================  =======================================

Events arrive on the event thread after the call that caused them returns,
so each handler re-reads the domain's real state before acting.

Start: the domain is started paused, its console attached (a pty
serial drops what is printed before anyone listens), then resumed.

Snapshots: a full snapshot is a libvirt internal snapshot (RAM and device
state in the first qcow2 disk); a disk-only snapshot of a shut-off guest is
an internal qcow2 snapshot of every disk, of a running guest an external
overlay (``disks/<target>.<snapshot>.qcow2``) which libvirt 9.0 cannot revert
to. Each snapshot's libvirt XML is kept in its snapshot folder, so a daemon
that never saw the guest (another host, after a migration) gets the metadata
back when the guest is defined there.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from virtkit import bundle
from virtkit.agent import AgentError, CommandAgent, GuestAgent
from virtkit.backends.base import Guest
from virtkit.backends.libvirt import agentops, storage
from virtkit.backends.libvirt.agentops import AddressSource
from virtkit.backends.libvirt.aio import LibvirtAsyncGuest
from virtkit.backends.libvirt.connection import is_remote
from virtkit.backends.libvirt.console import ConsoleSource, open_console
from virtkit.backends.libvirt.devices import DETACH_TIMEOUT, LiveDevices
from virtkit.backends.libvirt.storage import Progress
from virtkit.backends.readiness import GuestAddress
from virtkit.bundle.atomic import atomic_write
from virtkit.errors import (
    ConfigError,
    ImageError,
    StateError,
    TimeoutError,
    UnsupportedFeatureError,
)
from virtkit.images.args import check_timeout
from virtkit.model import CdRom, Disk, Machine, Nic, Snapshot, SnapshotKind, State

if TYPE_CHECKING:
    from virtkit.backends.libvirt.hypervisor import LibvirtHypervisor

__all__ = ["LOCATION_FILE", "LibvirtGuest"]

#: a small TOML file in the VM folder saying which host runs the guest now.
LOCATION_FILE = "location.toml"
_SNAPSHOT_XML = "libvirt-snapshot.xml"
#: in a full snapshot's folder: it was taken with the guest's file systems frozen
QUIESCED_FILE = "quiesced"
#: QEMU's own copy of the serial output of the current run (local hosts): a pty drops
#: what the console stream had not read yet when QEMU exits, so the tail is taken here
SERIAL_RUN_LOG = ".serial-run.log"
_LOG_SETTLE = 0.1
_LOG_WAIT = 2.0
_STOP_POLL = 0.05


class LibvirtGuest(Guest):
    """A guest run as a libvirt domain.

    Extra attributes beyond :class:`~virtkit.backends.base.Guest`:

    * :attr:`domain_name` - the libvirt domain's name;
    * :attr:`domain` - the ``virDomain`` object (for what virtkit does not wrap);
    * :meth:`xml` - the domain's live XML;
    * :meth:`migrate` - move the running guest to another libvirt host;
    * :attr:`detach_timeout` - how long a live ``detach()`` waits for the guest.
    """

    hypervisor: LibvirtHypervisor
    #: seconds :meth:`detach` waits for a running guest to release the device
    detach_timeout: float = DETACH_TIMEOUT

    def __init__(
        self, hypervisor: LibvirtHypervisor, machine: Machine, folder: Path, domain: Any
    ) -> None:
        super().__init__(hypervisor, machine, folder)
        self.domain = domain
        self.domain_name: str = domain.name()
        self._stream: ConsoleSource | None = None
        self._busy = 0  # > 0 while a virtkit call changes the run state itself
        self._expect_stop = False
        self._gone = False  # migrated away: the domain is no longer ours to undefine
        #: virtkit writes the domain's XML from the machine (False for an imported
        #: domain, whose own XML holds more than the model: it is left as it is)
        self.owns_definition = True
        self._busy_lock = threading.Lock()
        self._agent: CommandAgent | None = None
        self._run_mark: int | None = None  # console offset where this handle's run began
        self._aio: LibvirtAsyncGuest | None = None
        if machine.serial.enabled:
            self.console.set_writer(self._write_console)

    @property
    def aio(self) -> LibvirtAsyncGuest:
        """This guest's API as coroutines, with libvirt's domain events (one twin per guest).

        See :class:`~virtkit.backends.libvirt.aio.LibvirtAsyncGuest`.
        """
        if self._aio is None:
            self._aio = LibvirtAsyncGuest(self)
        return self._aio

    # -- the guest agent ------------------------------------------------------------------
    @property
    def agent(self) -> GuestAgent:
        """The QEMU guest agent in this guest (``Machine(agent=True)``), through libvirt.

        libvirt owns the domain's agent channel, so commands go through
        ``virDomainQemuAgentCommand`` (:class:`~virtkit.agent.CommandAgent`).

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
            self._agent = CommandAgent(self._agent_command, name=self.name)
        return self._agent

    def _agent_command(self, request: str, timeout: float) -> str:
        """One agent command through libvirt; a large file write as several (see
        :func:`~virtkit.backends.libvirt.agentops.split_file_write`)."""
        return agentops.split_file_write(self._agent_command_once, request, timeout)

    def _agent_command_once(self, request: str, timeout: float) -> str:
        """One agent command through libvirt (its timeout counts whole seconds)."""
        import libvirt_qemu  # noqa: PLC0415 - part of libvirt-python, loaded with the backend

        lv = self._conn.lv
        command = str(json.loads(request).get("execute"))
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                self.domain, request, max(1, math.ceil(timeout)), 0
            )
        except lv.libvirtError as exc:
            text = (
                f"guest agent of {self.name!r} on {self.hypervisor.uri}: {command} failed: "
                f"{exc.get_error_message()}"
            )
            if exc.get_error_code() == getattr(lv, "VIR_ERR_AGENT_UNRESPONSIVE", 86):
                raise TimeoutError(text, timeout=timeout) from exc
            raise AgentError(text, command=command) from exc
        return str(reply)

    def addresses(
        self, *, timeout: float = 10.0, source: AddressSource = "auto"
    ) -> list[GuestAddress]:
        """Where the guest can be reached: its addresses from libvirt's ``source``
        (``"agent"``, ``"lease"``, ``"arp"``, or ``"auto"``: the agent when it answers,
        else the leases, then ARP; see :mod:`~virtkit.backends.libvirt.agentops`), then
        the host ends of user-mode port forwards.

        Raises:
            ConfigError: a bad ``source``; ``"agent"`` without ``Machine(agent=True)``.
            BackendError: libvirt failed (the message names the URI).
            TimeoutError: ``source="agent"`` and the agent did not answer in ``timeout``.
            StateError: the handle is dead; a named source of a guest not running.
        """
        self._lifecycle.check_alive("list the addresses of")
        return agentops.addresses(self, source, check_timeout(timeout))

    # -- plumbing -----------------------------------------------------------------------
    @property
    def _conn(self) -> Any:
        return self.hypervisor.connection

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        return self._conn.call(f"{what} (domain {self.domain_name!r})", fn, *args)

    def _busy_enter(self) -> None:
        with self._busy_lock:
            self._busy += 1

    def _busy_exit(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    def _real_state(self) -> State | None:
        lv = self._conn.lv
        try:
            code = self.domain.state()[0]
        except lv.libvirtError:
            return None
        if code in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED):
            return State.RUNNING
        if code in (lv.VIR_DOMAIN_PAUSED, lv.VIR_DOMAIN_PMSUSPENDED):
            return State.PAUSED
        if code == lv.VIR_DOMAIN_CRASHED:
            return State.CRASHED
        return State.SHUTOFF

    def xml(self) -> str:
        """The domain's current XML as libvirt has it."""
        return str(self._call("read the domain XML", self.domain.XMLDesc, 0))

    # -- events (event thread) -------------------------------------------------------------
    def _on_lifecycle(self, event: int, detail: int) -> None:
        lv = self._conn.lv
        if self._aio is not None:
            self._aio.domain_event(event, detail)
        if event == lv.VIR_DOMAIN_EVENT_SUSPENDED:
            if not self._busy and self._real_state() is State.PAUSED:
                self._notify_paused()
        elif event == lv.VIR_DOMAIN_EVENT_RESUMED:
            if not self._busy and self._real_state() is State.RUNNING:
                self._notify_resumed()
        elif event == lv.VIR_DOMAIN_EVENT_STOPPED:
            self._on_stopped(detail)
        elif event == lv.VIR_DOMAIN_EVENT_CRASHED:
            self._notify_crash("the guest kernel panicked (libvirt CRASHED event)")

    def _on_stopped(self, detail: int) -> None:
        # Decided on a thread of its own, never on the event thread: draining the console
        # waits for its reader, and a virtkit call under way (ours: kill, revert, migrate;
        # or start() still returning when a quick guest already powered off) must finish
        # first; the operation lock orders both.
        threading.Thread(
            target=self._stopped_after_operation,
            args=(detail,),
            name=f"virtkit-libvirt-stop {self.domain_name}",
            daemon=True,
        ).start()

    def _stopped_after_operation(self, detail: int) -> None:
        with self._lifecycle._op_lock:
            if self._gone or isinstance(self.domain, _Released):
                return  # migrated away or released: this handle no longer follows it
            if self.state in (State.RUNNING, State.PAUSED) and not self._busy:
                self._handle_stop(detail)

    def _handle_stop(self, detail: int) -> None:
        lv = self._conn.lv
        if self._real_state() in (State.RUNNING, State.PAUSED):
            return  # an old event of an earlier run
        self._detach_console(drain=True)
        self._recover_console_tail()
        if detail == lv.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
            self._notify_poweroff()
        elif detail == lv.VIR_DOMAIN_EVENT_STOPPED_DESTROYED:
            if not self._expect_stop:
                self._notify_crash(
                    f"the domain {self.domain_name!r} was destroyed outside virtkit "
                    f"(on {self.hypervisor.uri})"
                )
        elif detail == lv.VIR_DOMAIN_EVENT_STOPPED_CRASHED:
            self._notify_crash("QEMU crashed (libvirt STOPPED/CRASHED event)")
        elif detail == lv.VIR_DOMAIN_EVENT_STOPPED_FAILED:
            self._notify_crash("the hypervisor failed (libvirt STOPPED/FAILED event)")
        elif detail in (lv.VIR_DOMAIN_EVENT_STOPPED_SAVED,):
            self._notify_poweroff()

    # -- console ---------------------------------------------------------------------------
    def _recover_console_tail(self) -> None:
        """Append what the guest printed just before it stopped and the stream missed.

        QEMU writes the run's serial output to :data:`SERIAL_RUN_LOG` as well;
        the stream delivered a prefix of it. Only for runs this handle started
        (a revert or migration restarts QEMU under another log).
        """
        mark, self._run_mark = self._run_mark, None
        if mark is None or not self.hypervisor.local_files:
            return
        path = self.folder / SERIAL_RUN_LOG
        deadline = time.monotonic() + _LOG_WAIT
        size = -1
        while time.monotonic() < deadline:  # virtlogd writes the file after QEMU
            try:
                now = path.stat().st_size
            except OSError:
                return
            if now == size:
                break
            size = now
            time.sleep(_LOG_SETTLE)
        try:
            logged = path.read_bytes()
        except OSError:
            return
        seen = self.console.output[mark:]
        if len(logged) > len(seen) and logged.startswith(seen):
            self.console.feed(logged[len(seen) :])

    def _attach_console(self) -> None:
        self._detach_console()
        if not self.machine.serial.enabled:
            return
        conn, domain = self._conn, self.domain
        if is_remote(self.hypervisor.uri):
            # a stream, on a connection of its own (see LibvirtHypervisor.console_connection)
            conn = self.hypervisor.console_connection()
            domain = conn.call(
                f"look up domain {self.domain_name!r} for its console",
                conn.raw.lookupByUUIDString,
                self.domain.UUIDString(),
            )
        self._stream = open_console(conn, domain, self.console.feed)

    def _detach_console(self, *, drain: bool = False) -> None:
        """Stop reading the console; ``drain``: first read what QEMU wrote before it exited."""
        stream, self._stream = self._stream, None
        if stream is not None:
            if drain:
                stream.drain()
            else:
                stream.close()

    def _write_console(self, data: bytes) -> None:
        stream = self._stream
        if stream is None or not stream.open:
            raise StateError(f"cannot write to the console of {self.name!r}: it is not running")
        stream.write(data)

    # -- lifecycle hooks ---------------------------------------------------------------------
    def _check_files(self) -> None:
        if not self.hypervisor.local_files:
            return
        for i, disk in enumerate(self.machine.disks):
            path = bundle.resolve_disk(self.folder, disk.active)
            if not path.is_file():
                raise ImageError(
                    f"disk 'disks[{i}]' ({disk.target}) has no image file: {path} does not exist",
                    path=str(path),
                )

    def _do_start(self) -> None:
        lv = self._conn.lv
        self._check_files()
        self._redefine()  # the folder may have changed while the guest was off
        self._busy_enter()
        try:
            self._expect_stop = False
            self._call("start", self.domain.createWithFlags, lv.VIR_DOMAIN_START_PAUSED)
            try:
                self._attach_console()
                self._run_mark = len(self.console.output)
                self._call("resume after start", self.domain.resume)
            except BaseException:
                self._kill_quietly()
                raise
        finally:
            self._busy_exit()

    def _kill_quietly(self) -> None:
        lv = self._conn.lv
        self._expect_stop = True
        self._detach_console()
        try:
            if self.domain.isActive():
                self.domain.destroy()
        except lv.libvirtError:
            pass

    def _do_pause(self) -> None:
        self._busy_enter()
        try:
            self._call("pause", self.domain.suspend)
        finally:
            self._busy_exit()

    def _do_resume(self) -> None:
        self._busy_enter()
        try:
            self._call("resume", self.domain.resume)
        finally:
            self._busy_exit()

    def _do_reset(self) -> None:
        self._call("reset", self.domain.reset, 0)

    def _do_shutdown(self, timeout: float) -> None:
        lv = self._conn.lv
        self._call(
            "press the ACPI power button",
            self.domain.shutdownFlags,
            lv.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN,
        )
        deadline = time.monotonic() + timeout
        while True:
            state = self._call("read the state", self.domain.state)[0]
            if state == lv.VIR_DOMAIN_SHUTOFF:
                self._detach_console(drain=True)
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"guest {self.name!r} ignored the ACPI power button for {timeout} s; "
                    "it keeps running (kill() stops it)",
                    timeout=timeout,
                )
            time.sleep(_STOP_POLL)

    def _do_kill(self) -> None:
        lv = self._conn.lv
        self._busy_enter()
        try:
            self._expect_stop = True
            self._detach_console()
            try:
                self.domain.destroy()
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                    raise self._conn._translate(exc, "kill") from exc
                if self._real_state() is not State.SHUTOFF:
                    raise self._conn._translate(exc, f"kill domain {self.domain_name!r}") from exc
        finally:
            self._busy_exit()

    # -- live device changes (see virtkit.backends.libvirt.devices) ----------------------------
    def _do_change_media(self, drive: CdRom) -> None:
        LiveDevices(self).change_media(drive)

    def _do_attach(self, device: Disk | Nic) -> None:
        LiveDevices(self).attach(device)

    def _do_detach(self, device: Disk | Nic) -> None:
        LiveDevices(self).detach(device, timeout=self.detach_timeout)

    # -- snapshots ----------------------------------------------------------------------------
    def _snapshot_xml(self, snap: Snapshot, *, external: bool) -> str:
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = snap.name
        if snap.description:
            ET.SubElement(root, "description").text = snap.description
        if external:
            ET.SubElement(root, "memory", snapshot="no")
            disks = ET.SubElement(root, "disks")
            for disk in self.machine.disks:
                if disk.read_only:
                    ET.SubElement(disks, "disk", name=str(disk.target), snapshot="no")
                    continue
                el = ET.SubElement(disks, "disk", name=str(disk.target), snapshot="external")
                ET.SubElement(el, "driver", type="qcow2")
                ET.SubElement(el, "source", file=str(self._overlay(disk, snap)))
        return ET.tostring(root, encoding="unicode")

    def _overlay(self, disk: Disk, snap: Snapshot) -> Path:
        return bundle.resolve_disk(self.folder, _overlay_name(disk, snap))

    def _do_snapshot(self, snap: Snapshot) -> Snapshot | None:
        lv = self._conn.lv
        live = self.state in (State.RUNNING, State.PAUSED)
        external = snap.kind is SnapshotKind.DISK and live
        flags = 0
        if external:
            flags = lv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        if snap.kind is SnapshotKind.FULL and any(d.format != "qcow2" for d in self.machine.disks):
            raise UnsupportedFeatureError(
                f"a full snapshot on libvirt needs qcow2 disks (internal snapshots); guest "
                f"{self.name!r} has a raw disk",
                feature="full snapshot of a raw disk",
            )
        marker = self.snapshot_dir(snap.name) / QUIESCED_FILE
        self._busy_enter()
        try:
            # frozen through the agent (when it answers), the snapshot's disks hold all the
            # guest wrote; a revert to a frozen full snapshot thaws the guest (marker file)
            with self.quiesce() as count:
                if count and snap.kind is SnapshotKind.FULL:
                    atomic_write(marker, b"%d\n" % count)
                else:
                    marker.unlink(missing_ok=True)
                made = self._call(
                    f"create snapshot {snap.name!r}",
                    self.domain.snapshotCreateXML,
                    self._snapshot_xml(snap, external=external),
                    flags,
                )
        finally:
            self._busy_exit()
        self._save_snapshot_xml(snap.name, made)
        if not external:
            return None
        # the folder is the truth: each disk now writes to its new overlay
        frozen = {str(d.target): d.active for d in self.machine.disks if not d.read_only}
        disks = tuple(
            d if d.read_only else attrs.evolve(d, layers=(*d.layers, _overlay_name(d, snap)))
            for d in self.machine.disks
        )
        self._set_machine(attrs.evolve(self.machine, disks=disks))
        return attrs.evolve(snap, layers=frozen)

    def _set_machine(self, machine: Machine) -> None:
        """Persist the changed definition, then give libvirt the same one."""
        super()._set_machine(machine)
        self._redefine()

    def _redefine(self) -> None:
        if not self.owns_definition:
            return
        # host_port=0 forwards as picked at start (QEMU would pick another port itself)
        xml = self.hypervisor.domain_xml(self.launch_machine(), self.folder)
        self.domain = self._call("update the domain definition", self._conn.raw.defineXML, xml)

    def _save_snapshot_xml(self, name: str, snapshot: Any) -> None:
        try:
            text = snapshot.getXMLDesc(0)
        except self._conn.lv.libvirtError:
            return
        atomic_write(self.snapshot_dir(name) / _SNAPSHOT_XML, text.encode())

    def restore_snapshot_metadata(self) -> None:
        """Give libvirt back the snapshot metadata kept in the folder (``REDEFINE``)."""
        lv = self._conn.lv
        for snap in self.snapshots:
            path = self.folder / "snapshots" / "state" / snap.name / _SNAPSHOT_XML
            try:
                text = path.read_text()
            except OSError:
                continue
            flags = lv.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
            if snap.name == self._current:
                flags |= lv.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
            self._call(
                f"restore snapshot {snap.name!r}", self.domain.snapshotCreateXML, text, flags
            )

    def _lookup_snapshot(self, name: str) -> Any:
        return self._call(f"find snapshot {name!r}", self.domain.snapshotLookupByName, name, 0)

    def _is_external(self, snapshot: Any) -> bool:
        try:
            root = ET.fromstring(snapshot.getXMLDesc(0))
        except (self._conn.lv.libvirtError, ET.ParseError):
            return False
        return any(d.get("snapshot") == "external" for d in root.iter("disk"))

    def _do_revert(self, snap: Snapshot) -> None:
        lv = self._conn.lv
        snapshot = self._lookup_snapshot(snap.name)
        if self._is_external(snapshot):
            raise UnsupportedFeatureError(
                f"libvirt {self.hypervisor.libvirt_version} cannot revert to the external "
                f"(disk-only, taken while running) snapshot {snap.name!r} of {self.name!r}",
                feature="revert to an external snapshot",
            )
        self._busy_enter()
        try:
            if snap.kind is SnapshotKind.DISK:
                self._kill_quietly()
                self._call(
                    f"revert to snapshot {snap.name!r}", self.domain.revertToSnapshot, snapshot, 0
                )
                return
            self._expect_stop = True
            self._detach_console()
            self._call(
                f"revert to snapshot {snap.name!r}",
                self.domain.revertToSnapshot,
                snapshot,
                lv.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED,
            )
            self._expect_stop = False
            self._attach_console()
            self._run_mark = len(self.console.output)  # QEMU restarted: a fresh run log
            if snap.state is State.RUNNING:
                self._call("resume after revert", self.domain.resume)
        finally:
            self._busy_exit()
        quiesced = (self.snapshot_dir(snap.name) / QUIESCED_FILE).is_file()
        if quiesced and snap.state is State.RUNNING and self.machine.agent:
            agentops.thaw_restored(self)

    def _do_delete_snapshot(self, snap: Snapshot) -> None:
        lv = self._conn.lv
        snapshot = self._lookup_snapshot(snap.name)
        flags = lv.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY if self._is_external(snapshot) else 0
        self._call(f"delete snapshot {snap.name!r}", snapshot.delete, flags)

    def _release(self) -> None:
        """Detach the console and undefine the domain (the VM folder stays)."""
        self._detach_console()
        if isinstance(self.domain, _Released):  # released before (undefine, then close)
            super()._release()
            return
        if self._gone:
            self.domain = _Released(self.domain_name)
            super()._release()
            return
        lv = self._conn.lv
        flags = lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | lv.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
        # already gone when undefined behind our back or the daemon died
        with contextlib.suppress(lv.libvirtError):
            self.domain.undefineFlags(flags)
        self.domain = _Released(self.domain_name)  # drops libvirt's reference to the connection
        super()._release()

    @contextlib.contextmanager
    def _exclusive(self, action: str) -> Iterator[None]:
        """Hold the guest's operation lock for an action the shared state table lacks."""
        with self._lifecycle._op_lock:
            self._lifecycle.check_alive(action)
            yield

    # -- hosts without shared storage ---------------------------------------------------------
    def pull(self, *, progress: Progress | None = None, remove: bool = False) -> None:
        """Download this pushed guest's disks back into its VM folder.

        Args:
            progress: called as ``progress(done_bytes, total_bytes)``.
            remove: delete the volumes and the pool on the host afterwards.

        Raises:
            StateError: the guest runs (its disks are changing).
            ConfigError: the host shares storage (nothing to pull).
            BackendError: libvirt failed (names the URI).
        """
        if progress is not None and not callable(progress):
            raise ConfigError(f"'progress' must be callable (got {progress!r})", field="progress")
        if not isinstance(remove, bool):
            raise ConfigError(f"'remove' must be True or False (got {remove!r})", field="remove")
        if self.hypervisor.local_files:
            raise ConfigError(
                f"{self.hypervisor.uri} shares storage with this machine; the folder already "
                "holds the disks",
                field="pull",
            )
        with self._exclusive("pull"):
            if self.state is not State.SHUTOFF:
                raise StateError(
                    f"cannot pull the disks of {self.name!r} while it is {self.state.value}",
                    state=self.state,
                    action="pull",
                )
            files = storage.disk_files(self.machine, self.folder)
            remote = self.hypervisor.remote_folder(self.name) + "/disks"
            pool = storage.pool_for(self._conn, self.domain_name, remote, create=False)
            storage.download_pool(self._conn, pool, files, progress)
            if remove:
                storage.delete_pool(
                    self._conn, self.domain_name, self.hypervisor.remote_folder(self.name)
                )

    # -- hosts ----------------------------------------------------------------------------------
    def record_location(self) -> None:
        """Write ``location.toml``: the URI and domain this guest runs under now."""
        when = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        text = (
            "# where this VM runs (written by virtkit's libvirt backend)\n"
            f"uri = {_toml_str(self.hypervisor.uri)}\n"
            f"domain = {_toml_str(self.domain_name)}\n"
            f"since = {_toml_str(when)}\n"
        )
        atomic_write(self.folder / LOCATION_FILE, text.encode())

    def migrate(
        self,
        destination: LibvirtHypervisor,
        *,
        live: bool = True,
        copy_storage: bool = False,
        timeout: float = 300.0,
    ) -> LibvirtGuest:
        """Move this running (or paused) guest to another libvirt host.

        The domain is migrated by libvirt (``migrate3``; ``LIVE`` unless
        ``live=False``, the destination keeps it defined, the source forgets
        it). With ``copy_storage=True`` libvirt copies the disks too (hosts
        without shared storage; the images must exist, empty and as large, on
        the destination). The console output continues in the returned
        guest's console; this handle is retired. The VM folder records the
        new host in ``location.toml``.

        Returns:
            the guest on ``destination``.

        Raises:
            StateError: the guest is not running or paused.
            ConfigError: the destination is not a libvirt connection, is this one,
                or already has a guest of that name.
            BackendError: libvirt refused or failed (the domain then still runs here).
        """
        from virtkit.backends.libvirt.hypervisor import LibvirtHypervisor  # noqa: PLC0415

        if not isinstance(destination, LibvirtHypervisor):
            raise ConfigError(
                f"migrate() needs a libvirt hypervisor (got {type(destination).__name__})",
                field="destination",
            )
        if destination is self.hypervisor or destination.uri == self.hypervisor.uri:
            raise ConfigError(
                f"guest {self.name!r} already runs on {destination.uri}", field="destination"
            )
        for value, name in ((live, "live"), (copy_storage, "copy_storage")):
            if not isinstance(value, bool):
                raise ConfigError(f"'{name}' must be True or False (got {value!r})", field=name)
        lv = self._conn.lv
        with self._exclusive("migrate"):
            if self.state not in (State.RUNNING, State.PAUSED):
                raise StateError(
                    f"cannot migrate guest {self.name!r}: it is {self.state.value} (only a running "
                    "or paused guest migrates; define the folder on the other host instead)",
                    state=self.state,
                    action="migrate",
                )
            if self.name in {g.name for g in destination.guests}:
                raise ConfigError(
                    f"{destination.uri} already has a guest named {self.name!r}", field="name"
                )
            flags = lv.VIR_MIGRATE_PERSIST_DEST | lv.VIR_MIGRATE_UNDEFINE_SOURCE
            if live:
                flags |= lv.VIR_MIGRATE_LIVE
            if copy_storage:
                flags |= lv.VIR_MIGRATE_NON_SHARED_DISK
            if any(d.cache != "none" for d in self.machine.disks) and not copy_storage:
                flags |= lv.VIR_MIGRATE_UNSAFE  # shared storage, page cache flushed by QEMU
            # always arrive paused: the console attaches on the destination before the
            # guest runs again there, so no output is lost (the source's stream reads
            # until the source QEMU stops)
            flags |= lv.VIR_MIGRATE_PAUSED
            params: dict[str, Any] = {}
            if destination.migration_uri:
                params[lv.VIR_MIGRATE_PARAM_URI] = destination.migration_uri
                if copy_storage:  # the disks' NBD stream goes to the same address
                    params[lv.VIR_MIGRATE_PARAM_DISKS_URI] = destination.migration_uri
            paused = self.state is State.PAUSED
            self._busy_enter()
            try:
                moved = self._call(
                    f"migrate to {destination.uri}",
                    self.domain.migrate3,
                    destination.connection.raw,
                    params,
                    flags,
                )
            finally:
                self._busy_exit()
            self._detach_console()
            new = destination._adopt(self, moved, paused=paused)
            self.hypervisor._forget(self, f"it was migrated to {destination.uri}")
            return new


class _Released:
    """Stands in for a released domain: any use is a StateError, not a crash."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        raise StateError(
            f"domain {self._name!r} is no longer managed by this handle (undefined, migrated "
            "or its connection closed)"
        )


def _overlay_name(disk: Disk, snap: Snapshot) -> str:
    """The overlay a running disk-only snapshot puts on ``disk``, next to its active file."""
    active = disk.active
    name = f"{disk.target}.{snap.name}.qcow2"
    parent = os.path.dirname(active)
    return os.path.join(parent, name) if parent else name


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)

"""``LibvirtHypervisor``: guests as domains on any libvirt host, local or remote.

Options (``virtkit.connect("libvirt", ...)``):

* ``uri``: a libvirt URI (default ``$LIBVIRT_DEFAULT_URI``, else
  ``qemu:///system``); ``qemu+ssh://``, ``qemu+tcp://`` and the rest work as
  in ``virsh -c``;
* ``accel``: ``"auto"`` (default: domain type ``kvm`` only if a probe guest
  really runs under KVM on that host, else ``qemu``), ``"kvm"`` or ``"tcg"``;
* ``name_prefix``: prepended to each domain's name (keeps a test run's
  domains apart from others on a shared daemon);
* ``shared_storage``: whether the host sees this machine's files at the same
  paths (default: True for local URIs); without it, :func:`virtkit.libvirt.push`
  uploads a VM folder's disks to the host;
* ``remote_root``: where pushed guests' disks live on a host without shared
  storage (default ``/var/lib/libvirt/virtkit``; one storage pool per guest);
* ``migration_uri``: where other hosts send migration data for guests
  migrating *to* this one (e.g. ``tcp://10.0.0.2``; default: libvirt's choice
  from the host name);
* ``timeout``: seconds to wait for the connection to open;
* plus the base options ``root``, ``host``, ``policy``.

The host's capacity is read from the node (CPUs and RAM of ``virNodeGetInfo``)
unless ``host=`` is given; :attr:`LibvirtHypervisor.free_memory` is the
node's free memory now.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import attrs

from virtkit.backends.base import Guest, Hypervisor
from virtkit.backends.kvmprobe import PROBE_MARKER, PROBE_TIMEOUT, probe_image
from virtkit.backends.libvirt import storage
from virtkit.backends.libvirt.connection import Connection, default_uri, is_remote, libvirt_module
from virtkit.backends.libvirt.guest import SERIAL_RUN_LOG, LibvirtGuest
from virtkit.backends.libvirt.storage import Progress
from virtkit.errors import BackendError, ConfigError, ResourceError
from virtkit.libvirt import to_xml
from virtkit.model import HostResources, HypervisorType, Machine, State

__all__ = ["AccelChoice", "LibvirtHypervisor"]

ACCELS = ("auto", "kvm", "tcg")


@attrs.frozen
class AccelChoice:
    """The domain type guests get on a host, and why.

    Attributes:
        accel: ``"kvm"`` or ``"tcg"`` (domain type ``kvm`` or ``qemu``).
        reason: one line a human can read.
    """

    accel: str
    reason: str


_probe_memo: dict[str, AccelChoice] = {}
_probe_lock = threading.Lock()


class LibvirtHypervisor(Hypervisor):
    """Runs each guest as a persistent libvirt domain on the host ``uri`` names.

    Args:
        uri: libvirt URI (default ``$LIBVIRT_DEFAULT_URI`` or ``qemu:///system``).
        accel: ``"auto"``, ``"kvm"`` or ``"tcg"``.
        name_prefix: prefix of every domain name this connection defines.
        shared_storage: the host sees local files at the same paths.
        migration_uri: the migration data address of this host.
        timeout: seconds to wait for the connection.
        root, host, policy: see :class:`virtkit.backends.base.Hypervisor`.

    Raises:
        BackendUnavailable: libvirt-python is not installed.
        BackendError: the daemon cannot be reached (the message names the URI).
        ConfigError: an option has a bad value.
    """

    name: ClassVar[str] = "libvirt"

    def __init__(
        self,
        *,
        uri: str | None = None,
        accel: str = "auto",
        name_prefix: str = "",
        shared_storage: bool | None = None,
        migration_uri: str | None = None,
        remote_root: str = "/var/lib/libvirt/virtkit",
        timeout: float = 30.0,
        **options: Any,
    ) -> None:
        if uri is not None and (not isinstance(uri, str) or not uri or "\0" in uri):
            raise ConfigError(f"'uri' must be a libvirt URI string (got {uri!r})", field="uri")
        if accel not in ACCELS:
            raise ConfigError(
                f"'accel' must be one of {', '.join(ACCELS)} (got {accel!r})", field="accel"
            )
        if not isinstance(name_prefix, str) or any(c in name_prefix for c in "/\0\n"):
            raise ConfigError(
                f"'name_prefix' must be a string without '/' (got {name_prefix!r})",
                field="name_prefix",
            )
        if shared_storage is not None and not isinstance(shared_storage, bool):
            raise ConfigError(
                f"'shared_storage' must be True or False (got {shared_storage!r})",
                field="shared_storage",
            )
        if migration_uri is not None and not isinstance(migration_uri, str):
            raise ConfigError(
                f"'migration_uri' must be a string like 'tcp://10.0.0.2' (got {migration_uri!r})",
                field="migration_uri",
            )
        if not isinstance(remote_root, str) or not remote_root.startswith("/"):
            raise ConfigError(
                f"'remote_root' must be an absolute path on the host (got {remote_root!r})",
                field="remote_root",
            )
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(
                f"'timeout' must be a positive number of seconds (got {timeout!r})",
                field="timeout",
            )
        self.uri = uri or default_uri()
        self.requested_accel = accel
        self.name_prefix = name_prefix
        self.local_files = (not is_remote(self.uri)) if shared_storage is None else shared_storage
        self.migration_uri = migration_uri
        self.remote_root = remote_root.rstrip("/") or "/"
        self.connection = Connection(self.uri, timeout=float(timeout))
        self._open_timeout = float(timeout)
        self._console_conn: Connection | None = None
        self._console_lock = threading.Lock()
        self._accel: AccelChoice | None = None
        self._callback_id: int | None = None
        try:
            raw = self.connection.raw
            lv = self.connection.lv
            info = self.connection.call("read the node info", raw.getInfo)
            self.libvirt_version = _version(
                self.connection.call("read the version", raw.getLibVersion)
            )
            if "host" not in options or options["host"] is None:
                storage_probe = HostResources.detect(_existing(options.get("root")))
                options["host"] = HostResources(
                    cpus=int(info[2]), memory=int(info[1]) * 1024**2, storage=storage_probe.storage
                )
            super().__init__(**options)
            self._callback_id = self.connection.call(
                "subscribe to domain events",
                raw.domainEventRegisterAny,
                None,
                lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                self._on_lifecycle,
                None,
            )
        except BaseException:
            self.connection.close()
            raise

    @classmethod
    def probe(cls, **options: object) -> None:
        """Raise ``BackendUnavailable`` when libvirt-python is missing."""
        libvirt_module()

    # -- identity ------------------------------------------------------------------------------
    @property
    def accelerator(self) -> AccelChoice:
        """The domain type guests get here, and why (probed once per host URI)."""
        if self._accel is None:
            self._accel = self._choose_accel()
        return self._accel

    @property
    def kind(self) -> HypervisorType:
        """TYPE1 when guests run under KVM on the host, TYPE2 with TCG."""
        return HypervisorType.TYPE1 if self.accelerator.accel == "kvm" else HypervisorType.TYPE2

    @property
    def free_memory(self) -> int:
        """The node's free memory now, in bytes."""
        return int(self.connection.call("read free memory", self.connection.raw.getFreeMemory))

    def usage(self) -> tuple[int, int]:
        """vCPUs and memory (bytes) of every domain running on the host now, virtkit's or not."""
        raw = self.connection.raw
        lv = self.connection.lv
        domains = self.connection.call(
            "list running domains", raw.listAllDomains, lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        )
        cpus = memory = 0
        for dom in domains:
            try:
                info = dom.info()
            except lv.libvirtError:
                continue  # stopped while we looked
            cpus += int(info[3])
            memory += int(info[1]) * 1024
        return cpus, memory

    @property
    def host(self) -> HostResources:
        """Host capacity (node info) and what runs there now: the CPUs and memory of every
        active domain on the host (also those virtkit did not start), defined guests' storage."""
        base = super().host
        if self._closed:
            return base
        cpus, memory = self.usage()
        return attrs.evolve(
            base,
            allocated_cpus=max(cpus, base.allocated_cpus),
            allocated_memory=max(memory, base.allocated_memory),
        )

    def _admit_start(self, guest: Guest) -> None:
        """The base policy check, plus the host's real load: domains virtkit did not start
        count too, and the node must have the memory free."""
        super()._admit_start(guest)
        cpus, memory = self.usage()
        own = [
            g for g in self.guests if g is not guest and g.state in (State.RUNNING, State.PAUSED)
        ]
        foreign_cpus = max(cpus - sum(g.machine.vcpus for g in own), 0)
        foreign_memory = max(memory - sum(g.machine.memory for g in own), 0)
        total_cpus = cpus + guest.machine.vcpus
        total_memory = memory + guest.machine.memory
        if total_cpus > self._cpu_limit():
            raise ResourceError(
                f"starting {guest.name!r} on {self.uri} would run {total_cpus} vCPUs "
                f"({foreign_cpus} of them in domains virtkit did not start); the policy allows "
                f"{self._cpu_limit()}",
                resource="cpus",
                requested=guest.machine.vcpus,
                available=max(self._cpu_limit() - cpus, 0),
            )
        if total_memory > self._memory_limit():
            raise ResourceError(
                f"starting {guest.name!r} on {self.uri} would commit {total_memory} bytes "
                f"({foreign_memory} in domains virtkit did not start); the policy allows "
                f"{self._memory_limit()}",
                resource="memory",
                requested=guest.machine.memory,
                available=max(self._memory_limit() - memory, 0),
            )

    def _choose_accel(self) -> AccelChoice:
        if self.requested_accel != "auto":
            return AccelChoice(self.requested_accel, "forced by the caller")
        env = os.environ.get("VIRTKIT_QEMU_ACCEL", "auto")
        if env in ("kvm", "tcg"):
            return AccelChoice(env, "forced by VIRTKIT_QEMU_ACCEL")
        with _probe_lock:
            if self.uri not in _probe_memo:
                _probe_memo[self.uri] = self._probe_kvm()
            return _probe_memo[self.uri]

    def _probe_kvm(self) -> AccelChoice:
        lv = self.connection.lv
        raw = self.connection.raw
        try:
            raw.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        except lv.libvirtError as exc:
            return AccelChoice("tcg", f"libvirt offers no KVM here: {exc.get_error_message()}")
        if not self.local_files:
            return AccelChoice(
                "tcg",
                "libvirt reports KVM on this remote host, but the probe guest can run only "
                "where the host sees local files; pass accel='kvm' to use it",
            )
        return _run_probe(self.connection)

    # -- events ---------------------------------------------------------------------------------
    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        try:
            uuid = dom.UUIDString()
        except self.connection.lv.libvirtError:
            return
        with self._lock:
            guest = next(
                (
                    g
                    for g in self._guests.values()
                    if isinstance(g, LibvirtGuest) and str(g.machine.uuid) == uuid
                ),
                None,
            )
        if guest is not None:
            guest._on_lifecycle(event, detail)

    # -- definitions ----------------------------------------------------------------------------
    def domain_xml(self, machine: Machine, folder: Path) -> str:
        """The XML :meth:`define` gives libvirt for ``machine`` in ``folder``.

        On a host without shared storage the disks are the pushed volumes in
        :meth:`remote_folder`, not the local files.
        """
        domain_type = "kvm" if self.accelerator.accel == "kvm" else "qemu"
        where = folder if self.local_files else Path(self.remote_folder(machine.name))
        xml = to_xml(machine, where, name=self.name_prefix + machine.name, domain_type=domain_type)
        if self.local_files and machine.serial.enabled:
            xml = _with_serial_log(xml, folder / SERIAL_RUN_LOG)
        return xml

    def remote_folder(self, name: str) -> str:
        """Where a pushed guest's files live on the host (its disks in ``disks/``)."""
        return f"{self.remote_root}/{self.name_prefix}{name}"

    def push(
        self,
        folder: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        allow: Iterable[str | os.PathLike[str]] = (),
    ) -> LibvirtGuest:
        """Define the VM folder ``folder`` here, uploading its disks when storage is not shared.

        With shared storage this is :meth:`define` on the folder's machine (the
        files are used in place). Otherwise every image file of ``disks/`` is
        uploaded into a storage pool of the guest's own on the host
        (:meth:`remote_folder`), reporting ``progress(done_bytes, total_bytes)``;
        the folder stays the truth for everything else, and
        :meth:`LibvirtGuest.pull` brings the disks back. ``allow`` lets the
        folder name files outside it (as in :func:`virtkit.load`; such files
        can be used only with shared storage).

        Raises:
            ConfigError: the folder does not load, a file is not directly in
                ``disks/``, or a guest of that name exists.
            BackendError: libvirt failed (the message names the URI).
        """
        from virtkit import bundle  # noqa: PLC0415 - keeps import order light

        if progress is not None and not callable(progress):
            raise ConfigError(f"'progress' must be callable (got {progress!r})", field="progress")
        target = Path(os.path.abspath(os.fspath(folder)))
        machine = bundle.load(target, allow=allow)
        if not self.local_files:
            files = storage.disk_files(machine, target)
            name = self.name_prefix + machine.name
            pool = storage.pool_for(
                self.connection, name, self.remote_folder(machine.name) + "/disks", create=True
            )
            storage.upload_files(self.connection, pool, files, progress)
        guest = self.define(machine, folder=target)
        assert isinstance(guest, LibvirtGuest)
        return guest

    def _create_guest(self, machine: Machine, folder: Path) -> Guest:
        raw = self.connection.raw
        lv = self.connection.lv
        name = self.name_prefix + machine.name
        try:
            raw.lookupByName(name)
        except lv.libvirtError as exc:
            if exc.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                raise self.connection._translate(exc, f"look up domain {name!r}") from exc
        else:
            raise ConfigError(
                f"{self.uri} already has a domain named {name!r}; undefine it (virsh undefine) "
                "or adopt it with virtkit.libvirt.import_domain()",
                field="name",
                value=machine.name,
            )
        if not self.local_files:
            try:
                pool = storage.pool_for(
                    self.connection, name, self.remote_folder(machine.name) + "/disks", create=False
                )
            except BackendError:
                raise ConfigError(
                    f"{self.uri} does not share this machine's storage and its disks are not "
                    f"uploaded; use hv.push(folder) to upload the VM folder",
                    field="folder",
                ) from None
            have = {v.name() for v in pool.listAllVolumes(0)}
            for i, disk in enumerate(machine.disks):
                missing = [f for f in disk.files() if os.path.basename(f) not in have]
                if missing:
                    raise ConfigError(
                        f"'disks[{i}]' file {missing[0]!r} is not uploaded to {self.uri}; use "
                        "hv.push(folder)",
                        field=f"disks[{i}]",
                    )
        xml = self.domain_xml(machine, Path(os.path.abspath(folder)))
        domain = self.connection.call(f"define domain {name!r}", raw.defineXML, xml)
        try:
            guest = LibvirtGuest(self, machine, folder, domain)
            guest.restore_snapshot_metadata()
            guest.record_location()
        except BaseException:
            _undefine(self.connection, domain)
            raise
        return guest

    def _adopt(self, source: LibvirtGuest, domain: Any, *, paused: bool) -> LibvirtGuest:
        """Take over a guest migrated here: same folder, same console buffer."""
        guest = LibvirtGuest(self, source.machine, source.folder, domain)
        guest.console = source.console
        guest.storage = source.storage
        if source.machine.serial.enabled:
            guest.console.set_writer(guest._write_console)
        guest._lifecycle.set(State.PAUSED if paused else State.RUNNING)
        self._register(guest)
        guest._attach_console()
        if not paused:
            guest._busy_enter()
            try:
                self.connection.call("resume after migration", domain.resume)
            finally:
                guest._busy_exit()
        # snapshot metadata is a convenience on the new host; the folder keeps it
        with contextlib.suppress(BackendError):
            guest.restore_snapshot_metadata()
        guest.record_location()
        return guest

    def read_domain(self, domain_name: str) -> tuple[str, bool]:
        """The XML of an existing domain on this host, and whether it runs.

        Raises:
            BackendError: there is no such domain (the message names the URI).
        """
        raw = self.connection.raw
        domain = self.connection.call(
            f"look up domain {domain_name!r}", raw.lookupByName, domain_name
        )
        xml = self.connection.call(f"read the XML of domain {domain_name!r}", domain.XMLDesc, 0)
        return str(xml), bool(domain.isActive())

    def attach(
        self, domain_name: str, machine: Machine, folder: str | os.PathLike[str]
    ) -> LibvirtGuest:
        """Manage an existing domain as a guest whose VM folder is ``folder``.

        Used by :func:`virtkit.libvirt.import_domain`; the domain's run state
        is taken as it is.

        Raises:
            ConfigError: a guest of that name is already managed here.
            BackendError: no such domain on this host.
        """
        raw = self.connection.raw
        domain = self.connection.call(
            f"look up domain {domain_name!r}", raw.lookupByName, domain_name
        )
        with self._lock:
            if machine.name in self._guests:
                raise ConfigError(
                    f"a guest named {machine.name!r} is already defined", field="name"
                )
            guest = LibvirtGuest(self, machine, Path(folder), domain)
            guest.owns_definition = False
            state = guest._real_state() or State.SHUTOFF
            guest._lifecycle.set(state)
            self._register(guest)
        if state in (State.RUNNING, State.PAUSED):
            guest.console.open()
            guest._attach_console()
        return guest

    def _register(self, guest: LibvirtGuest) -> None:
        with self._lock:
            self._guests[guest.name] = guest
            created = getattr(self, "_created", None)  # guests close() stops, where tracked
            if isinstance(created, list):
                created.append(guest)

    def _forget(self, guest: LibvirtGuest, why: str) -> None:
        guest._gone = True
        with self._lock:
            if self._guests.get(guest.name) is guest:
                del self._guests[guest.name]
            created = getattr(self, "_created", None)
            if isinstance(created, list) and guest in created:
                created.remove(guest)
        retire = getattr(guest._lifecycle, "retire", None)
        if retire is not None:
            retire(why)

    def console_connection(self) -> Connection:
        """The connection the guests' console streams use (opened on first use, reopened
        when it broke).

        A connection of its own: libvirt 9.0's client crashes the process when a
        connection is closed under it (a keep-alive timeout, a daemon gone) while one
        thread waits for a call's reply and another waits on a stream of that same
        connection. With the streams apart, each connection has one kind of waiter.

        Raises:
            BackendError: the host does not answer (the message names the URI).
        """
        with self._console_lock:
            conn = self._console_conn
            if conn is None or not conn.alive:
                if conn is not None:
                    conn.close()
                self._console_conn = None
                conn = self._console_conn = Connection(self.uri, timeout=self._open_timeout)
            return conn

    def close(self) -> None:
        """Kill and undefine every guest defined here, then close the connections."""
        super().close()
        if self._callback_id is not None:
            with contextlib.suppress(self.connection.lv.libvirtError):
                self.connection.raw.domainEventDeregisterAny(self._callback_id)
            self._callback_id = None
        with self._console_lock:
            conn, self._console_conn = self._console_conn, None
        if conn is not None:
            conn.close()
        self.connection.close()


def _undefine(conn: Connection, domain: Any) -> None:
    lv = conn.lv
    flags = lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | lv.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
    with contextlib.suppress(lv.libvirtError):
        domain.undefineFlags(flags)


def _with_serial_log(xml: str, path: Path) -> str:
    """``xml`` with QEMU logging the serial port's output of each run to ``path``."""
    root = ET.fromstring(xml)
    serial = root.find("devices/serial")
    if serial is None:
        return xml
    # libvirt resolves nothing: a relative folder (a CLI run from the VM's parent) goes in whole
    ET.SubElement(serial, "log", file=os.path.abspath(path), append="off")
    return ET.tostring(root, encoding="unicode")


def _existing(root: object) -> str:
    path = (
        Path(os.fspath(root))
        if isinstance(root, (str, os.PathLike))
        else Path(tempfile.gettempdir())
    )
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(path)


def _version(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def _run_probe(conn: Connection) -> AccelChoice:
    """Boot the probe boot sector as a transient ``kvm`` domain; KVM works if it finishes."""
    from virtkit.backends.libvirt.console import ConsoleSource, open_console  # noqa: PLC0415

    lv = conn.lv
    with tempfile.TemporaryDirectory(prefix="virtkit-libvirt-kvm-probe-") as tmp:
        os.chmod(tmp, 0o755)
        image = Path(tmp) / "probe.img"
        image.write_bytes(probe_image())
        machine = Machine(name="virtkit-kvm-probe", memory="256MiB")
        xml = to_xml(machine, tmp, domain_type="kvm")
        xml = xml.replace(
            "<devices>",
            "<devices>\n    <disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{image}'/><target dev='hda' bus='ide'/></disk>",
            1,
        )
        name = f"virtkit-kvm-probe-{os.getpid()}"
        xml = xml.replace("<name>virtkit-kvm-probe</name>", f"<name>{name}</name>", 1)
        xml = xml.replace(f"<uuid>{machine.uuid}</uuid>", "", 1)
        seen = bytearray()
        try:
            dom = conn.raw.createXML(xml, lv.VIR_DOMAIN_START_PAUSED)
        except lv.libvirtError as exc:
            return AccelChoice("tcg", f"KVM probe domain did not start: {exc.get_error_message()}")
        stream: ConsoleSource | None = None
        try:
            stream = open_console(conn, dom, seen.extend)
            dom.resume()
            deadline = time.monotonic() + PROBE_TIMEOUT
            while PROBE_MARKER not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
        except (lv.libvirtError, BackendError) as exc:
            return AccelChoice("tcg", f"KVM probe guest failed: {exc}")
        finally:
            if stream is not None:
                stream.close()
            with contextlib.suppress(lv.libvirtError):
                dom.destroy()
    if PROBE_MARKER in seen:
        return AccelChoice("kvm", "KVM probe guest ran to completion under libvirt")
    return AccelChoice(
        "tcg",
        f"KVM probe guest did not finish within {PROBE_TIMEOUT} s (printed {bytes(seen)!r}); "
        "KVM is present but does not run guests usefully here",
    )

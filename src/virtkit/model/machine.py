"""The machine definition: what a VM config file holds.

A :class:`Machine` is a value: frozen, compared by value, changed with
``attrs.evolve``. Placing it on a hypervisor makes a ``Guest``.
"""

from __future__ import annotations

import os
import string
import uuid as _uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs

from virtkit.errors import ConfigError
from virtkit.model._validate import (
    call_errors_are_config_errors,
    dns_label,
    instance_of,
    int_range,
    one_of,
    tuple_of,
)
from virtkit.model.boot import KernelBoot
from virtkit.model.devices import (
    CdRom,
    CloudInit,
    Disk,
    Nic,
    PortForward,
    Serial,
    Share,
    ports_clash,
)
from virtkit.units import parse_size

__all__ = ["MAX_MEMORY", "MAX_VCPUS", "MIN_MEMORY", "CpuTopology", "Machine"]

MIN_MEMORY = 1024**2  # 1 MiB: enough for a boot sector, as QEMU allows
MAX_MEMORY = 16 * 1024**4  # 16 TiB: QEMU's x86 pc/q35 practical ceiling
MAX_VCPUS = 288  # QEMU's maximum for q35 with x2apic
FIRMWARES = ("bios", "uefi")
MACHINE_TYPES = ("pc", "q35", "isapc", "microvm")
ARCHES = ("x86_64", "i386")
_LABEL_KEY_CHARS = set(string.ascii_letters + string.digits + "-_./")


@call_errors_are_config_errors
@attrs.frozen
class CpuTopology:
    """Virtual CPU layout: ``sockets * cores * threads`` vCPUs."""

    sockets: int = attrs.field(default=1, validator=int_range(1, MAX_VCPUS))
    cores: int = attrs.field(default=1, validator=int_range(1, MAX_VCPUS))
    threads: int = attrs.field(default=1, validator=int_range(1, MAX_VCPUS))

    def __attrs_post_init__(self) -> None:
        if self.count > MAX_VCPUS:
            raise ConfigError(
                f"'cpus' topology gives {self.count} vCPUs; at most {MAX_VCPUS} are allowed",
                field="cpus",
                value=self,
            )

    @property
    def count(self) -> int:
        """Number of vCPUs."""
        return self.sockets * self.cores * self.threads


def _check_cpus(_inst: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, CpuTopology):
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VCPUS:
        raise ConfigError(
            f"'cpus' must be a count from 1 to {MAX_VCPUS} or a CpuTopology (got {value!r})",
            field="cpus",
            value=value,
        )


def _convert_memory(value: Any) -> int:
    return parse_size(value, field="memory")


def _check_memory(_inst: Any, attribute: Any, value: int) -> None:
    if not MIN_MEMORY <= value <= MAX_MEMORY:
        raise ConfigError(
            f"'memory' must be from 1 MiB to 16 TiB (got {value} bytes)",
            field="memory",
            value=value,
        )
    if value % 1024**2:
        raise ConfigError(
            f"'memory' must be a whole number of MiB (got {value} bytes = "
            f"{value / 1024**2:.3f} MiB; QEMU would round it); write e.g. "
            f"'{value // 1024**2}MiB' or '{value // 1024**2 + 1}MiB'",
            field="memory",
            value=value,
        )


def _convert_uuid(value: Any) -> _uuid.UUID:
    if isinstance(value, _uuid.UUID):
        return value
    try:
        return _uuid.UUID(str(value))
    except ValueError:
        raise ConfigError(
            f"'uuid' must be a UUID like 6f1b...-... (got {value!r})", field="uuid", value=value
        ) from None


def _convert_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"'labels' must be a dict of str to str (got {value!r})", field="labels")
    for key, val in value.items():
        if not isinstance(key, str) or not key or not set(key) <= _LABEL_KEY_CHARS:
            raise ConfigError(
                "'labels' keys must be non-empty strings of letters, digits, - _ . / "
                f"(got {key!r})",
                field=f"labels[{key!r}]",
                value=key,
            )
        if not isinstance(val, str) or "\0" in val:
            raise ConfigError(
                f"'labels' values must be strings without NUL (got {val!r} for {key!r})",
                field=f"labels[{key!r}]",
                value=val,
            )
    return dict(sorted(value.items()))


_BUS_PREFIX = {"virtio": "vd", "ide": "hd", "sata": "sd", "scsi": "sd"}

T = TypeVar("T", Disk, CdRom, Nic)


def _fill_names(
    items: tuple[T, ...], attr: str, candidates: Callable[[T], Iterator[str]], field: str
) -> tuple[T, ...]:
    """Give each item whose ``attr`` is None the first unused candidate name."""
    used = {getattr(item, attr) for item in items} - {None}
    out = []
    for item in items:
        named = item
        if getattr(item, attr) is None:
            name = next((c for c in candidates(item) if c not in used), None)
            if name is None:
                raise ConfigError(f"'{field}' has too many devices to name", field=field)
            used.add(name)
            changes: dict[str, Any] = {attr: name}
            named = attrs.evolve(item, **changes)
        out.append(named)
    return tuple(out)


def _disk_names(disk: Disk) -> Iterator[str]:
    prefix = _BUS_PREFIX[disk.bus]
    return (f"{prefix}{c}" for c in string.ascii_lowercase)


def _convert_disks(value: Any) -> tuple[Disk, ...]:
    return _fill_names(tuple_of(Disk, "disks")(value), "target", _disk_names, "disks")


def _convert_cdroms(value: Any) -> tuple[CdRom, ...]:
    cdroms = tuple_of(CdRom, "cdroms")(value)
    return _fill_names(cdroms, "target", lambda _: (f"cdrom{i}" for i in range(64)), "cdroms")


def _convert_nics(value: Any) -> tuple[Nic, ...]:
    nics = tuple_of(Nic, "nics")(value)
    return _fill_names(nics, "name", lambda _: (f"net{i}" for i in range(64)), "nics")


def _convert_shares(value: Any) -> tuple[Share, ...]:
    shares = tuple_of(Share, "shares")(value)
    tags: dict[str, int] = {}
    for i, share in enumerate(shares):
        if share.tag in tags:
            raise ConfigError(
                f"'shares[{i}].tag' {share.tag!r} is already used by shares[{tags[share.tag]}]",
                field=f"shares[{i}].tag",
                value=share.tag,
            )
        tags[share.tag] = i
    return shares


def _convert_boot(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"'boot' must be a list of device names like ['vda', 'cdrom0'] (got {value!r})",
            field="boot",
            value=value,
        )
    return tuple(value)


@call_errors_are_config_errors
@attrs.frozen
class Machine:
    """A virtual machine definition.

    Args:
        name: a DNS label (1-63 letters, digits, inner hyphens); names the
            guest and its folder.
        uuid: generated once when omitted; kept by save/load.
        cpus: vCPU count, or a :class:`CpuTopology`.
        memory: RAM, e.g. ``"1GiB"``, ``"512M"`` or bytes (1 MiB to 16 TiB).
        firmware: ``"bios"`` (SeaBIOS) or ``"uefi"`` (OVMF).
        machine_type: QEMU machine type: ``"pc"`` (i440FX, the default) or ``"q35"``.
        arch: ``"x86_64"`` or ``"i386"``.
        disks: attached disk images, in order; targets are assigned per bus.
        cdroms: CD-ROM drives.
        nics: network cards.
        serial: the serial console.
        boot: device names (disk targets, CD-ROM targets, NIC names) in boot
            order; empty means the firmware's default (first disk).
        cloud_init: NoCloud provisioning, attached as a seed ISO.
        labels: free-form ``str -> str`` metadata.
        kernel: direct kernel boot (kernel, initrd, command line) instead of
            the firmware's boot loader; relative paths are relative to the
            VM folder.
        agent: give the guest a QEMU guest agent channel (a virtio-serial
            port named ``org.qemu.guest_agent.0``) for ``guest.agent``.
        shares: host folders shared with the guest, each by a unique tag.

    Raises:
        ConfigError: any field is invalid; the message names the field.
    """

    name: str = attrs.field(validator=dns_label)
    uuid: _uuid.UUID = attrs.field(factory=_uuid.uuid4, converter=_convert_uuid)
    cpus: int | CpuTopology = attrs.field(default=1, validator=_check_cpus)
    memory: int = attrs.field(
        default=256 * 1024**2, converter=_convert_memory, validator=_check_memory
    )
    firmware: str = attrs.field(default="bios", validator=one_of(FIRMWARES))
    machine_type: str = attrs.field(default="pc", validator=one_of(MACHINE_TYPES))
    arch: str = attrs.field(default="x86_64", validator=one_of(ARCHES))
    disks: tuple[Disk, ...] = attrs.field(default=(), converter=_convert_disks)
    cdroms: tuple[CdRom, ...] = attrs.field(default=(), converter=_convert_cdroms)
    nics: tuple[Nic, ...] = attrs.field(default=(), converter=_convert_nics)
    serial: Serial = attrs.field(factory=Serial, validator=instance_of(Serial))
    boot: tuple[str, ...] = attrs.field(default=(), converter=_convert_boot)
    cloud_init: CloudInit | None = attrs.field(
        default=None, validator=attrs.validators.optional(instance_of(CloudInit))
    )
    labels: dict[str, str] = attrs.field(factory=dict, converter=_convert_labels, hash=False)
    kernel: KernelBoot | None = attrs.field(
        default=None, validator=attrs.validators.optional(instance_of(KernelBoot))
    )
    agent: bool = attrs.field(default=False, validator=instance_of(bool))
    shares: tuple[Share, ...] = attrs.field(default=(), converter=_convert_shares)

    def __attrs_post_init__(self) -> None:
        self._check_files()
        names: dict[str, str] = {}
        devices = [
            *((f"disks[{i}].target", str(d.target)) for i, d in enumerate(self.disks)),
            *((f"cdroms[{i}].target", str(c.target)) for i, c in enumerate(self.cdroms)),
            *((f"nics[{i}].name", str(n.name)) for i, n in enumerate(self.nics)),
        ]
        for field, dev in devices:
            if dev in names:
                raise ConfigError(
                    f"'{field}' is {dev!r}, already used by {names[dev]}; device names "
                    "must be unique",
                    field=field,
                    value=dev,
                )
            names[dev] = field
        macs: dict[str, int] = {}
        for i, nic in enumerate(self.nics):
            if nic.mac in macs:
                raise ConfigError(
                    f"'nics[{i}].mac' {nic.mac} is already used by nics[{macs[nic.mac]}]",
                    field=f"nics[{i}].mac",
                    value=nic.mac,
                )
            macs[nic.mac] = i
        self._check_host_ports()
        for i, dev in enumerate(self.boot):
            if not isinstance(dev, str) or dev not in names:
                known = ", ".join(names) or "none"
                raise ConfigError(
                    f"'boot[{i}]' names {dev!r}, which is not a device of this machine "
                    f"(devices: {known})",
                    field=f"boot[{i}]",
                    value=dev,
                )
        if len(set(self.boot)) != len(self.boot):
            raise ConfigError(
                f"'boot' lists a device twice ({list(self.boot)})", field="boot", value=self.boot
            )
        if self.arch == "i386" and self.memory > 4 * 1024**3:
            raise ConfigError(
                f"'memory' of an i386 machine must be at most 4 GiB (got {self.memory} bytes)",
                field="memory",
                value=self.memory,
            )

    def _check_host_ports(self) -> None:
        """Two NICs forwarding the same host port: QEMU would refuse to start."""
        seen: list[tuple[str, PortForward]] = []
        for i, nic in enumerate(self.nics):
            for j, fwd in enumerate(nic.forwards):
                field = f"nics[{i}].forwards[{j}].host_port"
                for other_field, other in seen:
                    if other_field.startswith(f"nics[{i}]."):
                        continue  # one NIC's own forwards: Nic checked them
                    if ports_clash(fwd, other):
                        raise ConfigError(
                            f"'{field}' forwards host port {fwd.protocol}/{fwd.host_addr}:"
                            f"{fwd.host_port}, already forwarded by {other_field} "
                            f"({other.host_addr}); a host port can be forwarded once "
                            "(0.0.0.0 covers every address; host_port=0 picks a free one)",
                            field=field,
                            value=fwd.host_port,
                        )
                seen.append((field, fwd))

    def _check_files(self) -> None:
        """No image file may be named twice: two disks (or layers) on one file corrupt it."""
        files: dict[str, str] = {}
        for i, disk in enumerate(self.disks):
            named = [("path", disk.path), *((f"layers[{j}]", f) for j, f in enumerate(disk.layers))]
            for what, path in named:
                key = os.path.normpath(path)
                field = f"disks[{i}].{what}"
                if key in files:
                    raise ConfigError(
                        f"'{field}' {path!r} is already used by {files[key]}; a disk image "
                        "file can be attached only once",
                        field=field,
                        value=path,
                    )
                files[key] = field

    @property
    def vcpus(self) -> int:
        """Number of virtual CPUs."""
        return self.cpus.count if isinstance(self.cpus, CpuTopology) else self.cpus

    @property
    def topology(self) -> CpuTopology:
        """The CPU topology (one socket of ``cpus`` cores when given as a count)."""
        if isinstance(self.cpus, CpuTopology):
            return self.cpus
        return CpuTopology(sockets=1, cores=self.cpus, threads=1)

    def device_names(self) -> tuple[str, ...]:
        """Names usable in ``boot``: disk targets, CD-ROM targets, NIC names."""
        return tuple(
            str(x)
            for x in (
                *(d.target for d in self.disks),
                *(c.target for c in self.cdroms),
                *(n.name for n in self.nics),
            )
        )

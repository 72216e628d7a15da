"""Devices a machine has: disks, CD-ROMs, network cards, the serial console.

Values only; nothing here touches a file. Paths are strings: a relative path
names a file under the guest folder's ``disks/`` directory (so a VM's folder
can be moved), an absolute one a file anywhere the caller allows.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import attrs

from virtkit.errors import ConfigError
from virtkit.model._validate import (
    call_errors_are_config_errors,
    instance_of,
    int_range,
    one_of,
    optional_str,
    plain_str,
    tuple_of,
)
from virtkit.units import parse_size

__all__ = [
    "Share",
    "DISK_BUSES",
    "CdRom",
    "CloudInit",
    "Disk",
    "Nic",
    "PortForward",
    "Serial",
    "generate_mac",
    "ports_clash",
]

DISK_BUSES = ("virtio", "ide", "sata", "scsi")
DISK_FORMATS = ("qcow2", "raw")
CACHE_MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")
DISCARD_MODES = ("ignore", "unmap")
NIC_MODELS = ("virtio", "e1000", "rtl8139")
NETWORKS = ("user", "tap", "none")
TARGET_RE = re.compile(r"^[a-z][a-z0-9]{1,15}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_RAW_SUFFIXES = (".raw", ".img", ".iso", ".bin")


def generate_mac() -> str:
    """A random unicast, locally administered MAC in QEMU's 52:54:00 range."""
    tail = random.SystemRandom().getrandbits(24)
    return "52:54:00:" + ":".join(f"{(tail >> s) & 0xFF:02x}" for s in (16, 8, 0))


def _format_from_path(path: object) -> str:
    return "raw" if isinstance(path, str) and path.lower().endswith(_RAW_SUFFIXES) else "qcow2"


def _fspath(value: Any) -> Any:
    """Accept ``pathlib.Path`` and other path-likes; keep everything else for the validator."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _convert_size(value: Any) -> int | None:
    return None if value is None else parse_size(value, field="size")


def _convert_forwards(value: Any) -> tuple[PortForward, ...]:
    return tuple_of(PortForward, "forwards")(value)


def _norm(path: str) -> str:
    """A path's spelling-independent key (``./a//b`` and ``a/b`` are one file)."""
    return os.path.normpath(path)


def _convert_layers(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, os.PathLike)) or not hasattr(value, "__iter__"):
        raise ConfigError(
            f"'layers' must be a list of file paths (got {value!r})", field="layers", value=value
        )
    out = []
    for i, item in enumerate(value):
        path = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(path, str) or not path or any(c in path for c in "\0\n\r"):
            raise ConfigError(
                f"'layers[{i}]' must be a non-empty file path without NUL or line breaks "
                f"(got {item!r})",
                field=f"layers[{i}]",
                value=item,
            )
        out.append(path)
    return tuple(out)


def _target(_inst: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not TARGET_RE.match(value)):
        raise ConfigError(
            f"'{attribute.name}' must be a device name like 'vda' or 'sdb': a lowercase letter "
            f"then 1-15 lowercase letters or digits (got {value!r})",
            field=attribute.name,
            value=value,
        )


@call_errors_are_config_errors
@attrs.frozen
class Disk:
    """A disk image attached to a machine.

    Args:
        path: the image file; relative paths live under the guest's ``disks/``.
        format: ``"qcow2"`` or ``"raw"``; inferred from the suffix when omitted
            (``.raw``/``.img``/``.iso``/``.bin`` are raw).
        size: virtual size used to create the image when it does not exist.
        bus: ``"virtio"``, ``"ide"``, ``"sata"`` or ``"scsi"``.
        target: the guest-visible name (``vda``); assigned by ``Machine``.
        read_only: attach without write access (may be shared by guests).
        cache: QEMU cache mode.
        discard: ``"unmap"`` passes guest TRIM through to the image.
        backing: backing file name for creation, stored as given.
        backing_format: the backing file's format.
        layers: qcow2 overlays above ``path``, bottom to top (external
            snapshots, linked clones). Each names the one below as its
            backing file by a relative name; paths are like ``path``
            (relative ones live under ``disks/``). The guest reads and
            writes the top one, :attr:`active`; ``path`` stays the disk's
            base and identity.
    """

    path: str = attrs.field(converter=_fspath, validator=plain_str)
    format: str = attrs.field(validator=one_of(DISK_FORMATS))
    size: int | None = attrs.field(default=None, converter=_convert_size)
    bus: str = attrs.field(default="virtio", validator=one_of(DISK_BUSES))
    target: str | None = attrs.field(default=None, validator=_target)
    read_only: bool = attrs.field(default=False, validator=instance_of(bool))
    cache: str = attrs.field(default="writeback", validator=one_of(CACHE_MODES))
    discard: str = attrs.field(default="ignore", validator=one_of(DISCARD_MODES))
    backing: str | None = attrs.field(default=None, validator=optional_str)
    backing_format: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of(DISK_FORMATS))
    )
    layers: tuple[str, ...] = attrs.field(default=(), converter=_convert_layers)

    @format.default  # noqa: A003 - attrs decorator on the field
    def _default_format(self) -> str:
        return _format_from_path(self.path)

    @size.validator
    def _check_size(self, attribute: Any, value: int | None) -> None:
        if value is not None and (value < 512 or value % 512):
            raise ConfigError(
                f"'size' must be a positive multiple of 512 bytes (got {value})",
                field="size",
                value=value,
            )

    @backing.validator
    def _check_backing(self, attribute: Any, value: str | None) -> None:
        if value is not None and self.format == "raw":
            raise ConfigError(
                "'backing' needs format 'qcow2'; raw images have no backing file",
                field="backing",
                value=value,
            )

    @layers.validator
    def _check_layers(self, attribute: Any, value: tuple[str, ...]) -> None:
        seen = {_norm(self.path): "path"}
        for i, layer in enumerate(value):
            key = _norm(layer)
            if key in seen:
                raise ConfigError(
                    f"'layers[{i}]' {layer!r} is already used by {seen[key]}; each layer "
                    "must be its own file",
                    field=f"layers[{i}]",
                    value=layer,
                )
            seen[key] = f"layers[{i}]"

    @property
    def active(self) -> str:
        """The file the guest reads and writes: the top layer, or ``path`` without layers."""
        return self.layers[-1] if self.layers else self.path

    def files(self) -> tuple[str, ...]:
        """``path`` and every layer, bottom to top (as written, not resolved)."""
        return (self.path, *self.layers)


@call_errors_are_config_errors
@attrs.frozen
class CdRom:
    """A CD-ROM drive with an ISO image (e.g. a cloud-init seed), or empty.

    Args:
        path: the ISO file; relative paths live under the guest's ``disks/``.
            ``None`` is an empty drive (media can be inserted later).
        bus: ``"ide"``, ``"sata"`` or ``"scsi"``.
        target: the device name used in the boot order; assigned by ``Machine``.
    """

    path: str | None = attrs.field(default=None, converter=_fspath, validator=optional_str)
    bus: str = attrs.field(default="ide", validator=one_of(("ide", "sata", "scsi")))
    target: str | None = attrs.field(default=None, validator=_target)


@call_errors_are_config_errors
@attrs.frozen
class PortForward:
    """A host port forwarded to a guest port on a user-mode network.

    Args:
        host_port: the host port; ``0`` picks a free port when the guest
            starts (the backend reports the port it chose).
        guest_port: the guest port.
        protocol: ``"tcp"`` or ``"udp"``.
        host_addr: the host IPv4 address to listen on (``"0.0.0.0"`` for
            all). QEMU's user network (7.2) takes IPv4 only; an IPv6 or
            host-name form is refused here rather than at start.
    """

    host_port: int = attrs.field(validator=int_range(0, 65535))
    guest_port: int = attrs.field(validator=int_range(1, 65535))
    protocol: str = attrs.field(default="tcp", validator=one_of(("tcp", "udp")))
    host_addr: str = attrs.field(default="127.0.0.1")

    @host_addr.validator
    def _check_addr(self, attribute: Any, value: Any) -> None:
        import ipaddress  # noqa: PLC0415 - only needed when validating

        try:
            if not isinstance(value, str):
                raise TypeError(value)
            ipaddress.IPv4Address(value)
        except (ValueError, TypeError):
            raise ConfigError(
                f"'host_addr' must be a dotted IPv4 address like '127.0.0.1' or '0.0.0.0' "
                f"(QEMU's user network refuses IPv6 and host names) (got {value!r})",
                field="host_addr",
                value=value,
            ) from None


def ports_clash(a: PortForward, b: PortForward) -> bool:
    """Whether two forwards need the same host socket (port 0 never clashes: each picks its own).

    ``0.0.0.0`` listens on every address, so it clashes with any address on the same port.
    """
    return (
        a.host_port != 0
        and a.host_port == b.host_port
        and a.protocol == b.protocol
        and (a.host_addr == b.host_addr or "0.0.0.0" in (a.host_addr, b.host_addr))
    )


def _normalise_mac(value: Any) -> Any:
    return value.lower().replace("-", ":") if isinstance(value, str) else value


@call_errors_are_config_errors
@attrs.frozen
class Nic:
    """A network card.

    Args:
        model: ``"virtio"``, ``"e1000"`` or ``"rtl8139"``.
        mac: unicast MAC; generated once (52:54:00:xx:xx:xx) and kept by save/load.
        network: ``"user"`` (QEMU's NAT), ``"tap"`` (host interface) or ``"none"``.
        tap: the host tap interface name, with ``network="tap"``.
        forwards: host -> guest port forwards, with ``network="user"``.
        name: device name used in the boot order; assigned by ``Machine`` (``net0``).
    """

    model: str = attrs.field(default="virtio", validator=one_of(NIC_MODELS))
    mac: str = attrs.field(factory=generate_mac, converter=_normalise_mac)
    network: str = attrs.field(default="user", validator=one_of(NETWORKS))
    tap: str | None = attrs.field(default=None)
    forwards: tuple[PortForward, ...] = attrs.field(default=(), converter=_convert_forwards)
    name: str | None = attrs.field(default=None, validator=_target)

    @mac.validator
    def _check_mac(self, attribute: Any, value: Any) -> None:
        if not isinstance(value, str) or not MAC_RE.match(value):
            raise ConfigError(
                f"'mac' must look like 52:54:00:12:34:56 (got {value!r})", field="mac", value=value
            )
        first = int(value[:2], 16)
        if first & 1:
            raise ConfigError(
                f"'mac' must be a unicast address; the low bit of the first octet is set "
                f"(got {value})",
                field="mac",
                value=value,
            )
        if value == "00:00:00:00:00:00":
            raise ConfigError("'mac' must not be all zeroes", field="mac", value=value)

    @tap.validator
    def _check_tap(self, attribute: Any, value: Any) -> None:
        if self.network == "tap":
            if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9_.-]{1,15}$", value):
                raise ConfigError(
                    f"'tap' must name a host interface (1-15 of letters, digits, _ . -) "
                    f"with network='tap' (got {value!r})",
                    field="tap",
                    value=value,
                )
        elif value is not None:
            raise ConfigError(
                f"'tap' is only allowed with network='tap' (network is {self.network!r})",
                field="tap",
                value=value,
            )

    @forwards.validator
    def _check_forwards(self, attribute: Any, value: tuple[PortForward, ...]) -> None:
        if value and self.network != "user":
            raise ConfigError(
                f"'forwards' need network='user' (network is {self.network!r})",
                field="forwards",
                value=value,
            )
        for j, fwd in enumerate(value):
            if any(ports_clash(fwd, earlier) for earlier in value[:j]):
                raise ConfigError(
                    f"'forwards' uses host port {fwd.protocol}/{fwd.host_addr}:{fwd.host_port} "
                    "twice (0.0.0.0 covers every address)",
                    field="forwards",
                    value=value,
                )


@call_errors_are_config_errors
@attrs.frozen
class Serial:
    """The serial console (COM1).

    Args:
        enabled: attach a serial port at all.
        log: a file name inside the guest folder that receives all console output.
    """

    enabled: bool = attrs.field(default=True, validator=instance_of(bool))
    log: str | None = attrs.field(default=None, validator=optional_str)

    @log.validator
    def _check_log(self, attribute: Any, value: str | None) -> None:
        if value is not None and (value.startswith("/") or ".." in value.split("/")):
            raise ConfigError(
                f"'log' must be a file name inside the guest folder (got {value!r})",
                field="log",
                value=value,
            )


@call_errors_are_config_errors
@attrs.frozen
class CloudInit:
    """cloud-init NoCloud provisioning: attached to the guest as a seed ISO.

    Args:
        user_data: the user-data document (``#cloud-config`` YAML or a script).
        meta_data: the meta-data document; generated from the machine's name
            and uuid when omitted.
        network_config: optional network-config document (v1 or v2 YAML).
    """

    user_data: str = attrs.field(validator=instance_of(str))
    meta_data: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(instance_of(str))
    )
    network_config: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(instance_of(str))
    )


_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")
SECURITY_MODELS = ("none", "mapped-xattr", "mapped-file", "passthrough")


@call_errors_are_config_errors
@attrs.frozen
class Share:
    """A host folder shared with the guest (virtio-9p on the qemu backend).

    In a Linux guest: ``mount -t 9p -o trans=virtio,version=9p2000.L TAG /mnt``.

    Args:
        host_path: the host folder; a relative path is relative to the VM folder.
        tag: the mount tag the guest mounts by (1-31 letters, digits, ``_ . -``).
        read_only: the guest cannot change the folder.
        security_model: how guest file ownership maps to the host (QEMU's
            ``security_model``): ``"none"`` (files belong to the QEMU user),
            ``"mapped-xattr"``, ``"mapped-file"`` or ``"passthrough"``.
    """

    host_path: str = attrs.field(converter=_fspath, validator=plain_str)
    tag: str = attrs.field()
    read_only: bool = attrs.field(default=True, validator=instance_of(bool))
    security_model: str = attrs.field(default="none", validator=one_of(SECURITY_MODELS))

    @tag.validator
    def _check_tag(self, attribute: Any, value: Any) -> None:
        if not isinstance(value, str) or not _TAG_RE.match(value):
            raise ConfigError(
                f"'tag' must be 1-31 letters, digits, '_', '.' or '-' (got {value!r})",
                field="tag",
                value=value,
            )

"""Machine -> ``qemu-system-*`` command line: typed, deterministic, injection-proof.

The command line is a pure function of its inputs (no I/O, no clock, no
randomness), so ``guest.qemu_argv()`` shows exactly what will run and two
calls give the same list.

Injection: QEMU splits ``-opt key=val,key=val`` strings on commas, so every
value a user controls (disk paths, names) goes into ``-blockdev`` and
``-device`` **JSON** arguments, where a comma, ``=``, newline or leading
``-`` is just a character in a JSON string. The few keyval options left
(``-chardev``, ``-netdev``, ``-name``, ``-smp``) carry only validated
values; :func:`opt_value` escapes commas (QEMU's ``,,``) and refuses control
characters anyway. Each option's value is its own argv element, so a value
can never start a new option.

Reference: QEMU's docs/system/invocation and qapi/block-core.json
(BlockdevOptions), read for the option names used here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from virtkit.errors import ConfigError
from virtkit.model import Disk, KernelBoot, Machine, Share

__all__ = [
    "CACHE_MODES",
    "CD_DRIVER",
    "HD_DRIVER",
    "NIC_DRIVERS",
    "AttachedDisk",
    "KernelBoot",
    "LaunchSpec",
    "blockdev_nodes",
    "build_argv",
    "device_json",
    "node_name",
    "opt_value",
]

#: cache mode -> (O_DIRECT, ignore flushes, guest-visible write cache)
CACHE_MODES: dict[str, tuple[bool, bool, bool]] = {
    "writeback": (False, False, True),
    "none": (True, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}

NIC_DRIVERS = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
_MIB = 1024**2
_CPU_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def opt_value(value: str, *, what: str) -> str:
    """Escape ``value`` for a QEMU keyval option (``,`` -> ``,,``).

    Raises:
        ConfigError: the value holds a control character (newline, NUL...),
            which no QEMU option value may carry.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ConfigError(
            f"{what} must not contain control characters such as newlines (got {value!r})",
            field=what,
            value=value,
        )
    return value.replace(",", ",,")


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)


def node_name(target: str, suffix: str = "") -> str:
    """The block node name for a device target (``vda`` -> ``drive-vda``)."""
    return f"drive-{target}{suffix}"


@attrs.frozen
class AttachedDisk:
    """A disk as QEMU opens it: the model's attachment plus the file actually opened.

    ``path`` is the active layer (the top overlay when external snapshots
    exist, else the disk's own file).
    """

    disk: Disk
    path: Path


@attrs.frozen
class LaunchSpec:
    """Everything :func:`build_argv` needs besides the machine.

    Args:
        binary: the ``qemu-system-*`` executable.
        accel: ``"kvm"`` or ``"tcg"``.
        disks: the disks in ``machine.disks`` order, with the file to open.
        cdroms: the ISO files in ``machine.cdroms`` order (None: an empty drive).
        seed: the cloud-init seed ISO, if the machine has ``cloud_init``.
        qmp_socket: the UNIX socket QEMU connects its QMP monitor to.
        console_socket: the UNIX socket QEMU connects COM1 to (None: no serial).
        kernel: direct kernel boot, if any.
        firmware_code: OVMF code image for ``firmware="uefi"``.
        nvram: the guest's private OVMF variables file for ``firmware="uefi"``.
        paused: start with the vCPUs stopped (``-S``).
        agent_socket: the UNIX socket QEMU listens on for the guest agent's
            virtio-serial port (with ``machine.agent``).
        shares: each of ``machine.shares`` with its host folder.
        cpu_model: a ``-cpu`` model name (``"qemu64"``, ``"max"``, ``"host"`` with
            KVM); ``None`` keeps QEMU's default for the accelerator.
        extra: extra arguments appended verbatim (an escape hatch; the caller's responsibility).
    """

    binary: str
    accel: str
    disks: tuple[AttachedDisk, ...] = ()
    cdroms: tuple[Path | None, ...] = ()
    seed: Path | None = None
    qmp_socket: Path | None = None
    console_socket: Path | None = None
    kernel: KernelBoot | None = None
    firmware_code: Path | None = None
    nvram: Path | None = None
    paused: bool = True
    cpu_model: str | None = None
    extra: tuple[str, ...] = ()
    agent_socket: Path | None = None
    shares: tuple[tuple[Share, Path], ...] = ()


def device_json(driver: str, **props: Any) -> str:
    """A ``-device`` argument in JSON syntax (values never parsed as options)."""
    return _json({"driver": driver, **{k.replace("_", "-"): v for k, v in props.items()}})


def _bootindex(machine: Machine, name: str) -> dict[str, int]:
    if name in machine.boot:
        return {"bootindex": machine.boot.index(name)}
    return {}


def blockdev_nodes(disk: Disk, path: Path, node: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``file`` and format node (QMP ``blockdev-add`` arguments) that open a disk.

    ``path`` is the disk's active layer: qcow2 when the disk has layers,
    else the disk's own format.
    """
    direct, no_flush, _ = CACHE_MODES[disk.cache]
    cache = {"direct": direct, "no-flush": no_flush}
    file_node: dict[str, Any] = {
        "driver": "file",
        "node-name": f"{node}-file",
        "filename": os.fspath(path),
        "cache": cache,
        "discard": disk.discard,
        "read-only": disk.read_only,
    }
    if direct:
        file_node["aio"] = "threads"
    fmt_node: dict[str, Any] = {
        "driver": "qcow2" if disk.layers else disk.format,
        "node-name": node,
        "file": f"{node}-file",
        "cache": cache,
        "discard": disk.discard,
        "read-only": disk.read_only,
    }
    return file_node, fmt_node


def _blockdev_args(disk: Disk, path: Path, node: str) -> list[str]:
    file_node, fmt_node = blockdev_nodes(disk, path, node)
    return ["-blockdev", _json(file_node), "-blockdev", _json(fmt_node)]


class _Buses:
    """Hands out controller buses/units; adds controllers the machine type lacks."""

    def __init__(self, machine_type: str) -> None:
        self.machine_type = machine_type
        self.ide_next = 0
        self.sata_next = 0
        self.scsi_next = 0
        self.controllers: list[str] = []

    def place(self, bus: str) -> dict[str, Any]:
        if bus == "virtio":
            return {}
        if bus == "ide":
            i = self.ide_next
            self.ide_next += 1
            if self.machine_type == "q35":  # ICH9 AHCI: six ports, one unit each
                return {"bus": f"ide.{i}"}
            if i >= 4:
                raise ConfigError(
                    "the 'pc' machine has 4 IDE slots (disks and CD-ROMs on bus 'ide'); "
                    "use bus 'sata', 'scsi' or 'virtio' for more",
                    field="bus",
                )
            return {"bus": f"ide.{i // 2}", "unit": i % 2}
        if bus == "sata":
            if self.sata_next == 0:
                self.controllers.append(device_json("ahci", id="sata0"))
            i = self.sata_next
            self.sata_next += 1
            if i >= 6:
                raise ConfigError("at most 6 SATA devices are supported", field="bus")
            return {"bus": f"sata0.{i}"}
        # scsi
        if self.scsi_next == 0:
            self.controllers.append(device_json("virtio-scsi-pci", id="scsi0"))
        i = self.scsi_next
        self.scsi_next += 1
        return {"bus": "scsi0.0", "scsi-id": i}


HD_DRIVER = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "sata": "ide-hd", "scsi": "scsi-hd"}
CD_DRIVER = {"ide": "ide-cd", "sata": "ide-cd", "scsi": "scsi-cd"}


#: the agent port's device id (QMP ``VSERPORT_CHANGE`` names it when the guest opens or
#: closes the port)
AGENT_PORT_ID = "vk-agent-port"


def agent_channel_argv(socket: Path) -> list[str]:
    """The guest agent's channel: a virtio-serial port ``org.qemu.guest_agent.0``
    whose host side is a UNIX socket QEMU listens on (virtkit connects when it
    needs the agent; one client at a time, as QEMU's socket chardev allows)."""
    path = opt_value(os.fspath(socket), what="agent_socket")
    return [
        "-chardev",
        f"socket,id=vk-agent,path={path},server=on,wait=off",
        "-device",
        device_json("virtio-serial-pci", id="vk-vserial"),
        "-device",
        device_json(
            "virtserialport",
            id=AGENT_PORT_ID,
            bus="vk-vserial.0",
            chardev="vk-agent",
            name="org.qemu.guest_agent.0",
        ),
    ]


def share_argv(share: Share, folder: Path, number: int) -> list[str]:
    """A host folder exported to the guest over virtio-9p under ``share.tag``."""
    path = opt_value(os.fspath(folder), what="shares.host_path")
    fsdev = f"local,id=vk-share{number},path={path},security_model={share.security_model}"
    if share.read_only:
        fsdev += ",readonly=on"
    return [
        "-fsdev",
        fsdev,
        "-device",
        # the property is spelled mount_tag (device_json would turn _ into -)
        _json({"driver": "virtio-9p-pci", "fsdev": f"vk-share{number}", "mount_tag": share.tag}),
    ]


def build_argv(machine: Machine, spec: LaunchSpec) -> list[str]:
    """The full command line that runs ``machine``.

    Args:
        machine: the definition.
        spec: files and sockets of this launch (see :class:`LaunchSpec`).

    Returns:
        The argv list; ``argv[0]`` is ``spec.binary``.

    Raises:
        ConfigError: a value cannot be expressed safely, or there are too
            many devices for a bus.
    """
    if spec.accel not in ("kvm", "tcg"):
        raise ConfigError(f"'accel' must be 'kvm' or 'tcg' (got {spec.accel!r})", field="accel")
    if len(spec.disks) != len(machine.disks):
        raise ConfigError("one attached path per machine disk is required", field="disks")
    topo = machine.topology
    argv: list[str] = [
        spec.binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-msg",
        "timestamp=off",
        "-name",
        f"guest={opt_value(machine.name, what='name')}",
        "-uuid",
        str(machine.uuid),
        "-machine",
        f"type={machine.machine_type}",
        "-accel",
        spec.accel,
    ]
    if spec.cpu_model is not None:
        if not _CPU_MODEL.match(spec.cpu_model):
            raise ConfigError(
                f"'cpu_model' must be a QEMU CPU model name such as 'max' or 'qemu64' "
                f"(got {spec.cpu_model!r})",
                field="cpu_model",
                value=spec.cpu_model,
            )
        argv += ["-cpu", spec.cpu_model]
    argv += [
        "-smp",
        f"cpus={topo.count},sockets={topo.sockets},cores={topo.cores},threads={topo.threads}",
        "-m",
        f"size={-(-machine.memory // _MIB)}M",
    ]
    if machine.firmware == "uefi":
        if spec.firmware_code is None or spec.nvram is None:
            raise ConfigError("firmware 'uefi' needs OVMF (apt-get install ovmf)", field="firmware")
        code = {"filename": os.fspath(spec.firmware_code), "read-only": True}
        nvram = {"filename": os.fspath(spec.nvram)}
        argv += [
            "-blockdev",
            _json({"driver": "file", "node-name": "pflash0", **code}),
            "-blockdev",
            _json({"driver": "file", "node-name": "pflash1", **nvram}),
            "-machine",
            "pflash0=pflash0,pflash1=pflash1",
        ]
    if spec.qmp_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=qmp,path={opt_value(os.fspath(spec.qmp_socket), what='qmp_socket')}",
            "-mon",
            "chardev=qmp,mode=control",
        ]
    if machine.serial.enabled and spec.console_socket is not None:
        path = opt_value(os.fspath(spec.console_socket), what="console_socket")
        argv += [
            "-chardev",
            f"socket,id=serial0,path={path}",
            "-device",
            device_json("isa-serial", chardev="serial0", id="com1"),
        ]
    if machine.agent and spec.agent_socket is not None:
        argv += agent_channel_argv(spec.agent_socket)
    for number, (share, folder) in enumerate(spec.shares):
        argv += share_argv(share, folder, number)
    buses = _Buses(machine.machine_type)
    devices: list[str] = []
    blockdevs: list[str] = []
    for attached in spec.disks:
        disk = attached.disk
        target = str(disk.target)
        node = node_name(target)
        blockdevs += _blockdev_args(disk, attached.path, node)
        props: dict[str, Any] = {"drive": node, "id": target, **buses.place(disk.bus)}
        props["write-cache"] = "on" if CACHE_MODES[disk.cache][2] else "off"
        props.update(_bootindex(machine, target))
        devices += ["-device", device_json(HD_DRIVER[disk.bus], **props)]
    isos: list[tuple[str, str, Path | None]] = [
        (str(c.target), c.bus, p) for c, p in zip(machine.cdroms, spec.cdroms, strict=True)
    ]
    if spec.seed is not None:
        isos.append(("cidata", "ide", spec.seed))
    for target, bus, iso in isos:
        if iso is None:  # an empty drive: media can be inserted later (change_media)
            props = {"id": target, **buses.place(bus), **_bootindex(machine, target)}
            devices += ["-device", device_json(CD_DRIVER[bus], **props)]
            continue
        node = node_name(target)
        file_node = {"filename": os.fspath(iso), "read-only": True}
        blockdevs += [
            "-blockdev",
            _json({"driver": "file", "node-name": f"{node}-file", **file_node}),
            "-blockdev",
            _json({"driver": "raw", "node-name": node, "file": f"{node}-file", "read-only": True}),
        ]
        props = {"drive": node, "id": target, **buses.place(bus), **_bootindex(machine, target)}
        devices += ["-device", device_json(CD_DRIVER[bus], **props)]
    netdevs: list[str] = []
    for nic in machine.nics:
        name = str(nic.name)
        props = {"id": name, "mac": nic.mac, **_bootindex(machine, name)}
        if nic.network == "user":
            fwds = "".join(
                f",hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}"
                for f in nic.forwards
            )
            netdevs += ["-netdev", f"user,id=net-{name}{fwds}"]
            props["netdev"] = f"net-{name}"
        elif nic.network == "tap":
            tap = opt_value(str(nic.tap), what="tap")
            netdevs += ["-netdev", f"tap,id=net-{name},ifname={tap},script=no,downscript=no"]
            props["netdev"] = f"net-{name}"
        devices += ["-device", device_json(NIC_DRIVERS[nic.model], **props)]
    for controller in buses.controllers:
        argv += ["-device", controller]
    argv += blockdevs + netdevs + devices
    argv += ["-device", device_json("pvpanic", id="pvpanic0"), "-action", "panic=pause"]
    if spec.kernel is not None:
        argv += ["-kernel", os.fspath(spec.kernel.kernel)]
        if spec.kernel.initrd is not None:
            argv += ["-initrd", os.fspath(spec.kernel.initrd)]
        if spec.kernel.append:
            argv += ["-append", spec.kernel.append]
    if spec.paused:
        argv.append("-S")
    argv += list(spec.extra)
    return argv


def shell_quote(argv: Sequence[str]) -> str:
    """``argv`` as one POSIX shell line a user can paste."""
    import shlex  # noqa: PLC0415 - only for display

    return " ".join(shlex.quote(a) for a in argv)

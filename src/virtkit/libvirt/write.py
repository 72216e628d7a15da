"""``Machine`` -> libvirt domain XML (see :mod:`virtkit.libvirt` for the mapping)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import attrs

from virtkit.errors import ConfigError
from virtkit.libvirt.schema import (
    ARCH_LIBVIRT,
    LIBVIRT_PREFIX,
    NIC_DEVICE,
    NVRAM_FILE,
    OVMF_CODE,
    OVMF_VARS,
    QEMU_TAG,
    VK_TAG,
)
from virtkit.model import CdRom, CpuTopology, Disk, KernelBoot, Machine, Nic

__all__ = ["to_xml"]


AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: virtio-9p security models -> libvirt's accessmode (the exact model is kept in the metadata)
_ACCESS = {
    "none": "squash",
    "mapped-xattr": "mapped",
    "mapped-file": "mapped",
    "passthrough": "passthrough",
}


def _first_file(candidates: Iterable[str]) -> str:
    for path in candidates:
        if os.path.isfile(path):
            return path
    return next(iter(candidates))


def _resolve(folder: Path, path: str) -> str:
    return path if os.path.isabs(path) else str(folder / "disks" / path)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _kernel_of(machine: Machine) -> KernelBoot | None:
    return machine.kernel


def to_xml(
    machine: Machine,
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    domain_type: str = "qemu",
    emulator: str | None = None,
    loader: str | None = None,
    nvram_template: str | None = None,
) -> str:
    """The libvirt domain XML for ``machine`` whose VM folder is ``folder``.

    Disk paths relative to the folder are written as absolute paths (libvirt
    wants them so); the metadata keeps the relative ones so :func:`from_xml`
    gives the same ``Machine`` back.

    Args:
        machine: the definition.
        folder: the VM folder (relative disk paths live in ``folder/disks``).
        name: the domain name (default: ``machine.name``).
        domain_type: ``"qemu"`` (TCG) or ``"kvm"``.
        emulator: the QEMU binary to name in ``<emulator>`` (default: libvirt's choice).
        loader, nvram_template: OVMF code and variables files for UEFI
            (default: Debian's ``/usr/share/OVMF`` files).

    Raises:
        ConfigError: an argument has the wrong type or value.
    """
    if not isinstance(machine, Machine):
        raise ConfigError(f"to_xml() needs a Machine (got {type(machine).__name__})")
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigError(f"'folder' must be a path (got {folder!r})", field="folder")
    if domain_type not in ("qemu", "kvm"):
        raise ConfigError(
            f"'domain_type' must be 'qemu' or 'kvm' (got {domain_type!r})", field="domain_type"
        )
    base = Path(os.path.abspath(os.fspath(folder)))
    dom_name = machine.name if name is None else name
    if not isinstance(dom_name, str) or not dom_name or "/" in dom_name or "\0" in dom_name:
        raise ConfigError(f"'name' must be a domain name without '/' (got {name!r})", field="name")
    root = ET.Element("domain", {"type": domain_type})
    _sub(root, "name", dom_name)
    _sub(root, "uuid", str(machine.uuid))
    meta = ET.SubElement(_sub(root, "metadata"), f"{VK_TAG}machine", {"version": "1"})
    if machine.memory % 1024:
        meta.set("memory", str(machine.memory))
    _sub(root, "memory", str(-(-machine.memory // 1024)), unit="KiB")
    _sub(root, "vcpu", str(machine.vcpus), placement="static")
    os_el = _sub(root, "os")
    _sub(
        os_el,
        "type",
        "hvm",
        arch=ARCH_LIBVIRT.get(machine.arch, machine.arch),
        machine=machine.machine_type,
    )
    if machine.firmware == "uefi":
        _sub(os_el, "loader", loader or _first_file(OVMF_CODE), readonly="yes", type="pflash")
        _sub(
            os_el,
            "nvram",
            str(base / NVRAM_FILE),
            template=nvram_template or _first_file(OVMF_VARS),
        )
    kernel = _kernel_of(machine)
    if kernel is not None:
        _sub(os_el, "kernel", str(base / kernel.kernel))
        record = {"kernel": str(kernel.kernel)}
        if kernel.initrd is not None:
            _sub(os_el, "initrd", str(base / kernel.initrd))
            record["initrd"] = str(kernel.initrd)
        if kernel.append:
            _sub(os_el, "cmdline", kernel.append)
        _sub(meta, f"{VK_TAG}kernel", **record)
    if not machine.boot and kernel is None:
        _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if isinstance(machine.cpus, CpuTopology):
        cpu = _sub(root, "cpu")
        topo = machine.cpus
        _sub(
            cpu,
            "topology",
            sockets=str(topo.sockets),
            dies="1",
            cores=str(topo.cores),
            threads=str(topo.threads),
        )
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    if emulator:
        _sub(devices, "emulator", emulator)
    boot_order = {dev: str(i + 1) for i, dev in enumerate(machine.boot)}
    used: set[str] = set()
    if any(d.bus == "scsi" for d in machine.disks) or any(c.bus == "scsi" for c in machine.cdroms):
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for disk in machine.disks:
        target = str(disk.target)
        used.add(target)
        _disk_xml(devices, meta, base=base, disk=disk, target=target, order=boot_order.get(target))
    for cd in machine.cdroms:
        dev = _free_dev(LIBVIRT_PREFIX[cd.bus], used)
        used.add(dev)
        _cdrom_xml(
            devices,
            meta,
            base=base,
            cd=cd,
            cd_path=cd.path,
            dev=dev,
            order=boot_order.get(str(cd.target)),
        )
    commandline: list[str] = []
    for index, nic in enumerate(machine.nics):
        _nic_xml(
            devices,
            meta,
            nic,
            order=boot_order.get(str(nic.name)),
            commandline=commandline,
            index=index,
            machine_type=machine.machine_type,
        )
    if machine.serial.enabled:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    if machine.serial.log is not None or not machine.serial.enabled:
        _sub(
            meta,
            f"{VK_TAG}serial",
            enabled="yes" if machine.serial.enabled else "no",
            **({"log": machine.serial.log} if machine.serial.log is not None else {}),
        )
    if machine.agent:  # libvirt picks the socket; virsh domfsinfo & co. use the agent
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=AGENT_CHANNEL)
    for share in machine.shares:
        fs = _sub(devices, "filesystem", type="mount", accessmode=_ACCESS[share.security_model])
        host = share.host_path
        _sub(fs, "source", dir=host if os.path.isabs(host) else str(base / host))
        _sub(fs, "target", dir=share.tag)
        if share.read_only:
            _sub(fs, "readonly")
        ET.SubElement(
            meta,
            f"{VK_TAG}share",
            {"tag": share.tag, "path": share.host_path, "security_model": share.security_model},
        )
    _sub(devices, "memballoon", model="none")
    for key, value in machine.labels.items():
        _sub(meta, f"{VK_TAG}label", value, key=key)
    if machine.cloud_init is not None:
        ci = attrs.asdict(machine.cloud_init)
        _sub(meta, f"{VK_TAG}cloud-init", json.dumps(ci, sort_keys=True))
    if commandline:
        qemu = ET.SubElement(root, f"{QEMU_TAG}commandline")
        for arg in commandline:
            ET.SubElement(qemu, f"{QEMU_TAG}arg", {"value": arg})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _free_dev(prefix: str, used: set[str]) -> str:
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if prefix + letter not in used:
            return prefix + letter
    raise ConfigError("too many disks and CD-ROMs on one bus for libvirt names", field="cdroms")


def _disk_xml(
    devices: ET.Element,
    meta: ET.Element,
    *,
    base: Path,
    disk: Disk,
    target: str,
    order: str | None,
) -> None:
    el = _sub(devices, "disk", type="file", device="disk")
    _sub(el, "driver", name="qemu", type=disk.format, cache=disk.cache, discard=disk.discard)
    chain = [_resolve(base, f) for f in reversed(disk.files())]  # top first
    path = chain[0]
    _sub(el, "source", file=path)
    parent = el
    for below in chain[1:]:
        parent = _sub(parent, "backingStore", type="file")
        _sub(parent, "format", type=disk.format)
        _sub(parent, "source", file=below)
    if disk.backing is not None:
        store = _sub(parent, "backingStore", type="file")
        _sub(store, "format", type=disk.backing_format or "qcow2")
        backing = disk.backing
        if not os.path.isabs(backing):
            backing = os.path.join(os.path.dirname(chain[-1]), backing)
        _sub(store, "source", file=backing)
    _sub(el, "target", dev=target, bus=disk.bus)
    if disk.read_only:
        _sub(el, "readonly")
    if order is not None:
        _sub(el, "boot", order=order)
    record = {"target": target, "path": disk.path, "source": path}
    if disk.size is not None:
        record["size"] = str(disk.size)
    if disk.backing is not None:
        record["backing"] = disk.backing
    rec = _sub(meta, f"{VK_TAG}disk", **record)
    for layer in disk.layers:
        _sub(rec, f"{VK_TAG}layer", layer)


def _cdrom_xml(
    devices: ET.Element,
    meta: ET.Element,
    *,
    base: Path,
    cd: CdRom,
    cd_path: str | None,
    dev: str,
    order: str | None,
) -> None:
    el = _sub(devices, "disk", type="file", device="cdrom")
    _sub(el, "driver", name="qemu", type="raw")
    record = {"target": str(cd.target), "dev": dev}
    if cd_path is not None:
        source = _resolve(base, cd_path)
        _sub(el, "source", file=source)
        record.update(path=cd_path, source=source)
    _sub(el, "target", dev=dev, bus=cd.bus)
    _sub(el, "readonly")
    if order is not None:
        _sub(el, "boot", order=order)
    _sub(meta, f"{VK_TAG}cdrom", **record)


#: where NICs passed as QEMU arguments go: the root bus, slots from the top down (below
#: q35's ICH9 functions at 0x1f and the 0x1e libvirt takes for a DMI-to-PCI bridge)
_COMMANDLINE_NIC_SLOT = {"pc": ("pci.0", 0x1E), "q35": ("pcie.0", 0x1D)}


def _nic_xml(
    devices: ET.Element,
    meta: ET.Element,
    nic: Nic,
    *,
    order: str | None,
    commandline: list[str],
    index: int,
    machine_type: str,
) -> None:
    name = str(nic.name)
    where = str(index)
    if nic.network == "none":
        _sub(
            meta,
            f"{VK_TAG}nic",
            name=name,
            network="none",
            mac=nic.mac,
            model=nic.model,
            index=where,
        )
        return
    if nic.forwards:
        netdev = f"vk-{name}"
        fwds = ",".join(
            f"hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}"
            for f in nic.forwards
        )
        device = f"{NIC_DEVICE[nic.model]},netdev={netdev},mac={nic.mac}"
        slot = _COMMANDLINE_NIC_SLOT.get(machine_type)
        if slot is not None:
            # libvirt gives its own devices PCI slots from the bottom up and cannot see this
            # one: without an address QEMU would put it in the first free slot, the one
            # libvirt gave e.g. the first virtio disk ("slot 2 function 0 not available")
            bus, top = slot
            device += f",bus={bus},addr={top - commandline.count('-device'):#x}"
        if order is not None:
            device += f",bootindex={order}"
        commandline += ["-netdev", f"user,id={netdev},{fwds}", "-device", device]
        _sub(meta, f"{VK_TAG}nic", name=name, mac=nic.mac, commandline="yes", index=where)
        return
    el = _sub(devices, "interface", type="user" if nic.network == "user" else "ethernet")
    _sub(el, "mac", address=nic.mac)
    if nic.network == "tap":
        _sub(el, "target", dev=str(nic.tap), managed="no")
    _sub(el, "model", type=nic.model)
    if order is not None:
        _sub(el, "boot", order=order)
    _sub(meta, f"{VK_TAG}nic", name=name, mac=nic.mac, index=where)

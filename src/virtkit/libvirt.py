"""``Machine`` <-> libvirt domain XML (no daemon needed), and adopting existing domains.

:func:`to_xml` and :func:`from_xml` translate; :func:`import_domain` takes a
domain created elsewhere (virt-install, virsh) into a VM folder and manages it
through a ``virtkit.connect("libvirt")`` hypervisor.

The mapping (what libvirt 9.0 can express is expressed in its own terms):

=====================  ==========================================================
model                  domain XML
=====================  ==========================================================
name, uuid             ``<name>``, ``<uuid>`` (the domain name may carry a prefix)
memory                 ``<memory unit='KiB'>`` (exact bytes kept in the metadata
                       when not a whole KiB)
cpus                   ``<vcpu>``; a ``CpuTopology`` also as ``<cpu><topology>``
firmware, type, arch   ``<os><type arch machine>``; UEFI as a pflash ``<loader>``
                       plus an ``<nvram>`` file in the VM folder
disks                  ``<disk device='disk'>`` with driver type/cache/discard,
                       ``<readonly/>``, ``<backingStore>`` for ``backing``
cdroms                 ``<disk device='cdrom'>`` (libvirt names them ``hdX``/``sdX``;
                       the model's ``cdrom0`` is kept in the metadata)
nics, user network     ``<interface type='user'>``; tap as ``type='ethernet'``
                       with ``<target dev managed='no'>``
port forwards          libvirt 9.0 has ``<portForward>`` only with the passt
                       back end, so a NIC with forwards becomes QEMU arguments
                       in ``<qemu:commandline>``: ``-netdev user,...,hostfwd=``
                       and ``-device <model>,netdev=,mac=[,bootindex=]``
serial                 a pty ``<serial>`` + ``<console>``
boot                   ``<boot order='N'/>`` on each device (``bootindex`` for
                       command-line NICs)
kernel boot            ``<kernel>``, ``<initrd>``, ``<cmdline>``
what libvirt cannot    ``<metadata><vk:machine>`` in virtkit's namespace: labels,
hold                   cloud-init, disk sizes, the folder-relative paths, NICs
                       with ``network='none'``, the serial log file
=====================  ==========================================================

Parsing refuses DTDs and entities (a domain XML has none), and reports every
element it does not map with a :class:`~virtkit.CapabilityWarning` instead of
dropping it silently.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs

from virtkit.errors import CapabilityWarning, ConfigError
from virtkit.model import (
    CdRom,
    CpuTopology,
    Disk,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    Serial,
)
from virtkit.model.devices import CloudInit


class LibvirtHost(Protocol):
    """What :func:`import_domain` needs of a libvirt hypervisor connection
    (``virtkit.connect("libvirt")`` gives one; this module sits below the backends)."""

    name: str
    uri: str
    local_files: bool

    def read_domain(self, domain_name: str) -> tuple[str, bool]:
        """The domain's XML and whether it runs."""

    def attach(self, domain_name: str, machine: Machine, folder: str | os.PathLike[str]) -> Any:
        """Manage the existing domain as a guest with this machine and folder."""


__all__ = [
    "DOMAIN_XML_FILE",
    "LibvirtHost",
    "NAMESPACE",
    "OVMF_CODE",
    "OVMF_VARS",
    "QEMU_NAMESPACE",
    "XmlReport",
    "from_xml",
    "import_domain",
    "parse_report",
    "to_xml",
]

NAMESPACE = "https://virtkit.dev/xmlns/libvirt-domain/1"
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")
NVRAM_FILE = "OVMF_VARS.fd"
#: the imported domain's original XML, kept verbatim in the VM folder.
DOMAIN_XML_FILE = "libvirt-domain.xml"
MAX_XML = 4 * 1024 * 1024  # a domain XML is a few KiB

_VK = f"{{{NAMESPACE}}}"
_QEMU = f"{{{QEMU_NAMESPACE}}}"
_NIC_DEVICE = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
_DEVICE_NIC = {v: k for k, v in _NIC_DEVICE.items()}
_LIBVIRT_PREFIX = {"ide": "hd", "sata": "sd", "scsi": "sd", "virtio": "vd"}

ET.register_namespace("vk", NAMESPACE)
ET.register_namespace("qemu", QEMU_NAMESPACE)


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
    meta = ET.SubElement(_sub(root, "metadata"), f"{_VK}machine", {"version": "1"})
    if machine.memory % 1024:
        meta.set("memory", str(machine.memory))
    _sub(root, "memory", str(-(-machine.memory // 1024)), unit="KiB")
    _sub(root, "vcpu", str(machine.vcpus), placement="static")
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch=machine.arch, machine=machine.machine_type)
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
        _sub(meta, f"{_VK}kernel", **record)
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
        dev = _free_dev(_LIBVIRT_PREFIX[cd.bus], used)
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
        )
    if machine.serial.enabled:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    if machine.serial.log is not None or not machine.serial.enabled:
        _sub(
            meta,
            f"{_VK}serial",
            enabled="yes" if machine.serial.enabled else "no",
            **({"log": machine.serial.log} if machine.serial.log is not None else {}),
        )
    _sub(devices, "memballoon", model="none")
    for key, value in machine.labels.items():
        _sub(meta, f"{_VK}label", value, key=key)
    if machine.cloud_init is not None:
        ci = attrs.asdict(machine.cloud_init)
        _sub(meta, f"{_VK}cloud-init", json.dumps(ci, sort_keys=True))
    if commandline:
        qemu = ET.SubElement(root, f"{_QEMU}commandline")
        for arg in commandline:
            ET.SubElement(qemu, f"{_QEMU}arg", {"value": arg})
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
    rec = _sub(meta, f"{_VK}disk", **record)
    for layer in disk.layers:
        _sub(rec, f"{_VK}layer", layer)


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
    _sub(meta, f"{_VK}cdrom", **record)


def _nic_xml(
    devices: ET.Element,
    meta: ET.Element,
    nic: Nic,
    *,
    order: str | None,
    commandline: list[str],
    index: int,
) -> None:
    name = str(nic.name)
    where = str(index)
    if nic.network == "none":
        _sub(
            meta,
            f"{_VK}nic",
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
        device = f"{_NIC_DEVICE[nic.model]},netdev={netdev},mac={nic.mac}"
        if order is not None:
            device += f",bootindex={order}"
        commandline += ["-netdev", f"user,id={netdev},{fwds}", "-device", device]
        _sub(meta, f"{_VK}nic", name=name, mac=nic.mac, commandline="yes", index=where)
        return
    el = _sub(devices, "interface", type="user" if nic.network == "user" else "ethernet")
    _sub(el, "mac", address=nic.mac)
    if nic.network == "tap":
        _sub(el, "target", dev=str(nic.tap), managed="no")
    _sub(el, "model", type=nic.model)
    if order is not None:
        _sub(el, "boot", order=order)
    _sub(meta, f"{_VK}nic", name=name, mac=nic.mac, index=where)


# -- parsing -------------------------------------------------------------------------------


@attrs.frozen
class XmlReport:
    """What :func:`parse_report` found: the machine and what it could not map.

    Attributes:
        machine: the ``Machine`` the XML describes.
        unmapped: one line per element or attribute virtkit's model has no
            place for (``"devices/graphics[type=vnc]"``...).
        domain_type: the XML's ``<domain type>`` (``"qemu"``, ``"kvm"``...).
    """

    machine: Machine
    unmapped: tuple[str, ...]
    domain_type: str


# elements libvirt adds or that carry no machine state virtkit models
_IGNORED = {
    "resource",
    "seclabel",
    "clock",
    "pm",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "currentMemory",
    "title",
    "description",
}
_IGNORED_DEVICES = {"emulator", "controller", "memballoon", "input", "audio"}


def _check_text(xml: object) -> str:
    if isinstance(xml, bytes):
        try:
            xml = xml.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"domain XML is not UTF-8: {exc}", field="xml") from None
    if not isinstance(xml, str):
        raise ConfigError(f"domain XML must be a str (got {type(xml).__name__})", field="xml")
    if len(xml) > MAX_XML:
        raise ConfigError(
            f"domain XML is {len(xml)} characters; refusing more than {MAX_XML}", field="xml"
        )
    if re.search(r"<!(DOCTYPE|ENTITY)", xml, re.IGNORECASE):
        raise ConfigError("domain XML must not contain a DTD or entity declarations", field="xml")
    return xml


def _int(text: str | None, where: str) -> int:
    try:
        return int((text or "").strip())
    except ValueError:
        raise ConfigError(f"domain XML: {where} must be an integer (got {text!r})") from None


_UNITS = {
    "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
    "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4,
    "tb": 1000**4,
}  # fmt: skip


def _memory(el: ET.Element) -> int:
    unit = (el.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise ConfigError(f"domain XML: <memory unit={unit!r}> is not a unit libvirt knows")
    return _int(el.text, "<memory>") * _UNITS[unit]


def _machine_type(value: str | None) -> str:
    value = value or "pc"
    if value == "pc" or value.startswith(("pc-i440fx", "pc-1.")):
        return "pc"
    if value == "q35" or value.startswith("pc-q35"):
        return "q35"
    return value


def _build(kind: type[Any], where: str, **fields: Any) -> Any:
    try:
        return kind(**fields)
    except ConfigError as exc:
        raise ConfigError(f"domain XML {where}: {exc}", field=exc.field) from None


def parse_report(xml: str | bytes) -> XmlReport:
    """Parse a domain XML into a ``Machine`` and the list of what it could not map.

    Raises:
        ConfigError: the XML is malformed, not a domain, holds a DTD, or a value
            the model refuses (the message names the element).
    """
    text = _check_text(xml)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConfigError(f"domain XML is malformed: {exc}", field="xml") from None
    if root.tag != "domain":
        raise ConfigError(f"not a domain XML: the root element is <{root.tag}>", field="xml")
    unmapped: list[str] = []
    meta = root.find(f"metadata/{_VK}machine")
    meta_disks = {m.get("target"): m for m in meta.iter(f"{_VK}disk")} if meta is not None else {}
    meta_cds = {m.get("dev"): m for m in meta.iter(f"{_VK}cdrom")} if meta is not None else {}
    meta_nics = {m.get("mac"): m for m in meta.iter(f"{_VK}nic")} if meta is not None else {}
    nic_index = {
        m.get("mac"): _int(m.get("index") or "0", "vk:nic/@index") for m in meta_nics.values()
    }
    fields: dict[str, Any] = {}
    for child in root:
        tag = child.tag
        if tag in ("name", "uuid", "memory", "vcpu", "os", "cpu", "devices", "metadata"):
            continue
        if tag == "features":
            unmapped.extend(
                "features/" + _describe(f) for f in child if f.tag not in ("acpi", "apic", "pae")
            )
            continue
        if tag == _QEMU + "commandline" or tag in _IGNORED:
            continue
        unmapped.append(_describe(child))
    name_el = root.find("name")
    if name_el is None or not name_el.text:
        raise ConfigError("domain XML has no <name>", field="name")
    fields["name"] = name_el.text
    uuid_el = root.find("uuid")
    if uuid_el is not None and uuid_el.text:
        fields["uuid"] = uuid_el.text.strip()
    mem_el = root.find("memory")
    if mem_el is None:
        raise ConfigError("domain XML has no <memory>", field="memory")
    exact = meta.get("memory") if meta is not None else None
    memory = _memory(mem_el)
    if exact is not None and -(-_int(exact, "vk:machine/@memory") // 1024) * 1024 == memory:
        memory = _int(exact, "vk:machine/@memory")
    fields["memory"] = memory
    vcpu_el = root.find("vcpu")
    vcpus = _int(vcpu_el.text, "<vcpu>") if vcpu_el is not None else 1
    topo = root.find("cpu/topology")
    if topo is not None:
        fields["cpus"] = _build(
            CpuTopology,
            "<cpu><topology>",
            sockets=_int(topo.get("sockets"), "topology/@sockets"),
            cores=_int(topo.get("cores"), "topology/@cores"),
            threads=_int(topo.get("threads"), "topology/@threads"),
        )
        dies = topo.get("dies")
        if dies not in (None, "1"):
            unmapped.append(f"cpu/topology[dies={dies}]")
    else:
        fields["cpus"] = vcpus
    cpu = root.find("cpu")
    if cpu is not None:
        for sub in cpu:
            default_model = sub.tag == "model" and (sub.text or "") in ("qemu64", "")
            if sub.tag != "topology" and not default_model:
                unmapped.append("cpu/" + _describe(sub))
    boot: dict[str, int] = {}
    os_el = root.find("os")
    kernel: dict[str, str] = {}
    if os_el is not None:
        type_el = os_el.find("type")
        if type_el is not None:
            fields["arch"] = type_el.get("arch") or "x86_64"
            fields["machine_type"] = _machine_type(type_el.get("machine"))
        loader = os_el.find("loader")
        if os_el.get("firmware") == "efi" or (
            loader is not None and loader.get("type") == "pflash"
        ):
            fields["firmware"] = "uefi"
        for sub in os_el:
            if sub.tag in ("kernel", "initrd", "cmdline"):
                kernel[sub.tag] = sub.text or ""
            elif sub.tag not in ("type", "loader", "nvram", "boot", "firmware"):
                unmapped.append("os/" + _describe(sub))
        legacy_boot = [b.get("dev") for b in os_el.findall("boot")]
    else:
        legacy_boot = []
    disks: list[Disk] = []
    cdroms: list[CdRom] = []
    nics: list[Nic] = []
    serial_seen = False
    devices = root.find("devices")
    for dev in devices if devices is not None else ():
        if dev.tag == "disk":
            _parse_disk(
                dev,
                meta_disks=meta_disks,
                meta_cds=meta_cds,
                disks=disks,
                cdroms=cdroms,
                boot=boot,
                unmapped=unmapped,
            )
        elif dev.tag == "interface":
            _parse_interface(dev, meta_nics, nics, boot, unmapped)
        elif dev.tag == "serial":
            serial_seen = True
        elif dev.tag == "console" or dev.tag in _IGNORED_DEVICES:
            continue
        else:
            unmapped.append("devices/" + _describe(dev))
    _parse_commandline(root, meta_nics, nics, boot, unmapped)
    for record in meta_nics.values():
        if record.get("network") == "none":
            nics.append(
                _build(
                    Nic,
                    "vk:nic",
                    name=record.get("name"),
                    mac=record.get("mac"),
                    model=record.get("model") or "virtio",
                    network="none",
                )
            )
    fields["disks"] = tuple(disks)
    fields["cdroms"] = tuple(cdroms)
    fields["nics"] = tuple(sorted(nics, key=lambda n: nic_index.get(n.mac, len(nic_index))))
    if boot:
        fields["boot"] = tuple(name for name, _ in sorted(boot.items(), key=lambda kv: kv[1]))
    elif legacy_boot and legacy_boot != ["hd"]:
        fields["boot"] = _legacy_boot(legacy_boot, disks, cdroms, nics)
    serial_meta = meta.find(f"{_VK}serial") if meta is not None else None
    fields["serial"] = _build(
        Serial,
        "<serial>",
        enabled=serial_seen,
        log=serial_meta.get("log") if serial_meta is not None else None,
    )
    if meta is not None:
        fields["labels"] = {str(el.get("key")): el.text or "" for el in meta.iter(f"{_VK}label")}
        ci = meta.find(f"{_VK}cloud-init")
        if ci is not None:
            try:
                ci_fields = json.loads(ci.text or "")
            except ValueError:
                raise ConfigError("domain XML: vk:cloud-init is not JSON") from None
            if not isinstance(ci_fields, dict):
                raise ConfigError("domain XML: vk:cloud-init is not a JSON object")
            fields["cloud_init"] = _build(CloudInit, "vk:cloud-init", **ci_fields)
    if "kernel" in kernel:
        kernel_meta = meta.find(f"{_VK}kernel") if meta is not None else None
        _kernel_fields(kernel, kernel_meta, fields)
    machine = _build(Machine, "", **fields)
    return XmlReport(machine=machine, unmapped=tuple(unmapped), domain_type=root.get("type", ""))


def _kernel_fields(
    kernel: dict[str, str], record: ET.Element | None, fields: dict[str, Any]
) -> None:
    paths = {"kernel": kernel.get("kernel"), "initrd": kernel.get("initrd") or None}
    if record is not None:
        for key in ("kernel", "initrd"):
            original = record.get(key)
            if (
                original is not None
                and paths[key] is not None
                and (
                    os.path.isabs(original) or str(paths[key]).endswith("/" + original.lstrip("./"))
                )
            ):
                paths[key] = original
    fields["kernel"] = _build(
        KernelBoot,
        "<os><kernel>",
        kernel=paths["kernel"],
        initrd=paths["initrd"],
        append=kernel.get("cmdline", ""),
    )


def _describe(el: ET.Element) -> str:
    tag = el.tag.split("}")[-1]
    kind = el.get("type")
    return f"{tag}[type={kind}]" if kind else tag


def _legacy_boot(
    devs: list[str | None], disks: list[Disk], cdroms: list[CdRom], nics: list[Nic]
) -> tuple[str, ...]:
    order: list[str] = []
    firsts = {
        "hd": disks[0].target if disks else None,
        "cdrom": cdroms[0].target if cdroms else None,
        "network": nics[0].name if nics else None,
    }
    for dev in devs:
        name = firsts.get(dev or "")
        if name is not None and name not in order:
            order.append(name)
    return tuple(order)


def _parse_disk(
    dev: ET.Element,
    *,
    meta_disks: dict[str | None, ET.Element],
    meta_cds: dict[str | None, ET.Element],
    disks: list[Disk],
    cdroms: list[CdRom],
    boot: dict[str, int],
    unmapped: list[str],
) -> None:
    device = dev.get("device", "disk")
    target_el = dev.find("target")
    if target_el is None or not target_el.get("dev"):
        raise ConfigError("domain XML: a <disk> has no <target dev>", field="disks")
    target = str(target_el.get("dev"))
    bus = target_el.get("bus") or "ide"
    source_el = dev.find("source")
    source = None
    if source_el is not None:
        source = source_el.get("file") or source_el.get("dev")
        if source is None:
            unmapped.append(f"devices/disk[{target}]/source (not a file: {source_el.attrib})")
    if dev.get("type", "file") not in ("file", "block"):
        unmapped.append(f"devices/disk[{target}][type={dev.get('type')}]")
    order_el = dev.find("boot")
    if device == "cdrom":
        record = meta_cds.get(target)
        name = record.get("target") if record is not None else None
        path = source
        if record is not None and record.get("source") == source and record.get("path"):
            path = record.get("path")
        cd_fields: dict[str, Any] = {"bus": bus, "target": name or _cd_name(cdroms)}
        cd_fields["path"] = path
        cd = _build(CdRom, f"<disk device='cdrom'> {target}", **cd_fields)
        cdroms.append(cd)
        if order_el is not None:
            boot[str(cd.target)] = _int(order_el.get("order"), "boot/@order")
        return
    if device != "disk":
        unmapped.append(f"devices/disk[device={device}]")
        return
    if source is None:
        raise ConfigError(f"domain XML: disk {target} has no source file", field="disks")
    driver = dev.find("driver")
    fmt = driver.get("type") if driver is not None else None
    record = meta_disks.get(target)
    fields: dict[str, Any] = {
        "path": source,
        "format": fmt or "raw",
        "bus": bus,
        "target": target,
        "read_only": dev.find("readonly") is not None,
    }
    if driver is not None:
        if driver.get("cache"):
            fields["cache"] = driver.get("cache")
        if driver.get("discard"):
            fields["discard"] = driver.get("discard")
    chain: list[tuple[str, str]] = []  # (file, format) below the top, top first
    store: ET.Element | None = dev.find("backingStore")
    while store is not None:
        src = store.find("source")
        if src is None or not src.get("file"):
            break
        fmt_el = store.find("format")
        chain.append(
            (str(src.get("file")), fmt_el.get("type") or "qcow2" if fmt_el is not None else "qcow2")
        )
        store = store.find("backingStore")
    layers = [e.text or "" for e in record.iter(f"{_VK}layer")] if record is not None else []
    if record is not None and record.get("source") == source and len(chain) >= len(layers):
        fields["path"] = record.get("path") or source
        fields["layers"] = tuple(layers)
        chain = chain[len(layers) :]
        if record.get("size"):
            fields["size"] = _int(record.get("size"), "vk:disk/@size")
        if chain and record.get("backing"):
            fields["backing"] = record.get("backing")
            fields["backing_format"] = chain[0][1]
            chain = []
    if chain:
        backing, backing_fmt = chain[0]
        rel = os.path.relpath(backing, os.path.dirname(source))
        fields["backing"] = backing if rel.startswith("..") else rel
        fields["backing_format"] = backing_fmt
        if len(chain) > 1:
            unmapped.append(
                f"devices/disk[{target}]: backing chain below {backing} (kept by the image)"
            )
    disks.append(_build(Disk, f"<disk> {target}", **fields))
    if order_el is not None:
        boot[target] = _int(order_el.get("order"), "boot/@order")


def _cd_name(cdroms: list[CdRom]) -> str:
    used = {c.target for c in cdroms}
    return next(f"cdrom{i}" for i in range(64) if f"cdrom{i}" not in used)


def _nic_name(nics: list[Nic], record: ET.Element | None) -> str:
    if record is not None and record.get("name"):
        return str(record.get("name"))
    used = {n.name for n in nics}
    return next(f"net{i}" for i in range(64) if f"net{i}" not in used)


def _parse_interface(
    dev: ET.Element,
    meta_nics: dict[str | None, ET.Element],
    nics: list[Nic],
    boot: dict[str, int],
    unmapped: list[str],
) -> None:
    kind = dev.get("type")
    mac_el = dev.find("mac")
    mac = mac_el.get("address") if mac_el is not None else None
    model_el = dev.find("model")
    model = model_el.get("type") if model_el is not None else "virtio"
    fields: dict[str, Any] = {"model": model or "virtio"}
    if mac:
        fields["mac"] = mac
    if kind == "user":
        fields["network"] = "user"
    elif kind == "ethernet" and dev.find("target") is not None:
        fields["network"] = "tap"
        fields["tap"] = dev.find("target").get("dev")  # type: ignore[union-attr]
    else:
        unmapped.append(f"devices/interface[type={kind}] (mac {mac})")
        return
    for sub in dev:
        if sub.tag not in ("mac", "model", "target", "boot", "alias", "address", "source"):
            unmapped.append(f"devices/interface[{mac}]/{_describe(sub)}")
    fields["name"] = _nic_name(nics, meta_nics.pop(mac, None))
    nic = _build(Nic, f"<interface> {mac}", **fields)
    nics.append(nic)
    order_el = dev.find("boot")
    if order_el is not None:
        boot[str(nic.name)] = _int(order_el.get("order"), "boot/@order")


_HOSTFWD = re.compile(r"^(tcp|udp):([0-9.]*):(\d+)-[0-9.]*:(\d+)$")


def _parse_commandline(
    root: ET.Element,
    meta_nics: dict[str | None, ET.Element],
    nics: list[Nic],
    boot: dict[str, int],
    unmapped: list[str],
) -> None:
    cmd = root.find(f"{_QEMU}commandline")
    if cmd is None:
        return
    args = [str(a.get("value")) for a in cmd.findall(f"{_QEMU}arg")]
    for sub in cmd:
        if sub.tag != f"{_QEMU}arg":
            unmapped.append("qemu:commandline/" + _describe(sub))
    netdevs: dict[str, list[PortForward]] = {}
    i = 0
    while i < len(args):
        opt, value = args[i], args[i + 1] if i + 1 < len(args) else ""
        if opt == "-netdev" and value.startswith("user,"):
            parts = value.split(",")
            ident = next((p[3:] for p in parts if p.startswith("id=")), "")
            fwds = []
            for part in parts:
                if part.startswith("hostfwd="):
                    m = _HOSTFWD.match(part[8:])
                    if m is None:
                        raise ConfigError(f"domain XML: cannot read QEMU option {part!r}")
                    fwds.append(
                        _build(
                            PortForward,
                            part,
                            protocol=m.group(1),
                            host_addr=m.group(2) or "0.0.0.0",
                            host_port=int(m.group(3)),
                            guest_port=int(m.group(4)),
                        )
                    )
            netdevs[ident] = fwds
            i += 2
        elif opt == "-device" and ",netdev=" in value:
            props = value.split(",")
            kv = dict(p.split("=", 1) for p in props[1:] if "=" in p)
            found = netdevs.get(kv.get("netdev", ""))
            if found is None or props[0] not in _DEVICE_NIC:
                unmapped.append(f"qemu:commandline -device {value}")
                i += 2
                continue
            mac = kv.get("mac")
            fields: dict[str, Any] = {"model": _DEVICE_NIC[props[0]], "forwards": tuple(found)}
            if mac:
                fields["mac"] = mac
            fields["name"] = _nic_name(nics, meta_nics.pop(mac, None))
            nic = _build(Nic, f"qemu:commandline -device {value}", **fields)
            nics.append(nic)
            if "bootindex" in kv:
                boot[str(nic.name)] = _int(kv["bootindex"], "bootindex")
            i += 2
        else:
            unmapped.append(f"qemu:commandline {opt}")
            i += 1


def from_xml(xml: str | bytes) -> Machine:
    """The ``Machine`` a libvirt domain XML describes.

    Elements virtkit has no place for are reported in one
    :class:`~virtkit.CapabilityWarning` (use :func:`parse_report` to get them as data).

    Raises:
        ConfigError: the XML is malformed, not a domain, or holds values the
            model refuses.
    """
    report = parse_report(xml)
    if report.unmapped:
        warnings.warn(
            CapabilityWarning(
                f"domain {report.machine.name!r}: not represented in virtkit's model and left "
                f"out: {', '.join(report.unmapped)}",
                backend="libvirt",
            ),
            stacklevel=2,
        )
    return report.machine


def import_domain(
    hv: LibvirtHost,
    name: str,
    folder: str | os.PathLike[str],
    *,
    copy_disks: bool = False,
    machine_name: str | None = None,
) -> Any:
    """Adopt the existing domain ``name`` on ``hv``'s host into the VM folder ``folder``.

    The domain keeps running (or not) as it is; the returned guest manages it.
    Its XML is kept verbatim in ``folder/libvirt-domain.xml`` so nothing
    virtkit's model lacks is lost, and what the model leaves out is reported
    in one :class:`~virtkit.CapabilityWarning`.

    Args:
        hv: a ``virtkit.connect("libvirt", ...)`` hypervisor.
        name: the domain's name on that host.
        folder: the VM folder to write (``machine.toml``...).
        copy_disks: copy the disk images into ``folder/disks`` (the domain
            must be shut off, and the host must share this file system);
            ``False`` references them in place by absolute path.
        machine_name: the machine's name when the domain's name is not a DNS
            label (default: the domain's name).

    Returns:
        the :class:`~virtkit.backends.libvirt.LibvirtGuest` managing the domain.

    Raises:
        ConfigError: bad arguments, the folder already holds a machine, or the
            domain's XML cannot be expressed.
        StateError: ``copy_disks`` of a running domain.
        BackendError: no such domain, or libvirt failed (names the URI).
    """
    from virtkit import bundle  # noqa: PLC0415 - bundle sits above this module's own needs
    from virtkit.errors import StateError  # noqa: PLC0415

    if getattr(hv, "name", None) != "libvirt" or not hasattr(hv, "attach"):
        raise ConfigError(
            f"import_domain() needs a libvirt hypervisor (got {type(hv).__name__})", field="hv"
        )
    if not isinstance(name, str) or not name:
        raise ConfigError(f"'name' must be a domain name (got {name!r})", field="name")
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigError(f"'folder' must be a path (got {folder!r})", field="folder")
    if not isinstance(copy_disks, bool):
        raise ConfigError(f"'copy_disks' must be True or False (got {copy_disks!r})")
    target = Path(os.path.abspath(os.fspath(folder)))
    if (target / bundle.CONFIG_NAME).exists():
        raise ConfigError(
            f"{target} already holds a machine ({bundle.CONFIG_NAME}); choose an empty folder",
            field="folder",
        )
    xml, active = hv.read_domain(name)
    report = parse_report(xml)
    machine = report.machine
    if machine_name is not None:
        machine = _build(Machine, "machine_name", **{**_fields(machine), "name": machine_name})
    if report.unmapped:
        warnings.warn(
            CapabilityWarning(
                f"domain {name!r}: kept in {DOMAIN_XML_FILE} but not represented in virtkit's "
                f"model: {', '.join(report.unmapped)}",
                backend="libvirt",
            ),
            stacklevel=2,
        )
    if copy_disks:
        if active:
            raise StateError(
                f"cannot copy the disks of domain {name!r} on {hv.uri} while it runs; shut it "
                "off first or import with copy_disks=False",
                action="import_domain",
            )
        if not hv.local_files:
            raise ConfigError(
                f"copy_disks needs the host's files here; {hv.uri} does not share storage",
                field="copy_disks",
            )
        machine = _copy_disks(machine, target)
    target.mkdir(parents=True, exist_ok=True)
    bundle.save(machine, target, create_disks=False)
    from virtkit.bundle.atomic import atomic_write  # noqa: PLC0415

    atomic_write(target / DOMAIN_XML_FILE, xml.encode())
    return hv.attach(name, machine, target)


def _fields(machine: Machine) -> dict[str, Any]:
    return {f.name: getattr(machine, f.name) for f in attrs.fields(Machine)}


def _copy_disks(machine: Machine, folder: Path) -> Machine:
    import shutil  # noqa: PLC0415

    disks_dir = folder / "disks"
    disks_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for disk in machine.disks:
        if disk.layers or disk.backing is not None:
            raise ConfigError(
                f"disk {disk.target} of {machine.name!r} has a backing chain; copy_disks "
                "copies single images only (import with copy_disks=False)",
                field="copy_disks",
            )
        src = Path(disk.path)
        dest = disks_dir / f"{disk.target}-{src.name}"
        try:
            shutil.copyfile(src, dest)
        except OSError as exc:
            raise ConfigError(f"cannot copy disk {src} to {dest}: {exc.strerror}") from exc
        copied.append(attrs.evolve(disk, path=dest.name))
    return attrs.evolve(machine, disks=tuple(copied))

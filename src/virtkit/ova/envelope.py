"""OVF 1.x envelopes: parsed (safely) into what a VM folder needs, and written from a Machine.

Reference: DMTF DSP0243 (OVF 1.1) and the CIM RASD/VSSD schemas; VMware's and
VirtualBox's exports for the vendor extensions read here (``vmw:Config``
firmware, ``vmw:CoresPerSocket``, VirtualBox's ``Firmware`` element).

The descriptor is untrusted XML: a document type declaration (the vehicle of
entity-expansion bombs and external entities) is refused before parsing, the
text is bounded in size, and every number read from it is bounded.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import attrs

from virtkit.errors import CorruptImageError, UnsupportedFeatureError

__all__ = ["OVF_NS", "DiskRef", "FileRef", "Hardware", "Plan", "build", "parse"]

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
VBOX_NS = "http://www.virtualbox.org/ovf/machine"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

#: The largest disk or memory size accepted from a descriptor (qcow2's own limit is 64 PiB,
#: virtkit's model 16 TiB of memory); anything past it is hostile.
MAX_BYTES = 1 << 56
_UNITS = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(-?\d+))?\s*$", re.IGNORECASE)
_NAMED_UNITS = {"bytes": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30,
                "terabytes": 1 << 40, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}  # fmt: skip


def _o(tag: str) -> str:
    return f"{{{OVF_NS}}}{tag}"


def _r(tag: str) -> str:
    return f"{{{RASD_NS}}}{tag}"


@attrs.frozen
class FileRef:
    """A ``References/File``: a file of the appliance."""

    id: str
    href: str
    size: int | None
    compression: str | None


@attrs.frozen
class DiskRef:
    """A ``DiskSection/Disk``: a virtual disk, its file and capacity."""

    id: str
    file: FileRef | None
    capacity: int
    format: str


@attrs.frozen
class Hardware:
    """One ``Item`` of the virtual hardware section, with the RASD fields virtkit reads."""

    instance: str
    resource_type: int
    subtype: str
    name: str
    quantity: int | None
    units: str
    parent: str
    address: str
    address_on_parent: str
    host_resource: str
    required: bool


@attrs.frozen
class Plan:
    """What a descriptor asks for, before it is mapped to a Machine."""

    name: str
    files: dict[str, FileRef]
    disks: dict[str, DiskRef]
    items: tuple[Hardware, ...]
    cores_per_socket: int | None
    firmware: str | None
    os_type: str | None
    notes: tuple[str, ...]


def _corrupt(path: str, msg: str) -> CorruptImageError:
    return CorruptImageError(f"OVF descriptor: {msg}", path=path)


def _int(value: str | None, what: str, path: str, limit: int = MAX_BYTES) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        n = int(value.strip())
    except ValueError:
        raise _corrupt(path, f"{what} {value[:40]!r} is not a whole number") from None
    if not 0 <= n <= limit:
        raise _corrupt(path, f"{what} {n} is out of range (0 to {limit})")
    return n


def units(text: str | None, default: int, what: str, path: str) -> int:
    """The byte multiplier of an OVF allocation unit (``byte * 2^20``, ``MegaBytes``...)."""
    if text is None or not text.strip():
        return default
    m = _UNITS.match(text)
    if m is not None:
        if m[1] is None:
            return 1
        base, exp = int(m[1]), int(m[2])
        if base not in (2, 10) or not 0 <= exp <= 60:
            raise _corrupt(path, f"{what} unit {text!r} is not understood")
        return int(base**exp)
    named = _NAMED_UNITS.get(text.strip().lower())
    if named is None:
        raise _corrupt(path, f"{what} unit {text[:40]!r} is not understood")
    return named


def _safe_xml(data: bytes, path: str) -> ET.Element:
    head = data[:4096].lower()
    if b"<!doctype" in data.lower() or b"<!entity" in head:
        raise _corrupt(path, "a document type declaration (DTD/entities) is not allowed "
                       "in an OVF descriptor")  # fmt: skip
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise _corrupt(path, f"not well-formed XML ({exc})") from exc


def _text(elem: ET.Element | None) -> str:
    return (elem.text or "").strip() if elem is not None else ""


def parse(data: bytes, path: str) -> Plan:
    """Read an OVF 1.x descriptor into a :class:`Plan`.

    Raises:
        CorruptImageError: bad XML, a DTD, missing or out-of-range values.
        UnsupportedFeatureError: another envelope version, chunked files.
    """
    root = _safe_xml(data, path)
    if root.tag != _o("Envelope"):
        ns = root.tag[1:].split("}")[0] if root.tag.startswith("{") else "none"
        raise UnsupportedFeatureError(
            f"OVF descriptor: not an OVF 1.x envelope (root {root.tag.split('}')[-1]!r}, "
            f"namespace {ns!r})",
            feature="ovf version",
            path=path,
        )
    notes: list[str] = []
    files: dict[str, FileRef] = {}
    for f in root.iterfind(f"{_o('References')}/{_o('File')}"):
        fid = f.get(_o("id")) or ""
        href = f.get(_o("href")) or ""
        if not fid or not href or fid in files:
            raise _corrupt(path, f"a File reference without a unique id or href ({fid!r})")
        if f.get(_o("chunkSize")):
            raise UnsupportedFeatureError(
                f"OVF descriptor: file {href!r} is split into chunks, which virtkit does not join",
                feature="ovf chunked files",
                path=path,
            )
        comp = f.get(_o("compression"))
        if comp not in (None, "", "identity", "gzip"):
            raise UnsupportedFeatureError(
                f"OVF descriptor: file {href!r} uses compression {comp!r}",
                feature="ovf compression",
                path=path,
            )
        files[fid] = FileRef(fid, href, _int(f.get(_o("size")), f"size of {href!r}", path),
                             comp if comp == "gzip" else None)  # fmt: skip
    disks: dict[str, DiskRef] = {}
    for d in root.iterfind(f"{_o('DiskSection')}/{_o('Disk')}"):
        did = d.get(_o("diskId")) or ""
        if not did or did in disks:
            raise _corrupt(path, f"a Disk without a unique diskId ({did!r})")
        ref = d.get(_o("fileRef"))
        if ref and ref not in files:
            raise _corrupt(path, f"disk {did!r} refers to the unknown file {ref!r}")
        mult = units(d.get(_o("capacityAllocationUnits")), 1, f"disk {did!r} capacity", path)
        cap = _int(d.get(_o("capacity")), f"capacity of disk {did!r}", path) or 0
        if cap * mult > MAX_BYTES or cap * mult <= 0:
            raise _corrupt(path, f"disk {did!r} capacity {cap} x {mult} bytes is out of range")
        disks[did] = DiskRef(did, files[ref] if ref else None, cap * mult,
                             d.get(_o("format")) or "")  # fmt: skip
    systems = list(root.iter(_o("VirtualSystem")))
    if not systems:
        raise _corrupt(path, "no VirtualSystem")
    if len(systems) > 1:
        notes.append(f"the appliance has {len(systems)} virtual systems; only the first is "
                     "imported")  # fmt: skip
    vs = systems[0]
    name = _text(vs.find(_o("Name"))) or vs.get(_o("id")) or ""
    os_section = vs.find(_o("OperatingSystemSection"))
    os_type = None
    if os_section is not None:
        os_type = os_section.get(f"{{{VMW_NS}}}osType") or _text(os_section.find(_o("Description")))
    hw = vs.find(_o("VirtualHardwareSection"))
    if hw is None:
        raise _corrupt(path, "the VirtualSystem has no VirtualHardwareSection")
    items = []
    for item in (
        list(hw.iterfind(_o("Item")))
        + list(hw.iterfind(_o("StorageItem")))
        + list(hw.iterfind(_o("EthernetPortItem")))
    ):
        rtype = _int(_text(item.find(_r("ResourceType"))), "ResourceType", path, 1 << 16)
        items.append(Hardware(
            instance=_text(item.find(_r("InstanceID"))),
            resource_type=rtype if rtype is not None else 0,
            subtype=_text(item.find(_r("ResourceSubType"))),
            name=_text(item.find(_r("ElementName"))) or _text(item.find(_r("Caption"))),
            quantity=_int(_text(item.find(_r("VirtualQuantity"))), "VirtualQuantity", path),
            units=_text(item.find(_r("AllocationUnits"))),
            parent=_text(item.find(_r("Parent"))),
            address=_text(item.find(_r("Address"))),
            address_on_parent=_text(item.find(_r("AddressOnParent"))),
            host_resource=_text(item.find(_r("HostResource"))),
            required=item.get(_o("required"), "true").lower() != "false",
        ))  # fmt: skip
    cps = None
    for el in hw.iter(f"{{{VMW_NS}}}CoresPerSocket"):
        cps = _int(_text(el), "CoresPerSocket", path, 4096)
    firmware = None
    for el in hw.iter(f"{{{VMW_NS}}}Config"):
        if el.get(f"{{{VMW_NS}}}key") == "firmware":
            firmware = "uefi" if el.get(f"{{{VMW_NS}}}value", "").lower() == "efi" else "bios"
    for el in vs.iter(f"{{{VBOX_NS}}}Machine"):
        for fw in el.iter():
            if fw.tag.split("}")[-1] == "Firmware" and fw.get("type", "").upper().startswith("EFI"):
                firmware = "uefi"
    return Plan(name, files, disks, tuple(items), cps, firmware, os_type, tuple(notes))


# -- writing ---------------------------------------------------------------------------------


@attrs.frozen
class OutDisk:
    """A disk as it goes into the envelope: its file, sizes and controller."""

    href: str
    file_size: int
    capacity: int
    bus: str


@attrs.frozen
class OutNic:
    """A NIC as it goes into the envelope."""

    model: str
    mac: str


_NIC_SUBTYPES = {"virtio": "VirtIO", "e1000": "E1000", "rtl8139": "rtl8139"}
#: bus -> (ResourceType, ResourceSubType, ElementName) of its controller
_CONTROLLERS = {
    "ide": (5, "PIIX4", "IDE Controller"),
    "scsi": (6, "lsilogic", "SCSI Controller"),
    "sata": (20, "AHCI", "SATA Controller"),
    "virtio": (20, "virtio-blk", "VirtIO Block Controller"),
}


def _item(parent: ET.Element, fields: dict[str, str], *, tag: str = "Item") -> ET.Element:
    item = ET.SubElement(parent, _o(tag))
    for key in sorted(fields):  # CIM schemas want the RASD elements in alphabetical order
        ET.SubElement(item, _r(key)).text = fields[key]
    return item


def build(
    *,
    name: str,
    vcpus: int,
    cores_per_socket: int | None,
    memory_mib: int,
    firmware: str,
    disks: list[OutDisk],
    nics: list[OutNic],
) -> bytes:
    """An OVF 1.1 envelope for one virtual system (UTF-8 XML)."""
    for prefix, uri in (("ovf", OVF_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS), ("vmw", VMW_NS),
                        ("xsi", XSI_NS)):  # fmt: skip
        ET.register_namespace(prefix, uri)
    env = ET.Element(_o("Envelope"), {f"{{{VMW_NS}}}buildId": "virtkit"})
    refs = ET.SubElement(env, _o("References"))
    section = ET.SubElement(env, _o("DiskSection"))
    ET.SubElement(section, _o("Info")).text = "Virtual disk information"
    for i, d in enumerate(disks, 1):
        ET.SubElement(refs, _o("File"), {_o("id"): f"file{i}", _o("href"): d.href,
                                         _o("size"): str(d.file_size)})  # fmt: skip
        ET.SubElement(section, _o("Disk"), {
            _o("diskId"): f"vmdisk{i}", _o("fileRef"): f"file{i}", _o("capacity"): str(d.capacity),
            _o("capacityAllocationUnits"): "byte", _o("format"): STREAM_OPTIMIZED,
        })  # fmt: skip
    net = ET.SubElement(env, _o("NetworkSection"))
    ET.SubElement(net, _o("Info")).text = "The list of logical networks"
    ET.SubElement(ET.SubElement(net, _o("Network"), {_o("name"): "NAT"}),
                  _o("Description")).text = "User-mode (NAT) network"  # fmt: skip
    vs = ET.SubElement(env, _o("VirtualSystem"), {_o("id"): name})
    ET.SubElement(vs, _o("Info")).text = "A virtual machine"
    ET.SubElement(vs, _o("Name")).text = name
    ossec = ET.SubElement(vs, _o("OperatingSystemSection"), {_o("id"): "1"})
    ET.SubElement(ossec, _o("Info")).text = "The kind of installed guest operating system"
    hw = ET.SubElement(vs, _o("VirtualHardwareSection"))
    ET.SubElement(hw, _o("Info")).text = "Virtual hardware requirements"
    system = ET.SubElement(hw, _o("System"))
    system_fields = (
        ("ElementName", "Virtual Hardware Family"),
        ("InstanceID", "0"),
        ("VirtualSystemIdentifier", name),
        ("VirtualSystemType", "vmx-10"),
    )
    for key, value in system_fields:
        ET.SubElement(system, f"{{{VSSD_NS}}}{key}").text = value
    cpu = _item(hw, {"AllocationUnits": "hertz * 10^6", "Description": "Number of virtual CPUs",
                     "ElementName": f"{vcpus} virtual CPU(s)", "InstanceID": "1",
                     "ResourceType": "3", "VirtualQuantity": str(vcpus)})  # fmt: skip
    if cores_per_socket:
        ET.SubElement(cpu, f"{{{VMW_NS}}}CoresPerSocket", {_o("required"): "false"}).text = str(
            cores_per_socket
        )
    _item(hw, {"AllocationUnits": "byte * 2^20", "Description": "Memory Size",
               "ElementName": f"{memory_mib}MB of memory", "InstanceID": "2",
               "ResourceType": "4", "VirtualQuantity": str(memory_mib)})  # fmt: skip
    instance = 3
    controllers: dict[str, tuple[str, int]] = {}
    for i, d in enumerate(disks, 1):
        if d.bus not in controllers:
            rtype, sub, label = _CONTROLLERS[d.bus]
            _item(hw, {"Address": str(len(controllers)), "Description": label,
                       "ElementName": label, "InstanceID": str(instance),
                       "ResourceSubType": sub, "ResourceType": str(rtype)})  # fmt: skip
            controllers[d.bus] = (str(instance), 0)
            instance += 1
        parent, used = controllers[d.bus]
        _item(hw, {"AddressOnParent": str(used), "ElementName": f"Hard Disk {i}",
                   "HostResource": f"ovf:/disk/vmdisk{i}", "InstanceID": str(instance),
                   "Parent": parent, "ResourceType": "17"})  # fmt: skip
        controllers[d.bus] = (parent, used + 1)
        instance += 1
    for i, n in enumerate(nics, 1):
        _item(hw, {"Address": n.mac, "AddressOnParent": str(i), "AutomaticAllocation": "true",
                   "Connection": "NAT", "Description": f"{_NIC_SUBTYPES[n.model]} ethernet adapter",
                   "ElementName": f"Ethernet {i}", "InstanceID": str(instance),
                   "ResourceSubType": _NIC_SUBTYPES[n.model], "ResourceType": "10"})  # fmt: skip
        instance += 1
    ET.SubElement(hw, f"{{{VMW_NS}}}Config", {_o("required"): "false",
                                               f"{{{VMW_NS}}}key": "firmware",
                                               f"{{{VMW_NS}}}value": "efi" if firmware == "uefi"
                                               else "bios"})  # fmt: skip
    ET.indent(env)
    data: bytes = ET.tostring(env, encoding="utf-8", xml_declaration=True)
    return data + b"\n"

"""libvirt domain XML -> ``Machine``, reporting what does not map (see :mod:`virtkit.libvirt`)."""

from __future__ import annotations

import json
import os
import re
import warnings
import xml.etree.ElementTree as ET
from typing import Any

import attrs

from virtkit.errors import CapabilityWarning, ConfigError
from virtkit.libvirt.schema import DEVICE_NIC, LIBVIRT_ARCH, MAX_XML, QEMU_TAG, VK_TAG
from virtkit.model import (
    CdRom,
    CpuTopology,
    Disk,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    Serial,
    Share,
)
from virtkit.model.devices import CloudInit

__all__ = ["XmlReport", "build", "from_xml", "parse_report"]


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


def build(kind: type[Any], where: str, **fields: Any) -> Any:
    """``kind(**fields)``; a refused value is a ConfigError saying where in the XML."""
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
    meta = root.find(f"metadata/{VK_TAG}machine")
    meta_disks = (
        {m.get("target"): m for m in meta.iter(f"{VK_TAG}disk")} if meta is not None else {}
    )
    meta_cds = {m.get("dev"): m for m in meta.iter(f"{VK_TAG}cdrom")} if meta is not None else {}
    meta_nics = {m.get("mac"): m for m in meta.iter(f"{VK_TAG}nic")} if meta is not None else {}
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
        if tag == QEMU_TAG + "commandline" or tag in _IGNORED:
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
        fields["cpus"] = build(
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
            default_model = sub.tag == "model" and (sub.text or "") in ("qemu64", "qemu32", "")
            if sub.tag != "topology" and not default_model:
                unmapped.append("cpu/" + _describe(sub))
    boot: dict[str, int] = {}
    os_el = root.find("os")
    kernel: dict[str, str] = {}
    if os_el is not None:
        type_el = os_el.find("type")
        if type_el is not None:
            arch = type_el.get("arch") or "x86_64"
            fields["arch"] = LIBVIRT_ARCH.get(arch, arch)
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
    shares: list[Share] = []
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
        elif dev.tag == "channel" and _is_agent_channel(dev):
            fields["agent"] = True
        elif dev.tag == "filesystem" and dev.get("type", "mount") == "mount":
            shares.append(_parse_share(dev, meta, unmapped))
        elif dev.tag == "console" or dev.tag in _IGNORED_DEVICES:
            continue
        else:
            unmapped.append("devices/" + _describe(dev))
    _parse_commandline(root, meta_nics, nics, boot, unmapped)
    for record in meta_nics.values():
        if record.get("network") == "none":
            nics.append(
                build(
                    Nic,
                    "vk:nic",
                    name=record.get("name"),
                    mac=record.get("mac"),
                    model=record.get("model") or "virtio",
                    network="none",
                )
            )
    fields["disks"] = tuple(disks)
    if shares:
        fields["shares"] = tuple(shares)
    fields["cdroms"] = tuple(cdroms)
    fields["nics"] = tuple(sorted(nics, key=lambda n: nic_index.get(n.mac, len(nic_index))))
    if boot:
        fields["boot"] = tuple(name for name, _ in sorted(boot.items(), key=lambda kv: kv[1]))
    elif legacy_boot and legacy_boot != ["hd"]:
        fields["boot"] = _legacy_boot(legacy_boot, disks, cdroms, nics)
    serial_meta = meta.find(f"{VK_TAG}serial") if meta is not None else None
    fields["serial"] = build(
        Serial,
        "<serial>",
        enabled=serial_seen,
        log=serial_meta.get("log") if serial_meta is not None else None,
    )
    if meta is not None:
        fields["labels"] = {str(el.get("key")): el.text or "" for el in meta.iter(f"{VK_TAG}label")}
        ci = meta.find(f"{VK_TAG}cloud-init")
        if ci is not None:
            try:
                ci_fields = json.loads(ci.text or "")
            except ValueError:
                raise ConfigError("domain XML: vk:cloud-init is not JSON") from None
            if not isinstance(ci_fields, dict):
                raise ConfigError("domain XML: vk:cloud-init is not a JSON object")
            fields["cloud_init"] = build(CloudInit, "vk:cloud-init", **ci_fields)
    if "kernel" in kernel:
        kernel_meta = meta.find(f"{VK_TAG}kernel") if meta is not None else None
        _kernel_fields(kernel, kernel_meta, fields)
    machine = build(Machine, "", **fields)
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
    fields["kernel"] = build(
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
        cd = build(CdRom, f"<disk device='cdrom'> {target}", **cd_fields)
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
    layers = [e.text or "" for e in record.iter(f"{VK_TAG}layer")] if record is not None else []
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
    disks.append(build(Disk, f"<disk> {target}", **fields))
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
    nic = build(Nic, f"<interface> {mac}", **fields)
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
    cmd = root.find(f"{QEMU_TAG}commandline")
    if cmd is None:
        return
    args = [str(a.get("value")) for a in cmd.findall(f"{QEMU_TAG}arg")]
    for sub in cmd:
        if sub.tag != f"{QEMU_TAG}arg":
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
                        build(
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
            if found is None or props[0] not in DEVICE_NIC:
                unmapped.append(f"qemu:commandline -device {value}")
                i += 2
                continue
            mac = kv.get("mac")
            fields: dict[str, Any] = {"model": DEVICE_NIC[props[0]], "forwards": tuple(found)}
            if mac:
                fields["mac"] = mac
            fields["name"] = _nic_name(nics, meta_nics.pop(mac, None))
            nic = build(Nic, f"qemu:commandline -device {value}", **fields)
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


_FROM_ACCESS = {"squash": "none", "mapped": "mapped-xattr", "passthrough": "passthrough"}


def _is_agent_channel(dev: ET.Element) -> bool:
    target = dev.find("target")
    return target is not None and target.get("name") == "org.qemu.guest_agent.0"


def _parse_share(dev: ET.Element, meta: ET.Element | None, unmapped: list[str]) -> Share:
    """A 9p ``<filesystem type='mount'>`` as a Share (virtkit's metadata keeps the exact model)."""
    source, target = dev.find("source"), dev.find("target")
    host = source.get("dir") if source is not None else None
    tag = target.get("dir") if target is not None else None
    if not host or not tag:
        raise ConfigError(
            f"domain XML: a <filesystem> needs source and target dirs ({host!r}, {tag!r})"
        )
    model = _FROM_ACCESS.get(dev.get("accessmode", "passthrough"), "passthrough")
    record = None
    if meta is not None:
        record = next((r for r in meta.iter(f"{VK_TAG}share") if r.get("tag") == tag), None)
    if record is not None:
        model = record.get("security_model", model)
        host = record.get("path", host)
    driver = dev.find("driver")
    if driver is not None and driver.get("type") not in (None, "path"):
        unmapped.append(f"devices/filesystem[{tag}]/driver[type={driver.get('type')}]")
    share: Share = build(
        Share,
        f"<filesystem {tag}>",
        host_path=host,
        tag=tag,
        read_only=dev.find("readonly") is not None,
        security_model=model,
    )
    return share

"""Live device changes of a running libvirt domain: CD-ROM media, disk and NIC hot-plug.

libvirt calls used (libvirt 9.0, ``virDomain*DeviceFlags``):

* media: ``updateDeviceFlags`` of the ``<disk device='cdrom'>`` element with
  the new ``<source file>`` or none (eject; ``MODIFY_FORCE``: the guest may
  have locked the tray);
* disks and NICs: ``attachDeviceFlags`` of the element the domain writer
  (:func:`virtkit.libvirt.to_xml`) produces for the device, so a hot-plugged
  device is the one a restart defines; ``detachDeviceAlias`` of the live
  device's alias (asynchronous), then ``detachDeviceFlags`` of the same
  element from the persistent definition.

Flags: ``AFFECT_LIVE``, plus ``AFFECT_CONFIG`` on a persistent domain so
libvirt's own definition agrees with the folder (a detach changes the
definition only after the guest released the device).

Detach asks the guest to release the device (ACPI PCI hot-unplug on the
``pc`` machine) and polls the live XML until the device is gone, bounded by
:data:`DETACH_TIMEOUT`; only then does the call return (and the folder
drop the device).

What is refused (``ConfigError``, before libvirt is called): non-virtio
disks (IDE and SATA ports are not hot-pluggable), user-mode NICs with port
forwards (virtkit passes them on QEMU's command line: libvirt 9.0's
``<interface type='user'>`` has no forwards), and, on a host without shared
storage, new disk images and media (their files are not on the host). A NIC
with ``network="none"`` is not part of a libvirt domain at all (the writer
leaves it out), so plugging one live only records it.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import attrs

from virtkit import bundle
from virtkit.errors import BackendError, ConfigError, ImageError, TimeoutError
from virtkit.model import CdRom, Disk, Machine, Nic

if TYPE_CHECKING:
    from virtkit.backends.libvirt.guest import LibvirtGuest

__all__ = ["DETACH_TIMEOUT", "LiveDevices"]

#: seconds a guest gets to release a device after ``detachDeviceFlags``
DETACH_TIMEOUT = 30.0
_POLL = 0.2


class LiveDevices:
    """Media and device changes of one running libvirt guest."""

    def __init__(self, guest: LibvirtGuest) -> None:
        self.guest = guest

    # -- plumbing ---------------------------------------------------------------------
    def _flags(self, *, config: bool = True) -> int:
        lv = self.guest._conn.lv
        flags = int(lv.VIR_DOMAIN_AFFECT_LIVE)
        if config and self._persistent():
            flags |= int(lv.VIR_DOMAIN_AFFECT_CONFIG)
        return flags

    def _persistent(self) -> bool:
        guest = self.guest
        return bool(guest._call("ask whether the domain is persistent", guest.domain.isPersistent))

    def _live_devices(self) -> ET.Element:
        """The ``<devices>`` element of the domain's live XML."""
        text = self.guest.xml()
        try:
            devices = ET.fromstring(text).find("devices")
        except ET.ParseError as exc:
            raise BackendError(
                f"libvirt at {self.guest.hypervisor.uri} gave unreadable XML for domain "
                f"{self.guest.domain_name!r}: {exc}"
            ) from None
        return devices if devices is not None else ET.Element("devices")

    def _element(self, machine: Machine, tag: str, match: dict[str, str]) -> ET.Element | None:
        """The writer's ``<tag>`` element for one device of ``machine`` (None: not written)."""
        guest = self.guest
        root = ET.fromstring(guest.hypervisor.domain_xml(machine, guest.folder))
        for element in root.iterfind(f"devices/{tag}"):
            if all(_attr(element, path) == value for path, value in match.items()):
                return element
        return None

    def _refuse_remote_file(self, what: str, field: str) -> None:
        if not self.guest.hypervisor.local_files:
            raise ConfigError(
                f"cannot {what} live on {self.guest.hypervisor.uri}: it does not share storage "
                "with this machine, so the file is not on the host (change it with the guest "
                "shut off and push the folder again)",
                field=field,
            )

    # -- media ------------------------------------------------------------------------
    def change_media(self, drive: CdRom) -> None:
        """Insert ``drive.path`` into the running domain's drive, or eject it (None)."""
        guest = self.guest
        lv = guest._conn.lv
        target = str(drive.target)
        if drive.path is not None:
            self._refuse_remote_file(f"insert a medium into {target}", "path")
            medium = bundle.resolve_disk(guest.folder, drive.path)
            if not medium.is_file():  # the mixin checked; the file may have gone since
                raise ImageError(
                    f"cannot insert {medium} into {target}: no such file", path=str(medium)
                )
        targets = [str(c.target) for c in guest.machine.cdroms]
        index = targets.index(target)
        cdroms = list(guest.machine.cdroms)
        cdroms[index] = drive
        machine = attrs.evolve(guest.machine, cdroms=tuple(cdroms))
        root = ET.fromstring(guest.hypervisor.domain_xml(machine, guest.folder))
        written = list(root.iterfind("devices/disk[@device='cdrom']"))
        element = written[index]
        # libvirt names the drive by its target dev: take the running domain's (an
        # imported domain may name its drives otherwise than the writer would)
        live = list(self._live_devices().iterfind("disk[@device='cdrom']"))
        live_target, new_target = (
            live[index].find("target") if index < len(live) else None,
            element.find("target"),
        )
        if live_target is not None and new_target is not None:
            new_target.attrib.update(
                {k: v for k, v in live_target.attrib.items() if k in ("dev", "bus")}
            )
        flags = self._flags()
        if drive.path is None:
            flags |= int(lv.VIR_DOMAIN_DEVICE_MODIFY_FORCE)
        action = "eject the medium of" if drive.path is None else "insert a medium into"
        guest._call(
            f"{action} CD-ROM drive {target}",
            guest.domain.updateDeviceFlags,
            ET.tostring(element, encoding="unicode"),
            flags,
        )

    # -- disks and NICs -------------------------------------------------------------------
    def attach(self, device: Disk | Nic) -> None:
        """Hot-plug ``device`` (its target or name assigned) into the running domain."""
        guest = self.guest
        if isinstance(device, Disk):
            element = self._disk_element(device)
            what = f"hot-plug disk {device.target}"
        else:
            found = self._nic_element(device, "hot-plug")
            if found is None:
                return  # network="none": not part of a libvirt domain (see the module doc)
            element = found
            what = f"hot-plug network card {device.name}"
        guest._call(
            what,
            guest.domain.attachDeviceFlags,
            ET.tostring(element, encoding="unicode"),
            self._flags(),
        )

    def _disk_element(self, disk: Disk) -> ET.Element:
        guest = self.guest
        target = str(disk.target)
        if disk.bus != "virtio":
            raise ConfigError(
                f"only virtio disks can be hot-plugged (got {disk.bus!r} for {target}); attach "
                "it with the guest shut off, or use bus 'virtio'",
                field="bus",
                value=disk.bus,
            )
        self._refuse_remote_file(f"hot-plug disk {target}", "path")
        for name in disk.files():
            path = bundle.resolve_disk(guest.folder, name)
            if not path.is_file():
                raise ConfigError(
                    f"cannot hot-plug {target}: {path} does not exist (give the Disk a size to "
                    "create it)",
                    field="path",
                )
        machine = attrs.evolve(guest.machine, disks=(*guest.machine.disks, disk))
        element = self._element(machine, "disk[@device='disk']", {"target@dev": target})
        if element is None:  # the writer writes every disk
            raise BackendError(f"the domain writer wrote no <disk> for {target}")
        return element

    def _nic_element(self, nic: Nic, verb: str) -> ET.Element | None:
        name = str(nic.name)
        if nic.network == "none":
            return None
        if nic.forwards:
            raise ConfigError(
                f"cannot {verb} network card {name} live on libvirt: it has port forwards, "
                "which virtkit passes on QEMU's command line (libvirt 9.0's user-mode "
                "<interface> has none); change it with the guest shut off, or use a NIC "
                "without forwards",
                field="forwards",
            )
        guest = self.guest
        nics = guest.machine.nics if nic in guest.machine.nics else (*guest.machine.nics, nic)
        machine = attrs.evolve(guest.machine, nics=nics)
        element = self._element(machine, "interface", {"mac@address": nic.mac})
        if element is None:
            raise BackendError(f"the domain writer wrote no <interface> for {name}")
        return element

    def detach(self, device: Disk | Nic, timeout: float = DETACH_TIMEOUT) -> None:
        """Ask the guest to release ``device`` and wait until the domain no longer has it.

        Raises:
            TimeoutError: the guest did not release it within ``timeout`` (it
                stays attached and recorded; libvirt completes the removal if
                the guest releases it later).
        """
        guest = self.guest
        if isinstance(device, Disk):
            name = str(device.target)
            tag, match = "disk[@device='disk']", {"target@dev": name}
            element = self._element(guest.machine, tag, match)
            if element is None:
                raise BackendError(f"the domain writer wrote no <disk> for {name}")
            kind = "disk"
        else:
            name = str(device.name)
            found = self._nic_element(device, "hot-unplug")
            if found is None:
                return  # network="none": nothing in the domain to unplug
            element, tag, match = found, "interface", {"mac@address": device.mac}
            kind = "network card"
        xml = ET.tostring(element, encoding="unicode")
        deadline = time.monotonic() + timeout
        live = self._live_element(tag, match)
        if live is not None:
            alias = live.find("alias")
            what = f"hot-unplug {kind} {name}"
            flags = self._flags(config=False)
            if alias is not None and alias.get("name"):
                # asynchronous: returns once QEMU asked the guest (detachDeviceFlags
                # would block for libvirt's own few seconds of waiting)
                guest._call(what, guest.domain.detachDeviceAlias, alias.get("name"), flags)
            else:
                guest._call(what, guest.domain.detachDeviceFlags, xml, flags)
        while self._present(tag, match):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"guest {guest.name!r} did not release {kind} {name} within {timeout} s "
                    f"of the hot-unplug request on {guest.hypervisor.uri} (does it handle "
                    "ACPI PCI hot-unplug?); it stays attached",
                    timeout=timeout,
                )
            time.sleep(_POLL)
        if self._persistent():
            lv = guest._conn.lv
            # libvirt's definition follows (virtkit's own redefine does too); not in the
            # definition any more is fine
            with contextlib.suppress(lv.libvirtError):
                guest.domain.detachDeviceFlags(xml, lv.VIR_DOMAIN_AFFECT_CONFIG)

    def _live_element(self, tag: str, match: dict[str, str]) -> ET.Element | None:
        for element in self._live_devices().iterfind(tag):
            if all(_attr(element, path) == value for path, value in match.items()):
                return element
        return None

    def _present(self, tag: str, match: dict[str, str]) -> bool:
        return self._live_element(tag, match) is not None


def _attr(element: ET.Element, path: str) -> str | None:
    """``"target@dev"``: the ``dev`` attribute of ``element``'s ``<target>`` child."""
    child, _, attr = path.partition("@")
    found = element.find(child)
    return None if found is None else found.get(attr)

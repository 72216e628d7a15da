"""Live device changes on a running QEMU: CD-ROM media, disk and NIC hot-plug.

QMP commands used (QEMU 7.2, ``qapi/block.json``, ``qapi/qdev.json``,
``qapi/net.json``):

* media: ``blockdev-change-medium`` (opens the ISO, moves the tray) to
  insert, ``eject`` (``force``: the guest may have locked the tray) to eject;
  both address the drive by its qdev ``id`` (the CD-ROM target);
* disks: ``blockdev-add`` of a ``file`` and a format node, then
  ``device_add virtio-blk-pci`` (PCI hot-plug on ``pci.0``: the i440fx
  ``pc`` machine announces it through ACPI, q35 through its PCIe root);
  ``device_del`` + the ``DEVICE_DELETED`` event (the guest must release the
  device) + ``blockdev-del`` to detach;
* NICs: ``netdev_add`` (user network, port forwards) + ``device_add``;
  ``device_del`` + ``DEVICE_DELETED`` + ``netdev_del``.

Only virtio disks and NICs can be hot-plugged: IDE and SATA ports are not
hot-pluggable in QEMU's ``pc`` machine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

from virtkit import bundle
from virtkit.backends.qemu.argv import (
    CACHE_MODES,
    HD_DRIVER,
    NIC_DRIVERS,
    blockdev_nodes,
    node_name,
)
from virtkit.errors import BackendError, ConfigError, StateError, TimeoutError
from virtkit.model import CdRom, Disk, Nic

if TYPE_CHECKING:
    from virtkit.backends.qemu.guest import QemuGuest

__all__ = ["DETACH_TIMEOUT", "Hotplug"]

#: seconds a guest gets to release a device after ``device_del``
DETACH_TIMEOUT = 30.0


class Hotplug:
    """Live media and device changes of one guest; tracks ``DEVICE_DELETED`` events."""

    def __init__(self, guest: QemuGuest) -> None:
        self.guest = guest
        self._deleted: set[str] = set()
        self._cond = threading.Condition()

    def on_device_deleted(self, data: Any) -> None:
        """Record a ``DEVICE_DELETED`` event (called on the event loop thread)."""
        device = data.get("device") if hasattr(data, "get") else None
        if isinstance(device, str):
            with self._cond:
                self._deleted.add(device)
                self._cond.notify_all()

    def _wait_deleted(self, device_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while device_id not in self._deleted:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.guest._live():
                    return device_id in self._deleted
                self._cond.wait(min(remaining, 0.5))
            self._deleted.discard(device_id)
            return True

    # -- media ------------------------------------------------------------------------
    def change_media(self, drive: CdRom) -> None:
        """Insert ``drive.path`` into the running guest's drive, or eject (None)."""
        guest = self.guest
        target = str(drive.target)
        if drive.path is None:
            guest._qmp_sync("eject", {"id": target, "force": True})
            return
        guest._qmp_sync(
            "blockdev-change-medium",
            {
                "id": target,
                "filename": str(bundle.resolve_disk(guest.folder, drive.path)),
                "format": "raw",
                "read-only-mode": "read-only",
            },
        )

    # -- disks and NICs -----------------------------------------------------------------
    def attach(self, device: Disk | Nic) -> None:
        """Hot-plug a virtio disk or NIC into the running guest."""
        if isinstance(device, Disk):
            self._attach_disk(device)
        else:
            self._attach_nic(device)

    def _check_virtio(self, kind: str, bus: str, field: str) -> None:
        if bus != "virtio":
            raise ConfigError(
                f"only virtio {kind}s can be hot-plugged (got {bus!r}); attach it with the "
                "guest shut off, or use bus/model 'virtio'",
                field=field,
                value=bus,
            )

    def _attach_disk(self, disk: Disk) -> None:
        guest = self.guest
        self._check_virtio("disk", disk.bus, "bus")
        target = str(disk.target)
        node = node_name(target)
        path = bundle.resolve_disk(guest.folder, disk.active)
        if not path.is_file():
            raise ConfigError(
                f"cannot hot-plug {target}: {path} does not exist (give the Disk a size to "
                "create it)",
                field="path",
            )
        file_node, fmt_node = blockdev_nodes(disk, path, node)
        guest._qmp_sync("blockdev-add", file_node)
        try:
            guest._qmp_sync("blockdev-add", fmt_node)
            try:
                props = {
                    "driver": HD_DRIVER["virtio"],
                    "id": target,
                    "drive": node,
                    "write-cache": "on" if CACHE_MODES[disk.cache][2] else "off",
                }
                guest._qmp_sync("device_add", props)
            except BaseException:
                with contextlib.suppress(BackendError, StateError):
                    guest._qmp_sync("blockdev-del", {"node-name": node})
                raise
        except BaseException:
            with contextlib.suppress(BackendError, StateError):
                guest._qmp_sync("blockdev-del", {"node-name": f"{node}-file"})
            raise
        guest._nodes[target] = node

    def _attach_nic(self, nic: Nic) -> None:
        guest = self.guest
        self._check_virtio("network card", nic.model, "model")
        name = str(nic.name)
        netdev: dict[str, Any] = {"id": f"net-{name}"}
        if nic.network == "user":
            netdev["type"] = "user"
            fwds = [
                f"{f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}" for f in nic.forwards
            ]
            if fwds:
                netdev["hostfwd"] = [{"str": f} for f in fwds]
        elif nic.network == "tap":
            netdev.update(type="tap", ifname=str(nic.tap), script="no", downscript="no")
        props: dict[str, Any] = {"driver": NIC_DRIVERS[nic.model], "id": name, "mac": nic.mac}
        if nic.network != "none":
            guest._qmp_sync("netdev_add", netdev)
            props["netdev"] = f"net-{name}"
        try:
            guest._qmp_sync("device_add", props)
        except BaseException:
            if nic.network != "none":
                with contextlib.suppress(BackendError, StateError):
                    guest._qmp_sync("netdev_del", {"id": f"net-{name}"})
            raise

    def detach(self, device: Disk | Nic, timeout: float = DETACH_TIMEOUT) -> None:
        """Ask the guest to release ``device``, wait for ``DEVICE_DELETED``, free its backend.

        Raises:
            TimeoutError: the guest did not release it within ``timeout``
                (it stays attached; QEMU completes the removal if the guest
                releases it later).
        """
        guest = self.guest
        device_id = str(device.target) if isinstance(device, Disk) else str(device.name)
        with self._cond:
            self._deleted.discard(device_id)
        guest._qmp_sync("device_del", {"id": device_id})
        if not self._wait_deleted(device_id, timeout):
            raise TimeoutError(
                f"guest {guest.name!r} did not release {device_id} within {timeout} s of "
                "device_del (does it handle ACPI PCI hot-unplug?); it stays attached",
                timeout=timeout,
            )
        if isinstance(device, Disk):
            node = guest._nodes.pop(device_id, node_name(device_id))
            for name in (node, f"{node_name(device_id)}-file"):
                with contextlib.suppress(BackendError, StateError):
                    guest._qmp_sync("blockdev-del", {"node-name": name})
        elif device.network != "none":
            with contextlib.suppress(BackendError, StateError):
                guest._qmp_sync("netdev_del", {"id": f"net-{device_id}"})

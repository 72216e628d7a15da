"""The libvirt backend: guests as domains on any libvirt host, local or remote.

``virtkit.connect("libvirt", uri="qemu+ssh://host/system")``. Needs the
``libvirt-python`` binding (``pip install 'virtkit[libvirt]'``) and a
reachable libvirt daemon; see :doc:`/many-hosts`.
"""

from __future__ import annotations

from virtkit.backends.libvirt.aio import DomainEvent, LibvirtAsyncGuest
from virtkit.backends.libvirt.guest import LOCATION_FILE, LibvirtGuest
from virtkit.backends.libvirt.hypervisor import AccelChoice, LibvirtHypervisor

__all__ = [
    "LOCATION_FILE",
    "AccelChoice",
    "DomainEvent",
    "LibvirtAsyncGuest",
    "LibvirtGuest",
    "LibvirtHypervisor",
]

"""virtkit: virtual machines, hypervisors and disk images as typed objects.

Layout (imports point downwards only)::

    virtkit.cli        the `virtkit` command, over the public API
    virtkit.aio        the hypervisor API as coroutines (asyncio)
    virtkit.fleet      Fleet: guests across libvirt hosts, placement, migration
    virtkit.backends   Hypervisor implementations: "emulator" (unicorn), "qemu" (QMP), "libvirt"
    virtkit.libvirt    Machine <-> libvirt domain XML, import of existing domains
    virtkit.ova        OVF/OVA appliances <-> VM folders
    virtkit.bundle     Machine <-> folder of files (machine.toml, disks/, snapshots/)
    virtkit.provision  cloud-init NoCloud seed ISOs
    virtkit.images     qcow2/raw disk image engine
    virtkit.model      frozen attrs classes: Machine, Disk, Nic, Snapshot, ...
    virtkit.errors     the exception hierarchy

This module only re-exports the public names.
"""

from virtkit import aio, images, libvirt, ova
from virtkit.backends import Console, Guest, Hypervisor, connect
from virtkit.bundle import load, save
from virtkit.clone import clone
from virtkit.errors import (
    BackendError,
    BackendUnavailable,
    CapabilityWarning,
    ConfigError,
    CorruptImageError,
    ImageError,
    ImageLockedError,
    ResourceError,
    StateError,
    TimeoutError,
    UnsupportedFeatureError,
    VirtkitError,
)
from virtkit.fleet import Fleet
from virtkit.model import (
    AllocationPolicy,
    CdRom,
    CloudInit,
    CpuTopology,
    Disk,
    HostResources,
    HypervisorType,
    KernelBoot,
    Machine,
    Nic,
    PortForward,
    Serial,
    Share,
    Snapshot,
    SnapshotKind,
    State,
)

__all__ = [
    # entry points
    "clone",
    "connect",
    "load",
    "save",
    "images",
    "aio",
    "ova",
    "libvirt",
    "Fleet",
    # backends
    "Console",
    "Guest",
    "Hypervisor",
    # the object model
    "AllocationPolicy",
    "CdRom",
    "CloudInit",
    "CpuTopology",
    "Disk",
    "HostResources",
    "HypervisorType",
    "KernelBoot",
    "Machine",
    "Nic",
    "PortForward",
    "Serial",
    "Share",
    "Snapshot",
    "SnapshotKind",
    "State",
    # errors
    "BackendError",
    "BackendUnavailable",
    "CapabilityWarning",
    "ConfigError",
    "CorruptImageError",
    "ImageError",
    "ImageLockedError",
    "ResourceError",
    "StateError",
    "TimeoutError",
    "UnsupportedFeatureError",
    "VirtkitError",
]

"""The typed object model: machines, devices, snapshots, host resources.

Frozen ``attrs`` classes, validated at construction (``ConfigError`` naming
the field), compared by value, changed with ``attrs.evolve``. No I/O here.
"""

from virtkit.model.boot import KernelBoot
from virtkit.model.devices import CdRom, CloudInit, Disk, Nic, PortForward, Serial, Share
from virtkit.model.enums import HypervisorType, SnapshotKind, State
from virtkit.model.host import AllocationPolicy, HostResources
from virtkit.model.machine import CpuTopology, Machine
from virtkit.model.snapshot import Snapshot

__all__ = [
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
]

"""Enumerations of the object model: run states, hypervisor types, snapshot kinds."""

from __future__ import annotations

import enum

__all__ = ["HypervisorType", "SnapshotKind", "State"]


class State(enum.Enum):
    """A guest's run state, as libvirt names them."""

    #: Defined but not running (never started, powered off, or killed).
    SHUTOFF = "shutoff"
    #: The virtual CPUs are executing.
    RUNNING = "running"
    #: Frozen in place; ``resume()`` continues exactly where it stopped.
    PAUSED = "paused"
    #: The hypervisor or the guest failed; ``guest.crash_reason`` says why.
    CRASHED = "crashed"


class HypervisorType(enum.Enum):
    """Where the hypervisor runs relative to the hardware."""

    #: Bare-metal: the hypervisor is the host's kernel (KVM turns Linux into one).
    TYPE1 = "type1"
    #: Hosted: the hypervisor is an application on a host OS (QEMU with TCG,
    #: virtkit's in-process emulator).
    TYPE2 = "type2"


class SnapshotKind(enum.Enum):
    """What a snapshot captures."""

    #: Disk contents only.
    DISK = "disk"
    #: Disks plus RAM, CPU and device state: reverting resumes execution.
    FULL = "full"

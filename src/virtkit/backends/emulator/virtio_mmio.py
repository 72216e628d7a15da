"""The virtio-mmio transport (version 2) and the split virtqueue, per virtio 1.x.

A device's registers sit in a memory window (``uc.mmio_map``) with the
layout of the virtio specification, section 4.2.2 (QEMU's
``hw/virtio/virtio-mmio.c``, Linux's ``drivers/virtio/virtio_mmio.c``): magic
``"virt"``, version 2, device and vendor IDs, 64-bit feature words selected
32 bits at a time, per-queue size/ready/addresses, queue notify, interrupt
status and acknowledge, the device status byte, and the device-specific
configuration space from offset 0x100.

The driver's rings live in guest RAM and are untrusted: every address,
length, index and chain length is checked against RAM and the queue size
before it is used, and a whole descriptor chain is walked and checked before
the device acts on any of it. A malformed ring does not raise into the CPU
loop: the device sets ``DEVICE_NEEDS_RESET`` in its status, raises a
configuration-change interrupt and ignores the queues until the driver
resets it (writes 0 to the status register), as the specification allows
(2.1.2). Requests are served synchronously, on the CPU thread, when the
driver writes the queue-notify register, so a virtual-clock run stays
deterministic.
"""

from __future__ import annotations

import abc
import logging
import struct
from collections.abc import Callable
from typing import Any

import attrs

__all__ = [
    "DEVICE_NEEDS_RESET",
    "MMIO_WINDOW",
    "GuestMemory",
    "MmioTransport",
    "RingError",
    "Segment",
    "VirtioDevice",
    "Virtqueue",
]

log = logging.getLogger("virtkit.emulator")

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"VKIT", "little")
MMIO_WINDOW = 0x200  # register window length announced to the guest (QEMU's stride)

# register offsets (virtio 1.x, 4.2.2)
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_CONFIG_GENERATION = 0x0FC
REG_CONFIG = 0x100

# device status bits (2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# interrupt status bits
INT_VRING = 1
INT_CONFIG = 2

F_VERSION_1 = 1 << 32

# descriptor flags and ring flags (2.7)
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class RingError(Exception):
    """The driver's ring or request is malformed (the device then needs a reset)."""


class GuestMemory:
    """Guest RAM as a device sees it (DMA): reads and writes bounded to RAM.

    RAM is ``[0, low)`` and, past the PCI hole, ``[4 GiB, 4 GiB + rest)``, as
    :class:`~virtkit.backends.emulator.cpu.Cpu` maps it. An access must lie
    wholly inside one of them; writes go through the engine so that code
    translated from the bytes overwritten is dropped.

    Args:
        read: reads guest-physical memory (``Cpu.read``).
        write: writes guest-physical memory (``Cpu.write``).
        memory: RAM size in bytes.
    """

    def __init__(
        self,
        read: Callable[[int, int], bytes],
        write: Callable[[int, bytes], None],
        memory: int,
        *,
        hole: int = 0xE000_0000,
    ) -> None:
        self._read = read
        self._write = write
        low = min(memory, hole)
        self.ranges = [(0, low)]
        if memory > low:
            self.ranges.append((1 << 32, (1 << 32) + memory - low))

    def check(self, address: int, length: int) -> None:
        """Raise :class:`RingError` unless ``[address, address + length)`` is RAM."""
        if address < 0 or length < 0:
            raise RingError(f"negative address or length ({address:#x}, {length})")
        for start, end in self.ranges:
            if start <= address and address + length <= end:
                return
        raise RingError(f"{length} bytes at {address:#x} are not inside guest RAM")

    def read(self, address: int, length: int) -> bytes:
        """Read RAM (checked)."""
        self.check(address, length)
        return self._read(address, length) if length else b""

    def write(self, address: int, data: bytes) -> None:
        """Write RAM (checked)."""
        self.check(address, len(data))
        if data:
            self._write(address, data)


@attrs.frozen
class Segment:
    """One descriptor of a chain: guest address, length, device-writable."""

    address: int
    length: int
    writable: bool


@attrs.define
class Virtqueue:
    """One split virtqueue: the driver's three areas and the device's indexes."""

    num_max: int
    num: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0  # the available ring
    device: int = 0  # the used ring
    last_avail: int = 0
    used_idx: int = 0

    def reset(self) -> None:
        """As after a device reset."""
        self.num = self.num_max
        self.ready = False
        self.desc = self.driver = self.device = 0
        self.last_avail = self.used_idx = 0

    def enable(self, memory: GuestMemory) -> None:
        """The driver set QUEUE_READY: check the size and that the areas are RAM.

        Raises:
            RingError: the size is not a power of two up to ``num_max``, or an
                area is misaligned or outside RAM.
        """
        num = self.num
        if not 0 < num <= self.num_max or num & (num - 1):
            raise RingError(f"queue size {num} is not a power of two from 1 to {self.num_max}")
        for name, address, align, size in (
            ("descriptor table", self.desc, 16, 16 * num),
            ("available ring", self.driver, 2, 6 + 2 * num),
            ("used ring", self.device, 4, 6 + 8 * num),
        ):
            if address % align:
                raise RingError(f"the {name} at {address:#x} is not {align}-byte aligned")
            memory.check(address, size)
        self.ready = True
        self.last_avail = 0
        self.used_idx = 0

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver has made available and the device not taken.

        Raises:
            RingError: the available index ran more than the queue size ahead.
        """
        avail_idx = int.from_bytes(memory.read(self.driver + 2, 2), "little")
        count = (avail_idx - self.last_avail) & 0xFFFF
        if count > self.num:
            raise RingError(
                f"the available index {avail_idx} is {count} entries ahead of the device "
                f"({self.last_avail}), more than the queue size {self.num}"
            )
        return count

    def pop(self, memory: GuestMemory, max_segment: int) -> tuple[int, list[Segment]]:
        """Take the next available chain: (head index, its segments), all checked.

        Raises:
            RingError: a head or next index outside the queue, a chain longer
                than the queue (a loop), an indirect descriptor (not offered),
                a segment longer than ``max_segment`` or outside RAM, or a
                device-readable segment after a device-writable one.
        """
        slot = self.last_avail % self.num
        (head,) = struct.unpack("<H", memory.read(self.driver + 4 + 2 * slot, 2))
        segments: list[Segment] = []
        index = head
        seen_writable = False
        while True:
            if index >= self.num:
                raise RingError(f"descriptor index {index} is outside the queue of {self.num}")
            if len(segments) >= self.num:
                raise RingError(f"the chain from descriptor {head} loops (over {self.num} long)")
            address, length, flags, next_index = _DESC.unpack(
                memory.read(self.desc + 16 * index, 16)
            )
            if flags & DESC_F_INDIRECT:
                raise RingError(f"descriptor {index} is indirect, which was not offered")
            if length > max_segment:
                raise RingError(
                    f"descriptor {index} is {length} bytes long, more than the {max_segment} "
                    "the device allows"
                )
            memory.check(address, length)
            writable = bool(flags & DESC_F_WRITE)
            if seen_writable and not writable:
                raise RingError(f"descriptor {index} is device-readable after a writable one")
            seen_writable |= writable
            segments.append(Segment(address, length, writable))
            if not flags & DESC_F_NEXT:
                break
            index = next_index
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head, segments

    def push(self, memory: GuestMemory, head: int, written: int) -> None:
        """Return a chain to the driver through the used ring."""
        slot = self.used_idx % self.num
        memory.write(self.device + 4 + 8 * slot, _USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        memory.write(self.device + 2, struct.pack("<H", self.used_idx))

    def interrupt_wanted(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for used buffers (no event index)."""
        (flags,) = struct.unpack("<H", memory.read(self.driver, 2))
        return not flags & AVAIL_F_NO_INTERRUPT

    def save(self) -> list[int]:
        """Snapshot state."""
        return [
            self.num,
            int(self.ready),
            self.desc,
            self.driver,
            self.device,
            self.last_avail,
            self.used_idx,
        ]

    def load(self, state: list[int]) -> None:
        """Restore :meth:`save` output."""
        num, ready, self.desc, self.driver, self.device, self.last_avail, self.used_idx = (
            int(v) for v in state
        )
        self.num, self.ready = num, bool(ready)


class VirtioDevice(abc.ABC):
    """A device behind a transport: its ID, features, configuration and requests."""

    #: virtio device ID (2 = block)
    device_id: int
    #: queue sizes, one per virtqueue
    queue_sizes: tuple[int, ...]
    #: longest descriptor the device accepts, in bytes
    max_segment: int

    @abc.abstractmethod
    def features(self) -> int:
        """The 64-bit feature bits offered (VIRTIO_F_VERSION_1 included)."""

    @abc.abstractmethod
    def config(self) -> bytes:
        """The device-specific configuration space."""

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - optional hook
        """The driver wrote configuration space (ignored unless overridden)."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """The driver reset the device."""

    def set_features(self, features: int) -> None:  # noqa: B027 - optional hook
        """The driver accepted ``features`` (FEATURES_OK)."""

    @abc.abstractmethod
    def handle(self, queue: int, memory: GuestMemory, segments: list[Segment]) -> int:
        """Serve one request; return how many bytes were written into the chain.

        Raises:
            RingError: the request's layout is malformed (nothing may have
                been done yet when this is raised).
        """


class MmioTransport:
    """The virtio-mmio register window of one device.

    Args:
        device: the device behind it.
        memory: guest RAM (the rings and buffers).
    """

    def __init__(self, device: VirtioDevice, memory: GuestMemory) -> None:
        self.device = device
        self.memory = memory
        self.queues = [Virtqueue(size) for size in device.queue_sizes]
        self.reset()

    def reset(self) -> None:
        """Device reset (status 0 written, or machine reset)."""
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.needs_reset_reason: str | None = None
        for queue in self.queues:
            queue.reset()
        self.device.reset()

    # -- interrupt line --------------------------------------------------------------------------
    def irq_pending(self) -> bool:
        """The level of the device's interrupt line."""
        return self.interrupt_status != 0

    # -- registers -------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Guest read of the window (the mmio hook); never raises."""
        if offset >= REG_CONFIG:
            config = self.device.config()
            start = offset - REG_CONFIG
            data = config[start : start + size] if start < len(config) else b""
            return int.from_bytes(data.ljust(size, b"\0"), "little")
        if size != 4 or offset % 4:
            return 0  # the spec allows only aligned 32-bit access here
        queue = self._queue()
        registers = {
            REG_MAGIC: MAGIC,
            REG_VERSION: VERSION,
            REG_DEVICE_ID: self.device.device_id,
            REG_VENDOR_ID: VENDOR_ID,
            REG_DEVICE_FEATURES: (
                (self.device.features() >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
                if self.device_features_sel < 2
                else 0
            ),
            REG_QUEUE_NUM_MAX: queue.num_max if queue is not None else 0,
            REG_QUEUE_READY: int(queue.ready) if queue is not None else 0,
            REG_INTERRUPT_STATUS: self.interrupt_status,
            REG_STATUS: self.status,
            REG_SHM_LEN_LOW: 0xFFFF_FFFF,  # no shared memory regions
            REG_SHM_LEN_HIGH: 0xFFFF_FFFF,
            REG_CONFIG_GENERATION: self.config_generation,
        }
        return registers.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        """Guest write to the window (the mmio hook); never raises for guest input."""
        if offset >= REG_CONFIG:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.device.write_config(offset - REG_CONFIG, data)
            return
        if size != 4 or offset % 4:
            return
        value &= 0xFFFF_FFFF
        if offset == REG_STATUS:
            self._write_status(value)
        elif offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & FEATURES_OK:
                shift = 32 * self.driver_features_sel
                mask = 0xFFFF_FFFF << shift
                self.driver_features = (self.driver_features & ~mask) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == REG_QUEUE_NOTIFY:
            self.notify(value)
        else:
            self._write_queue(offset, value)

    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue(self, offset: int, value: int) -> None:
        queue = self._queue()
        if queue is None:
            return
        if offset == REG_QUEUE_READY:
            if not value & 1:
                queue.ready = False
            elif not queue.ready:
                try:
                    queue.enable(self.memory)
                except RingError as exc:
                    self.fail(f"queue {self.queue_sel}: {exc}")
            return
        if queue.ready:
            return  # the layout of a live queue cannot change
        low, high = value, value << 32
        if offset == REG_QUEUE_NUM:
            queue.num = value
        elif offset == REG_QUEUE_DESC_LOW:
            queue.desc = (queue.desc & ~0xFFFF_FFFF) | low
        elif offset == REG_QUEUE_DESC_HIGH:
            queue.desc = (queue.desc & 0xFFFF_FFFF) | high
        elif offset == REG_QUEUE_DRIVER_LOW:
            queue.driver = (queue.driver & ~0xFFFF_FFFF) | low
        elif offset == REG_QUEUE_DRIVER_HIGH:
            queue.driver = (queue.driver & 0xFFFF_FFFF) | high
        elif offset == REG_QUEUE_DEVICE_LOW:
            queue.device = (queue.device & ~0xFFFF_FFFF) | low
        elif offset == REG_QUEUE_DEVICE_HIGH:
            queue.device = (queue.device & 0xFFFF_FFFF) | high

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= 0xFF & ~DEVICE_NEEDS_RESET  # the device's own bit
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.device.features()
            accepted = self.driver_features
            if accepted & ~offered or not accepted & F_VERSION_1:
                value &= ~FEATURES_OK  # refused: the driver reads the bit back clear
            else:
                self.device.set_features(accepted)
        self.status = (self.status & DEVICE_NEEDS_RESET) | value

    def fail(self, reason: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET and a config interrupt."""
        if self.status & DEVICE_NEEDS_RESET:
            return
        log.warning("virtio-mmio device %d needs a reset: %s", self.device.device_id, reason)
        self.needs_reset_reason = reason
        self.status |= DEVICE_NEEDS_RESET
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        if self.status & DRIVER_OK:
            self.interrupt_status |= INT_CONFIG

    # -- requests ---------------------------------------------------------------------------------
    def notify(self, index: int) -> None:
        """The driver notified queue ``index``: serve every available chain."""
        if index >= len(self.queues):
            return
        queue = self.queues[index]
        if not queue.ready or not self.status & DRIVER_OK or self.status & DEVICE_NEEDS_RESET:
            return
        served = False
        try:
            for _ in range(queue.pending(self.memory)):
                head, segments = queue.pop(self.memory, self.device.max_segment)
                written = self.device.handle(index, self.memory, segments)
                queue.push(self.memory, head, written)
                served = True
        except RingError as exc:
            self.fail(f"queue {index}: {exc}")
        if served and queue.interrupt_wanted(self.memory):
            self.interrupt_status |= INT_VRING

    # -- snapshots --------------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """Register and queue state."""
        return {
            "status": self.status,
            "features_sel": [self.device_features_sel, self.driver_features_sel],
            "driver_features": self.driver_features,
            "queue_sel": self.queue_sel,
            "interrupt_status": self.interrupt_status,
            "config_generation": self.config_generation,
            "queues": [q.save() for q in self.queues],
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`save` output."""
        self.status = int(state["status"])
        self.device_features_sel, self.driver_features_sel = (int(v) for v in state["features_sel"])
        self.driver_features = int(state["driver_features"])
        self.queue_sel = int(state["queue_sel"])
        self.interrupt_status = int(state["interrupt_status"])
        self.config_generation = int(state["config_generation"])
        for queue, saved in zip(self.queues, state["queues"], strict=True):
            queue.load(saved)
        if self.status & FEATURES_OK:
            self.device.set_features(self.driver_features)

"""virtio-blk (virtio 1.x, section 5.2) backed by a :mod:`virtkit.images` image.

One request queue. Requests served: ``VIRTIO_BLK_T_IN`` (read),
``VIRTIO_BLK_T_OUT`` (write), ``VIRTIO_BLK_T_FLUSH`` (the image's
``flush()``: what the guest flushed survives a host crash) and
``VIRTIO_BLK_T_GET_ID`` (the disk's name as its serial); any other type is
answered ``VIRTIO_BLK_S_UNSUPP``. The capacity is the image's virtual size in
512-byte sectors; a read-only disk offers ``VIRTIO_BLK_F_RO`` and answers
writes with ``VIRTIO_BLK_S_IOERR``. Requests outside the disk, with a
length that is not whole sectors, or that the image fails are answered
``VIRTIO_BLK_S_IOERR`` (the driver sees an I/O error; the device goes on).

A request's layout (virtio 1.x makes no assumption on framing): the
device-readable bytes are the 16-byte header (type, reserved, sector) and,
for a write, the data; the device-writable bytes are, for a read or GET_ID,
the data and, last, the one status byte. A chain with no header or no
status byte is malformed (the transport then sets DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import logging
import struct

from virtkit import images
from virtkit.backends.emulator.virtio_mmio import (
    F_VERSION_1,
    GuestMemory,
    RingError,
    Segment,
    VirtioDevice,
)
from virtkit.errors import ImageError

__all__ = ["SECTOR", "VirtioBlock"]

log = logging.getLogger("virtkit.emulator")

SECTOR = 512
DEVICE_ID = 2
QUEUE_SIZE = 128
SIZE_MAX = 0x10000  # longest segment: 64 KiB
SEG_MAX = QUEUE_SIZE - 2  # data segments per request (the header and status take two)
ID_BYTES = 20

# feature bits (5.2.3)
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9

# request types and status values (5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

_HEADER = struct.Struct("<IIQ")
_CONFIG_SIZE = 60  # up to and including the discard/write-zeroes fields, left zero


class VirtioBlock(VirtioDevice):
    """A virtio block device over an open image.

    Args:
        image: the disk (qcow2 or raw, open writable unless ``read_only``).
        name: the disk's name, answered to GET_ID (at most 20 bytes used).
        read_only: offer VIRTIO_BLK_F_RO and refuse writes.
    """

    device_id = DEVICE_ID
    queue_sizes = (QUEUE_SIZE,)
    max_segment = SIZE_MAX

    def __init__(self, image: images.Image, *, name: str = "", read_only: bool = False) -> None:
        self.image = image
        self.name = name
        self.read_only = read_only or not image.writable
        self.sectors = image.virtual_size // SECTOR
        self.requests = 0  # served, for diagnostics

    def features(self) -> int:
        """VERSION_1, SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, and RO for a read-only disk."""
        features = F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH
        return features | F_RO if self.read_only else features

    def config(self) -> bytes:
        """capacity, size_max, seg_max, geometry (none), blk_size; the rest zero."""
        config = struct.pack("<QIIHBBI", self.sectors, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR)
        return config.ljust(_CONFIG_SIZE, b"\0")

    def handle(self, queue: int, memory: GuestMemory, segments: list[Segment]) -> int:
        """Serve one request; return the bytes written into the chain (data + status).

        Raises:
            RingError: no 16-byte header or no status byte.
        """
        readable = [s for s in segments if not s.writable]
        writable = [s for s in segments if s.writable]
        if sum(s.length for s in readable) < _HEADER.size:
            raise RingError("the request has no 16-byte header in device-readable memory")
        if not writable or writable[-1].length < 1:
            raise RingError("the request has no status byte in device-writable memory")
        out = b"".join(memory.read(s.address, s.length) for s in readable)
        kind, _, sector = _HEADER.unpack_from(out)
        data_in = sum(s.length for s in writable) - 1  # room for data before the status byte
        self.requests += 1
        status, payload = self._serve(kind, sector, out[_HEADER.size :], data_in)
        reply = payload + bytes([status])
        written = _scatter(memory, writable, payload, status)
        assert written == len(reply)
        return written

    def _serve(self, kind: int, sector: int, data: bytes, room: int) -> tuple[int, bytes]:
        """(status, data for the writable part) for one request."""
        try:
            if kind == T_IN:
                if not self._in_range(sector, room):
                    return S_IOERR, b""
                return S_OK, self.image.read(sector * SECTOR, room)
            if kind == T_OUT:
                if self.read_only or not self._in_range(sector, len(data)):
                    return S_IOERR, b""
                self.image.write(sector * SECTOR, data)
                return S_OK, b""
            if kind == T_FLUSH:
                if not self.read_only:
                    self.image.flush()
                return S_OK, b""
            if kind == T_GET_ID:
                return S_OK, self.name.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")[:room]
        except ImageError as exc:
            log.warning("virtio-blk %s: request type %d failed: %s", self.name, kind, exc)
            return S_IOERR, b""
        return S_UNSUPP, b""

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector + length // SECTOR <= self.sectors


def _scatter(memory: GuestMemory, writable: list[Segment], payload: bytes, status: int) -> int:
    """Write ``payload`` over the writable segments and the status as the very last byte."""
    pos = 0
    for segment in writable:
        if pos >= len(payload):
            break
        chunk = payload[pos : pos + segment.length]
        memory.write(segment.address, chunk)
        pos += len(chunk)
    last = writable[-1]
    memory.write(last.address + last.length - 1, bytes([status]))
    return len(payload) + 1

"""The VHDX log: finding the active sequence of a dirty log and replaying it in memory.

A VHDX writer puts every metadata change in the log first (MS-VHDX section
2.3), so a file that was not closed cleanly has a non-null log GUID in its
header and log entries carrying that GUID; it is consistent only once they
are replayed. virtkit replays the active sequence *in memory*: the file is
not modified (a read-only open must not write), and every read of the file
sees the bytes the replay would have written. ``qemu-img check -r all``
replays the same log into the file; the two read the same disk.

The search follows QEMU's ``vhdx_log_search`` (``block/vhdx-log.c``): the
log is a circular buffer of 4 KiB sectors; an entry is valid when its
signature, log GUID, non-zero sequence number, length, descriptors (``desc``
and ``zero``, sequence numbers matching, 4 KiB aligned), data sectors
(signature and split sequence number) and CRC-32C all check out; a sequence
is a run of valid entries with consecutive sequence numbers, and the one
with the highest sequence number is replayed. A log GUID with no valid entry
needs no replay.

Bounds: the log is read sector by sector; a log longer than 16 MiB, or
replay data (zeroed ranges included) past 256 MiB, is refused rather than
held in memory, and the search reads at most 16 sectors per log sector.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

from virtkit.errors import CorruptImageError, UnsupportedFeatureError
from virtkit.images.storage import Storage
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx.crc import crc32c

__all__ = ["ReplayedStorage", "find_sequence", "replayed_view"]

SECTOR = 4096
MAX_LOG = 16 << 20
#: Sector reads allowed per log sector while searching (a hostile log full of entry
#: headers with bad checksums would otherwise cost quadratic time).
_READS_PER_SECTOR = 16
MAX_REPLAY = 256 << 20
_DESC = struct.Struct("<4sIQQQ")  # signature, trailing/reserved, leading/zero length, offset, seq
_DESC_SIG = b"desc"
_ZERO_SIG = b"zero"
_DATA_SIG = b"data"


@attrs.frozen
class Patch:
    """One write the replay makes: ``data`` (or ``zero_length`` zero bytes) at ``offset``."""

    offset: int
    data: bytes = b""
    zero_length: int = 0

    @property
    def end(self) -> int:
        """First file offset past the patch."""
        return self.offset + (self.zero_length or len(self.data))


@attrs.frozen
class Entry:
    """A valid log entry: its header fields and the writes it describes."""

    sequence: int
    sectors: int
    flushed_file_offset: int
    last_file_offset: int
    patches: tuple[Patch, ...]


class _Log:
    """The circular log region, read one 4 KiB sector at a time."""

    def __init__(self, st: Storage, header: L.Header) -> None:
        self.st = st
        self.offset = header.log_offset
        self.length = header.log_length
        self.guid = header.log_guid
        self.budget = _READS_PER_SECTOR * (self.length // SECTOR)

    def sector(self, index: int) -> bytes:
        self.budget -= 1
        if self.budget < 0:
            raise CorruptImageError(
                "VHDX: the log is too damaged to search (too many invalid entries)",
                path=self.st.path,
                offset=self.offset,
            )
        pos = (index % (self.length // SECTOR)) * SECTOR
        data = self.st.pread(self.offset + pos, SECTOR)
        return data + bytes(SECTOR - len(data))

    def entry(self, start: int) -> Entry | None:
        """The valid entry whose header is in sector ``start``, or None."""
        first = self.sector(start)
        sig, _crc, length, _tail, seq, count, _r, guid, flushed, last = L.LOG_HEADER.unpack_from(
            first, 0
        )
        if (
            sig != L.LOG_SIGNATURE
            or guid != self.guid
            or not seq
            or not length
            or length % SECTOR
            or length > self.length
            or count * _DESC.size > length
        ):
            return None
        sectors = length // SECTOR
        desc_sectors = -(-(count + 2) // 128)
        if desc_sectors > sectors:
            return None
        raw = [first] + [self.sector(start + i) for i in range(1, sectors)]
        block = bytearray(b"".join(raw[:desc_sectors]))
        stored = struct.unpack_from("<I", block, 4)[0]
        block[4:8] = bytes(4)
        crc = crc32c(block)
        for s in raw[desc_sectors:]:
            crc = crc32c(s, crc)
        if crc != stored:
            return None
        patches: list[Patch] = []
        data_index = desc_sectors
        for i in range(count):
            dsig, trailing, lead, offset, dseq = _DESC.unpack_from(
                block, L.LOG_HEADER.size + 32 * i
            )
            if dseq != seq or offset % SECTOR:
                return None
            if dsig == _ZERO_SIG:
                if lead % SECTOR:
                    return None
                patches.append(Patch(offset, zero_length=lead))
            elif dsig == _DESC_SIG:
                if data_index >= sectors:
                    return None
                data = raw[data_index]
                data_index += 1
                high, low = (
                    struct.unpack_from("<I", data, 4)[0],
                    struct.unpack_from("<I", data, 4092)[0],
                )
                if data[:4] != _DATA_SIG or (high << 32 | low) != seq:
                    return None
                payload = struct.pack("<Q", lead) + data[8:4092] + struct.pack("<I", trailing)
                patches.append(Patch(offset, payload))
            else:
                return None
        return Entry(seq, sectors, flushed, last, tuple(patches))


def find_sequence(st: Storage, header: L.Header) -> list[Entry]:
    """The active log sequence (empty when nothing needs replaying).

    Raises:
        UnsupportedFeatureError: a log too long to replay in memory.
        CorruptImageError: a misaligned log region.
    """
    if header.log_guid == L.NULL_GUID or not header.log_length:
        return []
    if header.log_offset < L.MiB or header.log_offset % L.MiB or header.log_length % L.MiB:
        raise CorruptImageError("VHDX: the log region is not 1 MiB aligned", path=st.path,
                                offset=header.log_offset)  # fmt: skip
    if header.log_version != 0:
        raise UnsupportedFeatureError(
            f"VHDX: log version {header.log_version} (only 0 is defined)",
            feature="vhdx log version",
            path=st.path,
        )
    if header.log_length > MAX_LOG:
        raise UnsupportedFeatureError(
            f"VHDX: a {header.log_length}-byte log needs replay; virtkit replays logs of at "
            f"most {MAX_LOG} bytes. Replay it with 'qemu-img check -r all'",
            feature="vhdx log replay",
            path=st.path,
        )
    log = _Log(st, header)
    total = header.log_length // SECTOR
    best: list[Entry] = []
    index = 0
    while index < total:
        entry = log.entry(index)
        if entry is None:
            index += 1
            continue
        run = [entry]
        pos = index + entry.sectors
        while len(run) < total:
            nxt = log.entry(pos)
            if nxt is None or nxt.sequence != run[-1].sequence + 1:
                break
            run.append(nxt)
            pos += nxt.sectors
        if not best or run[-1].sequence > best[-1].sequence:
            best = run
        index = pos if pos < total else total  # a run that wraps around ends the scan
    return best


class ReplayedStorage:
    """A read-only view of a file as it is after the log's writes (the file is not touched)."""

    replayed = True

    def __init__(self, st: Storage, patches: list[Patch], size: int) -> None:
        self._st = st
        self.path = st.path
        self._patches = patches
        self._size = size

    def pread(self, offset: int, length: int) -> bytes:
        """Read from the file, then apply every replayed write that overlaps, in log order."""
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        data = bytearray(self._st.pread(offset, end - offset))
        data += bytes(end - offset - len(data))
        for p in self._patches:
            a, b = max(p.offset, offset), min(p.end, end)
            if a >= b:
                continue
            if p.zero_length:
                data[a - offset : b - offset] = bytes(b - a)
            else:
                data[a - offset : b - offset] = p.data[a - p.offset : b - p.offset]
        return bytes(data)

    def size(self) -> int:
        """The file's length after the replay."""
        return self._size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._st, name)


def replayed_view(st: Storage, header: L.Header) -> Storage:
    """``st`` itself for a clean file, else a :class:`ReplayedStorage` of the replayed log.

    Raises:
        CorruptImageError: the log says the file was truncated.
        UnsupportedFeatureError: a log too large to replay in memory.
    """
    entries = find_sequence(st, header)
    if not entries:
        return st
    file_size = st.size()
    patches: list[Patch] = []
    size = file_size
    held = 0
    for entry in entries:
        if entry.flushed_file_offset > file_size:
            raise CorruptImageError(
                f"VHDX: the log was written when the file was {entry.flushed_file_offset} bytes; "
                f"it is {file_size} now (truncated)",
                path=st.path,
            )
        for p in entry.patches:
            held += p.zero_length or len(p.data)
            if held > MAX_REPLAY or p.end > L.MAX_VIRTUAL_SIZE + (64 << 30):
                raise UnsupportedFeatureError(
                    "VHDX: the log's replay is too large to hold in memory; replay it with "
                    "'qemu-img check -r all'",
                    feature="vhdx log replay",
                    path=st.path,
                )
            patches.append(p)
            size = max(size, p.end)
        if entry.last_file_offset > size:
            size = -(-entry.last_file_offset // L.MiB) * L.MiB
    return ReplayedStorage(st, patches, size)

"""The VHDX log: finding entries that still have to be replayed.

A VHDX writer puts every metadata change in the log first (MS-VHDX section
2.3), so a file that was not closed cleanly has a non-null log GUID in its
header and log entries carrying that GUID. Such a file is only consistent
after the entries are replayed. virtkit does not replay logs: it finds
whether any valid entry is pending (signature, log GUID, non-zero sequence,
length and CRC-32C all right, as QEMU's ``vhdx_log_search`` accepts them) so
that opening such a file is refused with a clear error instead of reading
stale metadata. A log GUID with no valid entry behind it needs no replay.
"""

from __future__ import annotations

from virtkit.images.storage import Storage
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx.crc import crc32c

__all__ = ["pending_log_entries"]

SECTOR = 4096
#: Longest entry whose checksum is verified; a longer one with the right GUID counts
#: as pending without it (a refusal either way, and memory and time stay bounded).
_MAX_CHECKED = 16 << 20


def _entry_ok(st: Storage, start: int, length: int, log_end: int) -> bool:
    if start + length > log_end:
        return False
    if length > _MAX_CHECKED:
        return True
    crc = 0
    first = True
    for pos in range(start, start + length, L.MiB):
        chunk = bytearray(st.pread(pos, min(L.MiB, start + length - pos)))
        if first:
            stored = int.from_bytes(chunk[4:8], "little")
            chunk[4:8] = b"\0\0\0\0"
            first = False
        crc = crc32c(chunk, crc)
    return crc == stored


def pending_log_entries(st: Storage, header: L.Header, file_size: int) -> int:
    """Count the valid log entries that carry the header's log GUID."""
    start = header.log_offset
    end = min(start + header.log_length, file_size)
    found = 0
    pos = start
    while pos + SECTOR <= end:
        block = st.pread(pos, L.LOG_HEADER.size)
        if len(block) < L.LOG_HEADER.size:
            break
        sig, _crc, length, _tail, seq, _n, _r, guid, _flushed, _last = L.LOG_HEADER.unpack(block)
        if (
            sig == L.LOG_SIGNATURE
            and guid == header.log_guid
            and seq
            and length
            and length % SECTOR == 0
            and _entry_ok(st, pos, length, end)
        ):
            found += 1
            pos += length
            continue
        pos += SECTOR
    return found

"""CRC-32C (Castagnoli), the checksum of VHDX headers, region tables and log entries.

The standard library has only the IEEE CRC-32 (``zlib.crc32``); VHDX uses the
Castagnoli polynomial (reflected ``0x82F63B78``), initial value and final XOR
``0xFFFFFFFF``, as QEMU's ``util/crc32c.c``. The structures it covers are
small (4 KiB headers, 64 KiB region tables), so a table-driven loop is enough.
"""

from __future__ import annotations

__all__ = ["crc32c"]


def _table() -> tuple[int, ...]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_TABLE = _table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the CRC-32C of ``data``, continuing from a previous result ``crc``.

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    table = _TABLE
    c = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF

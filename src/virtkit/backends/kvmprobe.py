"""The KVM probe guest, shared by the backends that must tell whether KVM really works.

A boot sector that prints ``R`` in real mode, enters protected mode (``P``),
long mode with paging (``L``), clears 64 MiB of RAM through the page tables
(``M``), then powers off. A healthy KVM runs it in milliseconds; a KVM that
initialises but cannot run guests usefully does not print the full marker in
time. :mod:`virtkit.backends.qemu.accel` documents the source.
"""

from __future__ import annotations

__all__ = ["PROBE_MARKER", "PROBE_TIMEOUT", "probe_image"]

PROBE_MARKER = b"RPLM"
PROBE_TIMEOUT = 4.0

_PROBE_HEX = (
    "fa31c08ed88ed0bc007cbaf803b052ee0f0116f07c0f20c00c010f22c0ea227c080066b810008ed8"
    "8ec08ed066baf803b050eebf0010000031c0b9000c0000f3abc7050010000003200000c705002000"
    "0003300000bf00300000b883000000b9000200008907050000200083c708e2f4b8001000000f22d8"
    "0f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d000000800f22c0eaa17c000018"
    "0066baf803b04ceebf00004000b9000080004831c0f348ab66baf803b04deeb00aee66ba040666b8"
    "002066eff4ebfd900000000000000000ffff0000009acf00ffff00000092cf00ffff0000009aaf00"
    "1f00d07c0000"
)


def probe_image() -> bytes:
    """The 512-byte probe boot sector."""
    code = bytes.fromhex(_PROBE_HEX)
    return code + b"\0" * (510 - len(code)) + b"\x55\xaa"

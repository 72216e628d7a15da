"""ACPI tables for the emulated PC: RSDP, XSDT/RSDT, FADT, FACS and a DSDT.

The tables describe what the machine has, the way QEMU's ``pc`` machine does
on a PIIX4 (``hw/i386/acpi-build.c``) and its ``microvm`` machine announces
virtio-mmio devices:

* the RSDP (ACPI 2.0+, revision 2) points at an RSDT and an XSDT, each
  listing the FADT;
* the FADT (revision 3, 244 bytes) names the PIIX4 PM registers that
  :mod:`virtkit.backends.emulator.chipset` decodes at 0x600 (PM1a event block,
  PM1a control block, the 24-bit PM timer), the SCI on IRQ 9, the reset
  register (port 0xCF9, value 6), a fixed-feature power button, no sleep
  button, legacy devices present but no i8042 (so Linux does not probe a
  keyboard controller the machine only half has), and no ``SMI_CMD`` (the
  machine is always in ACPI mode);
* the FACS (64 bytes, 64-byte aligned) the FADT must point at on
  non-reduced hardware;
* the DSDT, hand-assembled AML: ``\\_S5`` (SLP_TYP 0 — PIIX4's soft-off
  type, which the chipset turns into a power-off), ``\\_SB.COM1`` (PNP0501 at
  0x3F8, IRQ 4) and one ``\\_SB.VRnn`` per virtio-mmio device (``_HID``
  ``LNRO0005``, a ``Memory32Fixed`` window and a level-triggered interrupt),
  which is how a kernel without ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`` finds
  them.

There is no MADT: the machine has no APIC, and the kernel runs on the 8259
PIC (``nolapic noapic``).

References: the ACPI 6.x specification (5.2.5 RSDP, 5.2.7 RSDT, 5.2.8 XSDT,
5.2.9 FADT, 5.2.10 FACS, 6.4 resource descriptors, 20 AML encoding). The
tests check every table with ACPICA's ``iasl -d``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs

from virtkit.errors import ConfigError

__all__ = [
    "RSDP_ADDRESS",
    "SCI_IRQ",
    "TABLES_SIZE",
    "AcpiTables",
    "MmioDeviceInfo",
    "build_tables",
]

#: where the RSDP goes: the BIOS area Linux scans (0xE0000-0xFFFFF), 16-byte aligned
RSDP_ADDRESS = 0xE0000
#: room the tables are given in RAM (an e820 ACPI-reclaim range)
TABLES_SIZE = 0x4000
SCI_IRQ = 9
PM_BASE = 0x600  # PIIX4 PM I/O base, as chipset.py decodes it
RESET_PORT = 0xCF9
RESET_VALUE = 0x06  # RST_CPU | SYS_RST: chipset.py resets on bit 2
COM1_PORT = 0x3F8
COM1_IRQ = 4

OEM_ID = b"VIRTKT"
OEM_TABLE_ID = b"VKPC    "
CREATOR_ID = b"VKIT"

_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # the common system description table header
_FADT_LENGTH = 244
_FADT_REVISION = 3
_FACS_LENGTH = 64

# FADT flags (ACPI 5.2.9, table 5.10)
_WBINVD = 1 << 0
_PROC_C1 = 1 << 2
_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button (and none in the DSDT)
_FIX_RTC = 1 << 6  # set: the RTC cannot wake the machine
_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags
_LEGACY_DEVICES = 1 << 0


@attrs.frozen
class MmioDeviceInfo:
    """One virtio-mmio device as the DSDT announces it.

    Attributes:
        base: guest-physical address of its register window.
        size: length of the window in bytes.
        irq: its interrupt line (an ISA IRQ: the machine has only the PIC).
    """

    base: int
    size: int
    irq: int


@attrs.frozen
class AcpiTables:
    """The built tables: the RSDP and one blob of tables, each for a fixed address.

    Attributes:
        rsdp_address: where :attr:`rsdp` must be written.
        rsdp: the 36-byte Root System Description Pointer.
        address: where :attr:`blob` must be written (the e820 ACPI range starts here).
        blob: FACS, DSDT, FADT, XSDT and RSDT, back to back.
        offsets: each table's signature to its guest-physical address.
    """

    rsdp_address: int
    rsdp: bytes = attrs.field(repr=False)
    address: int
    blob: bytes = attrs.field(repr=False)
    offsets: dict[str, int]

    def table(self, signature: str) -> bytes:
        """One table's bytes, by signature (``"DSDT"``, ``"FACP"``, ...).

        Raises:
            KeyError: there is no such table.
        """
        start = self.offsets[signature] - self.address
        if signature == "FACS":
            return self.blob[start : start + _FACS_LENGTH]
        (length,) = struct.unpack_from("<I", self.blob, start + 4)
        return self.blob[start : start + length]


# -- AML (ACPI 20.2) -----------------------------------------------------------------------------
def _pkg_length(body_length: int) -> bytes:
    """PkgLength for a body of ``body_length`` bytes (the encoding counts itself)."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ConfigError(f"an AML object of {body_length} bytes is too large", field="acpi")


def _name_seg(name: str) -> bytes:
    if not 1 <= len(name) <= 4 or not all(c.isupper() or c.isdigit() or c == "_" for c in name):
        raise ConfigError(f"{name!r} is not an ACPI name segment", field="acpi")
    if name[0].isdigit():
        raise ConfigError(f"ACPI name {name!r} must not start with a digit", field="acpi")
    return name.ljust(4, "_").encode()


def _name_string(path: str) -> bytes:
    """A NameString: ``\\`` for the root, then one segment or a DualNamePath."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = b"\\", path[1:]
    segments = [_name_seg(s) for s in path.split(".")] if path else []
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + b"\x2e" + segments[0] + segments[1]
    return prefix + b"\x2f" + bytes([len(segments)]) + b"".join(segments)


def aml_integer(value: int) -> bytes:
    """The shortest AML encoding of an integer constant."""
    if not 0 <= value < 1 << 64:
        raise ConfigError(f"{value} is not a 64-bit AML integer", field="acpi")
    if value in (0, 1):
        return bytes([value])  # ZeroOp, OneOp
    for prefix, fmt in ((0x0A, "<B"), (0x0B, "<H"), (0x0C, "<I"), (0x0E, "<Q")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    raise AssertionError("unreachable")  # pragma: no cover


def aml_string(text: str) -> bytes:
    """A StringPrefix constant (ASCII, NUL-terminated)."""
    return b"\x0d" + text.encode("ascii") + b"\0"


def eisa_id(text: str) -> int:
    """A compressed EISA ID (``"PNP0501"``) as the 32-bit integer AML stores."""
    if len(text) != 7 or not text[:3].isupper() or not text[:3].isalpha():
        raise ConfigError(f"{text!r} is not an EISA ID (3 letters, 4 hex digits)", field="acpi")
    letters = [(ord(c) - 0x40) & 0x1F for c in text[:3]]
    digits = int(text[3:], 16)
    word = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    raw = struct.pack(">HH", word, digits)
    return int.from_bytes(raw, "little")


def aml_name(path: str, value: bytes) -> bytes:
    """``Name (path, value)``."""
    return b"\x08" + _name_string(path) + value


def aml_package(elements: Sequence[bytes]) -> bytes:
    """``Package () { elements }``."""
    body = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + _pkg_length(len(body)) + body


def aml_buffer(data: bytes) -> bytes:
    """``Buffer () { data }``."""
    body = aml_integer(len(data)) + data
    return b"\x11" + _pkg_length(len(body)) + body


def aml_scope(path: str, terms: Sequence[bytes]) -> bytes:
    """``Scope (path) { terms }``."""
    body = _name_string(path) + b"".join(terms)
    return b"\x10" + _pkg_length(len(body)) + body


def aml_device(name: str, terms: Sequence[bytes]) -> bytes:
    """``Device (name) { terms }``."""
    body = _name_string(name) + b"".join(terms)
    return b"\x5b\x82" + _pkg_length(len(body)) + body


# -- resource descriptors (ACPI 6.4) ---------------------------------------------------------------
def resource_template(descriptors: Sequence[bytes]) -> bytes:
    """``ResourceTemplate () { ... }``: the descriptors and an end tag, as a buffer."""
    return aml_buffer(b"".join(descriptors) + b"\x79\x00")  # end tag, checksum 0 (= valid)


def res_memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """``Memory32Fixed (ReadWrite, base, length)``."""
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def res_interrupt(irq: int, *, level: bool, active_high: bool = True) -> bytes:
    """``Interrupt (ResourceConsumer, Level|Edge, ActiveHigh|Low, Exclusive) { irq }``."""
    flags = 0x01 | (0 if level else 0x02) | (0 if active_high else 0x04)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, irq)


def res_io(port: int, length: int) -> bytes:
    """``IO (Decode16, port, port, 0, length)``."""
    return struct.pack("<BBHHBB", 0x47, 0x01, port, port, 0, length)


def res_irq_noflags(irq: int) -> bytes:
    """``IRQNoFlags () { irq }``."""
    return struct.pack("<BH", 0x22, 1 << irq)


# -- tables ---------------------------------------------------------------------------------------
def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: header (checksum filled in) and body."""
    header = _HEADER.pack(
        signature,
        _HEADER.size + len(body),
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID[:4] + signature,
        1,
        CREATOR_ID,
        1,
    )
    table = bytearray(header + body)
    table[9] = _checksum(bytes(table))
    return bytes(table)


def _gas_io(port: int, bits: int) -> bytes:
    """A Generic Address Structure for an I/O port block."""
    access = {8: 1, 16: 2, 32: 3}.get(bits, 0)
    return struct.pack("<BBBBQ", 1, bits, 0, access, port)


def build_dsdt(devices: Sequence[MmioDeviceInfo], *, com1: bool = True) -> bytes:
    """The DSDT: ``\\_S5``, COM1 and one ``LNRO0005`` device per virtio-mmio window."""
    system_bus: list[bytes] = []
    if com1:
        system_bus.append(
            aml_device(
                "COM1",
                [
                    aml_name("_HID", b"\x0c" + struct.pack("<I", eisa_id("PNP0501"))),
                    aml_name("_UID", aml_integer(1)),
                    aml_name(
                        "_CRS",
                        resource_template([res_io(COM1_PORT, 8), res_irq_noflags(COM1_IRQ)]),
                    ),
                ],
            )
        )
    for index, device in enumerate(devices):
        system_bus.append(
            aml_device(
                f"VR{index:02d}",
                [
                    aml_name("_HID", aml_string("LNRO0005")),
                    aml_name("_UID", aml_integer(index)),
                    aml_name("_CCA", aml_integer(1)),
                    aml_name(
                        "_CRS",
                        resource_template(
                            [
                                res_memory32_fixed(device.base, device.size),
                                res_interrupt(device.irq, level=True),
                            ]
                        ),
                    ),
                ],
            )
        )
    terms = [
        # SLP_TYPa, SLP_TYPb, reserved, reserved: PIIX4's S5 sleep type is 0
        aml_name("\\_S5", aml_package([aml_integer(0)] * 4)),
        aml_scope("\\_SB", system_bus),
    ]
    return _sdt(b"DSDT", 2, b"".join(terms))


def build_fadt(*, facs: int, dsdt: int) -> bytes:
    """The FADT (revision 3) for the PIIX4 PM block at ``PM_BASE``."""
    body = bytearray(_FADT_LENGTH - _HEADER.size)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - _HEADER.size, *values)

    def put_bytes(offset: int, data: bytes) -> None:
        start = offset - _HEADER.size
        body[start : start + len(data)] = data

    put(36, "<II", facs, dsdt)
    put(45, "<B", 0)  # preferred PM profile: unspecified
    put(46, "<H", SCI_IRQ)
    put(48, "<I", 0)  # SMI_CMD 0: no SMM, always in ACPI mode
    put(56, "<I", PM_BASE)  # PM1a_EVT_BLK: PM1_STS, PM1_EN
    put(64, "<I", PM_BASE + 4)  # PM1a_CNT_BLK
    put(76, "<I", PM_BASE + 8)  # PM_TMR_BLK
    put(88, "<BBBB", 4, 2, 0, 4)  # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    put(96, "<HH", 0xFFF, 0xFFFF)  # P_LVL2/3 latencies above the limits: no C2/C3
    put(108, "<B", 0x32)  # CMOS index of the century, as chipset.py keeps it
    put(109, "<H", _LEGACY_DEVICES)
    put(112, "<I", _WBINVD | _PROC_C1 | _SLP_BUTTON | _FIX_RTC | _RESET_REG_SUP)
    put_bytes(116, _gas_io(RESET_PORT, 8))
    put(128, "<B", RESET_VALUE)
    # X_FIRMWARE_CTRL stays 0: with both set ACPICA installs the FACS twice (as QEMU, 32-bit only)
    put(140, "<Q", dsdt)  # X_DSDT
    put_bytes(148, _gas_io(PM_BASE, 32))  # X_PM1a_EVT_BLK
    put_bytes(172, _gas_io(PM_BASE + 4, 16))  # X_PM1a_CNT_BLK
    put_bytes(208, _gas_io(PM_BASE + 8, 32))  # X_PM_TMR_BLK
    return _sdt(b"FACP", _FADT_REVISION, bytes(body))


def build_facs() -> bytes:
    """The FACS: no firmware waking vector, no global lock owner."""
    facs = bytearray(_FACS_LENGTH)
    struct.pack_into("<4sI", facs, 0, b"FACS", _FACS_LENGTH)
    facs[32] = 2  # version
    return bytes(facs)


def build_rsdp(*, rsdt: int, xsdt: int) -> bytes:
    """The ACPI 2.0 RSDP (36 bytes) with both checksums."""
    rsdp = bytearray(
        struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt, 36, xsdt, 0, b"")
    )
    rsdp[8] = _checksum(bytes(rsdp[:20]))
    rsdp[32] = _checksum(bytes(rsdp))
    return bytes(rsdp)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def build_tables(
    address: int,
    devices: Sequence[MmioDeviceInfo] = (),
    *,
    com1: bool = True,
    rsdp_address: int = RSDP_ADDRESS,
) -> AcpiTables:
    """All tables, laid out for the RAM range starting at ``address``.

    Args:
        address: guest-physical start of the ACPI range (64-byte aligned,
            below 4 GiB: the RSDT holds 32-bit pointers).
        devices: virtio-mmio windows to announce in the DSDT.
        com1: whether to describe COM1.
        rsdp_address: where the RSDP will be written (16-byte aligned, in
            0xE0000-0xFFFFF where an OS scans for it).

    Raises:
        ConfigError: an address is misaligned or out of range, a device's
            window or IRQ is invalid, or the tables outgrow ``TABLES_SIZE``.
    """
    if address % 64 or not 0 < address < (1 << 32) - TABLES_SIZE:
        raise ConfigError(
            f"the ACPI tables need a 64-byte aligned address below 4 GiB (got {address:#x})",
            field="acpi",
        )
    if rsdp_address % 16 or not 0xE0000 <= rsdp_address <= 0xFFFFF - 36:
        raise ConfigError(
            f"the RSDP must be 16-byte aligned in 0xE0000-0xFFFFF (got {rsdp_address:#x})",
            field="acpi",
        )
    for device in devices:
        if not (device.size > 0 and device.base >= 0 and device.base + device.size <= 1 << 32):
            raise ConfigError(
                f"virtio-mmio window {device.base:#x}+{device.size:#x} is not below 4 GiB",
                field="acpi",
            )
        if not 0 <= device.irq < 16 or device.irq in (0, 2, 8):
            raise ConfigError(
                f"virtio-mmio IRQ {device.irq} is not a free ISA IRQ of the PIC", field="acpi"
            )
    facs_at = address
    dsdt = build_dsdt(devices, com1=com1)
    dsdt_at = facs_at + _FACS_LENGTH
    fadt_at = _align(dsdt_at + len(dsdt), 8)
    fadt = build_fadt(facs=facs_at, dsdt=dsdt_at)
    xsdt_at = _align(fadt_at + len(fadt), 8)
    xsdt = _sdt(b"XSDT", 1, struct.pack("<Q", fadt_at))
    rsdt_at = _align(xsdt_at + len(xsdt), 8)
    rsdt = _sdt(b"RSDT", 1, struct.pack("<I", fadt_at))
    end = rsdt_at + len(rsdt)
    if end - address > TABLES_SIZE:
        raise ConfigError(
            f"the ACPI tables take {end - address} bytes, more than the {TABLES_SIZE} reserved",
            field="acpi",
        )
    blob = bytearray(end - address)
    for at, data in (
        (facs_at, build_facs()),
        (dsdt_at, dsdt),
        (fadt_at, fadt),
        (xsdt_at, xsdt),
        (rsdt_at, rsdt),
    ):
        blob[at - address : at - address + len(data)] = data
    return AcpiTables(
        rsdp_address=rsdp_address,
        rsdp=build_rsdp(rsdt=rsdt_at, xsdt=xsdt_at),
        address=address,
        blob=bytes(blob),
        offsets={
            "FACS": facs_at,
            "DSDT": dsdt_at,
            "FACP": fadt_at,
            "XSDT": xsdt_at,
            "RSDT": rsdt_at,
        },
    )

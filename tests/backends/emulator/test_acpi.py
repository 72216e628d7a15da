"""The emulator's ACPI tables, checked with ACPICA's own tools (iasl, acpixtract).

Every table is disassembled with ``iasl -d`` and the names and values are
read back from the disassembly; the DSDT's disassembly is compiled again and
must give our AML byte for byte; the RSDP (which iasl cannot disassemble) is
compiled by iasl's data-table compiler from our field values and must equal
ours, checksums included.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from virtkit import ConfigError
from virtkit.backends.emulator.acpi import (
    RSDP_ADDRESS,
    TABLES_SIZE,
    AcpiTables,
    MmioDeviceInfo,
    _pkg_length,
    build_tables,
    eisa_id,
)

ADDRESS = 0x0FFF_C000  # the top 16 KiB of a 256 MiB machine
DEVICES = [MmioDeviceInfo(0xFEB0_0000, 0x200, 5), MmioDeviceInfo(0xFEB0_1000, 0x200, 6)]


@pytest.fixture(scope="module")
def tables() -> AcpiTables:
    return build_tables(ADDRESS, DEVICES)


def _iasl(args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        ["iasl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _disassemble(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / f"{name}.dat").write_bytes(data)
    output = _iasl(["-d", f"{name}.dat"], tmp_path)
    assert "Error" not in output and "Warning" not in output, output
    return (tmp_path / f"{name}.dsl").read_text()


def _field(dsl: str, name: str) -> str:
    """A value from iasl's data-table disassembly (``[off len] Name : value``)."""
    match = re.search(rf"(?:\]|^)\s+{re.escape(name)} : (\S+)", dsl, re.MULTILINE)
    assert match, f"{name!r} not in the disassembly"
    return match.group(1)


class TestChecksumsAndLayout:
    def test_every_table_sums_to_zero(self, tables: AcpiTables) -> None:
        """The SDT checksums, and both RSDP checksums (first 20 bytes, all 36)."""
        for signature in ("DSDT", "FACP", "XSDT", "RSDT"):
            data = tables.table(signature)
            assert data[:4] == signature.encode()
            assert sum(data) % 256 == 0, signature
        assert len(tables.rsdp) == 36
        assert sum(tables.rsdp[:20]) % 256 == 0
        assert sum(tables.rsdp) % 256 == 0

    def test_pointers_chain_from_the_rsdp(self, tables: AcpiTables) -> None:
        """RSDP -> RSDT/XSDT -> FADT -> FACS/DSDT, all inside the reserved range."""
        signature, _, _, revision, rsdt, length, xsdt = struct.unpack_from(
            "<8sB6sBIIQ", tables.rsdp
        )
        assert (signature, revision, length) == (b"RSD PTR ", 2, 36)
        assert (rsdt, xsdt) == (tables.offsets["RSDT"], tables.offsets["XSDT"])
        assert struct.unpack_from("<I", tables.table("RSDT"), 36) == (tables.offsets["FACP"],)
        assert struct.unpack_from("<Q", tables.table("XSDT"), 36) == (tables.offsets["FACP"],)
        fadt = tables.table("FACP")
        assert struct.unpack_from("<II", fadt, 36) == (
            tables.offsets["FACS"],
            tables.offsets["DSDT"],
        )
        assert tables.offsets["FACS"] % 64 == 0
        for at in tables.offsets.values():
            assert ADDRESS <= at < ADDRESS + TABLES_SIZE
        assert tables.rsdp_address == RSDP_ADDRESS and RSDP_ADDRESS % 16 == 0
        assert len(tables.blob) <= TABLES_SIZE


class TestWithAcpica:
    def test_dsdt_decompiles_with_s5_com1_and_virtio_devices(
        self, tables: AcpiTables, tmp_path: Path
    ) -> None:
        """iasl -d: \\_S5 soft-off package, PNP0501 at 0x3F8/IRQ 4, LNRO0005 windows and IRQs."""
        dsl = _disassemble(tmp_path, "dsdt", tables.table("DSDT"))
        compact = " ".join(dsl.split())
        assert (
            "Name (\\_S5, Package (0x04) // _S5_: S5 System State { Zero, Zero, Zero, Zero })"
            in compact
        )
        assert 'Device (COM1) { Name (_HID, EisaId ("PNP0501")' in compact
        assert "IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum" in compact
        assert "IRQNoFlags () {4}" in compact
        for index, device in enumerate(DEVICES):
            block = compact.split(f"Device (VR{index:02d})")[1]
            assert block.startswith(' { Name (_HID, "LNRO0005")')
            assert (
                f"Memory32Fixed (ReadWrite, 0x{device.base:08X}, // Address Base 0x00000200,"
                in block
            )
            assert "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) {" in block
            assert f"0x{device.irq:08X}," in block.split("}")[0] + block.split("}")[1]

    def test_dsdt_recompiles_to_the_same_aml(self, tables: AcpiTables, tmp_path: Path) -> None:
        """The disassembly compiled again by iasl gives our AML byte for byte (after the header)."""
        _disassemble(tmp_path, "dsdt", tables.table("DSDT"))
        _iasl(["-on", "-p", "again", "dsdt.dsl"], tmp_path)  # -on: keep our name paths
        again = (tmp_path / "again.aml").read_bytes()
        ours = tables.table("DSDT")
        assert again[36:] == ours[36:]
        assert again[:4] == b"DSDT" and len(again) == len(ours)

    def test_fadt_fields(self, tables: AcpiTables, tmp_path: Path) -> None:
        """iasl -d: the PM blocks chipset.py decodes, SCI 9, reset via 0xCF9, fixed power button."""
        dsl = _disassemble(tmp_path, "facp", tables.table("FACP"))
        assert _field(dsl, "Revision") == "03"
        assert _field(dsl, "Table Length") == "000000F4"
        assert _field(dsl, "SCI Interrupt") == "0009"
        assert _field(dsl, "SMI Command Port") == "00000000"
        assert _field(dsl, "PM1A Event Block Address") == "00000600"
        assert _field(dsl, "PM1A Control Block Address") == "00000604"
        assert _field(dsl, "PM Timer Block Address") == "00000608"
        assert _field(dsl, "PM1 Event Block Length") == "04"
        assert _field(dsl, "PM1 Control Block Length") == "02"
        assert _field(dsl, "Value to cause reset") == "06"
        assert "Address : 0000000000000CF9" in dsl
        assert _field(dsl, "Control Method Power Button (V1)") == "0"  # fixed feature
        assert _field(dsl, "Control Method Sleep Button (V1)") == "1"  # none
        assert _field(dsl, "Hardware Reduced (V5)") == "0"
        assert _field(dsl, "8042 Present on ports 60/64 (V2)") == "0"
        assert _field(dsl, "DSDT Address") == f"{tables.offsets['DSDT']:08X}"
        assert f"DSDT Address : {tables.offsets['DSDT']:016X}" in dsl

    def test_facs_xsdt_rsdt_disassemble(self, tables: AcpiTables, tmp_path: Path) -> None:
        """iasl -d reads the FACS and both root tables, pointing at the FADT."""
        facs = _disassemble(tmp_path, "facs", tables.table("FACS"))
        assert _field(facs, "Length") == "00000040"
        xsdt = _disassemble(tmp_path, "xsdt", tables.table("XSDT"))
        assert _field(xsdt, "ACPI Table Address   0") == f"{tables.offsets['FACP']:016X}"
        rsdt = _disassemble(tmp_path, "rsdt", tables.table("RSDT"))
        assert _field(rsdt, "ACPI Table Address   0") == f"{tables.offsets['FACP']:08X}"

    def test_rsdp_equals_what_iasl_compiles(self, tables: AcpiTables, tmp_path: Path) -> None:
        """iasl's data-table compiler, given our field values, computes the same RSDP."""
        _, _, oem, revision, rsdt, length, xsdt = struct.unpack_from("<8sB6sBIIQ", tables.rsdp)
        (tmp_path / "rsdp.asl").write_text(
            '[0008] Signature : "RSD PTR "\n'
            "[0001] Checksum : 00\n"
            f'[0006] Oem ID : "{oem.decode()}"\n'
            f"[0001] Revision : {revision:02X}\n"
            f"[0004] RSDT Address : {rsdt:08X}\n"
            f"[0004] Length : {length:08X}\n"
            f"[0008] XSDT Address : {xsdt:016X}\n"
            "[0001] Extended Checksum : 00\n"
            "[0003] Reserved : 000000\n"
        )
        _iasl(["rsdp.asl"], tmp_path)
        assert (tmp_path / "rsdp.aml").read_bytes() == tables.rsdp

    def test_acpixtract_finds_every_table(self, tables: AcpiTables, tmp_path: Path) -> None:
        """An acpidump-style dump of guest memory: acpixtract gets each table back whole."""
        dump = []
        for signature, at in [("RSDP", RSDP_ADDRESS), *tables.offsets.items()]:
            data = tables.rsdp if signature == "RSDP" else tables.table(signature)
            dump.append(f"{signature} @ 0x{at:016X}")
            for off in range(0, len(data), 16):
                chunk = data[off : off + 16]
                text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
                dump.append(f"    {off:04X}: {' '.join(f'{b:02X}' for b in chunk):<47}  {text}")
            dump.append("")
        (tmp_path / "dump.txt").write_text("\n".join(dump) + "\n")
        done = subprocess.run(
            ["acpixtract", "-a", "dump.txt"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for signature in ("DSDT", "FACP", "XSDT", "RSDT", "FACS"):
            extracted = (tmp_path / f"{signature.lower()}.dat").read_bytes()
            assert extracted == tables.table(signature), signature
        assert (tmp_path / "rsdp.dat").read_bytes() == tables.rsdp


class TestAml:
    @pytest.mark.parametrize(
        ("body", "encoded"),
        [
            (0, b"\x01"),
            (62, b"\x3f"),
            (63, b"\x41\x04"),  # 65 = 0x41: two bytes
            (4093, b"\x4f\xff"),  # 4095 still fits two bytes
            (4094, b"\x81\x00\x01"),  # 4097 = 0x1001: three bytes
        ],
    )
    def test_pkg_length(self, body: int, encoded: bytes) -> None:
        """PkgLength counts its own bytes and switches encodings at the spec's limits."""
        assert _pkg_length(body) == encoded

    def test_eisa_id(self) -> None:
        """PNP0501 compresses to 0x0105D041, as iasl's EisaId() does."""
        assert eisa_id("PNP0501") == 0x0105D041
        with pytest.raises(ConfigError, match="EISA ID"):
            eisa_id("pnp0501")


class TestBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"address": 0x1000_0010}, "64-byte aligned"),
            ({"address": 0xFFFF_F000}, "below 4 GiB"),
            ({"address": ADDRESS, "rsdp_address": 0xE0008}, "RSDP"),
            ({"address": ADDRESS, "rsdp_address": 0xD0000}, "RSDP"),
            ({"address": ADDRESS, "devices": [MmioDeviceInfo(0xFFFF_FF00, 0x200, 5)]}, "4 GiB"),
            ({"address": ADDRESS, "devices": [MmioDeviceInfo(0xFEB0_0000, 0x200, 2)]}, "IRQ 2"),
            ({"address": ADDRESS, "devices": [MmioDeviceInfo(0xFEB0_0000, 0x200, 16)]}, "IRQ 16"),
        ],
    )
    def test_refused(self, kwargs: dict[str, object], message: str) -> None:
        """Misplaced tables and impossible devices are ConfigErrors naming what is wrong."""
        with pytest.raises(ConfigError, match=message):
            build_tables(**kwargs)  # type: ignore[arg-type]

    def test_many_devices_still_fit(self) -> None:
        """Twelve devices (multi-byte package lengths) still fit the reserved range."""
        devices = [MmioDeviceInfo(0xFEB0_0000 + 0x1000 * i, 0x200, 5) for i in range(12)]
        tables = build_tables(ADDRESS, devices)
        assert sum(tables.table("DSDT")) % 256 == 0
        assert tables.table("DSDT").count(b"LNRO0005") == 12

"""BIOS services in Python: int 10h, 11h, 12h, 13h, 15h, 16h, 19h, 1Ah and the timer.

The interrupt vector table points every vector at a five-byte stub in the
BIOS ROM segment (F000:E000 + 8 * vector): ``int n`` followed by ``retf 2``
(``iret`` for hardware interrupts). Unicorn does not vector software
interrupts through the IVT; it calls the machine's interrupt hook instead,
and the machine calls :meth:`Bios.service` when the vector still points at
its stub (or the ``int`` is the stub's own). A guest that hooks a vector gets
its handler called exactly as on a PC, and can chain to the BIOS with
``pushf; call far [old]``: the stub's ``int`` then reaches Python and
``retf 2`` returns with the flags the service set (CF, ZF).

Results follow SeaBIOS, the BIOS of QEMU's ``pc`` machine, where it matters
to boot code: EDD 3.0, E820 layout, drive geometry, error codes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from virtkit.backends.emulator.cpu import FLAG_CF, FLAG_ZF
from virtkit.backends.emulator.disks import SECTOR, Drive
from virtkit.errors import ImageError

if TYPE_CHECKING:
    from virtkit.backends.emulator.machine import PcMachine

__all__ = ["BDA", "BIOS_SEGMENT", "STUB_BASE", "Bios", "stub_address"]

BIOS_SEGMENT = 0xF000
STUB_BASE = 0xE000  # offset of vector 0's stub in the BIOS segment
STUB_SIZE = 8
BDA = 0x400
EBDA_SEGMENT = 0x9FC0
SCREEN = 0xB8000
COLS, ROWS = 80, 25
TICKS_PER_DAY = 0x1800B0
HW_IRQ_VECTORS = frozenset({*range(0x08, 0x10), *range(0x70, 0x78)})

# int 13h status codes (AH)
OK = 0x00
EPARAM = 0x01
EWRITEPROTECT = 0x03
ENOTFOUND = 0x04
ECONTROLLER = 0x20

# ASCII -> PC keyboard scan code, for int 16h
_SCAN = {
    **{c: s for s, row in ((0x10, "qwertyuiop"), (0x1E, "asdfghjkl"), (0x2C, "zxcvbnm"))
       for c, s in ((ch, s + i) for i, ch in enumerate(row))},
    **{c: 0x02 + i for i, c in enumerate("1234567890")},
    " ": 0x39, "\r": 0x1C, "\n": 0x1C, "\t": 0x0F, "\b": 0x0E, "\x7f": 0x0E, "\x1b": 0x01,
    "-": 0x0C, "=": 0x0D, "[": 0x1A, "]": 0x1B, ";": 0x27, "'": 0x28, "`": 0x29,
    "\\": 0x2B, ",": 0x33, ".": 0x34, "/": 0x35,
}  # fmt: skip


def stub_address(vector: int) -> tuple[int, int]:
    """The (segment, offset) the IVT holds for ``vector`` by default."""
    return BIOS_SEGMENT, STUB_BASE + STUB_SIZE * vector


def _stub_code(vector: int) -> bytes:
    if vector == 0x08:  # timer: count the tick, call the user hook int 1Ch, return
        return bytes([0xCD, 0x08, 0xCD, 0x1C, 0xCF])
    if vector in HW_IRQ_VECTORS:
        return bytes([0xCD, vector, 0xCF])  # int n ; iret
    return bytes([0xCD, vector, 0xCA, 0x02, 0x00])  # int n ; retf 2 (keeps CF/ZF)


class Bios:
    """The BIOS of one machine: ROM, data areas and the services.

    Args:
        machine: the machine whose CPU, devices and disks the services use.
    """

    def __init__(self, machine: PcMachine) -> None:
        self.m = machine
        self.cpu = machine.cpu

    # -- power-on self test ------------------------------------------------------------------------
    def post(self) -> None:
        """Write the ROM stubs, the interrupt vector table and the BIOS data area."""
        cpu = self.cpu
        rom = bytearray(0x10000)
        for vector in range(256):
            off = STUB_BASE + STUB_SIZE * vector
            code = _stub_code(vector)
            rom[off : off + len(code)] = code
        rom[0xFFF0:0xFFF2] = b"\xcd\x19"  # reset vector: bootstrap
        rom[0xFFF5:0xFFFD] = b"11/26/26"  # BIOS date, where DOS-era code looks for it
        rom[0xFFFE] = 0xFC  # model byte: AT
        cpu.write(BIOS_SEGMENT << 4, bytes(rom))
        ivt = bytearray()
        for vector in range(256):
            seg, off = stub_address(vector)
            ivt += struct.pack("<HH", off, seg)
        cpu.write(0, bytes(ivt))
        bda = bytearray(0x100)
        if self.m.serial_present:
            struct.pack_into("<H", bda, 0x00, 0x3F8)  # COM1
        struct.pack_into("<H", bda, 0x0E, EBDA_SEGMENT)
        serial_ports = 1 if self.m.serial_present else 0
        struct.pack_into("<H", bda, 0x10, 0x0061 | (serial_ports << 9))  # equipment: VGA, FPU
        struct.pack_into("<H", bda, 0x13, 639)  # base memory in KiB
        struct.pack_into("<H", bda, 0x1A, 0x1E)  # keyboard buffer head
        struct.pack_into("<H", bda, 0x1C, 0x1E)  # keyboard buffer tail
        bda[0x49] = 0x03  # video mode 3: 80x25 colour text
        struct.pack_into("<H", bda, 0x4A, COLS)
        struct.pack_into("<H", bda, 0x63, 0x3D4)  # CRT controller port
        bda[0x75] = len(self.m.drives)
        struct.pack_into("<H", bda, 0x80, 0x1E)
        struct.pack_into("<H", bda, 0x82, 0x3E)
        bda[0x84] = ROWS - 1
        struct.pack_into("<H", bda, 0x85, 16)
        now = self.m.clock.rtc_now()  # SeaBIOS starts the tick count from the RTC
        seconds = now.hour * 3600 + now.minute * 60 + now.second
        struct.pack_into("<I", bda, 0x6C, seconds * TICKS_PER_DAY // 86400)
        cpu.write(BDA, bytes(bda))
        cpu.write(EBDA_SEGMENT << 4, b"\x01" + bytes(0x3FF))  # EBDA size: 1 KiB
        self.clear_screen()

    # -- dispatch ----------------------------------------------------------------------------------
    def service(self, vector: int) -> None:
        """Run BIOS service ``vector`` on the current registers."""
        handler = _SERVICES.get(vector)
        if handler is not None:
            handler(self)

    # -- register helpers --------------------------------------------------------------------------
    def _r(self, reg: int) -> int:
        return self.cpu.reg(reg)

    def _w(self, reg: int, value: int) -> None:
        self.cpu.set_reg(reg, value)

    def _flag(self, mask: int, on: bool) -> None:
        flags = self.cpu.eflags
        self._w(x86.UC_X86_REG_EFLAGS, (flags | mask) if on else (flags & ~mask))

    def _ret(self, ah: int) -> None:
        """Set AH to a status and CF to whether it is an error."""
        self._w(x86.UC_X86_REG_AH, ah)
        self._flag(FLAG_CF, ah != OK)

    def _lin(self, seg_reg: int, off: int) -> int:
        return ((self._r(seg_reg) & 0xFFFF) << 4) + (off & 0xFFFF)

    # -- int 10h: video ----------------------------------------------------------------------------
    def clear_screen(self) -> None:
        """Blank the text screen and home the cursor."""
        self.cpu.write(SCREEN, b"\x20\x07" * (COLS * ROWS))
        self._set_cursor(0, 0)

    def _cursor(self) -> tuple[int, int]:
        col, row = self.cpu.read(BDA + 0x50, 2)
        return row, col

    def _set_cursor(self, row: int, col: int) -> None:
        self.cpu.write(BDA + 0x50, bytes([col & 0xFF, row & 0xFF]))

    def screen_text(self) -> str:
        """The text screen, one line per row, trailing blanks removed."""
        raw = self.cpu.read(SCREEN, COLS * ROWS * 2)
        lines = []
        for row in range(ROWS):
            chars = raw[row * COLS * 2 : (row + 1) * COLS * 2 : 2]
            lines.append(chars.decode("cp437").rstrip())
        return "\n".join(lines).rstrip("\n")

    def teletype(self, char: int, attr: int = 0x07) -> None:
        """Write one character at the cursor and advance it (int 10h AH=0Eh)."""
        row, col = self._cursor()
        if char == 0x0D:
            col = 0
        elif char == 0x0A:
            row += 1
        elif char == 0x08:
            col = max(col - 1, 0)
        elif char == 0x07:
            pass
        else:
            self.cpu.write(SCREEN + (row * COLS + col) * 2, bytes([char, attr]))
            col += 1
            if col >= COLS:
                col, row = 0, row + 1
        if row >= ROWS:
            screen = self.cpu.read(SCREEN + COLS * 2, COLS * (ROWS - 1) * 2)
            self.cpu.write(SCREEN, screen + b"\x20\x07" * COLS)
            row = ROWS - 1
        self._set_cursor(row, col)

    def _int10(self) -> None:
        ah = self._r(x86.UC_X86_REG_AH)
        al = self._r(x86.UC_X86_REG_AL)
        if ah == 0x0E:
            self.teletype(al)
        elif ah == 0x00:
            self.clear_screen()
        elif ah == 0x02:
            self._set_cursor(self._r(x86.UC_X86_REG_DH), self._r(x86.UC_X86_REG_DL))
        elif ah == 0x03:
            row, col = self._cursor()
            self._w(x86.UC_X86_REG_DX, (row << 8) | col)
            self._w(x86.UC_X86_REG_CX, 0x0607)
        elif ah in (0x09, 0x0A):
            row, col = self._cursor()
            count = self._r(x86.UC_X86_REG_CX)
            attr = self._r(x86.UC_X86_REG_BL) if ah == 0x09 else 0x07
            pos = row * COLS + col
            count = min(count, COLS * ROWS - pos)
            self.cpu.write(SCREEN + pos * 2, bytes([al, attr]) * count)
        elif ah in (0x06, 0x07) and al == 0:
            self.cpu.write(SCREEN, b"\x20\x07" * (COLS * ROWS))
        elif ah == 0x0F:
            self._w(x86.UC_X86_REG_AX, (COLS << 8) | 0x03)
            self._w(x86.UC_X86_REG_BH, 0)
        elif ah == 0x12 and self._r(x86.UC_X86_REG_BL) == 0x10:  # EGA/VGA information
            self._w(x86.UC_X86_REG_BX, 0x0003)  # colour, 256 KiB
            self._w(x86.UC_X86_REG_CX, 0x0009)
        elif ah == 0x1A and al == 0x00:  # display combination: VGA with colour display
            self._w(x86.UC_X86_REG_AL, 0x1A)
            self._w(x86.UC_X86_REG_BX, 0x0008)
        elif ah == 0x13:
            es = self._lin(x86.UC_X86_REG_ES, self._r(x86.UC_X86_REG_BP))
            count = self._r(x86.UC_X86_REG_CX)
            text = self.cpu.read(es, count * (2 if al & 2 else 1))
            self._set_cursor(self._r(x86.UC_X86_REG_DH), self._r(x86.UC_X86_REG_DL))
            for char in text[:: 2 if al & 2 else 1]:
                self.teletype(char)

    # -- int 11h / 12h -----------------------------------------------------------------------------
    def _int11(self) -> None:
        self._w(x86.UC_X86_REG_AX, self.cpu.read16(BDA + 0x10))

    def _int12(self) -> None:
        self._w(x86.UC_X86_REG_AX, self.cpu.read16(BDA + 0x13))

    # -- int 13h: disks ----------------------------------------------------------------------------
    def _drive(self, number: int) -> Drive | None:
        for drive in self.m.drives:
            if drive.number == number:
                return drive
        return None

    def _int13(self) -> None:
        ah = self._r(x86.UC_X86_REG_AH)
        dl = self._r(x86.UC_X86_REG_DL)
        drive = self._drive(dl)
        if drive is None:
            if ah == 0x08 and dl & 0x80:  # no such hard disk: report how many there are
                self._w(x86.UC_X86_REG_DL, len(self.m.drives))
            self._status(dl, EPARAM)
            return
        status = self._disk_op(ah, drive)
        if status >= 0:  # -1: the service set AH and CF itself
            self._status(dl, status)

    def _status(self, drive: int, status: int) -> None:
        self.cpu.write(BDA + 0x74, bytes([status]))
        self.m.disk_status[drive] = status
        self._ret(status)

    def _disk_op(self, ah: int, drive: Drive) -> int:
        r = self._r
        if ah in (0x00, 0x04, 0x0C, 0x0D, 0x10, 0x11, 0x14, 0x44, 0x47):
            return OK  # reset, verify, seek, ready, recalibrate, diagnostics
        if ah == 0x01:
            return self.m.disk_status.get(drive.number, OK)
        if ah in (0x02, 0x03):
            count = r(x86.UC_X86_REG_AL)
            cx = r(x86.UC_X86_REG_CX)
            cylinder = (cx >> 8) | ((cx & 0xC0) << 2)
            lba = drive.chs_to_lba(cylinder, r(x86.UC_X86_REG_DH), cx & 0x3F)
            if lba is None or count == 0:
                self._w(x86.UC_X86_REG_AL, 0)
                return EPARAM
            buffer = self._lin(x86.UC_X86_REG_ES, r(x86.UC_X86_REG_BX))
            status = self._transfer(drive, ah == 0x03, lba, count, buffer)
            self._w(x86.UC_X86_REG_AL, count if status == OK else 0)
            return status
        if ah == 0x08:
            cyl = max(drive.cylinders - 2, 0)  # SeaBIOS keeps the last cylinder back
            self._w(
                x86.UC_X86_REG_CX,
                ((cyl & 0xFF) << 8) | ((cyl >> 2) & 0xC0) | drive.sectors_per_track,
            )
            self._w(x86.UC_X86_REG_DX, ((drive.heads - 1) << 8) | len(self.m.drives))
            self._w(x86.UC_X86_REG_AL, 0)
            self._w(x86.UC_X86_REG_BL, 0)
            return OK
        if ah == 0x15:
            self._w(x86.UC_X86_REG_CX, (drive.sectors >> 16) & 0xFFFF)
            self._w(x86.UC_X86_REG_DX, drive.sectors & 0xFFFF)
            self._flag(FLAG_CF, False)
            self._w(x86.UC_X86_REG_AH, 0x03)  # fixed disk present
            return -1
        if ah == 0x41:
            if r(x86.UC_X86_REG_BX) != 0x55AA:
                return EPARAM
            self._w(x86.UC_X86_REG_BX, 0xAA55)
            self._w(x86.UC_X86_REG_CX, 0x0007)  # fixed-disk access, locking, EDD
            self._flag(FLAG_CF, False)
            self._w(x86.UC_X86_REG_AH, 0x30)  # EDD 3.0
            return -1
        if ah in (0x42, 0x43):
            dap = self._lin(x86.UC_X86_REG_DS, r(x86.UC_X86_REG_SI))
            raw = self.cpu.read(dap, 0x18)
            size, _, count, off, seg, lba = struct.unpack_from("<BBHHHQ", raw)
            if size < 0x10:
                return EPARAM
            buffer = (seg << 4) + off
            if size >= 0x18 and (seg, off) == (0xFFFF, 0xFFFF):
                buffer = struct.unpack_from("<Q", raw, 0x10)[0]
            status = self._transfer(drive, ah == 0x43, lba, count, buffer)
            if status != OK:
                self.cpu.write16(dap + 2, 0)
            return status
        if ah == 0x48:
            table = self._lin(x86.UC_X86_REG_DS, r(x86.UC_X86_REG_SI))
            size = self.cpu.read16(table)
            if size < 0x1A:
                return EPARAM
            info = struct.pack(
                "<HHIIIQH",
                0x1E if size >= 0x1E else 0x1A,
                0x0002,  # CHS information is valid
                drive.cylinders,
                drive.heads,
                drive.sectors_per_track,
                drive.sectors,
                SECTOR,
            )
            if size >= 0x1E:
                info += b"\xff\xff\xff\xff"  # no DPTE
            self.cpu.write(table, info)
            return OK
        return EPARAM

    def _transfer(self, drive: Drive, write: bool, lba: int, count: int, buffer: int) -> int:
        if count == 0:
            return OK
        if buffer + count * SECTOR > self.cpu.memory_size and buffer < (1 << 32):
            return EPARAM
        try:
            if write:
                if drive.spec.read_only:
                    return EWRITEPROTECT
                drive.write(lba, self.cpu.read(buffer, count * SECTOR))
            else:
                self.cpu.write(buffer, drive.read(lba, count))
        except ImageError as exc:
            if lba + count > drive.sectors:
                return ENOTFOUND
            self.m.log(f"disk {drive.spec.name}: {exc}")
            return ECONTROLLER
        return OK

    # -- int 15h: system services ------------------------------------------------------------------
    def e820_map(self) -> list[tuple[int, int, int]]:
        """The E820 memory map (base, length, type) as SeaBIOS reports it on QEMU 7.2's ``pc``.

        The last entry is the reservation QEMU makes below 1 TiB for the AMD
        HyperTransport window (its default TCG CPU is an AMD one).
        """
        size = self.cpu.memory_size
        low = min(size, 0xE000_0000)
        entries = [
            (0, 0x9FC00, 1),
            (0x9FC00, 0x400, 2),
            (0xF0000, 0x10000, 2),
        ]
        if low > 0x100000:
            top = max(low - 0x20000, 0x100000)  # SeaBIOS keeps its tables at the top
            entries.append((0x100000, top - 0x100000, 1))
            entries.append((top, low - top, 2))
        entries.append((0xFFFC0000, 0x40000, 2))
        if size > low:
            entries.append((1 << 32, size - low, 1))
        entries.append((0xFD_0000_0000, 0x3_0000_0000, 2))
        return entries

    def _int15(self) -> None:
        r = self._r
        ax = r(x86.UC_X86_REG_AX)
        ah = ax >> 8
        if ax == 0xE820 and r(x86.UC_X86_REG_EDX) == 0x534D4150:
            entries = self.e820_map()
            index = r(x86.UC_X86_REG_EBX)
            if index >= len(entries) or r(x86.UC_X86_REG_ECX) < 20:
                self._ret(0x86)
                return
            base, length, kind = entries[index]
            dest = self._lin(x86.UC_X86_REG_ES, r(x86.UC_X86_REG_DI))
            self.cpu.write(dest, struct.pack("<QQI", base, length, kind))
            self._w(x86.UC_X86_REG_EAX, 0x534D4150)
            self._w(x86.UC_X86_REG_ECX, 20)
            self._w(x86.UC_X86_REG_EBX, 0 if index + 1 == len(entries) else index + 1)
            self._flag(FLAG_CF, False)
        elif ax in (0xE801, 0xE881):
            low = min(self.cpu.memory_size, 0xE000_0000)
            kb = min(max(low - 0x100000, 0) // 1024, 0x3C00)
            blocks = max(low - 0x1000000, 0) // 0x10000
            self._w(x86.UC_X86_REG_AX, kb)
            self._w(x86.UC_X86_REG_CX, kb)
            self._w(x86.UC_X86_REG_BX, blocks)
            self._w(x86.UC_X86_REG_DX, blocks)
            self._flag(FLAG_CF, False)
        elif ah == 0x88:
            kb = min(max(self.cpu.memory_size - 0x100000, 0) // 1024, 0xFC00)
            self._w(x86.UC_X86_REG_AX, kb)
            self._flag(FLAG_CF, False)
        elif ax in (0x2400, 0x2401):
            self.m.chipset.a20 = ax == 0x2401
            self._ret(OK)
        elif ax == 0x2402:
            self._w(x86.UC_X86_REG_AL, 1 if self.m.chipset.a20 else 0)
            self._ret(OK)
        elif ax == 0x2403:
            self._w(x86.UC_X86_REG_BX, 0x0003)  # keyboard controller and port 0x92
            self._ret(OK)
        elif ah == 0x87:  # move a block through a GDT the caller built (ES:SI)
            gdt = self._lin(x86.UC_X86_REG_ES, r(x86.UC_X86_REG_SI))
            words = r(x86.UC_X86_REG_CX)
            desc = self.cpu.read(gdt + 0x10, 16)
            src, dst = _segment_base(desc[:8]), _segment_base(desc[8:])
            length = words * 2
            if words > 0x8000 or max(src, dst) + length > self.cpu.memory_size:
                self._ret(0x01)  # parity error is the documented failure code
                return
            self.cpu.write(dst, self.cpu.read(src, length))
            self._ret(OK)
        elif ah == 0x86:
            micros = (r(x86.UC_X86_REG_CX) << 16) | r(x86.UC_X86_REG_DX)
            self._ret(OK)
            self.m.wait_until(self.m.clock.now_ns() + micros * 1000)
        elif ax == 0xEC00:
            self._ret(OK)
        else:
            self._ret(0x86)  # function not supported

    # -- int 16h: keyboard -------------------------------------------------------------------------
    def _key(self, byte: int) -> int:
        char = chr(byte)
        scan = _SCAN.get(char.lower(), 0)
        if byte == 0x0A:
            byte = 0x0D
        return (scan << 8) | byte

    def _int16(self) -> None:
        ah = self._r(x86.UC_X86_REG_AH)
        uart = self.m.uart
        if ah in (0x00, 0x10):
            byte = uart.pop_input()
            if byte is None:
                self.m.wait_for_input()  # runs this int 16h again when a key arrives
                return
            self._w(x86.UC_X86_REG_AX, self._key(byte))
        elif ah in (0x01, 0x11):
            byte = uart.peek_input()
            if byte is None:
                self._flag(FLAG_ZF, True)
            else:
                self._w(x86.UC_X86_REG_AX, self._key(byte))
                self._flag(FLAG_ZF, False)
        elif ah in (0x02, 0x12):
            self._w(x86.UC_X86_REG_AL, 0)
        elif ah == 0x05:
            uart.receive(bytes([self._r(x86.UC_X86_REG_CL)]))
            self._w(x86.UC_X86_REG_AL, 0)

    # -- int 1Ah: time -----------------------------------------------------------------------------
    def tick(self) -> None:
        """IRQ0 (int 08h): count a timer tick in the BIOS data area."""
        ticks = struct.unpack_from("<I", self.cpu.read(BDA + 0x6C, 4))[0] + 1
        if ticks >= TICKS_PER_DAY:
            ticks = 0
            self.cpu.write(BDA + 0x70, b"\x01")
        self.cpu.write(BDA + 0x6C, struct.pack("<I", ticks))

    def _int1a(self) -> None:
        ah = self._r(x86.UC_X86_REG_AH)
        if ah == 0x00:
            ticks = struct.unpack_from("<I", self.cpu.read(BDA + 0x6C, 4))[0]
            self._w(x86.UC_X86_REG_CX, ticks >> 16)
            self._w(x86.UC_X86_REG_DX, ticks & 0xFFFF)
            self._w(x86.UC_X86_REG_AL, self.cpu.read(BDA + 0x70, 1)[0])
            self.cpu.write(BDA + 0x70, b"\x00")
            self._flag(FLAG_CF, False)
        elif ah == 0x01:
            ticks = (self._r(x86.UC_X86_REG_CX) << 16) | self._r(x86.UC_X86_REG_DX)
            self.cpu.write(BDA + 0x6C, struct.pack("<I", ticks))
            self._flag(FLAG_CF, False)
        elif ah in (0x02, 0x04):
            now = self.m.clock.rtc_now()

            def bcd(v: int) -> int:
                return ((v // 10) << 4) | (v % 10)

            if ah == 0x02:
                self._w(x86.UC_X86_REG_CX, (bcd(now.hour) << 8) | bcd(now.minute))
                self._w(x86.UC_X86_REG_DX, bcd(now.second) << 8)
            else:
                self._w(x86.UC_X86_REG_CX, (bcd(now.year // 100) << 8) | bcd(now.year % 100))
                self._w(x86.UC_X86_REG_DX, (bcd(now.month) << 8) | bcd(now.day))
            self._flag(FLAG_CF, False)
        elif ah in (0x03, 0x05):
            self._flag(FLAG_CF, False)
        else:
            self._flag(FLAG_CF, True)

    # -- int 18h / 19h: boot -----------------------------------------------------------------------
    def _int18(self) -> None:
        self.m.fail("the guest called int 18h (boot failure): no bootable device")

    def _int19(self) -> None:
        self.m.bootstrap()

    def _int08(self) -> None:
        self.tick()
        self.m.chipset.eoi(0)


def _segment_base(descriptor: bytes) -> int:
    """The base address in an 8-byte segment descriptor."""
    d = descriptor
    return d[2] | (d[3] << 8) | (d[4] << 16) | (d[7] << 24)


def _eoi_service(irq: int) -> Callable[[Bios], None]:
    def service(bios: Bios) -> None:
        bios.m.chipset.eoi(irq)

    return service


_SERVICES: dict[int, Callable[[Bios], None]] = {
    **{0x08 + irq: _eoi_service(irq) for irq in range(1, 8)},
    0x08: Bios._int08,
    0x10: Bios._int10,
    0x11: Bios._int11,
    0x12: Bios._int12,
    0x13: Bios._int13,
    0x15: Bios._int15,
    0x16: Bios._int16,
    0x18: Bios._int18,
    0x19: Bios._int19,
    0x1A: Bios._int1a,
}

"""The PC chipset devices around the CPU, as QEMU's ``pc`` machine has them.

* ACPI PM (PIIX4 PM, I/O base 0x600 as SeaBIOS programs it): PM1a_STS at
  0x600, PM1a_EN at 0x602, PM1a_CNT at 0x604, the PM timer at 0x608.
  Writing SLP_EN with SLP_TYP 0 (``0x2000``) powers off, as on QEMU. The power
  button sets PWRBTN_STS (bit 8 of PM1a_STS) only while PWRBTN_EN (bit 8 of
  PM1a_EN) is set, exactly as QEMU's ``acpi_pm1_evt_power_down`` does; the
  guest polls or takes the SCI.
* Reset: port 0xCF9 (bit 2, RST_CPU), the keyboard controller (``0xFE`` to
  port 0x64) and port 0x92 bit 0; port 0x92 bit 1 is the A20 gate.
* The keyboard controller (8042) answers the commands an OS probes it with,
  as a controller with no keyboard and no mouse port attached: self-test
  (``0xAA`` -> 0x55), keyboard interface test (``0xAB`` -> 0), read and write
  the command byte (``0x20``/``0x60``), the output port (``0xD0``/``0xD1``,
  A20), and the mouse port tests fail at once (``0xA9`` -> 1, the ``0xD3``
  echo comes back without the mouse-data bit). Linux's i8042 driver waited
  for these answers in a ``udelay`` loop for half a second of guest time
  (10,000 status reads, millions of TSC reads).
* PIT (8254) at 0x40-0x43: channel counters read back from the clock; channel
  0's reload value sets the timer interrupt rate.
* RTC/CMOS at 0x70/0x71: time registers in BCD, status registers, memory size
  bytes as SeaBIOS reads them.
* PIC (8259) at 0x20/0x21, 0xA0/0xA1: initialisation words and masks are
  tracked so the timer interrupt goes to the vector the guest programmed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from virtkit.backends.emulator.clock import Clock

__all__ = ["PIT_HZ", "PM_TIMER_HZ", "Chipset", "Request"]

PIT_HZ = 1_193_182
PM_TIMER_HZ = 3_579_545
PM_BASE = 0x600
PWRBTN = 0x0100
#: the 8042's command byte at boot: keyboard interrupt, system flag, mouse port off, translation
KBC_CTR_DEFAULT = 0x65
#: 8042 commands answered with one fixed byte: self-test passed, keyboard interface
#: test passed, mouse interface test failed ("clock line stuck low": no mouse port)
_KBC_REPLIES = {0xAA: 0x55, 0xAB: 0x00, 0xA9: 0x01}
SLP_EN = 0x2000


class Request(enum.Enum):
    """What a device asks the machine to do."""

    POWEROFF = "poweroff"
    RESET = "reset"


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Chipset:
    """ACPI PM, reset, keyboard controller, PIT, RTC/CMOS and PIC registers.

    Args:
        clock: guest time.
        memory: guest RAM in bytes (for the CMOS memory-size bytes).
        request: called with a :class:`Request` when the guest powers off or resets.
    """

    def __init__(self, clock: Clock, memory: int, request: Callable[[Request], None]) -> None:
        self.clock = clock
        self.memory = memory
        self._request = request
        self.reset()

    def reset(self) -> None:
        """Device state as the BIOS leaves it at boot."""
        self.pm1_sts = 0
        self.pm1_en = 0
        self.pm1_cnt = 0
        self.a20 = True
        self.port61 = 0
        self.kbc_cmd = 0
        self.kbc_out = 0
        self.kbc_out_full = False  # a byte waits in the output buffer (status bit 0)
        self.kbc_ctr = KBC_CTR_DEFAULT
        self.cmos_index = 0
        self.cmos = bytearray(128)
        self._init_cmos()
        # PIT: per channel reload value, access mode, latch and the low/high toggle
        self.pit_reload = [0x10000, 0x10000, 0x10000]
        self.pit_access = [3, 3, 3]
        self.pit_mode = [3, 3, 3]  # counting mode (0-5) from the control word
        self.pit_latch: list[int | None] = [None, None, None]
        self.pit_read_hi = [False, False, False]
        self.pit_write_hi = [False, False, False]
        self.pit_start_ns = [0, 0, 0]
        # PIC: vector bases and masks as SeaBIOS programs them
        self.pic_base = [0x08, 0x70]
        self.pic_mask = [0xB8, 0x8F]
        self.pic_isr = 0  # master in-service bits: an IRQ waits for EOI before it repeats
        self._pic_icw = [0, 0]  # initialisation words still expected
        self._pic_icw_seen = [0, 0]

    def _init_cmos(self) -> None:
        c = self.cmos
        c[0x0A] = 0x26
        c[0x0B] = 0x02  # 24-hour clock, BCD
        c[0x0D] = 0x80  # battery good
        c[0x10] = 0x00  # no floppy
        c[0x14] = 0x06  # equipment: FPU, VGA-colour
        base_kb = 640
        c[0x15], c[0x16] = base_kb & 0xFF, base_kb >> 8
        ext_kb = min(max(self.memory - 0x100000, 0) // 1024, 0xFC00)
        c[0x17], c[0x18] = ext_kb & 0xFF, ext_kb >> 8
        c[0x30], c[0x31] = ext_kb & 0xFF, ext_kb >> 8
        above16 = min(max(self.memory - 0x1000000, 0) // 0x10000, 0xFFFF)
        c[0x34], c[0x35] = above16 & 0xFF, above16 >> 8
        c[0x5F] = 0  # one CPU minus one

    # -- ports ------------------------------------------------------------------------
    def handles(self, port: int) -> bool:
        """Whether ``port`` belongs to one of these devices."""
        return port in _PORTS or PM_BASE <= port < PM_BASE + 0x0C

    def read(self, port: int, size: int) -> int:
        """Guest ``in``."""
        if PM_BASE <= port < PM_BASE + 0x0C:
            return self._pm_read(port - PM_BASE, size)
        if 0x40 <= port <= 0x42:
            return self._pit_read(port - 0x40)
        if port == 0x43:
            return 0xFF
        if port == 0x61:
            # bit 4 toggles with the 15 us DRAM refresh; bit 5 is PIT channel 2's output
            refresh = (self.clock.now_ns() // 15_085) & 1
            return (self.port61 & 0x0F) | (refresh << 4) | (self._pit_output(2) << 5)
        if port == 0x70:
            return self.cmos_index
        if port == 0x71:
            return self._cmos_read(self.cmos_index & 0x7F)
        if port == 0x64:
            return 0x1C | (1 if self.kbc_out_full else 0)  # system flag, unlocked, command
        if port == 0x60:
            value, self.kbc_out, self.kbc_out_full = self.kbc_out, 0, False
            return value
        if port == 0x92:
            return 0x02 if self.a20 else 0x00
        if port in (0x20, 0xA0):
            return 0
        if port in (0x21, 0xA1):
            return self.pic_mask[port == 0xA1]
        if port == 0xCF9:
            return 0
        return 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        """Guest ``out``."""
        if PM_BASE <= port < PM_BASE + 0x0C:
            self._pm_write(port - PM_BASE, size, value)
        elif 0x40 <= port <= 0x42:
            self._pit_write(port - 0x40, value & 0xFF)
        elif port == 0x43:
            self._pit_control(value & 0xFF)
        elif port == 0x61:
            self.port61 = value & 0x0F
        elif port == 0x70:
            self.cmos_index = value & 0xFF
        elif port == 0x71:
            index = self.cmos_index & 0x7F
            if index not in (0x0C, 0x0D):
                self.cmos[index] = value & 0xFF
        elif port == 0x64:
            self._kbc_command(value & 0xFF)
        elif port == 0x60:
            if self.kbc_cmd == 0xD1:
                self.a20 = bool(value & 0x02)
                if not value & 0x01:
                    self._request(Request.RESET)
            elif self.kbc_cmd == 0x60:
                self.kbc_ctr = value & 0xFF
            elif self.kbc_cmd == 0xD3:  # echo "from the mouse": no mouse port, no mouse-data bit
                self._kbc_reply(value & 0xFF)
            self.kbc_cmd = 0
        elif port == 0x92:
            self.a20 = bool(value & 0x02)
            if value & 0x01:
                self._request(Request.RESET)
        elif port == 0xCF9:
            if value & 0x04:
                self._request(Request.RESET)
        elif port in (0x20, 0xA0, 0x21, 0xA1):
            self._pic_write(port, value & 0xFF)

    # -- keyboard controller ------------------------------------------------------------------
    def _kbc_command(self, command: int) -> None:
        """A command byte written to port 0x64 (those with a data byte wait for it)."""
        self.kbc_cmd = command
        if command == 0xFE:
            self._request(Request.RESET)
        elif command == 0xD0:
            self._kbc_reply(0x03 if self.a20 else 0x01)
        elif command == 0x20:
            self._kbc_reply(self.kbc_ctr)
        elif command in _KBC_REPLIES:
            self._kbc_reply(_KBC_REPLIES[command])

    def _kbc_reply(self, value: int) -> None:
        self.kbc_out = value
        self.kbc_out_full = True

    # -- ACPI PM --------------------------------------------------------------------------
    def press_power_button(self) -> None:
        """The ACPI power button: PWRBTN_STS latches if the guest enabled it."""
        if self.pm1_en & PWRBTN:
            self.pm1_sts |= PWRBTN

    def sci_pending(self) -> bool:
        """The level of the ACPI SCI: an enabled fixed event's status bit is set."""
        return bool(self.pm1_sts & self.pm1_en & PWRBTN)

    def _pm_read(self, offset: int, size: int) -> int:
        regs = bytearray(12)
        regs[0:2] = self.pm1_sts.to_bytes(2, "little")
        regs[2:4] = self.pm1_en.to_bytes(2, "little")
        regs[4:6] = self.pm1_cnt.to_bytes(2, "little")
        ticks = self.clock.now_ns() * PM_TIMER_HZ // 1_000_000_000
        regs[8:12] = (ticks & 0xFFFFFF).to_bytes(4, "little")
        return int.from_bytes(regs[offset : offset + size].ljust(size, b"\xff"), "little")

    def _pm_write(self, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for i, byte in enumerate(data):
            reg = offset + i
            if reg in (0, 1):  # write 1 to clear
                self.pm1_sts &= ~(byte << (8 * reg))
            elif reg in (2, 3):
                shift = 8 * (reg - 2)
                self.pm1_en = (self.pm1_en & ~(0xFF << shift)) | (byte << shift)
            elif reg in (4, 5):
                shift = 8 * (reg - 4)
                self.pm1_cnt = (self.pm1_cnt & ~(0xFF << shift)) | (byte << shift)
        if offset <= 5 < offset + size and self.pm1_cnt & SLP_EN:
            sleep_type = (self.pm1_cnt >> 10) & 7
            self.pm1_cnt &= ~SLP_EN
            if sleep_type == 0:  # QEMU's PIIX4: type 0 is S5, soft power-off
                self._request(Request.POWEROFF)

    # -- PIT --------------------------------------------------------------------------------
    def timer_period_ns(self) -> int:
        """The interval of IRQ0 (PIT channel 0), in nanoseconds."""
        return self.pit_reload[0] * 1_000_000_000 // PIT_HZ

    def _pit_count(self, channel: int) -> int:
        elapsed = (self.clock.now_ns() - self.pit_start_ns[channel]) * PIT_HZ // 1_000_000_000
        reload = self.pit_reload[channel]
        return (reload - (elapsed % reload)) & 0xFFFF

    def _pit_output(self, channel: int) -> int:
        """The counter's OUT line (channel 2's is bit 5 of port 0x61), from the clock.

        Modes 0 and 1 raise OUT when the count written runs out (Linux's TSC
        calibration waits for that); mode 2 pulses it low for one tick per
        period; mode 3 (and 4, 5, approximated) is a square wave.
        """
        elapsed = (self.clock.now_ns() - self.pit_start_ns[channel]) * PIT_HZ // 1_000_000_000
        reload = self.pit_reload[channel]
        mode = self.pit_mode[channel]
        if mode in (0, 1):
            return int(elapsed >= reload)
        if mode == 2:
            return int(elapsed % reload != reload - 1)
        return int(elapsed % reload < (reload + 1) // 2)

    def _pit_control(self, value: int) -> None:
        channel = value >> 6
        if channel == 3:
            return  # read-back command: not emulated
        access = (value >> 4) & 3
        if access == 0:
            self.pit_latch[channel] = self._pit_count(channel)
            self.pit_read_hi[channel] = False
            return
        self.pit_access[channel] = access
        mode = (value >> 1) & 7
        self.pit_mode[channel] = mode - 4 if mode > 5 else mode  # 6, 7 alias 2, 3
        self.pit_start_ns[channel] = self.clock.now_ns()
        self.pit_read_hi[channel] = False
        self.pit_write_hi[channel] = False

    def _pit_read(self, channel: int) -> int:
        latched = self.pit_latch[channel]
        count = latched if latched is not None else self._pit_count(channel)
        access = self.pit_access[channel]
        if access == 1:
            self.pit_latch[channel] = None
            return count & 0xFF
        if access == 2:
            self.pit_latch[channel] = None
            return count >> 8
        if not self.pit_read_hi[channel]:
            self.pit_read_hi[channel] = True
            if latched is None:
                self.pit_latch[channel] = count
            return count & 0xFF
        self.pit_read_hi[channel] = False
        self.pit_latch[channel] = None
        return count >> 8

    def _pit_write(self, channel: int, value: int) -> None:
        access = self.pit_access[channel]
        reload = self.pit_reload[channel] & 0xFFFF
        if access == 1:
            reload = value
        elif access == 2:
            reload = value << 8
        elif not self.pit_write_hi[channel]:
            self.pit_write_hi[channel] = True
            self.pit_reload[channel] = (reload & 0xFF00) | value or 0x10000
            return
        else:
            self.pit_write_hi[channel] = False
            reload = (reload & 0x00FF) | (value << 8)
        self.pit_reload[channel] = reload or 0x10000
        self.pit_start_ns[channel] = self.clock.now_ns()

    # -- RTC / CMOS -------------------------------------------------------------------------
    def _cmos_read(self, index: int) -> int:
        if index in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32):
            now = self.clock.rtc_now()
            value = {
                0x00: now.second,
                0x02: now.minute,
                0x04: now.hour,
                0x06: now.isoweekday() % 7 + 1,
                0x07: now.day,
                0x08: now.month,
                0x09: now.year % 100,
                0x32: now.year // 100,
            }[index]
            return _bcd(value) if not self.cmos[0x0B] & 0x04 else value
        if index == 0x0C:
            return 0
        return self.cmos[index]

    # -- PIC ----------------------------------------------------------------------------------
    def _pic_write(self, port: int, value: int) -> None:
        chip = 1 if port in (0xA0, 0xA1) else 0
        if port in (0x20, 0xA0):
            if value & 0x10:  # ICW1: ICW2, ICW3 (and ICW4 if bit 0) follow on the data port
                self._pic_icw[chip] = 3 if value & 0x01 else 2
                self._pic_icw_seen[chip] = 0
                self.pic_isr &= 0xFF00 if chip == 0 else 0x00FF
            elif value & 0x18 == 0 and value & 0x20:  # OCW2 with EOI
                isr = (self.pic_isr >> (8 * chip)) & 0xFF
                if value & 0x40:
                    self.eoi(8 * chip + (value & 7))  # specific EOI
                elif isr:
                    self.eoi(8 * chip + (isr & -isr).bit_length() - 1)
            return  # OCW3 (register selects) needs no state here
        if self._pic_icw[chip] == 0:
            self.pic_mask[chip] = value  # OCW1
            return
        if self._pic_icw_seen[chip] == 0:
            self.pic_base[chip] = value & 0xF8  # ICW2
        self._pic_icw_seen[chip] += 1
        if self._pic_icw_seen[chip] >= self._pic_icw[chip]:
            self._pic_icw[chip] = 0

    def irq_vector(self, irq: int) -> int | None:
        """The vector ``irq`` would be delivered on now, or None while it is
        masked or an IRQ of equal or higher priority awaits EOI.

        IRQs 8-15 are the slave PIC's, cascaded through the master's IRQ 2;
        ``pic_isr`` holds the master's in-service bits in bits 0-7 and the
        slave's in bits 8-15.
        """
        if irq >= 8:
            line = irq - 8
            if self.pic_mask[0] & 0x04 or self.pic_mask[1] & (1 << line):
                return None
            if self.pic_isr & 0x07 or (self.pic_isr >> 8) & ((2 << line) - 1):
                return None
            return self.pic_base[1] + line
        if self.pic_mask[0] & (1 << irq) or self.pic_isr & ((2 << irq) - 1):
            return None
        return self.pic_base[0] + irq

    def acknowledge(self, irq: int) -> None:
        """The CPU took ``irq``: it is in service until EOI (a slave IRQ also
        puts the master's cascade line 2 in service)."""
        self.pic_isr |= 1 << irq
        if irq >= 8:
            self.pic_isr |= 0x04

    def eoi(self, irq: int) -> None:
        """End of interrupt for ``irq``."""
        self.pic_isr &= ~(1 << irq)

    # -- snapshots ------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """All register state."""
        return {
            "pm1": [self.pm1_sts, self.pm1_en, self.pm1_cnt],
            "a20": self.a20,
            "port61": self.port61,
            "kbc": [self.kbc_cmd, self.kbc_out],
            "kbc_out_full": self.kbc_out_full,
            "kbc_ctr": self.kbc_ctr,
            "cmos_index": self.cmos_index,
            "cmos": bytes(self.cmos).hex(),
            "pit_mode": self.pit_mode,
            "pit": [
                self.pit_reload,
                self.pit_access,
                self.pit_latch,
                self.pit_read_hi,
                self.pit_write_hi,
                self.pit_start_ns,
            ],
            "pic": [self.pic_base, self.pic_mask, self._pic_icw, self._pic_icw_seen],
            "pic_isr": self.pic_isr,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`save` output."""
        self.pm1_sts, self.pm1_en, self.pm1_cnt = (int(v) for v in state["pm1"])
        self.a20 = bool(state["a20"])
        self.port61 = int(state["port61"])
        self.kbc_cmd, self.kbc_out = (int(v) for v in state["kbc"])
        self.kbc_out_full = bool(state.get("kbc_out_full", self.kbc_out != 0))
        self.kbc_ctr = int(state.get("kbc_ctr", KBC_CTR_DEFAULT))
        self.cmos_index = int(state["cmos_index"])
        self.cmos = bytearray(bytes.fromhex(state["cmos"]))
        reload, access, latch, read_hi, write_hi, start = state["pit"]
        self.pit_reload = [int(v) for v in reload]
        self.pit_access = [int(v) for v in access]
        self.pit_mode = [int(v) for v in state.get("pit_mode", [3, 3, 3])]
        self.pit_latch = [None if v is None else int(v) for v in latch]
        self.pit_read_hi = [bool(v) for v in read_hi]
        self.pit_write_hi = [bool(v) for v in write_hi]
        self.pit_start_ns = [int(v) for v in start]
        base, mask, icw, seen = state["pic"]
        self.pic_base = [int(v) for v in base]
        self.pic_mask = [int(v) for v in mask]
        self._pic_icw = [int(v) for v in icw]
        self._pic_icw_seen = [int(v) for v in seen]
        self.pic_isr = int(state.get("pic_isr", 0))


_PORTS = frozenset({0x20, 0x21, 0x40, 0x41, 0x42, 0x43, 0x60, 0x61, 0x64, 0x70, 0x71, 0x92})
_PORTS = _PORTS | {0xA0, 0xA1, 0xCF9}

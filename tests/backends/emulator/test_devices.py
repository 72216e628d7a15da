"""The emulated devices on their own: UART, chipset (ACPI, PIT, RTC, PIC, reset), clock, disks."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtkit import images
from virtkit.backends.emulator.chipset import PIT_HZ, Chipset, Request
from virtkit.backends.emulator.clock import NS_PER_INSTRUCTION, VIRTUAL_EPOCH, Clock
from virtkit.backends.emulator.disks import Drive, DriveSpec
from virtkit.backends.emulator.uart import Uart16550
from virtkit.errors import ImageError


@pytest.fixture
def uart() -> tuple[Uart16550, bytearray]:
    sent = bytearray()
    return Uart16550(sent.extend), sent


def virtual_chipset() -> tuple[Chipset, Clock, list[Request]]:
    clock = Clock("virtual")
    requests: list[Request] = []
    return Chipset(clock, 32 * 2**20, requests.append), clock, requests


class TestUart:
    """The 16550's registers as guests and Linux's serial driver use them."""

    def test_transmit_and_line_status(self, uart: tuple[Uart16550, bytearray]) -> None:
        """THR bytes go out at once; LSR always shows THRE|TEMT, DR only with input."""
        dev, sent = uart
        dev.write(0, ord("A"))
        assert sent == b"A"
        assert dev.read(5) == 0x60
        dev.receive(b"xy")
        assert dev.read(5) == 0x61
        assert dev.read(0) == ord("x")
        assert dev.read(0) == ord("y")
        assert dev.read(5) == 0x60
        assert dev.read(0) == 0

    def test_divisor_latch(self, uart: tuple[Uart16550, bytearray]) -> None:
        """With DLAB set, offsets 0 and 1 are the divisor, and THR writes do not transmit."""
        dev, sent = uart
        dev.write(3, 0x80)
        dev.write(0, 0x01)
        dev.write(1, 0x00)
        assert (dev.read(0), dev.read(1)) == (1, 0)
        dev.write(3, 0x03)
        assert dev.read(3) == 0x03
        assert sent == b""

    def test_loopback(self, uart: tuple[Uart16550, bytearray]) -> None:
        """MCR loopback returns written bytes as input and mirrors modem lines in MSR."""
        dev, sent = uart
        dev.write(4, 0x10 | 0x0B)
        dev.write(0, 0x55)
        assert sent == b""
        assert dev.read(0) == 0x55
        assert dev.read(6) & 0xF0 == 0xB0  # DTR->DSR, RTS->CTS, OUT2->DCD

    def test_interrupt_identification(self, uart: tuple[Uart16550, bytearray]) -> None:
        """IIR reports received data before THR empty, and 'none' otherwise."""
        dev, _ = uart
        assert dev.read(2) & 0x0F == 0x01
        dev.write(1, 0x03)
        dev.receive(b"z")
        assert dev.read(2) & 0x0F == 0x04
        dev.read(0)
        assert dev.read(2) & 0x0F == 0x02
        assert dev.read(2) & 0x0F == 0x01

    def test_interrupt_line(self, uart: tuple[Uart16550, bytearray]) -> None:
        """IRQ4 is asserted while an enabled condition holds (data waiting, THR empty)."""
        dev, _ = uart
        dev.receive(b"a")
        assert not dev.irq_pending()
        dev.write(1, 0x01)
        assert dev.irq_pending()
        dev.read(0)
        assert not dev.irq_pending()

    def test_fifo_reset_drops_input(self, uart: tuple[Uart16550, bytearray]) -> None:
        """FCR bit 1 clears the receive FIFO, as on QEMU (guests do this at init)."""
        dev, _ = uart
        dev.receive(b"stale")
        dev.write(2, 0x07)
        assert not dev.has_input()

    def test_state_round_trip(self, uart: tuple[Uart16550, bytearray]) -> None:
        """save()/load() restore registers and pending input."""
        dev, _ = uart
        dev.write(3, 0x83)
        dev.write(0, 3)
        dev.receive(b"kept")
        other = Uart16550(lambda data: None)
        other.load(dev.save())
        assert other.save() == dev.save()
        other.write(3, 0x03)
        assert bytes(other.read(0) for _ in range(4)) == b"kept"


class TestAcpi:
    """PIIX4 PM registers at 0x600, as QEMU's pc machine has them."""

    def test_power_button_needs_the_enable_bit(self) -> None:
        """PWRBTN_STS latches only while PWRBTN_EN is set (QEMU's acpi_pm1_evt_power_down)."""
        chip, _, _ = virtual_chipset()
        chip.press_power_button()
        assert chip.read(0x600, 2) & 0x100 == 0
        chip.write(0x602, 2, 0x100)
        chip.press_power_button()
        assert chip.read(0x600, 2) & 0x100
        chip.write(0x600, 2, 0x100)  # write 1 to clear
        assert chip.read(0x600, 2) & 0x100 == 0

    def test_slp_en_with_s5_powers_off(self) -> None:
        """0x2000 to PM1a_CNT requests power-off; another sleep type does not."""
        chip, _, requests = virtual_chipset()
        chip.write(0x604, 2, 0x2000 | (1 << 10))
        assert requests == []
        chip.write(0x604, 2, 0x2000)
        assert requests == [Request.POWEROFF]
        assert chip.read(0x604, 2) & 0x2000 == 0  # SLP_EN reads back as 0

    def test_byte_wide_access(self) -> None:
        """The high byte of PM1a_CNT alone carries SLP_EN (some guests write bytes)."""
        chip, _, requests = virtual_chipset()
        chip.write(0x605, 1, 0x20)
        assert requests == [Request.POWEROFF]

    def test_pm_timer_follows_the_clock(self) -> None:
        """The 3.58 MHz PM timer at 0x608 counts guest time."""
        chip, clock, _ = virtual_chipset()
        clock.advance(1_000_000_000 // NS_PER_INSTRUCTION)  # one second
        assert chip.read(0x608, 4) == 3_579_545


class TestReset:
    """The three ways a guest resets a PC."""

    @pytest.mark.parametrize(("port", "value"), [(0xCF9, 0x06), (0x64, 0xFE), (0x92, 0x01)])
    def test_reset_ports(self, port: int, value: int) -> None:
        """0xCF9 RST_CPU, keyboard controller pulse, port 0x92 fast reset."""
        chip, _, requests = virtual_chipset()
        chip.write(port, 1, value)
        assert requests == [Request.RESET]

    def test_a20_gate(self) -> None:
        """Port 0x92 bit 1 and the keyboard controller's output port gate A20."""
        chip, _, requests = virtual_chipset()
        chip.write(0x92, 1, 0x00)
        assert chip.read(0x92, 1) == 0
        chip.write(0x64, 1, 0xD1)
        chip.write(0x60, 1, 0x03)
        assert chip.a20
        assert requests == []


class TestTimers:
    """PIT, RTC/CMOS and the PIC as boot code programs them."""

    def test_pit_counts_down_from_the_reload_value(self) -> None:
        """Channel 0 latched reads fall with guest time and wrap at the reload value."""
        chip, clock, _ = virtual_chipset()
        chip.write(0x43, 1, 0x34)  # channel 0, lo/hi, mode 2
        chip.write(0x40, 1, 0x00)
        chip.write(0x40, 1, 0x10)  # reload 0x1000
        assert chip.timer_period_ns() == 0x1000 * 1_000_000_000 // PIT_HZ
        clock.advance(100_000 // NS_PER_INSTRUCTION)  # 100 us = 119 PIT ticks
        chip.write(0x43, 1, 0x00)  # latch
        count = chip.read(0x40, 1) | (chip.read(0x40, 1) << 8)
        assert count == 0x1000 - 119

    def test_rtc_reads_bcd_time(self) -> None:
        """CMOS time registers hold the clock's UTC time in BCD."""
        chip, clock, _ = virtual_chipset()
        clock.advance((3600 + 23 * 60 + 45) * 1_000_000_000 // NS_PER_INSTRUCTION)
        values = {}
        for index in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32):
            chip.write(0x70, 1, index)
            values[index] = chip.read(0x71, 1)
        assert values == {0x00: 0x45, 0x02: 0x23, 0x04: 0x01, 0x07: 0x01, 0x08: 0x01,
                          0x09: 0x24, 0x32: 0x20}  # fmt: skip
        assert VIRTUAL_EPOCH.year == 2024

    def test_cmos_memory_size(self) -> None:
        """CMOS 0x34/0x35 hold RAM above 16 MiB in 64 KiB units, as SeaBIOS reads them."""
        chip, _, _ = virtual_chipset()
        chip.write(0x70, 1, 0x34)
        low = chip.read(0x71, 1)
        chip.write(0x70, 1, 0x35)
        assert low | (chip.read(0x71, 1) << 8) == (32 - 16) * 16

    def test_pic_remap_moves_the_timer_vector(self) -> None:
        """ICW1-ICW4 set the vector base; OCW1 masks IRQ0."""
        chip, _, _ = virtual_chipset()
        assert chip.irq_vector(0) == 0x08
        for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)):
            chip.write(port, 1, value)
        assert chip.irq_vector(0) == 0x20
        chip.write(0x21, 1, 0x01)
        assert chip.irq_vector(0) is None

    def test_in_service_irq_waits_for_eoi(self) -> None:
        """An acknowledged IRQ blocks itself and lower priorities until EOI (0x20 to port 0x20)."""
        chip, _, _ = virtual_chipset()
        chip.write(0x21, 1, 0x00)
        chip.acknowledge(0)
        assert chip.irq_vector(0) is None
        assert chip.irq_vector(4) is None
        chip.write(0x20, 1, 0x20)  # non-specific EOI
        assert chip.irq_vector(4) == 0x0C
        chip.acknowledge(4)
        assert chip.irq_vector(0) == 0x08  # higher priority still gets through
        chip.write(0x20, 1, 0x64)  # specific EOI for IRQ4
        assert chip.irq_vector(4) == 0x0C

    def test_chipset_state_round_trip(self) -> None:
        """save()/load() carry every register."""
        chip, clock, _ = virtual_chipset()
        chip.write(0x602, 2, 0x100)
        chip.write(0x70, 1, 0x40)
        chip.write(0x71, 1, 0x99)
        other = Chipset(clock, 32 * 2**20, lambda request: None)
        other.load(chip.save())
        assert other.save() == chip.save()


class TestClock:
    """Guest time in the two modes."""

    def test_virtual_time_is_instructions(self) -> None:
        """Virtual time only moves with accounted instructions."""
        clock = Clock("virtual")
        clock.run()
        assert clock.now_ns() == 0
        clock.advance(1000)
        assert clock.now_ns() == 1000 * NS_PER_INSTRUCTION

    def test_wall_time_stops_while_stopped(self) -> None:
        """A stopped wall clock does not advance."""
        clock = Clock("wall")
        clock.run()
        clock.stop()
        frozen = clock.now_ns()
        assert clock.now_ns() == frozen


class TestDrives:
    """BIOS drives over virtkit.images."""

    def test_geometry_and_chs(self, tmp_path: Path) -> None:
        """A 1 MiB disk: 16 heads, 63 sectors, 2 cylinders; CHS 0/0/2 is LBA 1."""
        path = tmp_path / "d.raw"
        images.create(path, size="1MiB", format="raw").close()
        drive = Drive.open(DriveSpec("vda", str(path), "raw"))
        try:
            assert (drive.cylinders, drive.heads, drive.sectors_per_track) == (2, 16, 63)
            assert drive.chs_to_lba(0, 0, 2) == 1
            assert drive.chs_to_lba(1, 0, 1) == 16 * 63
            assert drive.chs_to_lba(0, 0, 0) is None
            assert drive.chs_to_lba(0, 16, 1) is None
        finally:
            drive.close()

    def test_large_disk_translation(self, tmp_path: Path) -> None:
        """Past 504 MiB the heads double (LBA translation) to stay within 1024 cylinders."""
        path = tmp_path / "big.qcow2"
        images.create(path, size="2GiB", format="qcow2").close()
        drive = Drive.open(DriveSpec("vda", str(path), "qcow2"))
        try:
            assert drive.heads == 128
            assert drive.cylinders <= 1024
        finally:
            drive.close()

    def test_reads_past_the_end_fail(self, tmp_path: Path) -> None:
        """Sector ranges beyond the disk raise ImageError naming the file."""
        path = tmp_path / "d.raw"
        images.create(path, size="64KiB", format="raw").close()
        drive = Drive.open(DriveSpec("vda", str(path), "raw", read_only=True))
        try:
            with pytest.raises(ImageError, match="beyond the end"):
                drive.read(127, 2)
        finally:
            drive.close()

"""virtio-mmio and virtio-blk, driven from Python the way Linux's drivers drive them.

The devices are mapped into a real unicorn CPU (``uc.mmio_map``) by
:class:`PlatformDevices`, exactly as the machine maps them; the test driver
reaches the registers through the engine's own memory bus (reads and writes
to the window run the same callbacks the CPU's loads and stores do) and
builds the split virtqueue in the CPU's RAM, in the order
``drivers/virtio/virtio_mmio.c`` and ``virtio_blk.c`` do. The disk bytes
are then read back with :mod:`virtkit.images`, and a qcow2 disk is compared
with the expected raw bytes by ``qemu-img compare``.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtkit import images
from virtkit.backends.emulator import virtio_mmio as vm
from virtkit.backends.emulator.cpu import Cpu
from virtkit.backends.emulator.disks import Drive, DriveSpec, open_drives
from virtkit.backends.emulator.platform import VIRTIO_BASE, PlatformDevices
from virtkit.backends.emulator.virtio_blk import (
    F_FLUSH,
    F_RO,
    F_SEG_MAX,
    F_SIZE_MAX,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SIZE_MAX,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
)

MiB = 1 << 20
RAM = 32 * MiB
DISK = 4 * MiB
QUEUE = 16
# guest-physical layout the test driver uses
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
HEADER, STATUS, DATA = 0x20000, 0x21000, 0x100000


class Driver:
    """The Linux virtio-mmio + virtio-blk driver's register and ring protocol, in Python."""

    def __init__(self, cpu: Cpu, base: int = VIRTIO_BASE) -> None:
        self.cpu = cpu
        self.base = base
        self.avail_idx = 0
        self.used_seen = 0
        self.num = QUEUE

    def reg(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.cpu.uc.mem_read(self.base + offset, size), "little")

    def set(self, offset: int, value: int, size: int = 4) -> None:
        self.cpu.uc.mem_write(self.base + offset, value.to_bytes(size, "little"))

    # -- probe (virtio_mmio.c: vm_probe, then virtio.c: virtio_dev_probe) -----------------------
    def probe(self, *, accept: int | None = None, num: int = QUEUE) -> int:
        assert self.reg(vm.REG_MAGIC) == 0x74726976
        assert self.reg(vm.REG_VERSION) == 2
        assert self.reg(vm.REG_DEVICE_ID) == 2
        self.set(vm.REG_STATUS, 0)
        assert self.reg(vm.REG_STATUS) == 0
        self.set(vm.REG_STATUS, vm.ACKNOWLEDGE)
        self.set(vm.REG_STATUS, vm.ACKNOWLEDGE | vm.DRIVER)
        offered = self.features()
        wanted = offered if accept is None else accept
        self.set(vm.REG_DRIVER_FEATURES_SEL, 1)
        self.set(vm.REG_DRIVER_FEATURES, wanted >> 32)
        self.set(vm.REG_DRIVER_FEATURES_SEL, 0)
        self.set(vm.REG_DRIVER_FEATURES, wanted & 0xFFFF_FFFF)
        self.set(vm.REG_STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK)
        if not self.reg(vm.REG_STATUS) & vm.FEATURES_OK:
            return offered
        self.setup_queue(num)
        self.set(vm.REG_STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK | vm.DRIVER_OK)
        return offered

    def features(self) -> int:
        self.set(vm.REG_DEVICE_FEATURES_SEL, 1)
        high = self.reg(vm.REG_DEVICE_FEATURES)
        self.set(vm.REG_DEVICE_FEATURES_SEL, 0)
        return (high << 32) | self.reg(vm.REG_DEVICE_FEATURES)

    def setup_queue(self, num: int, desc: int = DESC, avail: int = AVAIL, used: int = USED) -> None:
        self.num = num
        self.set(vm.REG_QUEUE_SEL, 0)
        assert self.reg(vm.REG_QUEUE_READY) == 0
        assert self.reg(vm.REG_QUEUE_NUM_MAX) >= num
        self.cpu.write(desc, bytes(16 * num))
        self.cpu.write(avail, bytes(6 + 2 * num))
        self.cpu.write(used, bytes(6 + 8 * num))
        self.set(vm.REG_QUEUE_NUM, num)
        for reg, address in (
            (vm.REG_QUEUE_DESC_LOW, desc),
            (vm.REG_QUEUE_DRIVER_LOW, avail),
            (vm.REG_QUEUE_DEVICE_LOW, used),
        ):
            self.set(reg, address & 0xFFFF_FFFF)
            self.set(reg + 4, address >> 32)
        self.set(vm.REG_QUEUE_READY, 1)
        self.avail_idx = self.used_seen = 0

    def capacity(self) -> int:
        while True:  # virtio_cread64: re-read while the generation changes
            generation = self.reg(vm.REG_CONFIG_GENERATION)
            low, high = self.reg(0x100), self.reg(0x104)
            if self.reg(vm.REG_CONFIG_GENERATION) == generation:
                return (high << 32) | low

    # -- requests ------------------------------------------------------------------------------
    def write_descriptors(self, chain: list[tuple[int, int, int, int]], first: int = 0) -> None:
        """(address, length, flags, next) at descriptor indexes first, first+1, ..."""
        for i, (address, length, flags, nxt) in enumerate(chain):
            self.cpu.write(
                DESC + 16 * (first + i), struct.pack("<QIHH", address, length, flags, nxt)
            )

    def make_available(self, head: int, *, count: int = 1) -> None:
        slot = self.avail_idx % self.num
        self.cpu.write(AVAIL + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + count) & 0xFFFF
        self.cpu.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def kick(self) -> None:
        self.set(vm.REG_QUEUE_NOTIFY, 0)

    def used(self) -> list[tuple[int, int]]:
        (idx,) = struct.unpack("<H", self.cpu.read(USED + 2, 2))
        out = []
        while self.used_seen != idx:
            slot = self.used_seen % self.num
            out.append(struct.unpack("<II", self.cpu.read(USED + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def request(
        self, kind: int, sector: int, data: bytes = b"", *, read: int = 0, segment: int = 4096
    ) -> tuple[int, bytes, int]:
        """One virtio-blk request as virtblk_add_req builds it: (status, data read, used len)."""
        self.cpu.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
        self.cpu.write(STATUS, b"\xee")
        chain = [(HEADER, 16, vm.DESC_F_NEXT, 1)]
        payload = data if kind == T_OUT else bytes(read)
        if kind == T_OUT:
            self.cpu.write(DATA, data)
        flags = vm.DESC_F_NEXT | (vm.DESC_F_WRITE if kind != T_OUT else 0)
        for offset in range(0, len(payload), segment):
            length = min(segment, len(payload) - offset)
            chain.append((DATA + offset, length, flags, len(chain) + 1))
        chain.append((STATUS, 1, vm.DESC_F_WRITE, 0))
        assert len(chain) <= self.num
        self.write_descriptors(chain)
        self.make_available(0)
        self.kick()
        interrupt = self.reg(vm.REG_INTERRUPT_STATUS)
        assert interrupt & vm.INT_VRING
        self.set(vm.REG_INTERRUPT_ACK, interrupt)
        ((head, length),) = self.used()
        assert head == 0
        return self.cpu.read(STATUS, 1)[0], self.cpu.read(DATA, read), length


@pytest.fixture
def cpu() -> Iterator[Cpu]:
    engine = Cpu(RAM)
    yield engine
    engine.close()


def _attach(
    cpu: Cpu, path: Path, fmt: str, *, read_only: bool = False
) -> tuple[list[Drive], PlatformDevices]:
    drives = open_drives([DriveSpec("vda-disk", str(path), fmt, read_only=read_only)])
    platform = PlatformDevices(cpu, drives)
    platform.map()
    platform.install()
    return drives, platform


@pytest.fixture(params=["raw", "qcow2"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    fmt = str(request.param)
    path = tmp_path / f"disk.{fmt}"
    images.create(path, DISK, format=fmt).close()  # type: ignore[arg-type]
    return path, fmt


def _pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 131 + i * 7 + (i >> 9)) & 0xFF for i in range(length))


class TestProbe:
    def test_registers_features_and_config(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """Magic, version 2, block device, VERSION_1 | SIZE_MAX | SEG_MAX | FLUSH; capacity."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        offered = driver.probe()
        assert offered & vm.F_VERSION_1
        assert offered & (F_SIZE_MAX | F_SEG_MAX | F_FLUSH) == F_SIZE_MAX | F_SEG_MAX | F_FLUSH
        assert not offered & F_RO
        assert driver.capacity() == DISK // 512
        assert driver.reg(0x108) == SIZE_MAX
        assert driver.reg(0x114) == 512  # blk_size
        assert driver.reg(0x100, 1) == (DISK // 512) & 0xFF  # byte access to config space
        assert driver.reg(vm.REG_STATUS) == 0x0F
        assert driver.reg(vm.REG_VENDOR_ID) == int.from_bytes(b"VKIT", "little")
        for drive in drives:
            drive.close()

    def test_read_only_disk_offers_ro(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """A read-only disk offers VIRTIO_BLK_F_RO."""
        drives, _ = _attach(cpu, *disk, read_only=True)
        assert Driver(cpu).probe() & F_RO
        drives[0].close()

    @pytest.mark.parametrize("accept", [0, 1 << 40 | vm.F_VERSION_1])
    def test_features_without_version_1_or_not_offered_are_refused(
        self, cpu: Cpu, disk: tuple[Path, str], accept: int
    ) -> None:
        """FEATURES_OK does not stick without VERSION_1 or with a bit the device did not offer."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe(accept=accept)
        assert not driver.reg(vm.REG_STATUS) & vm.FEATURES_OK
        drives[0].close()

    def test_reset_clears_the_queue(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """Writing status 0 resets: status, queue ready and interrupt status read 0."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe()
        assert driver.reg(vm.REG_QUEUE_READY) == 1
        driver.set(vm.REG_STATUS, 0)
        assert driver.reg(vm.REG_STATUS) == 0
        assert driver.reg(vm.REG_QUEUE_READY) == 0
        drives[0].close()


class TestRequests:
    def test_write_flush_read_back_and_on_disk(
        self, cpu: Cpu, disk: tuple[Path, str], tmp_path: Path
    ) -> None:
        """Writes in 4 KiB segments land in the image; reads return them; qemu-img agrees."""
        path, fmt = disk
        drives, platform = _attach(cpu, path, fmt)
        driver = Driver(cpu)
        driver.probe()
        expected = bytearray(DISK)
        for sector, length, seed in ((0, 512, 1), (7, 12 * 1024, 2), (DISK // 512 - 16, 8192, 3)):
            data = _pattern(seed, length)
            status, _, used = driver.request(T_OUT, sector, data)
            assert (status, used) == (S_OK, 1)
            expected[sector * 512 : sector * 512 + length] = data
        assert driver.request(T_FLUSH, 0)[0] == S_OK
        status, got, used = driver.request(T_IN, 7, read=12 * 1024)
        assert (status, used) == (S_OK, 12 * 1024 + 1)
        assert got == expected[7 * 512 : 7 * 512 + 12 * 1024]
        assert platform.transports[0].device.requests == 5  # type: ignore[attr-defined]
        drives[0].close()
        with images.open(path) as image:
            assert image.read(0, DISK) == bytes(expected)
        reference = tmp_path / "expected.raw"
        reference.write_bytes(bytes(expected))
        done = subprocess.run(
            ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(path), str(reference)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        if fmt == "qcow2":
            check = subprocess.run(
                ["qemu-img", "check", str(path)], capture_output=True, text=True, check=False
            )
            assert check.returncode == 0, check.stdout

    def test_get_id_unsupported_and_out_of_range(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """GET_ID gives the disk's name; unknown types UNSUPP; past the end IOERR; it goes on."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe()
        status, ident, used = driver.request(T_GET_ID, 0, read=20)
        assert (status, used) == (S_OK, 21)
        assert ident == b"vda-disk".ljust(20, b"\0")
        assert driver.request(11, 0)[0] == S_UNSUPP  # DISCARD: not offered
        assert driver.request(T_IN, DISK // 512 - 1, read=1024)[0] == S_IOERR
        assert driver.request(T_OUT, DISK // 512, b"x" * 512)[0] == S_IOERR
        assert driver.request(T_IN, 0, read=100)[0] == S_IOERR  # not whole sectors
        status, data, _ = driver.request(T_IN, 0, read=512)
        assert (status, data) == (S_OK, bytes(512))
        assert not driver.reg(vm.REG_STATUS) & vm.DEVICE_NEEDS_RESET
        drives[0].close()

    def test_read_only_disk_refuses_writes(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """A write to a read-only disk is IOERR and the image is unchanged."""
        path, fmt = disk
        drives, _ = _attach(cpu, path, fmt, read_only=True)
        driver = Driver(cpu)
        driver.probe()
        assert driver.request(T_OUT, 0, b"\xaa" * 512)[0] == S_IOERR
        assert driver.request(T_IN, 0, read=512)[0] == S_OK
        drives[0].close()
        with images.open(path) as image:
            assert image.read(0, 512) == bytes(512)

    def test_indexes_wrap_around_the_ring(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """200 requests through a 4-entry queue: ring slots and indexes wrap correctly."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe(num=4)
        for i in range(200):
            data = bytes([i]) * 512
            assert driver.request(T_OUT, i, data, segment=512)[0] == S_OK
        for i in (0, 3, 4, 199):
            assert driver.request(T_IN, i, read=512)[1] == bytes([i]) * 512
        drives[0].close()

    def test_several_chains_in_one_kick(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """Three chains made available before one notify are all served, in order."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe()
        for n in range(3):
            base = 5 * n
            header = HEADER + 16 * n
            cpu.write(header, struct.pack("<IIQ", T_OUT, 0, n))
            cpu.write(DATA + 512 * n, bytes([0x40 + n]) * 512)
            driver.write_descriptors(
                [
                    (header, 16, vm.DESC_F_NEXT, base + 1),
                    (DATA + 512 * n, 512, vm.DESC_F_NEXT, base + 2),
                    (STATUS + n, 1, vm.DESC_F_WRITE, 0),
                ],
                first=base,
            )
            driver.make_available(base)
        driver.kick()
        assert driver.used() == [(0, 1), (5, 1), (10, 1)]
        assert cpu.read(STATUS, 3) == bytes(3)
        drives[0].close()

    def test_no_interrupt_flag_is_honoured(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """VRING_AVAIL_F_NO_INTERRUPT: the request is served, no used-buffer interrupt."""
        drives, platform = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe()
        cpu.write(AVAIL, struct.pack("<H", vm.AVAIL_F_NO_INTERRUPT))
        cpu.write(HEADER, struct.pack("<IIQ", T_FLUSH, 0, 0))
        driver.write_descriptors([(HEADER, 16, vm.DESC_F_NEXT, 1), (STATUS, 1, vm.DESC_F_WRITE, 0)])
        driver.make_available(0)
        driver.kick()
        assert driver.used() == [(0, 1)]
        assert driver.reg(vm.REG_INTERRUPT_STATUS) == 0
        assert platform.pending_irqs() == []
        drives[0].close()


_OUTSIDE = RAM + 0x1000  # past the end of RAM


class TestMalformedRings:
    """Each bad ring sets DEVICE_NEEDS_RESET, interrupts, and writes nothing anywhere."""

    @pytest.mark.parametrize(
        ("case", "chain", "avail_step"),
        [
            ("data outside RAM", [(HEADER, 16, 1, 1), (_OUTSIDE, 512, 1, 2), (STATUS, 1, 2, 0)], 1),
            (
                "in the PCI hole",
                [(HEADER, 16, 1, 1), (0xF000_0000, 512, 1, 2), (STATUS, 1, 2, 0)],
                1,
            ),
            ("status outside RAM", [(HEADER, 16, 1, 1), (DATA, 512, 1, 2), (RAM - 1, 2, 2, 0)], 1),
            (
                "length wraps RAM",
                [(HEADER, 16, 1, 1), (DATA, 0xFFFF_FFFF, 1, 2), (STATUS, 1, 2, 0)],
                1,
            ),
            (
                "oversized segment",
                [(HEADER, 16, 1, 1), (DATA, SIZE_MAX + 512, 1, 2), (STATUS, 1, 2, 0)],
                1,
            ),
            ("loop", [(HEADER, 16, 1, 1), (DATA, 512, 1, 2), (STATUS, 1, 3, 1)], 1),
            ("self loop", [(HEADER, 16, 1, 0)], 1),
            (
                "next past the queue",
                [(HEADER, 16, 1, 1), (DATA, 512, 1, QUEUE), (STATUS, 1, 2, 0)],
                1,
            ),
            ("indirect", [(HEADER, 16, 1 | 4, 1), (DATA, 512, 1, 2), (STATUS, 1, 2, 0)], 1),
            (
                "readable after writable",
                [(HEADER, 16, 1, 1), (STATUS, 1, 3, 2), (DATA, 512, 0, 0)],
                1,
            ),
            ("no status byte", [(HEADER, 16, 1, 1), (DATA, 512, 0, 0)], 1),
            ("short header", [(HEADER, 8, 1, 1), (STATUS, 1, 2, 0)], 1),
            (
                "avail index past the queue",
                [(HEADER, 16, 1, 1), (DATA, 512, 1, 2), (STATUS, 1, 2, 0)],
                QUEUE + 1,
            ),
        ],
    )
    def test_write_request(
        self,
        cpu: Cpu,
        disk: tuple[Path, str],
        case: str,
        chain: list[tuple[int, int, int, int]],
        avail_step: int,
    ) -> None:
        path, fmt = disk
        drives, platform = _attach(cpu, path, fmt)
        driver = Driver(cpu)
        driver.probe()
        cpu.write(HEADER, struct.pack("<IIQ", T_OUT, 0, 0))
        cpu.write(DATA, b"\x5a" * 512)
        cpu.write(STATUS, b"\xee")
        driver.write_descriptors(chain)
        driver.make_available(0, count=avail_step)
        driver.kick()
        assert driver.reg(vm.REG_STATUS) & vm.DEVICE_NEEDS_RESET, case
        assert driver.reg(vm.REG_INTERRUPT_STATUS) == vm.INT_CONFIG
        assert platform.pending_irqs() == [platform.irqs[0]]
        assert driver.used() == []
        assert cpu.read(STATUS, 1) == b"\xee"
        transport = platform.transports[0]
        assert transport.needs_reset_reason
        # a second kick is ignored until the driver resets the device
        driver.kick()
        assert driver.used() == []
        # after a reset and a fresh set-up the device works again
        driver.probe()
        assert not driver.reg(vm.REG_STATUS) & vm.DEVICE_NEEDS_RESET
        assert driver.request(T_IN, 0, read=512) == (S_OK, bytes(512), 513)
        drives[0].close()
        with images.open(path) as image:
            assert image.read(0, DISK) == bytes(DISK)

    def test_bad_head_index(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """A head index past the queue in the available ring."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe()
        driver.make_available(QUEUE + 3)
        driver.kick()
        assert driver.reg(vm.REG_STATUS) & vm.DEVICE_NEEDS_RESET
        assert driver.used() == []
        drives[0].close()

    @pytest.mark.parametrize(
        "layout",
        [
            (QUEUE, RAM - 0x40, AVAIL, USED),  # descriptor table runs past RAM
            (QUEUE, DESC, AVAIL, 0xE000_0000),  # used ring in the hole
            (QUEUE, DESC + 8, AVAIL, USED),  # misaligned table
            (12, DESC, AVAIL, USED),  # not a power of two
            (4096, DESC, AVAIL, USED),  # beyond QueueNumMax
        ],
    )
    def test_bad_queue_layout(
        self, cpu: Cpu, disk: tuple[Path, str], layout: tuple[int, int, int, int]
    ) -> None:
        """A queue whose size or areas are impossible is refused at QUEUE_READY."""
        num, desc, avail, used = layout
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe()
        driver.set(vm.REG_STATUS, 0)
        for bit in (vm.ACKNOWLEDGE, vm.DRIVER):
            driver.set(vm.REG_STATUS, driver.reg(vm.REG_STATUS) | bit)
        driver.set(vm.REG_DRIVER_FEATURES_SEL, 1)
        driver.set(vm.REG_DRIVER_FEATURES, 1)
        driver.set(vm.REG_STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK)
        driver.set(vm.REG_QUEUE_SEL, 0)
        driver.set(vm.REG_QUEUE_NUM, num)
        driver.set(vm.REG_QUEUE_DESC_LOW, desc)
        driver.set(vm.REG_QUEUE_DRIVER_LOW, avail)
        driver.set(vm.REG_QUEUE_DEVICE_LOW, used)
        driver.set(vm.REG_QUEUE_READY, 1)
        assert driver.reg(vm.REG_QUEUE_READY) == 0
        assert driver.reg(vm.REG_STATUS) & vm.DEVICE_NEEDS_RESET
        drives[0].close()

    def test_odd_register_accesses_are_harmless(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """Byte and unaligned accesses to the registers, a bad queue and feature select: ignored."""
        drives, _ = _attach(cpu, *disk)
        driver = Driver(cpu)
        assert driver.reg(vm.REG_MAGIC, 1) == 0
        driver.set(vm.REG_STATUS, 0xFF, size=1)
        assert driver.reg(vm.REG_STATUS) == 0
        driver.set(vm.REG_QUEUE_SEL, 7)
        assert driver.reg(vm.REG_QUEUE_NUM_MAX) == 0
        driver.set(vm.REG_QUEUE_READY, 1)
        driver.set(vm.REG_QUEUE_NOTIFY, 9)
        driver.set(vm.REG_DEVICE_FEATURES_SEL, 5)
        assert driver.reg(vm.REG_DEVICE_FEATURES) == 0
        assert driver.reg(0x100 + 3000) == 0  # past the config space
        assert driver.reg(vm.REG_STATUS) == 0
        drives[0].close()


class TestSnapshot:
    def test_state_round_trip(self, cpu: Cpu, disk: tuple[Path, str]) -> None:
        """Transport state saved mid-run and loaded into a fresh device continues the ring."""
        drives, platform = _attach(cpu, *disk)
        driver = Driver(cpu)
        driver.probe()
        for i in range(5):
            driver.request(T_OUT, i, bytes([i + 1]) * 512)
        state = platform.save()
        platform.transports[0].reset()
        platform.load(state)
        assert driver.reg(vm.REG_STATUS) == 0x0F
        assert driver.request(T_IN, 4, read=512)[1] == bytes([5]) * 512
        drives[0].close()


class TestRandomRings:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        descriptors=st.lists(
            st.tuples(
                st.sampled_from([HEADER, STATUS, DATA, RAM - 512, RAM - 1, RAM, 0xE000_0000])
                | st.integers(0, (1 << 64) - 1),
                st.sampled_from([0, 1, 16, 512, 4096, SIZE_MAX, SIZE_MAX + 1])
                | st.integers(0, (1 << 32) - 1),
                st.integers(0, 0xFFFF),
                st.integers(0, 0xFFFF),
            ),
            min_size=QUEUE,
            max_size=QUEUE,
        ),
        heads=st.lists(st.integers(0, 0xFFFF), min_size=QUEUE, max_size=QUEUE),
        avail_idx=st.integers(0, 0xFFFF),
        header=st.tuples(st.integers(0, 12), st.integers(0, (1 << 64) - 1)),
    )
    def test_nothing_escapes_and_the_device_recovers(
        self,
        random_rig: Cpu,
        descriptors: list[tuple[int, int, int, int]],
        heads: list[int],
        avail_idx: int,
        header: tuple[int, int],
    ) -> None:
        """Random descriptor tables, heads and indexes: no exception leaves the device,
        it either serves every available chain or needs a reset, and a reset recovers it."""
        cpu = random_rig
        driver = Driver(cpu)
        driver.probe()
        cpu.write(HEADER, struct.pack("<IIQ", header[0], 0, header[1]))
        for i, (address, length, flags, nxt) in enumerate(descriptors):
            cpu.write(DESC + 16 * i, struct.pack("<QIHH", address, length, flags, nxt))
        cpu.write(AVAIL + 4, struct.pack(f"<{QUEUE}H", *heads))
        cpu.write(AVAIL + 2, struct.pack("<H", avail_idx))
        driver.kick()  # must not raise
        used_idx = struct.unpack("<H", cpu.read(USED + 2, 2))[0]
        needs_reset = bool(driver.reg(vm.REG_STATUS) & vm.DEVICE_NEEDS_RESET)
        if avail_idx > QUEUE:
            assert needs_reset and used_idx == 0
        assert needs_reset or used_idx == avail_idx
        assert used_idx <= min(avail_idx, QUEUE)
        driver.probe()
        assert driver.request(T_GET_ID, 0, read=20)[0] == S_OK


@pytest.fixture(scope="module")
def random_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cpu]:
    """One CPU and a raw disk for all the random examples (a fresh engine each is slow)."""
    path = tmp_path_factory.mktemp("fuzz") / "disk.raw"
    images.create(path, DISK, format="raw").close()
    engine = Cpu(RAM)
    drives, _ = _attach(engine, path, "raw")
    yield engine
    drives[0].close()
    engine.close()

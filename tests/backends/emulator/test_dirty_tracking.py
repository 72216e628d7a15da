"""Snapshots find changed RAM through the kernel's copy-on-write: every writer counts.

A page written between two snapshots and missed by the tracking would be
silent corruption: a revert would bring back the wrong bytes. These tests
write RAM every way the emulator does (the guest CPU, ``uc.mem_write`` as the
loader and the BIOS use it, plain stores into ``cpu.ram`` as a device model
would, the BIOS disk service reading sectors into guest memory) between
snapshots, then revert in a shuffled order and compare all of RAM byte for
byte, with the tracking and with the ``memcmp`` fallback.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit import images
from virtkit.backends.emulator import EmulatorGuest, EmulatorHypervisor, dirtytrack, ramstore
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests

TIMEOUT = 10.0
Define = Callable[..., EmulatorGuest]
SECTOR = 512

#: waits for a serial byte: 'c' makes the CPU write 64 scattered bytes in
#: 0x10000-0x8FFFF, 'd' reads disk sector LBA (counter & 7) + 1 to 0x30000
#: through int 13h; every byte is acknowledged with 'k'
WRITER = """
    mov [drive], dl
    mov al, 'R'
    call putc
.loop:
    mov dx, COM1 + 5
.wait:
    in al, dx
    test al, 1
    jz .wait
    mov dx, COM1
    in al, dx
    inc byte [counter]
    cmp al, 'c'
    je .cpu
    cmp al, 'd'
    je .disk
    jmp .ack
.cpu:
    mov bx, 0x1000
    mov cx, 32
    mov al, [counter]
.next:
    mov es, bx
    mov [es:0], al
    mov [es:0x7FF], al
    add bx, 0x400
    loop .next
    jmp .ack
.disk:
    mov ax, 0x3000
    mov es, ax
    xor bx, bx
    mov cl, [counter]
    and cl, 7
    add cl, 2
    xor ch, ch
    xor dh, dh
    mov dl, [drive]
    mov ax, 0x0201
    int 0x13
.ack:
    xor ax, ax
    mov es, ax
    mov al, 'k'
    call putc
    jmp .loop
drive: db 0
counter: db 0
"""


def writer_disk(folder: Path) -> Path:
    """A raw disk booting :data:`WRITER`, sectors 1-8 each filled with its own pattern."""
    text = (
        'bits 16\norg 0x7C00\n    jmp start\n%include "common.inc"\nstart:\n    GUEST_START\n'
        + WRITER
        + "\nBOOT_SIGNATURE\n"
    )
    path = folder / "writer.raw"
    with images.create(path, size="1MiB", format="raw") as image:
        image.write(0, guests.assemble(text, stem="writer"))
        for lba in range(1, 9):
            image.write(lba * SECTOR, bytes((lba * 37 + i) % 251 + 1 for i in range(SECTOR)))
    return path


def ram_of(guest: EmulatorGuest) -> bytes:
    """All of the guest's RAM (the guest should be paused)."""
    pc = guest._pc
    assert pc is not None
    return bytes(pc.cpu.ram)


def command(guest: EmulatorGuest, byte: bytes) -> None:
    """Have the paused writer guest run one command, and pause it again."""
    mark = len(guest.console.output)
    guest.resume()
    guest.console.write(byte)
    guest.console.expect("k", timeout=TIMEOUT)
    guest.pause()
    assert guest.console.output[mark:].count(b"k") == 1


@pytest.fixture(params=["tracked", "compared", "no-memfd"])
def tracking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with the kernel's tracking, with the ``memcmp`` fallback, and with the
    fallback on a plain anonymous copy (a system without ``memfd_create``)."""
    assert dirtytrack.supported(), "this kernel should report written pages"
    if request.param == "compared":
        monkeypatch.setattr(dirtytrack, "supported", lambda: False)
    elif request.param == "no-memfd":

        def missing(*args: object) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "memfd_create", missing)
    return str(request.param)


class TestEveryWriterIsSeen:
    """Writes between snapshots from every source are captured, and undone by reverts."""

    def test_cpu_loader_device_and_disk_writes(
        self, hv: EmulatorHypervisor, tmp_path: Path, tracking: str
    ) -> None:
        """Six snapshots, each after a different kind of write; reverts in a shuffled
        order (each from wherever the last left RAM) give every snapshot's RAM exactly."""
        guest = hv.define(
            Machine(name="w", memory="32MiB", disks=(Disk(str(writer_disk(tmp_path))),))
        )
        assert isinstance(guest, EmulatorGuest)
        guest.start()
        guest.console.expect("R", timeout=TIMEOUT)
        guest.pause()
        pc = guest._pc
        assert pc is not None
        captured = {"s0": ram_of(guest)}
        guest.snapshot("s0")
        rnd = random.Random(14)

        def loader_write() -> None:  # uc.mem_write, as the kernel loader and the BIOS use it
            pc.cpu.write(rnd.randrange(1 << 20, 32 << 20), rnd.randbytes(rnd.randrange(1, 9000)))

        def device_write() -> None:  # a store straight into the RAM mapping
            where = rnd.randrange(1 << 20, 31 << 20)
            pc.cpu.ram[where : where + 3000] = rnd.randbytes(3000)

        def zero_write() -> None:  # the disk buffer's chunk back to zero: its entry becomes 0
            start = 0x30000
            pc.cpu.ram[start : start + ramstore.CHUNK] = bytes(ramstore.CHUNK)

        steps: list[Callable[[], None]] = [
            lambda: command(guest, b"c"),
            lambda: command(guest, b"d"),
            loader_write,
            device_write,
            lambda: (command(guest, b"d"), command(guest, b"c"), device_write()),  # type: ignore[func-returns-value]
            zero_write,
        ]
        for number, step in enumerate(steps, start=1):
            step()
            captured[f"s{number}"] = ram_of(guest)
            assert captured[f"s{number}"] != captured[f"s{number - 1}"]
            guest.snapshot(f"s{number}")
        # the disk command landed sectors in RAM: the BIOS wrote guest memory
        disk_buffer = captured["s2"][0x30000 : 0x30000 + SECTOR]
        assert disk_buffer == bytes((3 * 37 + i) % 251 + 1 for i in range(SECTOR))  # LBA 3

        order = list(captured) * 2
        rnd.shuffle(order)
        for name in order:
            guest.revert(name)
            assert guest.state is State.PAUSED
            assert ram_of(guest) == captured[name], name
            device_write()  # leave something behind for the next revert to undo
        # after reverts the chain goes on: write, snapshot, revert
        guest.revert("s3")
        command(guest, b"c")
        loader_write()
        captured["after"] = ram_of(guest)
        guest.snapshot("after")
        guest.revert("s1")
        assert ram_of(guest) == captured["s1"]
        guest.revert("after")
        assert ram_of(guest) == captured["after"]
        guest.resume()  # and the guest still runs from the reverted state
        guest.console.write(b"c")
        guest.console.expect("k", timeout=TIMEOUT)
        guest.kill()

    def test_reset_after_a_snapshot_zeroes_ram(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """A reset zeroes RAM even where it reads through to a snapshot's copy."""
        guest = define(hv, "counter", memory="32MiB")
        guest.start()
        guest.console.expect("count 1", timeout=TIMEOUT)
        guest.pause()
        pc = guest._pc
        assert pc is not None
        pc.cpu.ram[16 << 20 : (16 << 20) + 4096] = b"\xaa" * 4096
        guest.snapshot("marked")
        guest.reset()  # the run state is kept: paused
        pc = guest._pc
        assert pc is not None
        assert pc.cpu.ram[16 << 20 : (16 << 20) + 4096] == bytes(4096)
        guest.resume()
        guest.console.expect("counter starts", timeout=TIMEOUT)
        guest.pause()
        pc = guest._pc
        assert pc is not None
        assert pc.cpu.ram[16 << 20 : (16 << 20) + 4096] == bytes(4096)
        guest.revert("marked")
        assert ram_of(guest)[16 << 20 : (16 << 20) + 4096] == b"\xaa" * 4096
        guest.kill()

    def test_state_file_holds_only_changed_chunks(
        self, hv: EmulatorHypervisor, define: Define, tracking: str
    ) -> None:
        """Three scattered writes between snapshots append exactly three chunks."""
        guest = define(hv, "counter", memory="64MiB")
        guest.start()
        guest.console.expect("count 1", timeout=TIMEOUT)
        guest.pause()
        guest.snapshot("a")
        pc = guest._pc
        assert pc is not None
        pack = next((guest.folder / "snapshots").glob("emulator-ram-*.pack"))
        before = pack.stat().st_size
        for where in (5 << 20, 33 << 20, (60 << 20) + 12345):
            pc.cpu.write(where, b"\x01\x02\x03")
        pc.cpu.ram[5 << 20] = pc.cpu.ram[5 << 20]  # rewritten with the same value: not stored
        pc.cpu.ram[40 << 20] = 0  # written, still zero: not stored either
        guest.snapshot("b")
        assert pack.stat().st_size - before == 3 * ramstore.CHUNK
        guest.kill()


def ram_copies_open() -> int:
    """Descriptors of this process that hold a copy of some guest's RAM."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "virtkit-ram-base" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return count


class TestRelease:
    """A guest's RAM copy goes with the guest."""

    def test_no_copy_outlives_its_guest(self, hv: EmulatorHypervisor, define: Define) -> None:
        """Three guests snapshot, revert and go: no memory file of theirs stays open."""
        gc.collect()
        before = ram_copies_open()
        for _ in range(3):
            guest = define(hv, "counter", memory="32MiB")
            guest.start()
            guest.console.expect("count 1", timeout=TIMEOUT)
            guest.snapshot("s")
            guest.revert("s")
            assert ram_copies_open() > before
            guest.kill()
            hv.undefine(guest)
            del guest
        gc.collect()
        assert ram_copies_open() == before


class TestTracker:
    """The tracking itself, on a plain mapping: every kind of write marks its page."""

    def test_writes_of_every_kind_are_reported(self, tmp_path: Path) -> None:
        """Stores, ctypes copies and a read() into the mapping mark exactly their pages."""
        size = 64 * dirtytrack.PAGE
        ram = mmap.mmap(-1, size)
        view = (ctypes.c_char * size).from_buffer(ram)
        ptr = ctypes.addressof(view)
        ram[: 3 * dirtytrack.PAGE] = os.urandom(3 * dirtytrack.PAGE)
        tracker = dirtytrack.Tracker(ptr, size)
        try:
            ctypes.memmove(tracker.base_ptr, ptr, size)
            before = bytes(ram)
            tracker.attach()
            assert bytes(ram) == before  # reading everything marks nothing
            assert tracker.dirty() == bytes(64)
            source = tmp_path / "data"
            source.write_bytes(b"\x07" * 100)
            ram[5 * dirtytrack.PAGE + 9] = 1  # a store
            ctypes.memmove(ptr + 40 * dirtytrack.PAGE - 2, b"abcd", 4)  # across two pages
            with open(source, "rb") as fh:  # the kernel writing into the mapping
                os.preadv(fh.fileno(), [memoryview(ram)[63 * dirtytrack.PAGE :][:100]], 0)
            expected = bytearray(64)
            for page in (5, 39, 40, 63):
                expected[page] = 1
            assert tracker.dirty() == bytes(expected)
            assert tracker.runs(tracker.dirty()) == [(5, 1), (39, 2), (63, 1)]
            written = bytes(ram)
            tracker.settle(tracker.runs(tracker.dirty()))
            assert tracker.dirty() == bytes(64)
            assert bytes(ram) == written == bytes(tracker.base)
            ram[0] ^= 0xFF
            tracker.discard(tracker.runs(tracker.dirty()))
            assert bytes(ram) == written
            tracker.zero_base(0, dirtytrack.PAGE)
            assert bytes(ram[: dirtytrack.PAGE]) == bytes(dirtytrack.PAGE)
            tracker.detach_to_zero()
            assert bytes(ram) == bytes(size)
        finally:
            tracker.close()
            del view
            ram.close()

    def test_misaligned_ram_is_refused(self) -> None:
        """A range that is not page-aligned is a BackendError naming it."""
        with pytest.raises(virtkit.BackendError, match="page-aligned"):
            dirtytrack.Tracker(0x1001, dirtytrack.PAGE)


class TestDeterminism:
    """With the virtual clock a run from a reverted snapshot repeats exactly."""

    def test_reverted_runs_repeat_output_and_ram(
        self, vhv: EmulatorHypervisor, define: Define
    ) -> None:
        """Revert from a fresh machine and from a running one: same bytes out, same RAM."""
        guest = define(vhv, "clock", fmt="qcow2")
        guest.start()
        guest.console.expect("ticks", timeout=TIMEOUT)
        guest.pause()
        early = ram_of(guest)
        guest.snapshot("early")
        offset = guest.snapshot_console_offset("early")
        guest.resume()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        first = guest.console.output[offset:]
        guest.revert("early")  # the machine was gone: the whole snapshot is read
        assert ram_of(guest) == early
        mark = len(guest.console.output)
        guest.resume()
        guest.console.expect("ticks", timeout=TIMEOUT)
        guest.pause()
        guest.revert("early")  # mid-run: only what the run changed is put back
        assert ram_of(guest) == early
        mark = len(guest.console.output)
        guest.resume()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        assert guest.console.output[mark:] == first


#: snapshot "a", change RAM, then snapshot "b" dying (os._exit, no clean-up) just
#: before the Nth file operation: every durable step of a snapshot is a kill point
CHILD = textwrap.dedent(
    """
    import os, sys, threading
    from pathlib import Path
    import virtkit
    from virtkit.model import Disk, Machine

    root, disk, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    hv = virtkit.connect("emulator", root=root / "guests")
    guest = hv.define(Machine(name="k", memory="32MiB", disks=(Disk(disk),)))
    guest.start()
    guest.console.expect("count 1", timeout=30)
    guest.pause()
    pc = guest._pc
    (root / "a.ram").write_bytes(bytes(pc.cpu.ram))
    guest.snapshot("a")
    for n in range(12):
        pc.cpu.write((2 + 2 * n) << 20, bytes([n + 1]) * 5000)
    pc.cpu.ram[0x60000:0x61000] = bytes(4096)
    (root / "b.ram").write_bytes(bytes(pc.cpu.ram))
    calls = 0

    def dying(real):
        def call(*args, **kwargs):
            global calls
            if threading.current_thread() is threading.main_thread():  # not the pack's
                calls += 1                                              # helper thread
                if calls == kill_at:
                    os._exit(9)
            return real(*args, **kwargs)
        return call

    for name in ("write", "pwrite", "fsync", "fdatasync", "replace", "rename", "unlink"):
        setattr(os, name, dying(getattr(os, name)))
    guest.snapshot("b")
    print("CALLS", calls, flush=True)
    os._exit(0)
    """
)


class TestKillMidSnapshot:
    """A process killed at any step of a snapshot leaves every listed snapshot exact."""

    @staticmethod
    def sweep(tmp_path: Path, disk: Path, pick: Callable[[int], list[int]]) -> list[str]:
        """Kill the child at each step ``pick(steps)`` chooses; check what it left."""

        def run(kill_at: int, root: Path) -> subprocess.CompletedProcess[str]:
            root.mkdir()
            return subprocess.run(
                [sys.executable, "-c", CHILD, str(root), str(disk), str(kill_at)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        clean = run(0, tmp_path / "clean")
        assert clean.returncode == 0, clean.stderr
        steps = int(clean.stdout.split("CALLS")[1])
        assert steps >= 5  # pack data, its sync, state file, its sync, rename, list...
        outcomes: list[str] = []
        for kill_at in pick(steps):
            root = tmp_path / f"kill{kill_at}"
            died = run(kill_at, root)
            assert died.returncode == 9, died.stderr
            with virtkit.connect("emulator", root=root / "guests") as hv:
                guest = hv.define(Machine(name="k", memory="32MiB", disks=(Disk(str(disk)),)))
                assert isinstance(guest, EmulatorGuest)
                names = [s.name for s in guest.snapshots]
                assert names[0] == "a"
                outcomes.append("listed" if "b" in names else "gone")
                for name in names:
                    guest.revert(name)
                    assert ram_of(guest) == (root / f"{name}.ram").read_bytes(), (kill_at, name)
                if "b" not in names:  # the name is free again and a snapshot works
                    guest.revert("a")
                    guest.snapshot("b")
                    guest.revert("b")
                    assert ram_of(guest) == (root / "a.ram").read_bytes(), kill_at
                guest.kill()
        return outcomes

    def test_kill_at_sampled_steps(self, tmp_path: Path, boot_disk: Callable[..., Path]) -> None:
        """The first step, one in the middle and the last: ``a`` exact, ``b`` gone or exact."""
        outcomes = self.sweep(
            tmp_path, boot_disk("counter"), lambda steps: [1, (steps + 1) // 2, steps]
        )
        assert outcomes[0] == "gone"
        assert outcomes[-1] == "listed"  # killed before the list's folder sync: it was renamed

    @pytest.mark.slow
    def test_kill_at_every_step(self, tmp_path: Path, boot_disk: Callable[..., Path]) -> None:
        """Every file operation of the snapshot as the kill point."""
        outcomes = self.sweep(
            tmp_path, boot_disk("counter"), lambda steps: list(range(1, steps + 1))
        )
        assert outcomes[0] == "gone"
        assert outcomes[-1] == "listed"  # killed before the list's folder sync: it was renamed

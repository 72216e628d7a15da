"""Behaviour specific to the emulator: determinism, exact replay, faults, BIOS services."""

from __future__ import annotations

import contextlib
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit import images
from virtkit.backends.emulator import EmulatorGuest, EmulatorHypervisor
from virtkit.model import Disk, Machine, State
from virtkit.testing import guests

TIMEOUT = 10.0
Define = Callable[..., EmulatorGuest]


def adhoc_disk(tmp_path: Path, name: str, body: str) -> Path:
    """A raw disk booting a boot sector assembled from ``body`` (common.inc included)."""
    text = (
        "bits 16\norg 0x7C00\n    jmp start\n%define NEED_PUTDEC\n%define NEED_PUTHEX\n"
        '%include "common.inc"\nstart:\n'
        "    GUEST_START\n" + body + "\nBOOT_SIGNATURE\n"
    )
    sector = guests.assemble(text, stem=name)
    path = tmp_path / f"{name}.raw"
    with images.create(path, size="1MiB", format="raw") as image:
        image.write(0, sector)
        image.write(512, guests.DISK_SECTOR1.ljust(512, b"\0"))
    return path


def define_adhoc(hv: EmulatorHypervisor, tmp_path: Path, name: str, body: str) -> EmulatorGuest:
    disk = adhoc_disk(tmp_path, name, body)
    guest = hv.define(Machine(name=name, memory="32MiB", disks=(Disk(str(disk), format="raw"),)))
    assert isinstance(guest, EmulatorGuest)
    return guest


def run_adhoc(hv: EmulatorHypervisor, tmp_path: Path, name: str, body: str) -> bytes:
    """Boot an ad-hoc guest, wait for it to power off, and return its console output."""
    guest = define_adhoc(hv, tmp_path, name, body)
    guest.start()
    assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
    return guest.console.output


def wait_crashed(guest: EmulatorGuest) -> str:
    state = guest.wait(timeout=TIMEOUT)
    assert state is State.CRASHED
    assert guest.crash_reason is not None
    return guest.crash_reason


class TestDeterminism:
    """clock="virtual": guest time follows executed instructions."""

    def test_two_runs_print_identical_bytes_at_identical_instruction_counts(
        self, vhv: EmulatorHypervisor, define: Define
    ) -> None:
        """The clock guest's timer readings and their instruction counts repeat exactly."""
        runs = []
        for _ in range(2):
            guest = define(vhv, "clock")
            guest.start()
            assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
            runs.append((guest.console.output, guest.serial_trace, guest.instructions))
        assert runs[0] == runs[1]
        output, trace, instructions = runs[0]
        assert b"".join(data for _, data in trace) == output
        assert [count for count, _ in trace] == sorted(count for count, _ in trace)
        assert instructions > 48_000_000  # eight samples, 6M instructions of busy work each
        lines = re.findall(rb"ticks (\d+) pit (\d+) rtc (\d+)\r\n", output)
        assert len(lines) == 8
        ticks = [int(t) for t, _, _ in lines]
        assert ticks == sorted(ticks)
        assert ticks[-1] > ticks[0]  # guest time did advance
        assert len({p for _, p, _ in lines}) == 8

    def test_pausing_does_not_change_a_virtual_run(
        self, vhv: EmulatorHypervisor, define: Define
    ) -> None:
        """Pauses and resumes at arbitrary moments leave the guest's view of time unchanged."""
        quiet = define(vhv, "clock")
        quiet.start()
        quiet.wait(timeout=TIMEOUT)
        busy = define(vhv, "clock")
        busy.start()
        busy.console.expect("ticks", timeout=TIMEOUT)
        for _ in range(3):
            busy.pause()
            time.sleep(0.05)
            busy.resume()
        busy.wait(timeout=TIMEOUT)
        assert busy.console.output == quiet.console.output

    def test_revert_replays_the_guest_clock_exactly(
        self, vhv: EmulatorHypervisor, define: Define
    ) -> None:
        """With the virtual clock a reverted run repeats even the timer values it reads."""
        guest = define(vhv, "clock", fmt="qcow2")
        guest.start()
        guest.console.expect("ticks", timeout=TIMEOUT)
        guest.pause()
        guest.snapshot("early")
        offset = guest.snapshot_console_offset("early")
        guest.resume()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        first = guest.console.output[offset:]
        assert first.count(b"\r\n") >= 7
        guest.revert("early")
        mark = len(guest.console.output)
        guest.resume()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        assert guest.console.output[mark:] == first

    def test_virtual_rtc_starts_at_a_fixed_date(
        self, vhv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """int 1Ah AH=04h reports the virtual epoch, 2024-01-01, on every run."""
        body = """
    mov ah, 0x04
    int 0x1A
    movzx eax, cx
    call puthex
    movzx eax, dx
    call puthex
    POWER_OFF
"""
        guest = define_adhoc(vhv, tmp_path, "rtc", body)
        guest.start()
        guest.wait(timeout=TIMEOUT)
        assert guest.console.output == b"0000202400000101"


class TestExactReplay:
    """A full snapshot replays the guest's output byte for byte."""

    def test_snapshot_taken_while_running_replays_exactly(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """Output after revert equals the original output from the capture point on."""
        guest = define(hv, "counter", fmt="qcow2")
        guest.start()
        guest.console.expect("count 3\r\n", timeout=TIMEOUT)
        guest.snapshot("running")
        offset = guest.snapshot_console_offset("running")
        guest.console.expect("count 12\r\n", timeout=TIMEOUT)
        original = guest.console.output[offset:]
        original = original[: original.index(b"count 12\r\n")]
        assert len(original) > 40
        guest.pause()  # so nothing of the old run lands after the mark
        mark = len(guest.console.output)
        guest.revert("running")
        assert guest.state is State.RUNNING
        guest.console.expect("count 12\r\n", timeout=TIMEOUT)
        assert guest.console.output[mark:].startswith(original)

    def test_full_snapshot_files_and_internal_qcow2_snapshot(
        self, hv: EmulatorHypervisor, define: Define, qemu_img: Callable[..., object]
    ) -> None:
        """The state lands in the snapshot folder; the disk holds an internal snapshot."""
        guest = define(hv, "counter", fmt="qcow2")
        guest.start()
        guest.console.expect("count 1", timeout=TIMEOUT)
        guest.snapshot("both")
        folder = guest.snapshot_dir("both")
        assert "state.bin" in {p.name for p in folder.iterdir()}
        guest.kill()
        listing = qemu_img("snapshot", "-l", "-U", guest.disk_path(guest.machine.disks[0]))
        assert "both" in listing.stdout  # type: ignore[attr-defined]
        with images.open(guest.disk_path(guest.machine.disks[0])) as image:
            assert image.check().ok

    def test_delete_snapshot_removes_state_and_internal_snapshot(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """Deleting a full snapshot drops its folder and the qcow2 internal snapshot."""
        guest = define(hv, "counter", fmt="qcow2")
        guest.start()
        guest.console.expect("count 0", timeout=TIMEOUT)
        guest.snapshot("gone")
        guest.snapshot("kept")
        folder = guest.snapshot_dir("gone")
        assert folder.is_dir()
        guest.delete_snapshot("gone")
        assert not folder.exists()
        guest.kill()
        with images.open(guest.disk_path(guest.machine.disks[0])) as image:
            assert [s.name for s in image.snapshots] == ["kept"]
            assert image.check().ok

    def test_snapshot_survives_a_new_connection(
        self, tmp_path: Path, boot_disk: Callable[..., Path]
    ) -> None:
        """A full snapshot saved with the guest's files reverts from a fresh hypervisor."""
        disk = boot_disk("counter", "qcow2")
        machine = Machine(name="keeper", memory="32MiB", disks=(Disk(str(disk)),))
        with virtkit.connect("emulator", root=tmp_path / "root") as hv:
            guest = hv.define(machine)
            guest.start()
            guest.console.expect("count 2\r\n", timeout=TIMEOUT)
            guest.pause()
            captured = int(re.findall(rb"count (\d+)", guest.console.output)[-1])
            guest.snapshot("kept")
        with virtkit.connect("emulator", root=tmp_path / "root") as hv:
            guest = hv.define(machine)
            assert [s.name for s in guest.snapshots] == ["kept"]
            guest.revert("kept")
            assert guest.state is State.PAUSED
            guest.resume()
            found = guest.console.expect(re.compile(rb"count (\d+)\r\n"), timeout=TIMEOUT)
            assert int(found.group(1)) == captured + 1
            guest.kill()


class TestFaults:
    """Bad guests and bad input end CRASHED with a reason, or a VirtkitError."""

    def test_no_boot_signature_names_the_disk(self, hv: EmulatorHypervisor, define: Define) -> None:
        """The reason says which disk lacks 0x55AA, where, and what was found."""
        guest = define(hv, "no-signature")
        guest.start()
        reason = wait_crashed(guest)
        assert reason.startswith("no bootable device: vda (")
        assert "no boot signature 55aa at offset 510 (found 0000)" in reason

    def test_machine_without_disks(self, hv: EmulatorHypervisor, define: Define) -> None:
        """With no disks the reason says so."""
        guest = define(hv, None)
        guest.start()
        assert wait_crashed(guest) == "no bootable device: the machine has no disks"

    def test_triple_fault(self, hv: EmulatorHypervisor, define: Define) -> None:
        """The empty-IDT interrupt is reported as a triple fault with the vector."""
        guest = define(hv, "triple-fault")
        guest.start()
        reason = wait_crashed(guest)
        assert reason.startswith("triple fault: interrupt vector 0x03")
        assert guest.console.output == b"triple fault next\r\n"

    def test_invalid_opcode_without_handler(self, hv: EmulatorHypervisor, tmp_path: Path) -> None:
        """ud2 with the BIOS's default vector crashes the guest, naming #UD and CS:IP."""
        guest = define_adhoc(hv, tmp_path, "ud", "    ud2\n")
        guest.start()
        reason = wait_crashed(guest)
        assert "#UD invalid opcode" in reason
        assert re.search(r"0000:7c[0-9a-f]{2} \(real mode\)", reason)

    def test_divide_error_reaches_the_guest_handler(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """A real-mode #DE goes through IVT[0] to the guest's handler, with IP at the fault."""
        body = """
    mov word [0], handler
    mov word [2], 0
    xor bx, bx
    mov ax, 5
    div bl
    PRINT after
    POWER_OFF
handler:
    PRINT caught
    push bp
    mov bp, sp
    add word [bp + 2], 2    ; skip the two-byte div
    pop bp
    iret
caught: db "caught #DE", 13, 10, 0
after: db "resumed", 13, 10, 0
"""
        assert run_adhoc(hv, tmp_path, "de", body) == b"caught #DE\r\nresumed\r\n"

    def test_interrupt_without_an_idt_in_protected_mode_is_a_triple_fault(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """int 0x30 with the real-mode IVT still loaded: #GP, then #DF, then triple fault."""
        body = """
    cli
    lgdt [gdtr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:pm
bits 32
pm:
    int 0x30
bits 16
align 8
gdt: dq 0, 0x00CF9A000000FFFF
gdtr: dw 15
      dd gdt
"""
        guest = define_adhoc(hv, tmp_path, "pmint", body)
        guest.start()
        reason = wait_crashed(guest)
        assert reason.startswith("triple fault: vector 0x30: ")
        assert "then vector 0x0d" in reason
        assert "then vector 0x08" in reason
        assert reason.endswith("(protected mode)")

    def test_long_mode_interrupt_without_an_idt_is_a_triple_fault(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """The interrupts64 guest minus its lidt: int3 cannot be delivered in long mode."""
        text = guests.source("interrupts64").replace("    lidt [rel idtr]\n", "")
        path = tmp_path / "noidt.raw"
        with images.create(path, size="1MiB", format="raw") as image:
            image.write(0, guests.assemble(text, stem="noidt"))
        guest = hv.define(Machine(name="noidt", memory="32MiB", disks=(Disk(str(path)),)))
        guest.start()
        reason = wait_crashed(guest)  # type: ignore[arg-type]
        assert reason.startswith("triple fault: vector 0x03: ")
        assert reason.endswith("(long mode)")
        assert guest.console.output == b""

    @pytest.mark.parametrize(
        ("name", "port", "value"), [("kbc", "0x64", "0xFE"), ("cf9", "0xCF9", "0x06")]
    )
    def test_guest_reset_reboots(
        self, hv: EmulatorHypervisor, tmp_path: Path, name: str, port: str, value: str
    ) -> None:
        """A reset through the keyboard controller or port 0xCF9 reboots the machine."""
        body = f"""
    PRINT msg
    mov dx, {port}
    mov al, {value}
    out dx, al
    hlt
msg: db "booted", 13, 10, 0
"""
        guest = define_adhoc(hv, tmp_path, name, body)
        guest.start()
        guest.console.expect("booted\r\nbooted\r\nbooted\r\n", timeout=TIMEOUT)
        assert guest.state is State.RUNNING
        guest.kill()

    def test_crash_during_shutdown(self, hv: EmulatorHypervisor, tmp_path: Path) -> None:
        """A guest that crashes on the power button makes shutdown() fail; it stays CRASHED."""
        body = """
    mov dx, PM1A_EN
    mov ax, PWRBTN
    out dx, ax
    PRINT ready
.poll:
    mov dx, PM1A_STS
    in ax, dx
    test ax, PWRBTN
    jnz .boom
    sti
    hlt
    jmp .poll
.boom:
    ud2
ready: db "ready", 0
"""
        guest = define_adhoc(hv, tmp_path, "boom", body)
        guest.start()
        guest.console.expect("ready", timeout=TIMEOUT)
        with pytest.raises(virtkit.StateError, match="crashed instead of powering off"):
            guest.shutdown(timeout=TIMEOUT)
        assert guest.state is State.CRASHED
        assert "#UD" in (guest.crash_reason or "")

    def test_unknown_clock_is_a_config_error(self) -> None:
        """connect() rejects a clock it does not know, naming the field."""
        with pytest.raises(virtkit.ConfigError, match="'clock'"):
            virtkit.connect("emulator", clock="sundial")

    def test_uefi_firmware_is_a_config_error(self, hv: EmulatorHypervisor) -> None:
        """The emulator has a BIOS only; UEFI machines are refused at define()."""
        with pytest.raises(virtkit.ConfigError, match="firmware"):
            hv.define(Machine(name="uefi", firmware="uefi"))


class TestHighCode:
    """Code above 64 KiB keeps running across slice boundaries."""

    BODY = """
    cli
    lgdt [gdtr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:pm
bits 32
pm:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov esi, blob
    mov edi, 0x100000
    mov ecx, blob_end - blob
    rep movsb
    mov eax, 0x100000
    jmp eax
blob:                       ; position-independent: runs at 1 MiB
    mov ecx, 20000000
.spin:
    dec ecx
    jnz .spin
    mov dx, COM1
    mov al, 'O'
    out dx, al
    mov al, 'K'
    out dx, al
    mov dx, PM1A_CNT
    mov ax, SLP_EN_S5
    out dx, ax
.halt:
    hlt
    jmp .halt
blob_end:
bits 16
align 8
gdt: dq 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
gdtr: dw 23
      dd gdt
"""

    @pytest.mark.parametrize("clock", ["wall", "virtual"])
    def test_protected_mode_code_at_one_mib(
        self, clock: str, hv: EmulatorHypervisor, vhv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """A 40M-instruction loop at 1 MiB spans many slices and still finishes."""
        hyp = vhv if clock == "virtual" else hv
        guest = define_adhoc(hyp, tmp_path, f"high-{clock}", self.BODY)
        guest.start()
        assert guest.wait(timeout=60) is State.SHUTOFF, guest.crash_reason
        assert guest.console.output == b"OK"


class TestBiosServices:
    """BIOS services beyond what the QEMU comparison covers."""

    def test_int10_writes_the_screen_not_the_serial_port(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """Teletype output is on the text screen only, as on QEMU without a serial console."""
        body = """
    mov si, text
.next:
    lodsb
    test al, al
    jz .done
    mov ah, 0x0E
    int 0x10
    jmp .next
.done:
    PRINT serial
    POWER_OFF
text: db "on the screen", 13, 10, "second row", 0
serial: db "on the wire", 13, 10, 0
"""
        guest = define_adhoc(hv, tmp_path, "tty", body)
        guest.start()
        guest.wait(timeout=TIMEOUT)
        assert guest.console.output == b"on the wire\r\n"
        assert guest.screen_text() == "on the screen\nsecond row"

    def test_int16_reads_console_input_as_keys(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """int 16h AH=00h blocks until console input and returns scan code and ASCII."""
        body = """
.key:
    xor ah, ah
    int 0x16
    cmp al, 'q'
    je .quit
    movzx eax, ax
    call puthex
    PRINT crlf
    jmp .key
.quit:
    POWER_OFF
crlf: db 13, 10, 0
"""
        guest = define_adhoc(hv, tmp_path, "keys", body)
        guest.start()
        time.sleep(0.1)  # let it block in int 16h first
        guest.console.write(b"a1\r")
        guest.console.expect("00001c0d\r\n", timeout=TIMEOUT)
        guest.console.write(b"q")
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        assert guest.console.output == b"00001e61\r\n00000231\r\n00001c0d\r\n"

    def test_timer_interrupt_calls_the_guest_hook_and_chained_int13_works(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """IRQ0 reaches a guest int 1Ch hook; an int 13h hook can chain to the BIOS."""
        body = """
    cli
    mov word [0x1C * 4], tick
    mov word [0x1C * 4 + 2], 0
    mov eax, [0x13 * 4]
    mov [old13], eax
    mov word [0x13 * 4], hook13
    mov word [0x13 * 4 + 2], 0
    sti
.wait:
    hlt
    cmp word [ticks], 3
    jb .wait
    mov ax, 0x0201
    mov cx, 0x0002
    xor dh, dh
    mov dl, 0x80
    mov bx, 0x8000
    int 0x13
    jc .bad
    PRINT 0x8000
    PRINT ok
    movzx eax, word [calls]
    call putdec
    POWER_OFF
.bad:
    PRINT bad
    POWER_OFF
tick:
    inc word [cs:ticks]
    iret
hook13:
    inc word [cs:calls]
    jmp far [cs:old13]
ticks: dw 0
calls: dw 0
old13: dd 0
ok: db " / int 13h hook calls: ", 0
bad: db "int 13h failed", 0
"""
        assert (
            run_adhoc(hv, tmp_path, "hooks", body)
            == b"sector one says hello / int 13h hook calls: 1"
        )

    def test_int15_block_move_copies_above_one_mib(
        self, hv: EmulatorHypervisor, tmp_path: Path
    ) -> None:
        """int 15h AH=87h copies through the caller's GDT, there and back again."""
        body = """
    mov si, gdt
    mov cx, 10              ; 20 bytes
    mov ah, 0x87
    int 0x15
    jc .bad
    mov dword [gdt + 0x12], 0x200000        ; source: 2 MiB (24-bit base)
    mov byte [gdt + 0x17], 0
    mov dword [gdt + 0x1A], back            ; destination: back (low 24 bits)
    mov byte [gdt + 0x1F], 0
    mov si, gdt
    mov cx, 10
    mov ah, 0x87
    int 0x15
    jc .bad
    PRINT back
    POWER_OFF
.bad:
    PRINT bad
    POWER_OFF
align 8
gdt: times 0x10 db 0
     dw 0xFFFF
     dd text
     dw 0
     dw 0xFFFF
     dd 0x200000
     dw 0
     times 0x10 db 0
text: db "over the 1 MiB line", 0
back: times 20 db 0
bad: db "failed", 0
"""
        assert run_adhoc(hv, tmp_path, "move", body) == b"over the 1 MiB line"

    def test_e820_covers_the_machine_memory(self, hv: EmulatorHypervisor, define: Define) -> None:
        """The usable E820 ranges add up to the RAM minus what SeaBIOS reserves."""
        guest = define(hv, "bios-info", memory="64MiB")
        guest.start()
        guest.wait(timeout=TIMEOUT)
        usable = sum(
            int(length, 16)
            for _, length, kind in re.findall(rb"e820 (\w+) (\w+) (\d)", guest.console.output)
            if kind == b"1"
        )
        assert usable == 64 * 2**20 - 0x400 - 0x60000 - 0x20000


class TestHost:
    """The emulator's footprint on the host process."""

    def test_halted_guest_does_not_burn_host_cpu(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """cli; hlt idles: the process uses well under a core while the guest sits halted."""
        guest = define(hv, "ignore-acpi")
        guest.start()
        guest.console.expect("halting", timeout=TIMEOUT)
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert used < 0.3
        assert guest.state is State.RUNNING
        guest.kill()

    def test_counter_guest_idles_between_lines(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """sti; hlt waits for the next timer tick without spinning."""
        guest = define(hv, "counter")
        guest.start()
        guest.console.expect("count 1\r\n", timeout=TIMEOUT)
        before = resource.getrusage(resource.RUSAGE_SELF)
        guest.console.expect("count 15\r\n", timeout=TIMEOUT)
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert used < 0.4  # ~0.75 s of guest time, mostly halted
        guest.kill()


class TestRandomCode:
    """Arbitrary boot sectors never hang the process or break the emulator itself."""

    def test_random_boot_sectors(self, hv: EmulatorHypervisor, tmp_path: Path) -> None:
        """Each random sector runs, crashes or powers off; kill() always works; no internal error."""
        rng = random.Random(20261126)
        outcomes = set()
        for i in range(40):
            code = bytes(rng.randrange(256) for _ in range(510)) + b"\x55\xaa"
            path = tmp_path / f"r{i}.raw"
            with images.create(path, size="64KiB", format="raw") as image:
                image.write(0, code)
            guest = hv.define(Machine(name=f"r{i}", memory="2MiB", disks=(Disk(str(path)),)))
            guest.start()
            with contextlib.suppress(virtkit.TimeoutError):
                guest.wait(timeout=0.05)
            state = guest.state
            outcomes.add(state)
            if state is State.CRASHED:
                assert guest.crash_reason
                assert "internal error" not in guest.crash_reason
            if state is not State.SHUTOFF:
                guest.kill()
            assert guest.state is State.SHUTOFF
            hv.undefine(guest)
        assert State.CRASHED in outcomes


class TestSerialOption:
    """Machine.serial.enabled decides whether COM1 exists."""

    def test_without_serial_nothing_reaches_the_console(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """With serial disabled the guest still runs (and powers off) but prints nothing."""
        guest = define(hv, "hello", serial=virtkit.Serial(enabled=False))
        guest.start()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        assert guest.console.output == b""


class TestBootOrder:
    """int 19h: the first bootable disk in boot order boots, as drive 0x80."""

    def _machine(
        self, hv: EmulatorHypervisor, disks: list[Path], **fields: object
    ) -> EmulatorGuest:
        machine = Machine(
            name="order",
            memory="32MiB",
            disks=tuple(Disk(str(p)) for p in disks),
            **fields,  # type: ignore[arg-type]
        )
        guest = hv.define(machine)
        assert isinstance(guest, EmulatorGuest)
        return guest

    def test_unbootable_first_disk_is_skipped(
        self, hv: EmulatorHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """A first disk without a signature is passed over for the second."""
        guest = self._machine(hv, [boot_disk("no-signature"), boot_disk("hello")])
        guest.start()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["hello"]

    def test_boot_order_names_the_disk(
        self, hv: EmulatorHypervisor, boot_disk: Callable[..., Path]
    ) -> None:
        """Machine.boot picks the second disk although the first is bootable."""
        guest = self._machine(hv, [boot_disk("counter"), boot_disk("hello")], boot=("vdb",))
        guest.start()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        assert guest.console.output == guests.OUTPUT["hello"]

    def test_second_disk_is_drive_0x81(self, hv: EmulatorHypervisor, tmp_path: Path) -> None:
        """The guest reads the other disk as BIOS drive 0x81 (EDD) and sees two drives."""
        data = tmp_path / "data.qcow2"
        with images.create(data, size="1MiB", format="qcow2") as image:
            image.write(5 * 512, b"data disk sector five\0")
        body = """
    mov ah, 0x42
    mov dl, 0x81
    mov si, dap
    int 0x13
    jc .bad
    PRINT 0x8000
    mov ah, 0x08
    mov dl, 0x80
    int 0x13
    movzx eax, dl
    call putdec
    POWER_OFF
.bad:
    PRINT bad
    POWER_OFF
align 4
dap: db 0x10, 0
     dw 1, 0x8000, 0
     dq 5
bad: db "read failed", 0
"""
        boot = adhoc_disk(tmp_path, "second", body)
        guest = self._machine(hv, [boot, data])
        guest.start()
        assert guest.wait(timeout=TIMEOUT) is State.SHUTOFF
        assert guest.console.output == b"data disk sector five2"


class TestInterpreterExit:
    """Leaving Python with guests still running is clean."""

    def test_exit_with_running_guests_does_not_crash(self, tmp_path: Path) -> None:
        """A script that never closes its spinning guests still exits with status 0."""
        script = tmp_path / "leave.py"
        script.write_text(
            f"""
import virtkit
from virtkit import images
from virtkit.model import Disk, Machine
from virtkit.testing import guests

text = (
    'bits 16\\norg 0x7C00\\n    jmp start\\n%include "common.inc"\\nstart:\\n    GUEST_START\\n'
    '    PRINT m\\n.l: inc eax\\n    jmp .l\\nm: db "spinning", 0\\nBOOT_SIGNATURE\\n'
)
disk = {str(tmp_path / "spin.raw")!r}
with images.create(disk, size="1MiB", format="raw") as image:
    image.write(0, guests.assemble(text, stem="spin"))
hv = virtkit.connect("emulator", root={str(tmp_path / "guests")!r})
for i in range(2):
    guest = hv.define(Machine(name=f"s{{i}}", memory="32MiB", disks=(Disk(disk, read_only=True),)))
    guest.start()
    guest.console.expect("spinning", timeout=10)
print("leaving")
"""
        )
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "leaving\n"

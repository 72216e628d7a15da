"""The PC: CPU, RAM, BIOS, chipset, UART and disks, run on a worker thread.

The worker runs the CPU in bounded slices. Between slices it delivers the
timer interrupt, idles a halted CPU on a condition variable (no host CPU
burnt), and parks when the API asks (pause, snapshot, reset), so every
operation takes effect within one slice (a few milliseconds).

* ``clock="virtual"``: a slice is a budget of at most ``SLICE_INSTRUCTIONS``
  instructions, counted by unicorn; guest time is the sum of budgets spent (a
  halted CPU skips to the next timer tick), so execution and the times it
  observes are a deterministic function of the machine's inputs. Counting
  costs unicorn about ten times its speed.
* ``clock="wall"``: a slice runs uncounted until the next timer tick or
  ``WALL_SLICE_NS`` at most, and a timer thread ends it between two
  translation blocks (``slicestop.py`` says why not with unicorn's
  ``emu_stop``). Where that cannot be set up (another unicorn layout),
  wall-clock slices are counted like virtual ones.

A slice also ends at a ``hlt`` or when the CPU thread itself stops it (a
device request, a crash). An interrupt is not delivered right after ``sti``
(the one-instruction interrupt shadow), so ``sti; hlt`` waits as on hardware.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from unicorn import x86_const as x86

from virtkit.backends.emulator import bootstrap, instructions
from virtkit.backends.emulator.bios import (
    BIOS_SEGMENT,
    STUB_BASE,
    STUB_SIZE,
    Bios,
    stub_address,
)
from virtkit.backends.emulator.bootparams import LinuxBoot
from virtkit.backends.emulator.chipset import Chipset, Request
from virtkit.backends.emulator.clock import NS_PER_INSTRUCTION, Clock
from virtkit.backends.emulator.cpu import (
    EXCEPTION_NAMES,
    FLAG_IF,
    Cpu,
    CpuFault,
    TripleFault,
    UcError,
    unicorn,
)
from virtkit.backends.emulator.disks import Drive, DriveSpec, open_drives
from virtkit.backends.emulator.interrupts import (
    Mmu,
    deliver,
    enter_syscall,
    page_fault_error_code,
    syscall_length,
)
from virtkit.backends.emulator.platform import PlatformDevices
from virtkit.backends.emulator.slicestop import SliceStopper, SliceTimer, stop_fields
from virtkit.backends.emulator.uart import COM1_BASE, Uart16550
from virtkit.errors import BackendError, ConfigError, ImageError

__all__ = ["SLICE_INSTRUCTIONS", "WALL_SLICE_NS", "PcMachine"]

log = logging.getLogger("virtkit.emulator")

SLICE_INSTRUCTIONS = 100_000
#: the longest uncounted wall-clock slice (host nanoseconds); it ends sooner at the next tick
WALL_SLICE_NS = 10_000_000
#: count wall-clock slices too (as before the uncounted ones), e.g. to compare them
COUNTED_WALL_SLICES = False
_STI = 0xFB
TRACE_LIMIT = 100_000  # serial trace entries kept (virtual clock); later output is not traced
_PARK_TIMEOUT = 10.0
#: ACPI tables and virtio-mmio disks for a directly booted kernel (see platform.py); on by
#: default. ``PcMachine(platform=False)`` gives a kernel the bare PC (no ACPI, disks by BIOS only).
PLATFORM_DEVICES = True
#: decompress a directly booted kernel on the host and enter it at its 64-bit entry (see
#: vmlinux.py) instead of running its decompressor; ``PcMachine(unpack_kernel=...)`` overrides
UNPACK_KERNEL = True


#: machines whose worker runs; stopped at interpreter exit, because a CPU thread
#: still executing guest code while Python frees the engine and the RAM would crash
_RUNNING: weakref.WeakSet[PcMachine] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for machine in list(_RUNNING):
        with contextlib.suppress(Exception):
            machine.close()


@functools.cache
def _register_exit_hook() -> None:
    """Register :func:`_stop_all_at_exit` once a unicorn engine exists.

    atexit runs handlers last-in first-out, and unicorn frees its engines from
    a ``weakref.finalize`` exit hook registered when the first engine is
    made: ours must come later so that it runs first.
    """
    atexit.register(_stop_all_at_exit)


class _Event(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    CRASH = "crash"
    WAIT_INPUT = "wait-input"
    WAIT_UNTIL = "wait-until"


class PcMachine:
    """One emulated PC.

    Args:
        memory: RAM in bytes.
        drives: disks in BIOS order; the first bootable one boots.
        boot_problems: reasons devices in the boot order cannot boot
            (e.g. CD-ROMs), reported if no disk boots either.
        clock: ``"wall"`` or ``"virtual"``.
        serial: whether COM1 exists (without it the ports read as open bus).
        output: receives the bytes the guest sends to COM1.
        on_poweroff: called (from the worker) when the guest powers off.
        on_crash: called (from the worker) with a reason when the guest crashes.
        kernel: boot this Linux kernel directly (boot protocol) instead of a disk.
        platform: give a directly booted kernel ACPI tables and its disks as
            virtio-mmio block devices (default: ``PLATFORM_DEVICES``).
        unpack_kernel: decompress a directly booted kernel on the host and
            start it at its 64-bit entry, skipping its decompressor (default:
            ``UNPACK_KERNEL``); kernels whose compression is not handled
            still boot through their decompressor.

    Raises:
        ImageError: a disk cannot be opened.
        BackendError: the CPU cannot be created.
        ConfigError: the kernel's compressed payload is corrupt.
    """

    def __init__(
        self,
        *,
        memory: int,
        drives: Sequence[DriveSpec],
        boot_problems: Sequence[str] = (),
        clock: str = "wall",
        serial: bool = True,
        output: Callable[[bytes], None],
        on_poweroff: Callable[[], None],
        on_crash: Callable[[str], None],
        kernel: LinuxBoot | None = None,
        platform: bool | None = None,
        unpack_kernel: bool | None = None,
    ) -> None:
        self.clock = Clock(clock)
        self.kernel = kernel
        unpack = UNPACK_KERNEL if unpack_kernel is None else unpack_kernel
        #: the kernel proper unpacked on the host (None: the decompressor runs)
        self.vmlinux = kernel.unpacked() if kernel is not None and unpack else None
        self._output = output
        self._on_poweroff = on_poweroff
        self._on_crash = on_crash
        #: why devices in the boot order cannot boot (reported if nothing boots)
        self.boot_problems = list(boot_problems)
        self.serial_present = serial
        self.drives: list[Drive] = open_drives(drives)
        try:
            self.cpu = Cpu(memory)
        except BaseException:
            for drive in self.drives:
                drive.close()
            raise
        self.uart = Uart16550(self._transmit)
        self.chipset = Chipset(self.clock, self.cpu.memory_size, self._device_request)
        self.platform: PlatformDevices | None = None
        if kernel is not None and (PLATFORM_DEVICES if platform is None else platform):
            try:
                self.platform = PlatformDevices(self.cpu, self.drives, sci=self.chipset.sci_pending)
                self.platform.map()
            except BaseException:
                for drive in self.drives:
                    drive.close()
                self.cpu.close()
                raise
        self.bios = Bios(self)
        self.disk_status: dict[int, int] = {}
        self.trace: list[tuple[int, bytes]] = []  # virtual clock: (instructions, output)
        #: guest instructions run in counted slices (whole budgets when unicorn's counter
        #: is not found); uncounted wall-clock slices (see :attr:`counted`) add nothing
        self.executed = 0
        fields = None if self.clock.virtual or COUNTED_WALL_SLICES else stop_fields()
        self._stopper = None if fields is None else SliceStopper(self.cpu.uc, fields)
        #: whether slices are counted (always on the virtual clock)
        self.counted = self._stopper is None
        self._timer: SliceTimer | None = None
        self._slice_out = bytearray()
        self.halted = False
        self._event: _Event | None = None
        self._event_reason = ""
        self._wait_deadline = 0
        self._next_tick_ns = 0
        self._irq0_pending = False
        self.finished: str | None = None  # "poweroff" / "crash" / "closed" once the worker ended
        self.crash_reason: str | None = None
        self.last_screen = ""
        self._cv = threading.Condition()
        self._gate = threading.Event()
        self._park = False
        self._parked = False
        self._quit = False
        self._thread: threading.Thread | None = None
        self._install_hooks()

    # -- construction ------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        uc = self.cpu.uc
        uc.hook_add(unicorn.UC_HOOK_INSN, self._hook_in, None, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._hook_out, None, 1, 0, x86.UC_X86_INS_OUT)
        uc.hook_add(unicorn.UC_HOOK_INTR, self._hook_interrupt)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._hook_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        instructions.install(self.cpu, self._tsc, self.fail)

    def _tsc(self) -> int:
        """The time-stamp counter: guest nanoseconds (exact to the instruction when virtual)."""
        return self.clock.now_ns()

    def power_on(self) -> None:
        """Run the BIOS start-up (data areas) and load the boot sector; no code runs yet."""
        self.cpu.reset_real_mode()
        self.bios.post()
        self.chipset.reset()
        self.uart.reset()
        self._next_tick_ns = self.clock.now_ns() + self.chipset.timer_period_ns()
        self.bootstrap()

    # -- worker control (API side) -----------------------------------------------------------------
    def start(self, *, parked: bool = False) -> None:
        """Start the worker thread; it waits for :meth:`release` before running."""
        self._park = parked
        if self._stopper is not None:
            self._timer = SliceTimer(self._stopper)
        self._thread = threading.Thread(target=self._worker, name="virtkit-emulator", daemon=True)
        _RUNNING.add(self)
        _register_exit_hook()
        self._thread.start()

    def release(self) -> None:
        """Let the worker begin (after the guest's state says it runs)."""
        self._gate.set()

    def park(self) -> None:
        """Stop the CPU at the next slice boundary and wait until it is parked.

        Raises:
            BackendError: the worker did not stop in time.
        """
        with self._cv:
            self._park = True
            self._cv.notify_all()
            self._end_slice()
            deadline = time.monotonic() + _PARK_TIMEOUT
            while not self._parked and self.finished is None and self._thread is not None:
                if not self._gate.is_set():
                    return  # not started yet: it will park before running
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendError("the emulator's CPU thread did not stop within 10 s")
                self._cv.wait(remaining)

    def unpark(self) -> None:
        """Let a parked CPU continue."""
        with self._cv:
            self._park = False
            self._cv.notify_all()

    def _end_slice(self) -> None:
        """End an uncounted slice now, so that a request is seen at once (any thread)."""
        timer = self._timer
        if timer is not None:
            timer.stop_now()

    @property
    def running(self) -> bool:
        """Whether the worker is alive."""
        return self._thread is not None and self._thread.is_alive()

    def send_input(self, data: bytes) -> None:
        """Console input: queue it for the UART (and the BIOS keyboard)."""
        self.uart.receive(data)
        with self._cv:
            self._cv.notify_all()
        self._end_slice()

    def press_power_button(self) -> None:
        """The ACPI power button."""
        with self._cv:
            self.chipset.press_power_button()
            self._cv.notify_all()
        self._end_slice()

    def wait_finished(self, timeout: float) -> str | None:
        """Wait until the worker ends; return why (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.finished is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cv.wait(min(remaining, 0.5))
            return self.finished

    def close(self) -> None:
        """Stop the worker and release the CPU and the disks. Idempotent."""
        with self._cv:
            self._quit = True
            self._cv.notify_all()
        self._end_slice()
        self._gate.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_PARK_TIMEOUT)
            if thread.is_alive():
                raise BackendError("the emulator's CPU thread did not stop within 10 s")
        self._release_resources()

    def _release_resources(self) -> None:
        _RUNNING.discard(self)
        for drive in self.drives:
            try:
                drive.close()
            except ImageError as exc:
                log.warning("closing %s: %s", drive.spec.path, exc)
        self.drives = []
        if self.cpu.uc is not None:
            self.cpu.close()

    def hard_reset(self) -> None:
        """The reset button (call while parked): reboot from the BIOS."""
        self._event = None
        self.halted = False
        self.cpu.clear_ram()
        self.power_on()

    # -- worker ------------------------------------------------------------------------------------
    def _worker(self) -> None:
        self._gate.wait()
        why, reason = "closed", ""
        try:
            why, reason = self._loop()
        except TripleFault as exc:
            why, reason = "crash", f"triple fault: {exc}"
        except CpuFault as exc:
            why, reason = "crash", str(exc)
        except Exception as exc:  # an emulator bug must not kill the process: crash the guest
            log.exception("emulator worker failed")
            why, reason = "crash", f"emulator internal error: {type(exc).__name__}: {exc}"
        self._flush_trace()
        if self._timer is not None:
            self._timer.close()
        if why != "closed":  # the guest stopped by itself: free disks before anyone is told
            self.last_screen = self.bios.screen_text()
            self._release_resources()
        with self._cv:
            self.crash_reason = reason or None
            self.finished = why
            self._cv.notify_all()
        self.clock.stop()
        if why == "poweroff":
            self._on_poweroff()
        elif why == "crash":
            self._on_crash(reason)

    def _loop(self) -> tuple[str, str]:
        clock = self.clock
        while True:
            with self._cv:
                if self._quit:
                    return "closed", ""
                if self._park:
                    clock.stop()
                    self._parked = True
                    self._cv.notify_all()
                    while self._park and not self._quit:
                        self._cv.wait()
                    self._parked = False
                    continue
            if self._event is _Event.POWEROFF:
                return "poweroff", ""
            if self._event is _Event.CRASH:
                return "crash", self._event_reason
            clock.run()
            if self._event is _Event.WAIT_INPUT:
                if not self._idle(until_input=True):
                    continue
                self._event = None
            elif self._event is _Event.WAIT_UNTIL:
                if not self._idle(deadline=self._wait_deadline):
                    continue
                self._event = None
            elif self.halted:
                if not self._idle():
                    continue
                self.halted = False
            self._interrupts()
            self._slice()
            if self._event is _Event.RESET:  # power-off and crash end the loop at its top
                self._event = None
                self.hard_reset()

    def _interrupts(self) -> None:
        """Raise due hardware interrupts: IRQ0 (timer) and IRQ4 (COM1), through the PIC."""
        now = self.clock.now_ns()
        if now >= self._next_tick_ns:
            self._irq0_pending = True
            period = self.chipset.timer_period_ns()
            self._next_tick_ns += period
            if self._next_tick_ns <= now:  # far behind (host was busy): drop lost ticks
                self._next_tick_ns = now + period
        cpu = self.cpu
        if not cpu.eflags & FLAG_IF:
            return
        lines = [(0, self._irq0_pending), (4, self.uart.irq_pending())]
        if self.platform is not None:  # virtio-mmio disks: level-triggered lines
            lines += [(irq, True) for irq in self.platform.pending_irqs()]
        for irq, pending in lines:
            vector = self.chipset.irq_vector(irq) if pending else None
            if vector is None:
                continue
            if self._byte_before_rip() == _STI:
                return  # the shadow of sti: delivered at the next slice boundary
            if irq == 0:
                self._irq0_pending = False
            self.chipset.acknowledge(irq)
            deliver(cpu, vector, cpu.rip, external=True)
            return  # one interrupt per slice boundary

    def _irq_ready(self) -> bool:
        """Whether an interrupt would be taken now (wakes a halted CPU)."""
        if not self.cpu.eflags & FLAG_IF:
            return False
        if self._irq0_pending and self.chipset.irq_vector(0) is not None:
            return True
        if self.platform is not None and any(
            self.chipset.irq_vector(irq) is not None for irq in self.platform.pending_irqs()
        ):
            return True
        return self.uart.irq_pending() and self.chipset.irq_vector(4) is not None

    def _idle(self, *, until_input: bool = False, deadline: int | None = None) -> bool:
        """Wait (without spinning) for what a halted or blocked CPU waits for.

        Returns True when the CPU should run again; False to re-check requests
        first (the caller loops).
        """
        clock = self.clock
        if until_input and self.uart.has_input():
            return True
        now = clock.now_ns()
        if deadline is not None and now >= deadline:
            return True
        ticks = until_input or deadline is not None or bool(self.cpu.eflags & FLAG_IF)
        if ticks and now >= self._next_tick_ns:
            return True
        if self._irq_ready():
            return True
        if not ticks:  # halted with interrupts off: only a request (or reset) ends this
            with self._cv:
                if not (self._park or self._quit):
                    self._cv.wait(0.5)
            return False
        wake = self._next_tick_ns if deadline is None else min(deadline, self._next_tick_ns)
        delay_ns = max(wake - now, 0)
        with self._cv:
            if not (self._park or self._quit or (until_input and self.uart.has_input())):
                self._cv.wait(delay_ns / 1e9)
        if clock.virtual:  # idle time is skipped, deterministically, whatever woke us
            clock.advance(-(-delay_ns // NS_PER_INSTRUCTION))  # round up: reach the tick
        return False

    def _slice(self) -> None:
        with self._cv:
            if self._park or self._quit:
                return
        if self._timer is not None:
            self._wall_slice(self._timer)
        else:
            self._counted_slice()

    def _wall_slice(self, timer: SliceTimer) -> None:
        """Run uncounted until the next tick (at most ``WALL_SLICE_NS``); the timer ends it."""
        cpu = self.cpu
        length = min(WALL_SLICE_NS, max(self._next_tick_ns - self.clock.now_ns(), 0))
        timer.begin(time.monotonic_ns() + length)
        ran_out = False
        try:
            cpu.run(count=0)
        except UcError as exc:
            if SliceStopper.ran_out(exc):
                ran_out = True
            else:
                self._engine_error(exc)
        finally:
            timer.end()
        # unicorn returns early only at a hlt, an error or a CPU-thread stop; after a timer
        # stop 0xF4 before RIP may be another instruction's: then only with interrupts on
        may_be_hlt = not ran_out or bool(cpu.eflags & FLAG_IF)
        if self._event is None and may_be_hlt and self._byte_before_rip() == 0xF4:
            self.halted = True

    def _counted_slice(self) -> None:
        cpu, clock = self.cpu, self.clock
        budget = SLICE_INSTRUCTIONS
        if clock.virtual:
            to_tick = -(-(self._next_tick_ns - clock.now_ns()) // NS_PER_INSTRUCTION)
            budget = max(min(SLICE_INSTRUCTIONS, to_tick), 1)
        start = clock.instructions
        if clock.virtual:  # time inside the slice follows unicorn's counter
            clock.slice_started(cpu.slice_progress)
        try:
            cpu.run(count=budget)
        except UcError as exc:
            self._engine_error(exc)
        finally:
            clock.slice_ended()
        used = cpu.budget_used()
        self.executed += budget if used or used is None else cpu.slice_progress()
        if clock.virtual:
            clock.advance(budget)
            if self._slice_out:
                if len(self.trace) < TRACE_LIMIT:
                    self.trace.append((start, bytes(self._slice_out)))
                self._slice_out.clear()
        # 0xF4 before RIP may be a hlt or part of another instruction: a hlt ends the
        # slice before its budget is used up (a wrong "halted" with interrupts off would
        # idle forever). Without the counter, only with interrupts on (a short delay).
        may_be_hlt = not used if used is not None else bool(cpu.eflags & FLAG_IF)
        if self._event is None and may_be_hlt and self._byte_before_rip() == 0xF4:
            self.halted = True

    def _byte_before_rip(self) -> int | None:
        """The byte before the instruction pointer (0xF4 after a ``hlt``, 0xFB after ``sti``)."""
        cpu = self.cpu
        try:
            if cpu.real_mode:
                linear = (cpu.cs << 4) + (cpu.rip & 0xFFFF) - 1
                return cpu.read(linear, 1)[0] if linear >= 0 else None
            return Mmu(cpu).read(self._cs_base() + cpu.rip - 1, 1)[0]
        except (UcError, CpuFault):
            return None

    def _engine_error(self, exc: Exception) -> None:
        errno = getattr(exc, "errno", None)
        cpu = self.cpu
        if errno == unicorn.UC_ERR_INSN_INVALID:
            if cpu.real_mode and not self._guest_handles(6):
                self.fail(f"unhandled exception #UD invalid opcode at {cpu.where()}")
                return
            where = cpu.where()
            try:
                deliver(cpu, 6, cpu.rip)
            except TripleFault as fault:
                self.fail(f"triple fault: #UD invalid opcode at {where}, then {fault}")
            except CpuFault as fault:
                self.fail(f"#UD invalid opcode at {where}: {fault}")
            return
        if errno in (
            unicorn.UC_ERR_READ_UNMAPPED,
            unicorn.UC_ERR_WRITE_UNMAPPED,
            unicorn.UC_ERR_FETCH_UNMAPPED,
        ):
            self.fail(f"the guest accessed memory that does not exist ({exc}) at {cpu.where()}")
            return
        self.fail(f"the CPU stopped: {exc} at {cpu.where()}")

    # -- hooks (worker thread, inside a slice) -----------------------------------------------------
    def _hook_in(self, uc: Any, port: int, size: int, user_data: Any) -> int:
        if COM1_BASE <= port < COM1_BASE + 8 and self.serial_present:
            return self.uart.read(port - COM1_BASE)
        if self.chipset.handles(port):
            return self.chipset.read(port, size)
        return (1 << (8 * size)) - 1

    def _hook_out(self, uc: Any, port: int, size: int, value: int, user_data: Any) -> None:
        if COM1_BASE <= port < COM1_BASE + 8 and self.serial_present:
            self.uart.write(port - COM1_BASE, value)
            if self._timer is not None and self.uart.irq_pending():
                self._timer.stop_now()  # deliver it at the next block, not at the slice's end
        elif self.chipset.handles(port):
            self.chipset.write(port, size, value)

    def _hook_interrupt(self, uc: Any, vector: int, user_data: Any) -> None:
        try:
            self._interrupt(vector)
            self.cpu.end_exception()
        except TripleFault as exc:
            self.fail(f"triple fault: {exc}")
        except CpuFault as exc:
            self.fail(str(exc))

    def _hook_syscall(self, uc: Any, user_data: Any) -> None:
        # unicorn treats SYSCALL as a NOP that calls this hook: do the entry
        cpu = self.cpu
        try:
            enter_syscall(cpu, syscall_length(cpu, cpu.rip, self._cs_base()))
        except TripleFault as exc:
            self.fail(f"triple fault: {exc}")
        except CpuFault as exc:
            self.fail(f"SYSCALL at {cpu.where()}: {exc}")

    def _interrupt(self, vector: int) -> None:
        cpu = self.cpu
        if not cpu.real_mode:
            software, return_ip = self._software_int_pm(vector)
            code = None
            if vector == 14 and not software:
                code = page_fault_error_code(cpu, cpu.reg(x86.UC_X86_REG_CR2))
            deliver(cpu, vector, return_ip, software=software, error_code=code)
            return
        ip = cpu.rip & 0xFFFF
        cs = cpu.cs
        software, at = self._software_int(vector, cs, ip)
        idt_limit = cpu.idtr()[1]
        if vector * 4 + 3 > idt_limit:
            raise TripleFault(
                f"interrupt vector {vector:#04x} at {cs:04x}:{ip:04x} is beyond the real-mode IDT "
                f"limit {idt_limit:#x}"
            )
        # the BIOS stub's own ``int n`` (reached by a guest handler chaining to the BIOS)
        in_stub = software and cs == BIOS_SEGMENT and at == STUB_BASE + STUB_SIZE * vector
        if software and (in_stub or not self._guest_handles(vector)):
            self.bios.service(vector)
            return
        if not software and not self._guest_handles(vector):
            name = EXCEPTION_NAMES.get(vector, f"exception {vector}")
            raise CpuFault(f"unhandled exception {name} at {cs:04x}:{ip:04x} (real mode)")
        deliver(cpu, vector, ip, software=software)

    def _software_int_pm(self, vector: int) -> tuple[bool, int]:
        """Whether a protected/long-mode interrupt came from INT, and the return address."""
        cpu = self.cpu
        rip = cpu.rip
        try:
            code = Mmu(cpu).read(self._cs_base() + rip - 2, 2)
        except CpuFault:
            return False, rip
        if code == bytes([0xCD, vector]) or (vector, code[1]) in ((3, 0xCC), (4, 0xCE), (1, 0xF1)):
            return True, rip
        return False, rip

    def _cs_base(self) -> int:
        cpu = self.cpu
        if cpu.long_mode:
            return 0
        gdt = cpu.uc.reg_read(x86.UC_X86_REG_GDTR)
        index = cpu.cs & ~7
        if index == 0 or index + 7 > int(gdt[2]):
            return 0
        raw = int.from_bytes(Mmu(cpu).read(int(gdt[1]) + index, 8), "little")
        return ((raw >> 16) & 0xFFFFFF) | ((raw >> 56) << 24)

    def _software_int(self, vector: int, cs: int, ip: int) -> tuple[bool, int]:
        """Whether the interrupt came from an INT instruction, and where that is."""
        base = cs << 4
        code = self.cpu.read(base + ((ip - 2) & 0xFFFF), 2)
        if code == bytes([0xCD, vector]):
            return True, (ip - 2) & 0xFFFF
        if (vector, code[1]) in ((3, 0xCC), (4, 0xCE), (1, 0xF1)):
            return True, (ip - 1) & 0xFFFF
        return False, ip

    def _guest_handles(self, vector: int) -> bool:
        """Whether the IVT entry was changed from the BIOS default."""
        base = self.cpu.idtr()[0]
        off = self.cpu.read16(base + vector * 4)
        seg = self.cpu.read16(base + vector * 4 + 2)
        return (seg, off) != stub_address(vector)

    # -- called by devices and BIOS services -------------------------------------------------------
    def _transmit(self, data: bytes) -> None:
        if self.clock.virtual:
            self._slice_out += data
        self._output(data)

    def _flush_trace(self) -> None:
        if self._slice_out:
            self.trace.append((self.clock.instructions, bytes(self._slice_out)))
            self._slice_out.clear()

    def _device_request(self, request: Request) -> None:
        self._event = _Event.POWEROFF if request is Request.POWEROFF else _Event.RESET
        self.cpu.stop()

    def fail(self, reason: str) -> None:
        """Crash the guest with ``reason`` (the slice ends)."""
        self._event = _Event.CRASH
        self._event_reason = reason
        self.cpu.stop()

    def wait_for_input(self) -> None:
        """Block the current BIOS call until console input arrives (it is re-run)."""
        cpu = self.cpu
        cpu.set_reg(x86.UC_X86_REG_EIP, (cpu.rip - 2) & 0xFFFF)
        self._event = _Event.WAIT_INPUT
        cpu.stop()

    def wait_until(self, deadline_ns: int) -> None:
        """Block the guest (as int 15h AH=86h does) until guest time ``deadline_ns``."""
        self._wait_deadline = deadline_ns
        self._event = _Event.WAIT_UNTIL
        self.cpu.stop()

    def log(self, message: str) -> None:
        """Record a diagnostic about the guest."""
        log.info("%s", message)

    # -- int 19h -----------------------------------------------------------------------------------
    def bootstrap(self) -> None:
        """Start the kernel, or the first bootable device's boot sector (int 19h)."""
        bootstrap.boot(self)

    # -- snapshots -----------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        """Machine-level state (the CPU must be parked)."""
        return {
            "halted": self.halted,
            "event": None if self._event is None else self._event.value,
            "event_reason": self._event_reason,
            "wait_deadline": self._wait_deadline,
            "next_tick_ns": self._next_tick_ns,
            "irq0_pending": self._irq0_pending,
            "disk_status": {str(k): v for k, v in self.disk_status.items()},
            "drives": [d.spec.name for d in self.drives],
            "platform": None if self.platform is None else self.platform.save(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`save_state` output.

        Raises:
            ConfigError: the snapshot was taken with other disks attached.
        """
        drives = [d.spec.name for d in self.drives]
        if list(state["drives"]) != drives:
            raise ConfigError(
                f"the snapshot was taken with disks {state['drives']}, the machine has {drives}",
                field="disks",
            )
        self.halted = bool(state["halted"])
        event = state["event"]
        self._event = None if event is None else _Event(event)
        self._event_reason = str(state["event_reason"])
        self._wait_deadline = int(state["wait_deadline"])
        self._next_tick_ns = int(state["next_tick_ns"])
        self._irq0_pending = bool(state["irq0_pending"])
        self.disk_status = {int(k): int(v) for k, v in state["disk_status"].items()}
        if self.platform is not None and state.get("platform") is not None:
            self.platform.load(state["platform"])

    # -- inspection --------------------------------------------------------------------------------
    def screen_text(self) -> str:
        """The BIOS text screen (as it was when the guest stopped, once it has)."""
        if self.cpu.uc is None:
            return self.last_screen
        return self.bios.screen_text()

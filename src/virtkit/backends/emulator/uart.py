"""A 16550A UART (COM1 at 0x3F8), wired to the guest's console.

Transmit is instantaneous (THR is always empty), received bytes wait in a
FIFO fed by ``Console.write``. Registers, as in the 16550 data sheet and
QEMU's ``hw/char/serial.c``:

=====  ==============  ==============
offs   read            write
=====  ==============  ==============
0      RBR / DLL       THR / DLL     (DLAB selects the divisor latch)
1      IER / DLM       IER / DLM
2      IIR             FCR
3      LCR             LCR
4      MCR             MCR
5      LSR             (ignored)
6      MSR             (ignored)
7      SCR             SCR
=====  ==============  ==============

Interrupts (received data, THR empty) are reported in IIR and raise IRQ4 on
the PIC when IER enables them, as QEMU's UART does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["COM1_BASE", "Uart16550"]

COM1_BASE = 0x3F8

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
LCR_DLAB = 0x80
MCR_LOOP = 0x10
IER_RDA = 0x01
IER_THRE = 0x02
FIFO_LIMIT = 1 << 16


class Uart16550:
    """The UART's registers and receive FIFO.

    Args:
        output: called with every byte the guest transmits.
        base: first I/O port.
    """

    def __init__(self, output: Callable[[bytes], None], base: int = COM1_BASE) -> None:
        self.base = base
        self._output = output
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        #: called (once, then cleared) the first time the guest looks for input
        self.input_wanted: Callable[[], None] | None = None
        self.reset()

    def reset(self) -> None:
        """Registers as after power-on."""
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.divisor = 12  # 9600 baud
        self._thre_pending = True

    # -- console side ------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Queue bytes for the guest to read (from any thread)."""
        with self._lock:
            room = FIFO_LIMIT - len(self._rx)
            self._rx.extend(data[: max(room, 0)])

    def _wanted(self) -> None:
        """The guest is looking for input: tell the console once (outside our lock)."""
        hook, self.input_wanted = self.input_wanted, None
        if hook is not None:
            hook()

    def has_input(self) -> bool:
        """Whether received bytes are waiting."""
        self._wanted()
        with self._lock:
            return bool(self._rx)

    def peek_input(self) -> int | None:
        """The next received byte, left in the queue."""
        self._wanted()
        with self._lock:
            return self._rx[0] if self._rx else None

    def pop_input(self) -> int | None:
        """Take the next received byte (the BIOS keyboard shares this queue)."""
        self._wanted()
        with self._lock:
            return self._rx.popleft() if self._rx else None

    def irq_pending(self) -> bool:
        """Whether the UART asserts its interrupt line (IRQ4 for COM1), as IIR reports."""
        if self.ier & IER_RDA and self.has_input():
            return True
        return bool(self.ier & IER_THRE and self._thre_pending)

    # -- port I/O ---------------------------------------------------------------------
    def read(self, offset: int) -> int:
        """Guest ``in`` from ``base + offset``."""
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == 0:
            if dlab:
                return self.divisor & 0xFF
            value = self.pop_input()
            return 0 if value is None else value
        if offset == 1:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if offset == 2:
            fifo = 0xC0 if self.fcr & 0x01 else 0x00
            if self.ier & IER_RDA and self.has_input():
                return fifo | 0x04
            if self.ier & IER_THRE and self._thre_pending:
                self._thre_pending = False
                return fifo | 0x02
            return fifo | 0x01
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.has_input() else 0)
        if offset == 6:
            if self.mcr & MCR_LOOP:
                m = self.mcr
                # loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            return 0xB0  # DCD, DSR, CTS: a connected terminal
        return self.scr

    def write(self, offset: int, value: int) -> None:
        """Guest ``out`` to ``base + offset``."""
        value &= 0xFF
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == 0:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            elif self.mcr & MCR_LOOP:
                self.receive(bytes([value]))
            else:
                self._output(bytes([value]))
                self._thre_pending = True
        elif offset == 1:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                self.ier = value & 0x0F
                self._thre_pending = True
        elif offset == 2:
            self.fcr = value & 0xC9
            if value & 0x02:
                with self._lock:
                    self._rx.clear()
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
        elif offset == 7:
            self.scr = value

    # -- snapshots ------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """Register and FIFO state."""
        with self._lock:
            rx = bytes(self._rx).hex()
        return {
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "scr": self.scr,
            "fcr": self.fcr,
            "divisor": self.divisor,
            "thre_pending": self._thre_pending,
            "rx": rx,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`save` output."""
        self.ier = int(state["ier"])
        self.lcr = int(state["lcr"])
        self.mcr = int(state["mcr"])
        self.scr = int(state["scr"])
        self.fcr = int(state["fcr"])
        self.divisor = int(state["divisor"])
        self._thre_pending = bool(state["thre_pending"])
        with self._lock:
            self._rx = deque(bytes.fromhex(str(state["rx"])))

"""Guest time: the wall clock, or a virtual clock driven by executed instructions.

Every device that shows time to the guest (PIT, RTC/CMOS, ACPI PM timer, the
BIOS tick count) asks a :class:`Clock` for ``now_ns()``: nanoseconds of
*guest* time since power-on. Guest time stops while the guest is paused.

* ``"wall"`` (default): guest time follows the host's monotonic clock.
* ``"virtual"``: guest time advances only with the instructions the CPU runs
  (8 ns per instruction, like QEMU's ``-icount shift=3``: a 125 MIPS CPU) and with
  idle time the CPU skips while halted. Two runs of the same machine then see
  identical times at identical points of execution.

Inside a slice, virtual time includes the instructions the slice has run so
far (the engine's counter, see :meth:`Clock.slice_started`), so a device
read twice in one slice sees time move, as the TSC does (``rdtsc`` returns
guest nanoseconds: see ``instructions.py``). Not covered: console input
arrives when it is typed.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable

__all__ = ["NS_PER_INSTRUCTION", "VIRTUAL_EPOCH", "Clock"]

#: virtual time one instruction takes, in nanoseconds.
NS_PER_INSTRUCTION = 8
#: the RTC date a virtual-clock guest powers on at.
VIRTUAL_EPOCH = _dt.datetime(2024, 1, 1, tzinfo=_dt.UTC)


class Clock:
    """Guest time in nanoseconds since power-on.

    Args:
        mode: ``"wall"`` or ``"virtual"``.
    """

    def __init__(self, mode: str = "wall") -> None:
        self.mode = mode
        self.virtual = mode == "virtual"
        self._base_ns = 0  # guest time accumulated before the current run period
        self._since: int | None = None  # monotonic_ns when the current run period began
        self.instructions = 0  # virtual mode: instructions (and idle) accounted so far
        self._progress: Callable[[], int] | None = None  # instructions run in this slice
        self._boot_wall = _dt.datetime.now(_dt.UTC)

    # -- run periods (wall mode) ---------------------------------------------
    def run(self) -> None:
        """Guest time starts (or continues) to flow."""
        if self._since is None:
            self._since = time.monotonic_ns()

    def stop(self) -> None:
        """Guest time stops (pause)."""
        if self._since is not None:
            self._base_ns += time.monotonic_ns() - self._since
            self._since = None

    # -- virtual mode ------------------------------------------------------------
    def advance(self, instructions: int) -> None:
        """Account ``instructions`` executed (or idled) instructions (virtual mode)."""
        self.instructions += instructions

    def slice_started(self, progress: Callable[[], int]) -> None:
        """A slice runs: ``progress()`` counts its instructions so far (virtual mode)."""
        self._progress = progress

    def slice_ended(self) -> None:
        """The slice is over (its budget is then accounted with :meth:`advance`)."""
        self._progress = None

    # -- reading -------------------------------------------------------------------
    def now_ns(self) -> int:
        """Guest nanoseconds since power-on."""
        if self.virtual:
            inside = 0 if self._progress is None else self._progress()
            return (self.instructions + inside) * NS_PER_INSTRUCTION
        running = 0 if self._since is None else time.monotonic_ns() - self._since
        return self._base_ns + running

    def rtc_now(self) -> _dt.datetime:
        """The RTC's date and time (UTC, like QEMU's default ``-rtc base=utc``)."""
        if self.virtual:
            return VIRTUAL_EPOCH + _dt.timedelta(microseconds=self.now_ns() // 1000)
        return self._boot_wall + _dt.timedelta(microseconds=self.now_ns() // 1000)

    # -- snapshots -----------------------------------------------------------------
    def save(self) -> dict[str, object]:
        """The clock's state, for a snapshot."""
        return {
            "mode": self.mode,
            "now_ns": self.now_ns(),
            "instructions": self.instructions,
            "boot_wall": self._boot_wall.isoformat(),
        }

    def load(self, state: dict[str, object]) -> None:
        """Restore a state from :meth:`save` (guest time continues from it)."""
        running = self._since is not None
        self._base_ns = int(str(state["now_ns"]))
        self.instructions = int(str(state["instructions"]))
        self._boot_wall = _dt.datetime.fromisoformat(str(state["boot_wall"]))
        self._since = time.monotonic_ns() if running else None

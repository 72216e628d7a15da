"""The in-process emulator backend: boot real disk images on an emulated PC.

``virtkit.connect("emulator")`` (or ``connect("emulator", clock="virtual")``
for reproducible runs). The pieces, one module each:

* :mod:`.cpu`: the unicorn x86 CPU and interrupt delivery,
* :mod:`.machine`: the PC and its worker thread (run slices, idle, park),
* :mod:`.bios`: BIOS services in Python (int 10h/13h/15h/16h/19h/1Ah),
* :mod:`.disks`: BIOS drives on :mod:`virtkit.images` images,
* :mod:`.uart`, :mod:`.chipset`: COM1, ACPI PM, reset, PIT, RTC/CMOS, PIC,
* :mod:`.clock`: wall or virtual guest time,
* :mod:`.state`: full-snapshot files,
* :mod:`.hypervisor`: ``EmulatorHypervisor`` and ``EmulatorGuest``.
"""

from __future__ import annotations

from virtkit.backends.emulator.hypervisor import EmulatorGuest, EmulatorHypervisor

__all__ = ["EmulatorGuest", "EmulatorHypervisor"]

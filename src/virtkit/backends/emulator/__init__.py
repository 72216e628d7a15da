"""The in-process emulator backend: boot real disk images on an emulated PC.

``virtkit.connect("emulator")`` (or ``connect("emulator", clock="virtual")``
for reproducible runs) gives a hypervisor whose guests run on a worker
thread of this process: a unicorn x86 CPU (real, protected and long mode)
inside a PC that behaves like QEMU's ``pc`` machine for what it has. A
typical test::

    with virtkit.connect("emulator") as hv:
        guest = hv.define(virtkit.Machine(name="t", disks=[virtkit.Disk("boot.qcow2")]))
        guest.start()
        guest.console.expect("login:", timeout=10)
        guest.snapshot("ready")

What the PC has: RAM from ``Machine.memory``; a BIOS in Python (int 10h
teletype and text screen, int 13h CHS and EDD on every disk through
:mod:`virtkit.images`, int 15h E820/A20/block move, int 16h from the
console, int 1Ah, int 19h boot); a 16550 UART on COM1 with IRQ4; ACPI PM at
0x600 (power-off through PM1a_CNT, the power button through PM1a_STS/EN);
reset through 0xCF9, the keyboard controller and port 0x92; the PIT, the
RTC/CMOS and the 8259 PIC. What it does not have: more than one CPU (extra
vCPUs count for admission only), a local APIC or IOAPIC, PCI devices,
network cards, CD-ROM boot, VGA beyond the BIOS text screen.

The pieces, one module each:

* :mod:`.cpu`: the unicorn x86 CPU,
* :mod:`.interrupts`: interrupt and exception delivery (IVT/IDT, TSS stacks),
* :mod:`.machine`: the PC and its worker thread (run slices, idle, park),
* :mod:`.bios`: BIOS services in Python,
* :mod:`.disks`: BIOS drives on :mod:`virtkit.images` images,
* :mod:`.uart`, :mod:`.chipset`: COM1, ACPI PM, reset, PIT, RTC/CMOS, PIC,
* :mod:`.clock`: wall or virtual guest time,
* :mod:`.slicestop`: ending a wall-clock slice from another thread, between blocks,
* :mod:`.state`: full-snapshot files,
* :mod:`.hypervisor`: ``EmulatorHypervisor`` and ``EmulatorGuest``.
"""

from __future__ import annotations

from virtkit.backends.emulator.hypervisor import EmulatorGuest, EmulatorHypervisor

__all__ = ["EmulatorGuest", "EmulatorHypervisor"]

"""Saving and restoring a whole machine: CPU context, RAM and device state.

A full snapshot's folder holds one file, ``state.bin``, written atomically
(temporary name, ``fsync``, rename) once the RAM chunks it names are durable
(see :mod:`virtkit.backends.emulator.ramstore`; the file's layout and its
checksum are :mod:`virtkit.backends.emulator.ramformat`'s). Its machine state
part is:

* unicorn's CPU context (u32 length, then the bytes: every register,
  including segment caches, control registers and MSRs). It is tied to the
  unicorn build: the device state records the version and restoring checks
  it;
* the device state: UART, chipset, clock and machine, as JSON.

The RAM index follows (with the chunks the snapshot added, when they are
few): a second snapshot stores only the chunks that changed since the first.
States saved before ``state.bin`` existed (``cpu.bin``,
``devices.json`` and ``ram.bin``, holding the index or, older still, the
whole RAM as ``VKRAM001``: the RAM size, the chunk size, then each non-zero
chunk) still load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtkit.backends.emulator import ramstore
from virtkit.backends.emulator.cpu import unicorn
from virtkit.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from virtkit.backends.emulator.cpu import Cpu
    from virtkit.backends.emulator.machine import PcMachine

__all__ = ["load_machine", "save_machine"]

RAM_MAGIC = b"VKRAM001"
CHUNK = 64 * 1024
_HEADER = struct.Struct("<8sQI")
_RECORD = struct.Struct("<Q")
_CONTEXT_LENGTH = struct.Struct("<I")
FORMAT_VERSION = 1


def save_machine(machine: PcMachine, folder: Path) -> int:
    """Write the machine's state into ``folder`` (the CPU must be parked).

    Returns the number of bytes written (RAM chunks unchanged since the
    machine's previous snapshot or revert are not written again).
    """
    folder.mkdir(parents=True, exist_ok=True)
    cpu = machine.cpu
    context = cpu.context()
    devices = {
        "format": FORMAT_VERSION,
        "unicorn": unicorn.__version__,
        "context_size": len(context),
        "machine": machine.save_state(),
        "uart": machine.uart.save(),
        "chipset": machine.chipset.save(),
        "clock": machine.clock.save(),
    }
    data = json.dumps(devices, indent=1, sort_keys=True).encode()
    extra = _CONTEXT_LENGTH.pack(len(context)) + context + data
    return len(extra) + ramstore.save_ram(cpu, folder, extra)


def _read_machine_state(folder: Path) -> tuple[dict[str, Any], bytes, ramstore.SavedState | None]:
    """(devices, CPU context, parsed state file or None for the legacy layout)."""
    if (folder / ramstore.STATE_FILE).exists():
        saved = ramstore.read_state(folder)
        extra = saved.extra or b""
        if len(extra) < _CONTEXT_LENGTH.size:
            raise BackendError(f"{saved.path} is truncated (no CPU context)")
        (length,) = _CONTEXT_LENGTH.unpack_from(extra)
        start = _CONTEXT_LENGTH.size
        if length > len(extra) - start:
            raise BackendError(f"{saved.path} is truncated (CPU context of {length} bytes)")
        context, data = extra[start : start + length], extra[start + length :]
        where = saved.path
    else:
        saved = None
        where = folder / "devices.json"
        try:
            data = where.read_bytes()
            context = (folder / "cpu.bin").read_bytes()
        except OSError as exc:
            raise BackendError(f"saved machine state in {folder} cannot be read: {exc}") from exc
    try:
        devices = json.loads(data)
    except ValueError as exc:
        raise BackendError(f"the device state in {where} is not valid JSON: {exc}") from exc
    if not isinstance(devices, dict) or devices.get("format") != FORMAT_VERSION:
        raise BackendError(f"the device state in {where} has an unknown format")
    return devices, context, saved


def load_machine(machine: PcMachine, folder: Path) -> None:
    """Restore a state written by :func:`save_machine` (the CPU must be parked).

    Raises:
        ConfigError: the state does not fit this machine (memory size, disks).
        BackendError: the files are missing or damaged, or were written by
            another unicorn version.
    """
    devices, context, saved = _read_machine_state(folder)
    if devices.get("unicorn") != unicorn.__version__:
        raise BackendError(
            f"the snapshot's CPU state was saved by unicorn {devices.get('unicorn')}, "
            f"this is unicorn {unicorn.__version__}; it cannot be restored"
        )
    cpu = machine.cpu
    if saved is None:
        try:
            with open(folder / "ram.bin", "rb") as fh:
                magic = fh.read(len(RAM_MAGIC))
        except OSError as exc:
            raise BackendError(f"saved machine state in {folder} cannot be read: {exc}") from exc
        if magic == ramstore.INDEX_MAGIC:
            ramstore.load_ram(cpu, folder)
        elif magic == RAM_MAGIC:
            ramstore.forget(cpu)
            _load_full_ram(cpu, folder / "ram.bin")
        else:
            raise BackendError(f"{folder / 'ram.bin'} is not a virtkit RAM image")
    else:
        ramstore.load_ram(cpu, folder, saved)
    cpu.restore_context(context)
    cpu.flush_code()
    machine.load_state(devices["machine"])
    machine.uart.load(devices["uart"])
    machine.chipset.load(devices["chipset"])
    machine.clock.load(devices["clock"])


def _load_full_ram(cpu: Cpu, path: Path) -> None:
    """Read a whole-RAM image (``VKRAM001``) saved before the RAM pack existed."""
    try:
        ram_file = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise BackendError(f"{path} cannot be read: {exc.strerror}") from exc
    with ram_file:
        header = ram_file.read(_HEADER.size)
        if len(header) != _HEADER.size:
            raise BackendError(f"{path} is truncated (no header)")
        magic, size, chunk_size = _HEADER.unpack(header)
        if magic != RAM_MAGIC or chunk_size != CHUNK:
            raise BackendError(f"{path} is not a virtkit RAM image")
        if size != cpu.memory_size:
            raise ConfigError(
                f"the snapshot holds {size} bytes of RAM but the machine has {cpu.memory_size}; "
                "revert needs the memory size the snapshot was taken with",
                field="memory",
            )
        cpu.clear_ram()
        chunks = size // CHUNK + (1 if size % CHUNK else 0)
        while True:
            record = ram_file.read(_RECORD.size)
            if not record:
                break
            if len(record) != _RECORD.size:
                raise BackendError(f"{path} is truncated in a chunk record")
            (index,) = _RECORD.unpack(record)
            if index >= chunks:
                raise BackendError(f"{path} is damaged (chunk index {index})")
            want = min(CHUNK, size - index * CHUNK)
            data = ram_file.read(want)
            if len(data) != want:
                raise BackendError(f"{path} is truncated in chunk {index}")
            cpu.ram[index * CHUNK : index * CHUNK + want] = data

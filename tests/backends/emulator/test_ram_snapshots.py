"""Full snapshots store RAM incrementally: a pack of chunks shared by the guest's snapshots."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.emulator import EmulatorGuest, EmulatorHypervisor, ramstore
from virtkit.backends.emulator.state import RAM_MAGIC
from virtkit.model import Disk, Machine

TIMEOUT = 10.0
MEMORY = 64 * 1024**2
Define = Callable[..., EmulatorGuest]


def ram_of(guest: EmulatorGuest) -> bytes:
    """The guest's RAM right now (the guest should be paused)."""
    pc = guest._pc
    assert pc is not None
    return bytes(pc.cpu.ram)


def packs(guest: EmulatorGuest) -> dict[str, int]:
    """Pack file name -> size, in the guest's snapshots/ folder."""
    folder = guest.folder / "snapshots"
    return {p.name: p.stat().st_size for p in folder.glob("emulator-ram-*.pack")}


def revert_paused(guest: EmulatorGuest, name: str) -> None:
    """Revert to ``name`` (taken while paused, so the guest comes back paused)."""
    guest.revert(name)
    assert guest.state is virtkit.State.PAUSED


def counted_snapshot(guest: EmulatorGuest, name: str, count: int) -> bytes:
    """Let the counter reach ``count``, pause, snapshot; return the RAM it captured."""
    guest.resume()
    guest.console.expect(f"count {count}\r\n", timeout=TIMEOUT)
    guest.pause()
    ram = ram_of(guest)
    guest.snapshot(name)
    return ram


class TestIncrementalSave:
    """A second snapshot writes only the chunks the guest changed since the first."""

    def test_second_snapshot_appends_few_chunks(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """After a little guest activity the pack grows by a handful of chunks, not by RAM size."""
        guest = define(hv, "counter", memory="64MiB")
        guest.start()
        guest.pause()
        counted_snapshot(guest, "first", 1)
        after_first = sum(packs(guest).values())
        counted_snapshot(guest, "second", 3)
        grown = sum(packs(guest).values()) - after_first
        assert 0 < grown <= 8 * ramstore.CHUNK, grown
        guest.kill()

    def test_dirty_guest_writes_whole_ram_once(
        self, hv: EmulatorHypervisor, define: Define
    ) -> None:
        """The first snapshot stores every non-zero chunk; an idle repeat stores almost nothing."""
        guest = define(hv, "counter", memory="64MiB")
        guest.start()
        guest.pause()
        pc = guest._pc
        assert pc is not None
        pattern = bytes(range(256)) * (ramstore.CHUNK // 256)
        for offset in range(2 * 1024**2, MEMORY, ramstore.CHUNK):
            pc.cpu.ram[offset : offset + ramstore.CHUNK] = pattern
        guest.snapshot("full")
        first = sum(packs(guest).values())
        assert first >= MEMORY - 2 * 1024**2
        guest.snapshot("again")
        assert sum(packs(guest).values()) - first <= 4 * ramstore.CHUNK
        guest.kill()


class TestRevert:
    """Reverts restore RAM byte for byte, whichever snapshot the machine last saw."""

    def test_revert_back_and_forth(self, hv: EmulatorHypervisor, define: Define) -> None:
        """a -> b -> a -> b: each revert gives exactly the RAM captured."""
        guest = define(hv, "counter", memory="64MiB")
        guest.start()
        guest.pause()
        first = counted_snapshot(guest, "a", 1)
        second = counted_snapshot(guest, "b", 4)
        assert first != second
        for name, expected in (("a", first), ("b", second), ("a", first), ("b", second)):
            revert_paused(guest, name)
            assert ram_of(guest) == expected, name
        guest.resume()
        guest.console.expect("count 5\r\n", timeout=TIMEOUT)
        guest.kill()

    def test_revert_from_a_fresh_connection(
        self, tmp_path: Path, boot_disk: Callable[..., Path]
    ) -> None:
        """A machine with no baseline reads the whole snapshot from the pack."""
        machine = Machine(
            name="fresh", memory="64MiB", disks=(Disk(str(boot_disk("counter", "qcow2"))),)
        )
        with virtkit.connect("emulator", root=tmp_path / "root") as hv:
            guest = hv.define(machine)
            assert isinstance(guest, EmulatorGuest)
            guest.start()
            guest.pause()
            counted_snapshot(guest, "a", 1)
            expected = counted_snapshot(guest, "b", 3)
        with virtkit.connect("emulator", root=tmp_path / "root") as hv:
            guest = hv.define(machine)
            assert isinstance(guest, EmulatorGuest)
            revert_paused(guest, "b")
            assert ram_of(guest) == expected
            guest.kill()

    @pytest.mark.parametrize("ram", ["whole", "index"])
    def test_legacy_states_still_load(
        self, hv: EmulatorHypervisor, define: Define, ram: str
    ) -> None:
        """States saved before ``state.bin`` (``cpu.bin``, ``devices.json``, ``ram.bin``
        holding the whole RAM as ``VKRAM001`` or a pack index) revert exactly."""
        guest = define(hv, "counter", memory="32MiB")
        guest.start()
        guest.pause()
        expected = counted_snapshot(guest, "old", 2)
        folder = guest.snapshot_dir("old")
        saved = ramstore.read_state(folder)
        assert saved.extra is not None
        (length,) = struct.unpack_from("<I", saved.extra)
        (folder / "cpu.bin").write_bytes(saved.extra[4 : 4 + length])
        (folder / "devices.json").write_bytes(saved.extra[4 + length :])
        if ram == "whole":
            records = [struct.pack("<8sQI", RAM_MAGIC, len(expected), ramstore.CHUNK)]
            for index in range(len(expected) // ramstore.CHUNK):
                chunk = expected[index * ramstore.CHUNK : (index + 1) * ramstore.CHUNK]
                if any(chunk):
                    records += [struct.pack("<Q", index), chunk]
            (folder / "ram.bin").write_bytes(b"".join(records))
        else:
            (folder / "ram.bin").write_bytes(saved.index.encode())
        (folder / ramstore.STATE_FILE).unlink()
        guest.resume()
        guest.console.expect("count 4\r\n", timeout=TIMEOUT)
        revert_paused(guest, "old")
        assert ram_of(guest) == expected
        guest.snapshot("new")  # and a state-file snapshot follows it
        revert_paused(guest, "new")
        assert ram_of(guest) == expected
        guest.kill()


class TestDamage:
    """A damaged index or pack is a BackendError naming the file, never a wrong RAM image."""

    @pytest.mark.parametrize(
        "damage", ["entry-past-end", "flipped-byte", "truncated-state", "missing-pack"]
    )
    def test_damaged_state_is_refused(
        self, hv: EmulatorHypervisor, define: Define, damage: str
    ) -> None:
        """Each kind of damage is reported before any RAM is trusted."""
        guest = define(hv, "counter", memory="32MiB")
        guest.start()
        guest.pause()
        counted_snapshot(guest, "s", 1)
        guest.kill()
        path = guest.snapshot_dir("s") / ramstore.STATE_FILE
        data = bytearray(path.read_bytes())
        if damage == "entry-past-end":
            # a well-formed file (its checksum fixed up) naming data past the pack's end
            data[-8:] = struct.pack("<Q", 1 << 40)
            data[8:12] = struct.pack("<I", zlib.crc32(data[12:]))
            path.write_bytes(bytes(data))
        elif damage == "flipped-byte":
            data[len(data) // 2] ^= 0x40
            path.write_bytes(bytes(data))
        elif damage == "truncated-state":
            path.write_bytes(bytes(data[:-3]))
        else:
            for name in packs(guest):
                (path.parent.parent.parent / name).unlink()
        with pytest.raises(virtkit.BackendError, match=r"state\.bin|pack"):
            guest.revert("s")


class TestCompaction:
    """Deleted snapshots' chunks are reclaimed by writing a new pack generation."""

    def test_compaction_keeps_live_snapshots(
        self, hv: EmulatorHypervisor, define: Define, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Garbage over the threshold moves live chunks to a new pack; every survivor reverts."""
        monkeypatch.setattr(ramstore, "_GARBAGE_FLOOR", 0)
        guest = define(hv, "counter", memory="32MiB")
        guest.start()
        guest.pause()
        pc = guest._pc
        assert pc is not None
        captured = {}
        for step in range(4):
            # a different fill per snapshot, so each one owns many chunks
            fill = bytes([step + 1]) * ramstore.CHUNK
            for offset in range(4 * 1024**2, 12 * 1024**2, ramstore.CHUNK):
                pc.cpu.ram[offset : offset + ramstore.CHUNK] = fill
            captured[f"s{step}"] = ram_of(guest)
            guest.snapshot(f"s{step}")
        assert list(packs(guest)) == ["emulator-ram-1.pack"]
        for name in ("s0", "s1", "s2"):
            guest.delete_snapshot(name)
        guest.snapshot("s4")
        captured["s4"] = ram_of(guest)
        assert list(packs(guest)) == ["emulator-ram-2.pack"]
        for name in ("s3", "s4", "s3"):
            revert_paused(guest, name)
            assert ram_of(guest) == captured[name], name
        guest.kill()

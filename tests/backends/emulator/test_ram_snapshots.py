"""Full snapshots store RAM incrementally: a pack of chunks shared by the guest's snapshots."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import virtkit
from virtkit.backends.emulator import EmulatorGuest, EmulatorHypervisor, ramformat, ramstore
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
        self, hv: EmulatorHypervisor, define: Define, ram: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """States saved before ``state.bin`` (``cpu.bin``, ``devices.json``, ``ram.bin``
        holding the whole RAM as ``VKRAM001`` or a pack index) revert exactly."""
        monkeypatch.setattr(ramstore, "_INLINE_LIMIT", 0)  # legacy indexes name only the pack
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
        "damage",
        ["entry-past-end", "inline-past-end", "flipped-byte", "truncated-state", "missing-pack"],
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
        if damage in ("entry-past-end", "inline-past-end"):
            # a well-formed file (its checksum right) naming data past the pack's end,
            # or past its own inline chunks
            saved = ramstore.read_state(path.parent)
            last = len(saved.index.entries) - 1
            if damage == "entry-past-end":
                saved.index.entries[last] = 1 << 40
            else:
                saved.index.entries[last] = ramformat.INLINE | len(saved.index.inline)
            path.write_bytes(saved.encode())
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


class TestInlineChunks:
    """A snapshot adding a few chunks carries them in its state file: one fsync."""

    def test_inline_state_survives_losing_the_pack_copies(
        self, tmp_path: Path, boot_disk: Callable[..., Path]
    ) -> None:
        """Cut the pack back to before the snapshot (its copies never reached the disk):
        the snapshot still reverts exactly, and the next one stores the chunks again."""
        machine = Machine(
            name="inline", memory="32MiB", disks=(Disk(str(boot_disk("counter", "qcow2"))),)
        )
        with virtkit.connect("emulator", root=tmp_path / "root") as hv:
            guest = hv.define(machine)
            assert isinstance(guest, EmulatorGuest)
            guest.start()
            guest.pause()
            counted_snapshot(guest, "a", 1)
            (pack,) = (guest.folder / "snapshots").glob("emulator-ram-*.pack")
            before = pack.stat().st_size
            pc = guest._pc
            assert pc is not None
            pc.cpu.write(9 << 20, b"inline" * 100)
            expected = counted_snapshot(guest, "b", 3)
            saved = ramstore.read_state(guest.snapshot_dir("b"))
            assert any(entry & ramformat.INLINE for entry in saved.index.entries)
            assert pack.stat().st_size > before
            guest.kill()
        with open(pack, "r+b") as fh:
            fh.truncate(before)
        with virtkit.connect("emulator", root=tmp_path / "root") as hv:
            guest = hv.define(machine)
            assert isinstance(guest, EmulatorGuest)
            revert_paused(guest, "b")
            assert ram_of(guest) == expected
            guest.snapshot("c")  # names no pack copy of b's inline chunks: stores them again
            guest.kill()
            revert_paused(guest, "a")
            revert_paused(guest, "c")
            assert ram_of(guest) == expected
            guest.kill()

    def test_pending_pack_copies_are_carried_or_synced(
        self, hv: EmulatorHypervisor, define: Define, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the helper thread's sync held back, the next snapshot that reuses the
        chunks carries them inline too; when they do not fit, it syncs the pack
        before its state file is renamed into place."""
        guest = define(hv, "counter", memory="32MiB")
        guest.start()
        guest.pause()
        counted_snapshot(guest, "a", 1)
        pc = guest._pc
        assert pc is not None
        events: list[str] = []
        real_fdatasync, real_replace = os.fdatasync, os.replace

        def fdatasync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".pack"):
                events.append("sync")
            real_fdatasync(fd)

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            if Path(dst).name == ramformat.STATE_FILE:
                events.append(f"state {Path(dst).parent.name}")
            real_replace(src, dst)

        def held_back(work: Callable[[], None]) -> None:  # the helper's sync never happens
            events.append("deferred")

        def inline(name: str, where: int) -> bool:
            saved = ramstore.read_state(guest.snapshot_dir(name))
            return bool(saved.index.entries[where // ramstore.CHUNK] & ramformat.INLINE)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(ramformat, "_in_background", held_back)
        pc.cpu.write(9 << 20, b"first")
        guest.snapshot("b")
        assert events == ["state b", "deferred"]  # inline: no pack sync on the way
        assert inline("b", 9 << 20)
        events.clear()
        pc.cpu.write(17 << 20, b"second")  # b's chunk at 9 MiB is still not synced
        guest.snapshot("c")
        assert events == ["state c", "deferred"]
        assert inline("c", 9 << 20) and inline("c", 17 << 20)
        events.clear()
        monkeypatch.setattr(ramstore, "_INLINE_LIMIT", 0)
        pc.cpu.write(25 << 20, b"third")
        guest.snapshot("d")
        assert "sync" in events and events.index("sync") < events.index("state d")
        assert not inline("d", 9 << 20) and not inline("d", 25 << 20)
        guest.kill()
        for name, where, data in (
            ("b", 9 << 20, b"first"),
            ("c", 17 << 20, b"second"),
            ("d", 25 << 20, b"third"),
            ("d", 9 << 20, b"first"),
        ):
            revert_paused(guest, name)
            assert ram_of(guest)[where : where + len(data)] == data
        guest.kill()

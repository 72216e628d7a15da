"""virtkit incremental backup: copy only what changed since the last backup.

A persistent dirty bitmap in a qcow2 disk records which parts of the disk
were written since it was added; virtkit keeps it up to date on every write
(and so does QEMU, when a VM runs on the disk). A backup cycle is:

1. full backup: copy the whole disk, and add a bitmap at the same moment;
2. the disk is used (here: a few writes);
3. incremental backup: copy only the dirty extents of the bitmap into a
   small qcow2 overlay on top of the previous backup (ranges that now read
   as zeroes are recorded as zeroes, not copied), then clear the bitmap for
   the next cycle;
4. restore: the overlay chain (full + incrementals) reads back exactly the
   disk as it was at the last backup.

Run it with ``python examples/incremental_backup.py [FOLDER]``.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from virtkit import images

MiB = 1024 * 1024
SIZE = 64 * MiB
BITMAP = "since-last-backup"


def use_disk(disk: Path, round_no: int) -> None:
    """Stand-in for a running VM: write a few places of the disk."""
    with images.open(disk, writable=True) as img:
        img.write(round_no * 5 * MiB + 1234, f"round {round_no} data ".encode() * 300)
        img.write(40 * MiB, bytes([round_no]) * 4096)
        img.write_zeroes(8 * MiB, 2 * MiB)


def full_backup(disk: Path, target: Path) -> None:
    """Copy the whole disk and start recording changes from this moment."""
    with images.open(disk, writable=True) as img:
        if not any(b.name == BITMAP for b in img.bitmaps()):
            img.add_bitmap(BITMAP, granularity=64 * 1024)
        else:
            img.clear_bitmap(BITMAP)
    images.convert(disk, target, format="qcow2")


def incremental_backup(disk: Path, previous: Path, target: Path) -> int:
    """Copy only the extents dirtied since the last backup; return the bytes copied."""
    copied = 0
    with images.open(disk, writable=True) as src:
        extents = src.bitmap_extents(BITMAP)
        with images.create(target, backing=previous.name, backing_format="qcow2") as out:
            for offset, length in extents:
                for ext in src.block_status(offset, length):
                    if ext.kind == "zero":  # zeroed or discarded: no data to copy
                        out.write_zeroes(ext.start, ext.length)
                        continue
                    for pos in range(ext.start, ext.start + ext.length, 4 * MiB):
                        n = min(4 * MiB, ext.start + ext.length - pos)
                        out.write(pos, src.read(pos, n))
                        copied += n
        src.clear_bitmap(BITMAP)  # the next incremental starts from here
    return copied


def digest(path: Path) -> str:
    """SHA-256 of what a disk (or a backup chain) reads as."""
    h = hashlib.sha256()
    with images.open(path) as img:
        for pos in range(0, img.virtual_size, 4 * MiB):
            h.update(img.read(pos, min(4 * MiB, img.virtual_size - pos)))
    return h.hexdigest()


def main(folder: Path) -> None:
    """Create a disk, back it up fully, change it twice with an incremental backup each time."""
    folder.mkdir(parents=True, exist_ok=True)
    disk = folder / "disk.qcow2"
    with images.create(disk, SIZE) as img:
        img.write(0, b"boot sector and file system" * 1000)
    use_disk(disk, 1)

    full = folder / "backup-0-full.qcow2"
    full_backup(disk, full)
    print(f"Full backup: {full.name}, {SIZE // MiB} MiB disk")

    previous = full
    for round_no in (2, 3):
        use_disk(disk, round_no)
        target = folder / f"backup-{round_no - 1}-incremental.qcow2"
        copied = incremental_backup(disk, previous, target)
        print(f"Incremental backup {target.name}: copied {copied} bytes of {SIZE}")
        previous = target

    restored = folder / "restored.raw"
    images.convert(previous, restored, format="raw")
    same = digest(restored) == digest(disk)
    print(f"Restored from the backup chain equals the disk: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))

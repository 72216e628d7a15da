"""The BIOS's view of the attached disks: drive numbers, geometry, sector I/O.

Each drive is an open :mod:`virtkit.images` image (qcow2 with its backing
chain, or raw), so the guest reads and writes the very file QEMU would.
Geometry follows SeaBIOS's LBA translation of QEMU's guessed geometry
(16 heads, 63 sectors per track, heads doubled until there are at most 1024
cylinders), so CHS addresses mean the same sectors on both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import attrs

from virtkit import images
from virtkit.errors import ImageError

__all__ = ["SECTOR", "Drive", "DriveSpec", "open_drives"]

SECTOR = 512


@attrs.frozen
class DriveSpec:
    """What the machine attaches: an image file and how."""

    name: str
    path: str
    format: str
    read_only: bool = False
    #: further places its backing chain may come from (the guest's allowed roots)
    allow: tuple[str, ...] = ()


@attrs.define
class Drive:
    """One BIOS hard disk (0x80, 0x81, ...)."""

    spec: DriveSpec
    image: images.Image
    sectors: int
    cylinders: int
    heads: int
    sectors_per_track: int
    number: int = 0x80

    @classmethod
    def open(cls, spec: DriveSpec) -> Drive:
        """Open the image (writable unless read-only) and compute its geometry.

        Raises:
            ImageError: the image cannot be opened.
        """
        image = images.open(
            spec.path,
            writable=not spec.read_only,
            format=spec.format,  # type: ignore[arg-type]  # "qcow2" | "raw", checked by the model
            allow_backing=(os.path.dirname(os.path.abspath(spec.path)), *spec.allow),
        )
        sectors = image.virtual_size // SECTOR
        heads, spt = 16, 63
        cylinders = max(min(sectors // (heads * spt), 16383), 1)
        while cylinders > 1024 and heads < 255:
            heads = 255 if heads * 2 > 128 else heads * 2
            cylinders = max(sectors // (heads * spt), 1)
        return cls(spec, image, sectors, min(cylinders, 1024), heads, spt)

    def chs_to_lba(self, cylinder: int, head: int, sector: int) -> int | None:
        """The LBA of a CHS address, or None if it is outside the geometry."""
        if sector < 1 or sector > self.sectors_per_track or head >= self.heads:
            return None
        return (cylinder * self.heads + head) * self.sectors_per_track + sector - 1

    def read(self, lba: int, count: int) -> bytes:
        """Read ``count`` sectors.

        Raises:
            ImageError: outside the disk, or the image failed.
        """
        if lba < 0 or count < 0 or lba + count > self.sectors:
            raise ImageError(
                f"sectors {lba}..{lba + count - 1} are beyond the end of the disk "
                f"({self.sectors} sectors)",
                path=self.spec.path,
            )
        return self.image.read(lba * SECTOR, count * SECTOR)

    def write(self, lba: int, data: bytes) -> None:
        """Write whole sectors.

        Raises:
            ImageError: read-only, outside the disk, or the image failed.
        """
        count = len(data) // SECTOR
        if lba < 0 or lba + count > self.sectors:
            raise ImageError(
                f"sectors {lba}..{lba + count - 1} are beyond the end of the disk "
                f"({self.sectors} sectors)",
                path=self.spec.path,
            )
        self.image.write(lba * SECTOR, data)

    def close(self) -> None:
        """Flush and close the image."""
        self.image.close()


def open_drives(specs: Sequence[DriveSpec]) -> list[Drive]:
    """Open every drive, numbering them 0x80, 0x81... in order.

    Raises:
        ImageError: one cannot be opened (those already opened are closed).
    """
    drives: list[Drive] = []
    try:
        for i, spec in enumerate(specs):
            drive = Drive.open(spec)
            drive.number = 0x80 + i
            drives.append(drive)
    except BaseException:
        for drive in drives:
            drive.close()
        raise
    return drives

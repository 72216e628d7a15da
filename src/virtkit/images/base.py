"""The format-independent face of a disk image.

Every format driver (``raw.py``, ``qcow2/``) returns an object that follows
:class:`Image`; the format-independent tools (``convert``, ``measure``,
``rebase``, ``commit``) and the backends use only this surface.
"""

from __future__ import annotations

import abc
import datetime as _dt
import os
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal

import attrs

from virtkit.errors import UnsupportedFeatureError

__all__ = [
    "BitmapInfo",
    "CheckProblem",
    "CheckResult",
    "Extent",
    "Image",
    "ImageInfo",
    "SnapshotInfo",
]

ExtentKind = Literal["data", "zero", "unallocated"]


@attrs.frozen
class Extent:
    """A run of guest bytes with one allocation status.

    ``kind`` is ``"data"`` (bytes stored in this image or, when
    ``include_backing`` was asked, somewhere in its chain), ``"zero"`` (reads as
    zeroes without data being stored), or ``"unallocated"`` (not stored in this
    image; reads fall through to the backing file, or read zeroes without one).
    """

    start: int
    length: int
    kind: ExtentKind
    #: True when the data lives in a backing file rather than this image.
    from_backing: bool = False


@attrs.frozen
class SnapshotInfo:
    """One internal snapshot as ``qemu-img snapshot -l`` lists it."""

    id: str
    name: str
    date: _dt.datetime
    vm_state_size: int
    disk_size: int | None
    vm_clock_ns: int = 0
    icount: int | None = None


@attrs.frozen
class BitmapInfo:
    """One persistent dirty bitmap, as QEMU's ``query-block`` lists it."""

    name: str
    #: Bytes of guest data per bit.
    granularity: int
    #: Whether writes set its bits (qcow2's ``auto`` flag; QMP's ``recording``).
    enabled: bool
    #: Left in-use by a writer that did not close cleanly: listed, removable, not usable.
    inconsistent: bool
    #: Dirty bytes as QEMU counts them (set bits times the granularity); 0 when inconsistent.
    count: int


@attrs.frozen
class CheckProblem:
    """One problem ``check()`` found: what kind, where, and a sentence."""

    kind: Literal["leak", "corruption", "error"]
    message: str
    offset: int | None = None


@attrs.frozen
class CheckResult:
    """What ``Image.check()`` found (and fixed), as ``qemu-img check`` reports."""

    leaks: int = 0
    corruptions: int = 0
    errors: int = 0
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    problems: tuple[CheckProblem, ...] = ()
    image_end_offset: int | None = None
    allocated_clusters: int = 0
    total_clusters: int = 0

    @property
    def ok(self) -> bool:
        """True when no leak, corruption or error remains."""
        return (
            self.leaks - self.leaks_fixed == 0
            and self.corruptions - self.corruptions_fixed == 0
            and self.errors == 0
        )


#: The order ``qemu-img info --output=json`` prints its top-level keys in (QEMU's QDict
#: hash order, the same for every format).
_QEMU_INFO_ORDER = (
    "backing-filename-format",
    "snapshots",
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
    "actual-size",
    "format-specific",
    "full-backing-filename",
    "backing-filename",
    "dirty-flag",
)


@attrs.frozen
class ImageInfo:
    """The fields ``qemu-img info --output=json`` gives, in Python form."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    cluster_size: int | None = None
    backing_filename: str | None = None
    backing_format: str | None = None
    dirty_flag: bool = False
    snapshots: tuple[SnapshotInfo, ...] = ()
    format_specific: dict[str, Any] = attrs.field(factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        """Return the dict ``qemu-img info --output=json`` would print."""
        out: dict[str, Any] = {
            "filename": self.filename,
            "format": self.format,
            "virtual-size": self.virtual_size,
            "actual-size": self.actual_size,
            "dirty-flag": self.dirty_flag,
        }
        if self.cluster_size is not None:
            out["cluster-size"] = self.cluster_size
        if self.backing_filename is not None:
            out["backing-filename"] = self.backing_filename
        if self.backing_format is not None:
            out["backing-filename-format"] = self.backing_format
        if self.snapshots:
            out["snapshots"] = [
                {
                    "id": s.id,
                    "name": s.name,
                    "date-sec": int(s.date.timestamp()),
                    "vm-state-size": s.vm_state_size,
                    "vm-clock-nsec": s.vm_clock_ns,
                }
                for s in self.snapshots
            ]
        if self.format_specific:
            out["format-specific"] = {"type": self.format, "data": self.format_specific}
        rank = {key: i for i, key in enumerate(_QEMU_INFO_ORDER)}
        return {key: out[key] for key in sorted(out, key=lambda k: rank.get(k, len(rank)))}


class Image(abc.ABC):
    """An open disk image. Use as a context manager; ``close()`` flushes.

    Offsets and lengths are guest (virtual disk) byte positions. Reads past the
    end of the virtual disk, negative offsets and writes to a read-only image
    raise :class:`virtkit.ImageError`.
    """

    #: ``"qcow2"`` or ``"raw"``.
    format: str
    #: The file this image reads and writes.
    path: str

    @property
    @abc.abstractmethod
    def virtual_size(self) -> int:
        """Size of the virtual disk in bytes."""

    @property
    @abc.abstractmethod
    def cluster_size(self) -> int:
        """Allocation unit in bytes (512 for raw)."""

    @property
    @abc.abstractmethod
    def backing_file(self) -> str | None:
        """The backing file name exactly as stored in the image, or None."""

    @property
    @abc.abstractmethod
    def writable(self) -> bool:
        """Whether the image was opened for writing."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether ``close()`` has been called."""

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes starting at ``offset``."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at guest ``offset``."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeroes, without writing data where the format allows."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Tell the image a range is no longer needed (reads may return zeroes or backing data)."""

    @abc.abstractmethod
    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Yield the allocation status of ``[offset, offset+length)`` as extents.

        With ``include_backing`` the answer covers the whole chain: ranges that
        are unallocated here but stored in a backing file are ``"data"`` with
        ``from_backing=True``; what no layer stores is ``"zero"``.
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (metadata included)."""

    @abc.abstractmethod
    def resize(self, size: int | str, *, shrink: bool = False) -> None:
        """Change the virtual size; shrinking that drops data needs ``shrink=True``."""

    @abc.abstractmethod
    def info(self) -> ImageInfo:
        """Return what ``qemu-img info`` would report."""

    @abc.abstractmethod
    def check(self, repair: bool = False) -> CheckResult:
        """Check (and with ``repair`` fix) the image's metadata."""

    @property
    @abc.abstractmethod
    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """Internal snapshots, oldest first."""

    @abc.abstractmethod
    def create_snapshot(self, name: str, *, vm_state: bytes | None = None) -> SnapshotInfo:
        """Take an internal snapshot of the disk (and optional VM state blob)."""

    @abc.abstractmethod
    def revert_snapshot(self, name: str) -> None:
        """Make the disk what it was when snapshot ``name`` (name or id) was taken."""

    @abc.abstractmethod
    def delete_snapshot(self, name: str) -> None:
        """Delete snapshot ``name`` (name or id), freeing what only it used."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release the file. Idempotent."""

    # Persistent dirty bitmaps (qcow2 only; other formats have none).
    def bitmaps(self) -> tuple[BitmapInfo, ...]:
        """Persistent dirty bitmaps, in the image's order (none for formats without them)."""
        return ()

    def _no_bitmaps(self) -> UnsupportedFeatureError:
        return UnsupportedFeatureError(
            f"{self.format} images have no persistent dirty bitmaps; convert to qcow2",
            feature="bitmaps",
            path=self.path,
        )

    def add_bitmap(
        self, name: str, *, granularity: int | str | None = None, disabled: bool = False
    ) -> BitmapInfo:
        """Add an empty persistent dirty bitmap (``qemu-img bitmap --add``).

        Raises:
            UnsupportedFeatureError: the format has no bitmaps.
        """
        raise self._no_bitmaps()

    def remove_bitmap(self, name: str) -> None:
        """Remove a persistent dirty bitmap (``qemu-img bitmap --remove``).

        Raises:
            UnsupportedFeatureError: the format has no bitmaps.
        """
        raise self._no_bitmaps()

    def clear_bitmap(self, name: str) -> None:
        """Clear every bit of a bitmap (``qemu-img bitmap --clear``).

        Raises:
            UnsupportedFeatureError: the format has no bitmaps.
        """
        raise self._no_bitmaps()

    def enable_bitmap(self, name: str) -> None:
        """Make a bitmap record writes (``qemu-img bitmap --enable``).

        Raises:
            UnsupportedFeatureError: the format has no bitmaps.
        """
        raise self._no_bitmaps()

    def disable_bitmap(self, name: str) -> None:
        """Stop a bitmap recording writes (``qemu-img bitmap --disable``).

        Raises:
            UnsupportedFeatureError: the format has no bitmaps.
        """
        raise self._no_bitmaps()

    def merge_bitmap(
        self,
        source: str,
        target: str,
        *,
        source_image: Image | str | os.PathLike[str] | None = None,
    ) -> None:
        """Set in ``target`` every bit set in ``source`` (``qemu-img bitmap --merge``).

        Raises:
            UnsupportedFeatureError: the format has no bitmaps.
        """
        raise self._no_bitmaps()

    def bitmap_extents(self, name: str) -> list[tuple[int, int]]:
        """Dirty ranges of a bitmap as ``(offset, length)`` guest bytes.

        Raises:
            UnsupportedFeatureError: the format has no bitmaps.
        """
        raise self._no_bitmaps()

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

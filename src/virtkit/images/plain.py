"""What the formats without internal snapshots share: raw, VMDK, VHD, VHDX and VDI.

Each of those drivers keeps one guest size, answers the snapshot calls with
the same refusal and bounds every request the same way; this base holds that
once so the messages stay alike across formats.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from virtkit.errors import ImageError, UnsupportedFeatureError
from virtkit.images.args import check_int
from virtkit.images.base import Image, SnapshotInfo
from virtkit.images.storage import Storage

__all__ = ["PlainImage", "SingleFileImage"]


class PlainImage(Image):
    """An :class:`~virtkit.images.base.Image` with no internal snapshots.

    Subclasses set :attr:`format_label` and ``path``, keep the guest size in
    ``_size`` (or override :attr:`virtual_size`), and implement :meth:`_live`.
    """

    #: How messages name the format, e.g. ``"VHD"`` ("VHD images have no ...").
    format_label: ClassVar[str]
    path: str
    _size: int = 0

    @property
    def virtual_size(self) -> int:
        """Size of the virtual disk in bytes."""
        return self._size

    @property
    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """Always empty: the format has no internal snapshots."""
        self._live()
        return ()

    @abc.abstractmethod
    def _live(self) -> object:
        """Raise :class:`~virtkit.ImageError` if the image is closed."""

    def _check_range(self, offset: int, length: int, action: str) -> None:
        """Refuse a request that is not inside the guest disk."""
        check_int(offset, "offset")
        check_int(length, "length")
        if offset < 0 or length < 0:
            raise ImageError(
                f"{action}: negative offset or length ({offset}, {length})", path=self.path
            )
        size = self.virtual_size
        if offset + length > size:
            raise ImageError(
                f"{action} of {length} bytes at {offset} runs past the end of the {size}-byte disk",
                path=self.path,
                offset=offset,
            )

    def create_snapshot(self, name: str, *, vm_state: bytes | None = None) -> SnapshotInfo:
        """The format has no internal snapshots.

        Raises:
            UnsupportedFeatureError: always; convert to qcow2 first.
        """
        raise UnsupportedFeatureError(
            f"{self.format_label} images have no internal snapshots; convert to qcow2 first",
            feature="snapshots",
            path=self.path,
        )

    def revert_snapshot(self, name: str) -> None:
        """The format has no internal snapshots.

        Raises:
            UnsupportedFeatureError: always.
        """
        self.create_snapshot(name)

    def delete_snapshot(self, name: str) -> None:
        """The format has no internal snapshots.

        Raises:
            UnsupportedFeatureError: always.
        """
        self.create_snapshot(name)


class SingleFileImage(PlainImage):
    """A :class:`PlainImage` stored in one file (raw, VHD, VHDX, VDI).

    Subclasses keep that file's :class:`~virtkit.images.storage.Storage` in
    ``_st`` (None once closed) and whether it was opened for writing in
    ``_writable``.
    """

    _st: Storage | None = None
    _writable: bool = False

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._writable

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has been called."""
        return self._st is None

    def _live(self) -> Storage:
        """The open file; :class:`~virtkit.ImageError` once closed."""
        if self._st is None:
            raise ImageError("image is closed", path=self.path)
        return self._st

    def _writable_storage(self, action: str) -> Storage:
        """The open file, refusing ``action`` on an image opened read-only."""
        st = self._live()
        if not self._writable:
            raise ImageError(
                f"cannot {action}: image is open read-only; open it with writable=True",
                path=self.path,
            )
        return st

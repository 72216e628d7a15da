"""The native qcow2 engine (versions 2 and 3), interoperable with qemu-img.

Module map (after XanClic/imago's split):

- :mod:`.layout`: on-disk structures, described once, used for reading and writing;
- :mod:`.metadata`: the raw header record validated into checked metadata;
- :mod:`.mapping`: where a guest offset lives (data / zero / unallocated / compressed);
- :mod:`.allocator`: refcounts and cluster allocation;
- :mod:`.image`: :class:`Qcow2Image`, the access layer (reads, writes, resize, info);
- :mod:`.snapshots`, :mod:`.check`, :mod:`.create`, :mod:`.chain` (backing files),
  :mod:`.compress` (zlib / zstd).

The driver protocol used by :func:`virtkit.images.open` / ``create``: the
module-level functions :func:`create` and :func:`open`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import Any

from virtkit.errors import CorruptImageError, VirtkitError
from virtkit.images.qcow2 import metadata
from virtkit.images.qcow2.create import create as _create
from virtkit.images.qcow2.image import Qcow2Image
from virtkit.images.storage import FileStorage

__all__ = ["Qcow2Image", "create", "open"]


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> Qcow2Image:
    """Create a qcow2 image (see :func:`virtkit.images.qcow2.create.create` for options)."""
    return _create(path, size, **options)


def open(  # noqa: A001 - the driver protocol's name
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    allow_backing: Iterable[str | os.PathLike[str]] = (),
    force_share: bool = False,
    cache: str = "writeback",
) -> Qcow2Image:
    """Open an existing qcow2 image (``cache``: ``"writeback"`` or ``"writethrough"``).

    Raises:
        ImageError: the file (or its backing file) cannot be opened or is not allowed.
        CorruptImageError: the metadata is damaged.
        UnsupportedFeatureError: the image uses a feature virtkit lacks.
    """
    st = FileStorage(path, writable=writable, force_share=force_share)
    try:
        return Qcow2Image(
            st,
            metadata.load(st),
            writable=writable,
            allow_backing=tuple(allow_backing),
            force_share=force_share,
            cache=cache,
        )
    except VirtkitError:
        st.close()
        raise
    except (struct.error, IndexError, OverflowError, ValueError, MemoryError) as exc:
        st.close()
        raise CorruptImageError(
            f"malformed image metadata ({type(exc).__name__}: {exc})", path=os.fspath(path)
        ) from exc
    except BaseException:
        st.close()
        raise

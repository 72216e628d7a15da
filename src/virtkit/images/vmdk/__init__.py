"""VMDK (VMware) images: native read of every common subformat, streamOptimized write.

Module map (the shape of :mod:`virtkit.images.qcow2`):

- :mod:`.layout`: the sparse extent header and markers, described once;
- :mod:`.descriptor`: the text descriptor, parsed as QEMU 7.2 reads it;
- :mod:`.mapping`: where a guest byte of an extent lives (flat, sparse, compressed);
- :mod:`.image`: :class:`VmdkImage`, the read-only access layer;
- :mod:`.create`: the streamOptimized writer used by ``convert(..., format="vmdk")``.

Read: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, vmfs,
vmfsSparse, streamOptimized, descriptor files with several extents, and
``parentFileNameHint`` parents as backing files. Not read: COWD (VMDK3) and
seSparse extents (``UnsupportedFeatureError``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import Any

from virtkit.errors import CorruptImageError, UnsupportedFeatureError, VirtkitError
from virtkit.images.base import Image
from virtkit.images.qcow2 import chain
from virtkit.images.storage import FileStorage, Storage
from virtkit.images.vmdk import descriptor, layout
from virtkit.images.vmdk.create import Progress, write_stream
from virtkit.images.vmdk.image import AnyExtent, VmdkImage
from virtkit.images.vmdk.mapping import FlatExtent, SparseExtent

__all__ = ["VmdkImage", "convert_into", "create", "open"]


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> Image:
    """VMDK files are not created empty for writing; convert into one instead.

    Raises:
        UnsupportedFeatureError: always; use
            ``virtkit.images.convert(src, dst, format="vmdk")``.
    """
    raise UnsupportedFeatureError(
        "virtkit writes VMDK only as a convert target (streamOptimized): "
        "virtkit.images.convert(src, dst, format='vmdk'); create a qcow2 image to write into",
        feature="vmdk create",
        path=os.fspath(path),
    )


def convert_into(
    src: Image,
    path: str,
    final: str,
    *,
    progress: Progress | None = None,
    **options: Any,
) -> None:
    """Write ``src`` into a new streamOptimized VMDK at ``path`` (see :mod:`.create`).

    ``final`` is the name the file will have after ``convert`` renames it; the
    descriptor records it.
    """
    write_stream(src, path, final, progress=progress, **options)


def _sparse_descriptor(st: Storage, ext: SparseExtent) -> bytes:
    hdr = ext.header
    if hdr.desc_offset == 0 or hdr.desc_size == 0:
        return b""
    length = min(hdr.desc_size * layout.SECTOR, descriptor.MAX_DESCRIPTOR)
    return st.pread(hdr.desc_offset * layout.SECTOR, length)


def _open_parent(path: str, hint: str, allow: tuple[str, ...], force_share: bool) -> Image:
    real = chain.resolve(path, hint, allow, what="parent disk (parentFileNameHint)")
    chain.STACK.push(path)
    try:
        return open(real, allow_backing=allow, force_share=force_share)
    finally:
        chain.STACK.pop()


def _load(st: FileStorage, path: str, allow: tuple[str, ...], force_share: bool) -> VmdkImage:
    storages: list[Storage] = [st]
    size = st.size()
    if size < 4:
        raise CorruptImageError("file is too small to be a VMDK image", path=path)
    head = st.pread(0, 4)
    extents: list[AnyExtent] = []
    try:
        if head == layout.VMDK3_MAGIC:
            raise UnsupportedFeatureError(
                "VMDK version 3 (COWD) images are not supported", feature="vmdk COWD", path=path
            )
        if head == layout.MAGIC:
            ext = SparseExtent(st, path, "", path)
            if ext.header.capacity == 0 and ext.header.desc_offset:
                raise UnsupportedFeatureError(
                    "a sparse file holding only a descriptor is not supported",
                    feature="vmdk embedded descriptor file",
                    path=path,
                )
            desc = descriptor.parse(_sparse_descriptor(st, ext), path=path, extents=False)
            extents.append(ext)
            create_type = "streamOptimized" if ext.compressed else "monolithicSparse"
        else:
            desc = descriptor.parse(
                st.pread(0, min(size, descriptor.MAX_DESCRIPTOR)), path=path, extents=True
            )
            create_type = desc.create_type or ""
            if desc.create_type is None:
                raise CorruptImageError("invalid VMDK image descriptor (no createType)", path=path)
            if create_type not in descriptor.DESCRIPTOR_TYPES or create_type == "seSparse":
                raise UnsupportedFeatureError(
                    f"unsupported VMDK image type {create_type!r}",
                    feature=f"vmdk {create_type}",
                    path=path,
                )
            folder = os.path.dirname(path)
            for line in desc.extents:
                if line.type == "SESPARSE":
                    raise UnsupportedFeatureError(
                        "seSparse extents are not supported", feature="vmdk seSparse", path=path
                    )
                real = chain.resolve(path, line.filename, allow, what="extent file")
                shown = (
                    line.filename
                    if os.path.isabs(line.filename)
                    else os.path.join(folder, line.filename)
                )
                est = FileStorage(real, writable=False, force_share=force_share)
                storages.append(est)
                if line.type in ("FLAT", "VMFS"):
                    extents.append(FlatExtent(est, line.sectors, line.offset, shown, line.type))
                else:
                    extents.append(SparseExtent(est, shown, line.type, real))
        if sum(ext.size for ext in extents) > descriptor.MAX_DISK:
            raise CorruptImageError(
                f"extents add up to more than {descriptor.MAX_DISK} bytes", path=path
            )
        backing = None
        if desc.parent_hint is not None:
            backing = _open_parent(path, desc.parent_hint, allow, force_share)
        return VmdkImage(
            path,
            storages,
            extents=extents,
            descriptor=desc,
            create_type=create_type,
            backing=backing,
        )
    except BaseException:
        for other in storages[1:]:
            other.close()
        raise


def open(  # noqa: A001 - the driver protocol's name
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    allow_backing: Iterable[str | os.PathLike[str]] = (),
    force_share: bool = False,
) -> VmdkImage:
    """Open a VMDK image (descriptor file or monolithic file) read-only.

    Raises:
        UnsupportedFeatureError: ``writable=True``, or a subformat virtkit does not read.
        ImageError: a file cannot be opened, or an extent or parent file is
            outside the allowed places.
        CorruptImageError: the metadata is damaged.
    """
    path = os.fspath(path)
    if writable:
        raise UnsupportedFeatureError(
            "virtkit opens VMDK images read-only; convert to qcow2 to modify the disk",
            feature="vmdk (write)",
            path=path,
        )
    allow = tuple(os.fspath(a) for a in allow_backing)
    st = FileStorage(path, writable=False, force_share=force_share)
    try:
        return _load(st, path, allow, force_share)
    except VirtkitError:
        st.close()
        raise
    except (struct.error, IndexError, OverflowError, ValueError, MemoryError) as exc:
        st.close()
        raise CorruptImageError(
            f"malformed VMDK metadata ({type(exc).__name__}: {exc})", path=path
        ) from exc
    except BaseException:
        st.close()
        raise

"""Creating qcow2 images with the options ``qemu-img create -f qcow2 -o ...`` takes.

The new file is laid out as QEMU lays it out: header (and extensions, and
the backing file name) in cluster 0, then the refcount table, the refcount
blocks describing this metadata, then the L1 table. It is written under a
hidden temporary name in the same directory and linked into place only when
complete (as ``convert`` does), so a create killed half-way leaves no
half-made image at the destination.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from virtkit.errors import ConfigError, ImageError
from virtkit.images.args import check_choice
from virtkit.images.publish import publish, temp_name
from virtkit.images.qcow2 import chain, layout, metadata
from virtkit.images.qcow2.image import Qcow2Image, _Request
from virtkit.images.storage import FileStorage

__all__ = ["create"]

#: L2 tables a preallocation request fills before publishing them behind one barrier.
_PREALLOC_BATCH = 256

_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_COMPRESSION = {"zlib": layout.COMPRESSION_ZLIB, "zstd": layout.COMPRESSION_ZSTD}


def _backing_size(path: str, backing: str, fmt: str, allow: tuple[Any, ...]) -> int:
    from virtkit import images  # noqa: PLC0415 - the public package imports this driver

    real = chain.resolve(path, backing, allow, what="backing file")
    with images.open(real, format=fmt, allow_backing=allow, force_share=True) as b:  # type: ignore[arg-type]
        return b.virtual_size


def create(
    path: str | os.PathLike[str],
    size: int | None,
    *,
    cluster_size: int | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    compat: str = "1.1",
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    preallocation: str = "off",
    compression_type: str = "zlib",
    allow_backing: tuple[Any, ...] = (),
) -> Qcow2Image:
    """Create a qcow2 image and return it open for writing.

    Args:
        path: the new file (must not exist).
        size: virtual size in bytes (rounded up to 512); ``None`` takes the
            backing file's size.
        cluster_size: 512 B..2 MiB, a power of two (default 64 KiB).
        backing: backing file name, stored as given.
        backing_format: ``"qcow2"`` or ``"raw"``; probed (qcow2 magic only)
            when omitted.
        compat: ``"1.1"`` (v3, default) or ``"0.10"`` (v2).
        refcount_bits: 1..64, a power of two (v2: 16 only).
        lazy_refcounts: set the lazy refcounts bit (v3).
        extended_l2: subcluster allocation (v3, clusters of 16 KiB or more).
        preallocation: ``"off"`` or ``"metadata"`` (not with a backing file).
        compression_type: ``"zlib"`` or ``"zstd"`` (zstd needs v3).
        allow_backing: extra places a backing file may come from.

    Raises:
        ConfigError: an option is out of range or options conflict.
        ImageError: the file exists or cannot be written.
    """
    path = os.fspath(path)
    cs = 65536 if cluster_size is None else int(cluster_size)
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise ConfigError(
            f"'cluster_size' must be a power of two from 512 to 2 MiB (got {cs})",
            field="cluster_size",
        )
    if compat not in _COMPAT:
        raise ConfigError(f"'compat' must be '0.10' or '1.1' (got {compat!r})", field="compat")
    version = _COMPAT[compat]
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ConfigError(
            f"'refcount_bits' must be a power of two from 1 to 64 (got {refcount_bits})",
            field="refcount_bits",
        )
    if version == 2 and refcount_bits != 16:
        raise ConfigError("compat 0.10 images need refcount_bits=16", field="refcount_bits")
    if version == 2 and (lazy_refcounts or extended_l2):
        raise ConfigError("lazy_refcounts and extended_l2 need compat 1.1", field="compat")
    if extended_l2 and cs < 16384:
        raise ConfigError(
            f"extended_l2 needs a cluster size of at least 16 KiB (got {cs})",
            field="cluster_size",
        )
    if compression_type not in _COMPRESSION:
        raise ConfigError(
            f"'compression_type' must be 'zlib' or 'zstd' (got {compression_type!r})",
            field="compression_type",
        )
    ctype = _COMPRESSION[compression_type]
    if ctype and version == 2:
        raise ConfigError("zstd compression needs compat 1.1", field="compression_type")
    if preallocation not in ("off", "metadata"):
        raise ConfigError(
            f"'preallocation' must be 'off' or 'metadata' (got {preallocation!r})",
            field="preallocation",
        )
    if preallocation != "off" and backing is not None:
        raise ConfigError(
            "backing file and preallocation cannot be used together", field="preallocation"
        )
    if backing is not None:
        if len(backing.encode()) > layout.MAX_BACKING_NAME:
            raise ConfigError("backing file name longer than 1023 bytes", field="backing")
        if backing_format is None:
            real = chain.resolve(path, backing, allow_backing, what="backing file")
            backing_format = chain.backing_format(None, real, path)
        check_choice(backing_format, chain.BACKING_FORMATS, "backing_format")
        if size is None:
            size = _backing_size(path, backing, backing_format, tuple(allow_backing))
    if size is None:
        raise ConfigError("a qcow2 image needs a size (or a backing file)", field="size")
    size = -(-size // 512) * 512
    if size > layout.MAX_VIRTUAL_SIZE:
        raise ConfigError(f"'size' {size} exceeds the qcow2 limit", field="size")

    cb = cs.bit_length() - 1
    l2_entries = cs // (16 if extended_l2 else 8)
    l1_n = -(-size // (cs * l2_entries))
    if l1_n * 8 > layout.MAX_L1_BYTES:
        raise ConfigError(
            f"a {size}-byte disk needs an L1 table over QEMU's 32 MiB limit; use a larger "
            "cluster size",
            field="cluster_size",
        )
    l1_clusters = -(-l1_n * 8 // cs)
    per_block = cs * 8 // refcount_bits
    rt = nb = 1
    for _ in range(64):
        total = 1 + rt + nb + l1_clusters
        new_nb = -(-total // per_block)
        new_rt = -(-new_nb * 8 // cs)
        if (new_nb, new_rt) == (nb, rt):
            break
        nb, rt = new_nb, new_rt
    if rt * cs > layout.MAX_REFTABLE_BYTES:
        raise ConfigError(
            "the refcount table would be too large; use a larger cluster size", field="cluster_size"
        )
    rt_off = 1 * cs
    blocks_off = (1 + rt) * cs
    l1_off = (1 + rt + nb) * cs if l1_n else 0
    end = (1 + rt + nb + l1_clusters) * cs

    incompat = 0
    if extended_l2:
        incompat |= layout.INCOMPAT_EXTL2
    if ctype:
        incompat |= layout.INCOMPAT_COMPRESSION
    hdr = layout.Header(
        version=version,
        cluster_bits=cb,
        size=size,
        l1_size=l1_n,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt,
        incompatible_features=incompat,
        compatible_features=layout.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        refcount_order=refcount_bits.bit_length() - 1,
        header_length=layout.HEADER_V3_LENGTH if version == 3 else 72,
        compression_type=ctype,
    )
    exts: list[layout.Extension] = []
    if backing is not None and backing_format is not None:
        exts.append(layout.Extension(layout.EXT_BACKING_FORMAT, backing_format.encode()))
    if version == 3:
        exts.append(layout.Extension(layout.EXT_FEATURE_TABLE, layout.default_feature_table()))
    head = bytearray(layout.encode_header(hdr)) + layout.encode_extensions(exts)
    if backing is not None:
        raw_name = backing.encode()
        if len(head) + len(raw_name) > cs:
            raise ConfigError(
                "the backing file name does not fit in the first cluster", field="backing"
            )
        hdr.backing_file_offset = len(head)
        hdr.backing_file_size = len(raw_name)
        head[: len(layout.encode_header(hdr))] = layout.encode_header(hdr)
        head += raw_name
    if len(head) > cs:
        raise ConfigError(
            "the header does not fit in one cluster; use a larger cluster size",
            field="cluster_size",
        )

    if os.path.lexists(path):
        raise ImageError("file already exists", path=path)
    # Built under a temporary name and published whole: a create killed at any
    # point leaves nothing at ``path`` (at most a hidden temporary file).
    tmp = temp_name(path)
    st = FileStorage(tmp, writable=True, create=True)
    try:
        st.pwrite(0, bytes(head) + bytes(cs - len(head)))
        table = [blocks_off + i * cs for i in range(nb)]
        st.pwrite(rt_off, layout.encode_u64_table(table) + bytes(rt * cs - nb * 8))
        used = end // cs
        for i in range(nb):
            blk = layout.new_refblock(per_block, refcount_bits)
            lo = i * per_block
            for c in range(lo, min(used, lo + per_block)):
                blk[c - lo] = 1
            st.pwrite(blocks_off + i * cs, layout.encode_refblock(blk, refcount_bits))
        if l1_n:
            st.pwrite(l1_off, bytes(l1_clusters * cs))
        st.flush()
        if preallocation == "metadata":
            building = Qcow2Image(st, metadata.load(st), writable=True, allow_backing=allow_backing)
            _preallocate(building)
            building.close()
        st.close()
        publish(tmp, path)
    except ImageError as exc:
        st.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if type(exc) is ImageError and exc.path == tmp:  # name the file the caller asked for
            message = exc.message.rsplit(" [", 1)[0]
            raise ImageError(message, path=path, offset=exc.offset) from exc.__cause__
        raise
    except BaseException:
        st.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    st = FileStorage(path, writable=True)
    try:
        return Qcow2Image(st, metadata.load(st), writable=True, allow_backing=allow_backing)
    except BaseException:
        st.close()
        raise


def _preallocate(img: Qcow2Image) -> None:
    """Allocate every L2 table and data cluster (data left as sparse zeroes)."""
    cs = img.cs
    total = -(-img.virtual_size // cs)
    ci = 0
    step = img.mapper.step
    end = img.st.size()
    req = _Request()
    while ci < total:
        k = min(total - ci, img.l2_entries - (ci & (img.l2_entries - 1)))
        l1i = ci >> img.l2_bits
        _l2off, l2 = img._req_l2(req, l1i)
        host = img.refs.allocate(k)
        base = ci & (img.l2_entries - 1)
        for j in range(k):
            l2[(base + j) * step] = (host + j * cs) | layout.OFLAG_COPIED
            if step == 2:
                l2[(base + j) * 2 + 1] = layout.BITMAP_ALLOC_ALL
        req.mark(l1i, base, base + k)
        end = max(end, host + k * cs)
        ci += k
        if len(req.tables) >= _PREALLOC_BATCH or ci >= total:
            # the clusters exist (and their counts are raised) before any L2 entry says so
            if img.st.size() < end:
                img.st.truncate(end)
            img._commit(req)
            req = _Request()
    if img.st.size() < end:
        img.st.truncate(end)
    img.st.flush()
    if img.st.size() < end:  # pragma: no cover - truncate failed silently
        raise ImageError("could not extend the file for preallocation", path=img.path)

"""Format-independent image tools: convert, measure, rebase, commit.

These work on any :class:`~virtkit.images.base.Image` (qcow2 or raw) through
its public surface only (``read``/``write``/``block_status``...), and behave
like their ``qemu-img`` namesakes:

* :func:`convert` copies only what reads as non-zero (sparse output), can
  write compressed qcow2 clusters, reports progress, and is atomic: it writes
  a temporary file next to ``dst`` and renames it into place only when
  complete, so a failure never leaves a half-written ``dst``.
* :func:`measure` answers ``qemu-img measure --output=json``.
* :func:`rebase` changes an overlay's backing file; in safe mode it first
  copies into the overlay every range where the old and new backing differ.
* :func:`commit` writes an overlay's own data into its backing file and then
  empties the overlay.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from typing import Any

from virtkit.errors import (
    ConfigError,
    ImageError,
    UnsupportedFeatureError,
    VirtkitError,
)
from virtkit.images import convert_pipeline
from virtkit.images.args import check_bool, check_callable, check_name, check_path
from virtkit.images.base import Extent, Image
from virtkit.images.probe import format_for_name
from virtkit.images.qcow2.bulk import BulkWriter
from virtkit.images.sizes import parse_size
from virtkit.images.storage import FileStorage

__all__ = ["commit", "convert", "measure", "rebase"]

Progress = Callable[[int, int], None]

#: Bytes moved per read/write call on the copy paths.
CHUNK = 2 << 20
#: Zero-detection granularity for raw targets (qemu-img convert's default -S 4k).
RAW_GRANULE = 4096
_ZERO_CHUNK = bytes(CHUNK)


def _images() -> Any:
    # virtkit.images imports this module, so the package is looked up at call time.
    return sys.modules["virtkit.images"]


def _open(
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    format: str | None = None,  # noqa: A002 - qemu-img's own word
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    force_share: bool = False,
) -> Image:
    opened: Image = _images().open(
        path,
        writable=writable,
        format=format,
        allow_backing=allow_backing,
        force_share=force_share,
    )
    return opened


def _is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    if n <= CHUNK:
        return data == _ZERO_CHUNK[:n] if n < CHUNK else data == _ZERO_CHUNK
    return bytes(data) == bytes(n)


def _nonzero_runs(data: bytes, granule: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` runs of ``data`` whose ``granule``-sized pieces are not all zero."""
    if _is_zero(data):
        return
    zero = _ZERO_CHUNK[:granule] if granule <= CHUNK else bytes(granule)
    run_start: int | None = None
    n = len(data)
    for pos in range(0, n, granule):
        piece = data[pos : pos + granule]
        if piece == zero or (len(piece) < granule and piece == zero[: len(piece)]):
            if run_start is not None:
                yield run_start, pos
                run_start = None
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        yield run_start, n


def _chunks(start: int, end: int, align: int) -> Iterator[tuple[int, int]]:
    """Split ``[start, end)`` into pieces of at most CHUNK bytes that end on ``align``."""
    step = max(CHUNK // align, 1) * align
    pos = start
    while pos < end:
        nxt = min((pos // step + 1) * step, end)
        yield pos, nxt
        pos = nxt


def _sync_dir(path: str) -> None:
    """fsync the directory holding ``path`` so a rename survives a power loss."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync directories; the rename still happened
    finally:
        os.close(fd)


def _temp_name(dst: str) -> str:
    folder, name = os.path.split(os.path.abspath(dst))
    return os.path.join(folder, f".{name}.virtkit-{secrets.token_hex(4)}.tmp")


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    format: str | None = None,  # noqa: A002 - qemu-img's own word
    compress: bool = False,
    progress: Progress | None = None,
    *,
    src_format: str | None = None,
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    force_share: bool = False,
    **create_options: Any,
) -> None:
    """Copy image ``src`` (its whole backing chain flattened) into a new image ``dst``.

    Ranges that read as zeroes are not written, so the output is sparse (qcow2:
    unallocated clusters; raw: file holes). The copy is written to a hidden
    temporary file in ``dst``'s directory and renamed over ``dst`` only once it
    is complete and flushed; an existing ``dst`` is replaced, but not while
    another process holds it (its lock is checked first).

    Args:
        src: the source image in any format virtkit reads (probed as qemu-img
            does unless ``src_format``).
        dst: the file to write.
        format: ``"qcow2"``, ``"raw"``, ``"vmdk"`` (streamOptimized),
            ``"vpc"`` (fixed) or ``"vhdx"``. When omitted it follows ``dst``'s
            name as :func:`virtkit.images.create` does: ``.raw``/``.img``/
            ``.iso``/``.bin`` raw, ``.vmdk``, ``.vhd``, ``.vhdx`` those
            formats, any other name qcow2.
        compress: write compressed qcow2 clusters (``compression_type="zstd"``
            in ``create_options`` for zstd, else zlib).
        progress: called as ``progress(done_bytes, total_bytes)`` as the copy
            advances, ending with ``(total, total)``.
        src_format: the source format, when it must not be probed.
        allow_backing: places the source's backing files may come from.
        force_share: read a source another process holds (``qemu-img -U``);
            the copy may be inconsistent if that process is writing.
        create_options: passed to :func:`virtkit.images.create` for ``dst``
            (``cluster_size``, ``compat``, ``refcount_bits``, ``compression_type``,
            ``backing``/``backing_format`` as ``qemu-img convert -B``: only the
            clusters that differ from the backing file are written).

    Raises:
        ConfigError: ``compress`` with a raw target, or a bad create option.
        ImageLockedError: ``dst`` (or ``src``) is held by another process.
        ImageError: reading or writing failed; ``dst`` is left untouched.
    """
    images = _images()
    check_path(src, "src")
    dst_path = check_path(dst, "dst")
    if format is None:
        format = format_for_name(dst_path)  # noqa: A001 - the argument's own name
    images._driver(format)
    check_callable(progress, "progress")
    check_bool(compress, "compress")
    if compress and format != "qcow2":
        raise ConfigError("compress=True needs a qcow2 target", field="compress")
    src_img = _open(src, format=src_format, allow_backing=allow_backing, force_share=force_share)
    guard: Any = None
    tmp = _temp_name(dst_path)
    out: Image | None = None
    try:
        if os.path.exists(dst_path):
            if os.path.samefile(dst_path, src_img.path):
                raise ConfigError(
                    f"convert: destination {dst_path} is the source image", field="dst"
                )
            # Refuse to replace an image someone is using, as qemu-img would.
            guard = FileStorage(dst_path, writable=True)
        total = src_img.virtual_size
        # A format written in one sequential pass (streamOptimized VMDK) has its own writer.
        convert_into = getattr(images._driver(format), "convert_into", None)
        if convert_into is not None:
            convert_into(src_img, tmp, dst_path, progress=progress, **create_options)
        else:
            out = images.create(tmp, total, format=format, **create_options)
            if _bulk_target(out, create_options):
                out.close()  # a new, empty qcow2 image: filled front to back instead
                out = None
                _copy_bulk(src_img, tmp, compress=compress, progress=progress)
            else:
                _copy(src_img, out, compress=compress, progress=progress)
                out.close()
        os.replace(tmp, dst_path)
        out = None
        _sync_dir(dst_path)
    except BaseException:
        if out is not None:
            with contextlib.suppress(VirtkitError):
                out.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        src_img.close()
        if guard is not None:
            guard.close()


def _bulk_target(out: Image, create_options: dict[str, Any]) -> bool:
    """Whether the new ``out`` can be filled by :class:`~.qcow2.bulk.BulkWriter`."""
    return (
        out.format == "qcow2"
        and out.backing_file is None
        and create_options.get("preallocation") in (None, "off")
    )


def _copy_bulk(src: Image, path: str, *, compress: bool, progress: Progress | None) -> None:
    """Fill the new qcow2 image at ``path`` sequentially: data, then metadata, one flush."""
    writer = BulkWriter(path)
    try:
        if compress:
            convert_pipeline.copy_compressed(src, writer, progress)  # every core compresses
        else:
            convert_pipeline.copy_clusters(src, writer, progress)
        writer.finish()
    finally:
        writer.close()


def _copy_over_backing(src: Image, out: Image, progress: Progress | None) -> None:
    """Write into ``out`` (which has a backing file) only the clusters that read differently."""
    total = src.virtual_size
    cluster = out.cluster_size
    zero = bytes(cluster)
    for start, stop in _chunks(0, total, cluster):
        ours = src.read(start, stop - start)
        theirs = out.read(start, stop - start)
        if ours != theirs:
            for pos in range(0, len(ours), cluster):
                piece = ours[pos : pos + cluster]
                if piece == theirs[pos : pos + cluster]:
                    continue
                if piece == zero[: len(piece)]:
                    out.write_zeroes(start + pos, len(piece))
                else:
                    out.write(start + pos, piece)
        if progress is not None:
            progress(stop, total)
    out.flush()


def _copy(src: Image, out: Image, *, compress: bool, progress: Progress | None) -> None:
    if out.backing_file is not None and not compress:
        _copy_over_backing(src, out, progress)
        return
    granule = out.cluster_size if out.format == "qcow2" else RAW_GRANULE
    write_compressed = getattr(out, "write_compressed", None)
    if compress and write_compressed is None:
        raise UnsupportedFeatureError(
            f"{out.format} images cannot store compressed clusters", feature="compression"
        )
    if compress and hasattr(out, "write_precompressed") and hasattr(out, "compress_cluster"):
        convert_pipeline.copy_compressed(src, out, progress)  # every core compresses
    elif not compress:
        convert_pipeline.copy_plain(src, out, granule, progress)  # reads ahead on a thread
    else:
        assert write_compressed is not None  # refused above
        _copy_sequential(src, out, write_compressed, progress)
    out.flush()


def _copy_sequential(
    src: Image,
    out: Image,
    write_compressed: Callable[[int, bytes], None],
    progress: Progress | None,
) -> None:
    """One thread, extent by extent: compressed output without the pipeline's hooks."""
    total = src.virtual_size
    if progress is not None:
        progress(0, total)
    for extent in src.block_status(0, total, include_backing=True):
        if extent.kind == "data":
            _copy_compressed(src, out, extent, write_compressed)
        if progress is not None:
            progress(extent.start + extent.length, total)


def _copy_compressed(
    src: Image, out: Image, extent: Extent, write_compressed: Callable[[int, bytes], None]
) -> None:
    """Write each non-zero cluster touching ``extent`` compressed (whole clusters only)."""
    cluster = out.cluster_size
    size = out.virtual_size
    first = extent.start // cluster * cluster
    end = extent.start + extent.length
    for start, stop in _chunks(first, min(-(-end // cluster) * cluster, size), cluster):
        data = src.read(start, stop - start)
        for pos in range(0, len(data), cluster):
            piece = data[pos : pos + cluster]
            if _is_zero(piece):
                continue
            if len(piece) == cluster:
                write_compressed(start + pos, piece)
            else:  # the short last cluster of a disk whose size is not cluster-aligned
                out.write(start + pos, piece)


# -- measure --------------------------------------------------------------------------


def _refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table + blocks needed to count ``clusters`` and themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def _qcow2_full_size(
    virtual_size: int, cluster_size: int, refcount_order: int, extended_l2: bool
) -> int:
    """File size of a fully allocated qcow2 image: data plus all metadata."""
    aligned = -(-virtual_size // cluster_size) * cluster_size
    l2e = 16 if extended_l2 else 8
    meta = cluster_size  # header
    nl2e = aligned // cluster_size
    per_l2 = cluster_size // l2e
    nl2e = -(-nl2e // per_l2) * per_l2
    meta += nl2e * l2e
    nl1e = nl2e * l2e // cluster_size
    per_l1 = cluster_size // 8
    nl1e = -(-nl1e // per_l1) * per_l1
    meta += nl1e * 8
    meta += _refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def _data_bytes_by_cluster(img: Image, cluster: int) -> int:
    """Bytes of whole ``cluster``-sized units touched by data, as qemu-img measure counts."""
    required = 0
    extents = list(img.block_status(0, img.virtual_size, include_backing=True))
    idx = 0
    offset = 0
    size = img.virtual_size
    while offset < size:
        while extents[idx].start + extents[idx].length <= offset:
            idx += 1
        ext = extents[idx]
        pnum = ext.start + ext.length - offset
        if ext.kind == "data":
            pnum = -(-(offset + pnum) // cluster) * cluster - offset
            required += offset % cluster + pnum
        offset += pnum
    return required


def measure(
    src: str | os.PathLike[str] | None = None,
    format: str = "qcow2",  # noqa: A002 - qemu-img's own word
    *,
    size: int | str | None = None,
    src_format: str | None = None,
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    force_share: bool = False,
    **options: Any,
) -> dict[str, int]:
    """How big converting ``src`` (or a new empty image of ``size``) to ``format`` would be.

    Returns the fields of ``qemu-img measure --output=json``: ``required``
    (bytes the converted file needs), ``fully-allocated`` (bytes if every
    cluster were written) and, for a qcow2 v3 target from a qcow2 source,
    ``bitmaps`` (bytes of persistent dirty bitmaps; virtkit copies none, so 0).

    Args:
        src: the source image, or None to measure a new image of ``size``.
        format: target format.
        size: virtual size when there is no source.
        src_format: the source's format; probed when omitted.
        allow_backing: extra places the source's backing files may come from.
        force_share: read a source another process holds (``qemu-img -U``).
        options: target qcow2 options: ``cluster_size``, ``refcount_bits``,
            ``extended_l2``, ``compat``, ``preallocation``, ``backing``.

    Raises:
        ConfigError: neither or both of ``src`` and ``size``, or a bad option.
    """
    if (src is None) == (size is None):
        raise ConfigError("measure needs exactly one of a source image or a size", field="size")
    img: Image | None = None
    _images()._driver(format)
    check_bool(force_share, "force_share")
    if src is not None:
        check_path(src, "src")
        img = _open(src, format=src_format, allow_backing=allow_backing, force_share=force_share)
    try:
        return _measure(img, format, size, options)
    finally:
        if img is not None:
            img.close()


def _measure(
    img: Image | None, fmt: str, size: int | str | None, options: dict[str, Any]
) -> dict[str, int]:
    virtual = img.virtual_size if img is not None else parse_size(size, field="size")
    if fmt == "raw":
        for name, value in options.items():
            if value is not None and name != "preallocation":
                raise ConfigError(f"raw images have no option {name!r}", field=name)
        raw_size = virtual if img is not None else -(-virtual // 512) * 512
        return {"required": raw_size, "fully-allocated": raw_size}
    if fmt != "qcow2":
        raise UnsupportedFeatureError(f"cannot measure for format {fmt!r}", feature=f"format {fmt}")
    known = {"cluster_size", "refcount_bits", "extended_l2", "compat", "preallocation",
             "backing", "backing_format", "lazy_refcounts", "compression_type"}  # fmt: skip
    for name in options:
        if name not in known:
            raise ConfigError(f"qcow2 has no option {name!r}", field=name)
    cluster = parse_size(options.get("cluster_size") or 65536, field="cluster_size")
    if cluster < 512 or cluster > (2 << 20) or cluster & (cluster - 1):
        raise ConfigError(
            f"'cluster_size' must be a power of two from 512 to 2 MiB (got {cluster})",
            field="cluster_size",
        )
    refcount_bits = int(options.get("refcount_bits") or 16)
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ConfigError(
            f"'refcount_bits' must be a power of two up to 64 (got {refcount_bits})",
            field="refcount_bits",
        )
    extended_l2 = bool(options.get("extended_l2"))
    prealloc = options.get("preallocation") or "off"
    compat = str(options.get("compat") or "1.1")
    virtual_aligned = -(-virtual // cluster) * cluster
    if img is None:
        required = 0
    elif options.get("backing"):
        required = virtual_aligned
    else:
        required = _data_bytes_by_cluster(img, cluster)
    if prealloc in ("falloc", "full"):
        required = virtual_aligned
    full = _qcow2_full_size(virtual_aligned, cluster, refcount_bits.bit_length() - 1, extended_l2)
    result = {"required": full - virtual_aligned + required, "fully-allocated": full}
    if img is not None and img.format == "qcow2" and compat not in ("0.10", "v2"):
        result = {"bitmaps": _bitmaps_size(img, cluster), **result}
    return result


def _source_bitmaps(img: Image) -> list[tuple[str, int]]:
    """``(name, granularity)`` of the persistent dirty bitmaps ``info()`` lists for a source."""
    listed = img.info().format_specific.get("bitmaps", [])
    return [(str(b["name"]), int(b["granularity"])) for b in listed]


def _bitmaps_size(img: Image, cluster: int) -> int:
    """Bytes the source's persistent bitmaps would take in a target, as qemu-img measure says."""
    total = 0
    directory = 0
    for name, granularity in _source_bitmaps(img):
        bits = -(-img.virtual_size // granularity)
        nbytes = -(-bits // 8)
        clusters = -(-nbytes // cluster)
        total += clusters * cluster  # the whole bitmap, as if allocated
        total += -(-(clusters * 8) // cluster) * cluster  # its bitmap table
        entry = 24 + len(name.encode())
        directory += entry + (-entry % 8)
    return total + -(-directory // cluster) * cluster


# -- rebase / commit ------------------------------------------------------------------


def _set_backing(img: Image, backing: str | None, backing_format: str | None) -> None:
    change = getattr(img, "set_backing_file", None)
    if change is None:
        raise UnsupportedFeatureError(
            f"{img.format} images cannot change their backing file", feature="backing file"
        )
    change(backing, backing_format)


def rebase(
    image: str | os.PathLike[str],
    backing: str | None,
    backing_format: str | None = None,
    unsafe: bool = False,
    *,
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    progress: Progress | None = None,
) -> None:
    """Make ``backing`` the backing file of qcow2 overlay ``image`` (None: no backing).

    In safe mode (the default, as ``qemu-img rebase``) every range the overlay
    does not store itself and where the old chain and the new backing file
    read differently is first copied into the overlay, so the guest-visible
    contents do not change. ``unsafe=True`` only rewrites the header
    (``qemu-img rebase -u``), for when the file was moved or renamed.

    Args:
        image: the overlay (qcow2).
        backing: the new backing file name, stored as given and resolved
            relative to the overlay's directory; None removes the backing file.
        backing_format: the new backing file's format (probed when omitted,
            as only the caller's own file is named here).
        unsafe: skip the data comparison.

    Raises:
        UnsupportedFeatureError: ``image`` is not qcow2.
        ImageError: the new backing file cannot be opened, or I/O failed.
    """
    images = _images()
    path = check_path(image, "image")
    if backing is not None:
        check_name(backing, "backing")
    check_callable(progress, "progress")
    check_bool(unsafe, "unsafe")
    if unsafe:
        with _open(path, writable=True, allow_backing=allow_backing) as img:
            _set_backing(img, backing, backing_format)
        return
    folder = os.path.dirname(os.path.abspath(path))
    new_img: Image | None = None
    if backing is not None:
        new_path = backing if os.path.isabs(backing) else os.path.join(folder, backing)
        fmt = backing_format or images.probe_format(new_path)
        new_img = _open(new_path, format=fmt, allow_backing=allow_backing)
        backing_format = fmt
    try:
        with _open(path, writable=True, allow_backing=allow_backing) as img:
            if img.format != "qcow2":
                raise UnsupportedFeatureError(
                    "only qcow2 images have a backing file to rebase",
                    feature="backing file",
                    path=path,
                )
            _copy_differences(img, new_img, progress)
            _set_backing(img, backing, backing_format)
    finally:
        if new_img is not None:
            new_img.close()


def _copy_differences(img: Image, new: Image | None, progress: Progress | None) -> None:
    """Copy into ``img`` what its chain shows and ``new`` would show differently."""
    total = img.virtual_size
    cluster = img.cluster_size
    new_size = new.virtual_size if new is not None else 0
    for ext in list(img.block_status(0, total, include_backing=False)):
        end = ext.start + ext.length
        if ext.kind != "unallocated":
            if progress is not None:
                progress(end, total)
            continue
        for start, stop in _chunks(ext.start, end, cluster):
            old = img.read(start, stop - start)
            if new is not None and start < new_size:
                theirs = new.read(start, min(stop, new_size) - start)
                theirs += bytes(stop - start - len(theirs))
            else:
                theirs = bytes(stop - start)
            if old != theirs:
                for pos in range(0, len(old), cluster):
                    a = old[pos : pos + cluster]
                    if a != theirs[pos : pos + cluster]:
                        img.write(start + pos, a)
            if progress is not None:
                progress(stop, total)


def commit(
    image: str | os.PathLike[str],
    *,
    drop: bool = False,
    allow_backing: tuple[str | os.PathLike[str], ...] = (),
    progress: Progress | None = None,
) -> None:
    """Write qcow2 overlay ``image``'s own data into its backing file, then empty it.

    As ``qemu-img commit``: every range the overlay stores (data, or zeroes
    written over backing data) is written into the backing file, which grows
    if the overlay is larger; afterwards the overlay is emptied
    (``make_empty``) so it reads through to the updated backing file, or with
    ``drop=True`` deleted. Internal snapshots of the overlay keep their data.

    The overlay stays open throughout and its backing file is reopened
    read-write for the copy (QEMU's commit does the same with the backing
    node), so the base is never writable by anyone else in between.

    Raises:
        ImageError: the image has no backing file, or I/O failed.
        ImageLockedError: the overlay or its backing file is held by another
            process (for example a QEMU running another overlay on the same base).
    """
    path = check_path(image, "image")
    check_callable(progress, "progress")
    check_bool(drop, "drop")
    with _open(path, writable=True, allow_backing=allow_backing) as top:
        if top.backing_file is None:
            raise ImageError("cannot commit: the image has no backing file", path=path)
        reopen_backing = getattr(top, "reopen_backing", None)
        make_empty = getattr(top, "make_empty", None)
        if reopen_backing is None or make_empty is None:
            raise UnsupportedFeatureError(
                f"cannot commit {top.format} images", feature="commit", path=path
            )
        extents = [
            e for e in top.block_status(0, top.virtual_size, include_backing=False)
            if e.kind != "unallocated"
        ]  # fmt: skip
        base: Image = reopen_backing(writable=True)
        try:
            _commit_into(top, base, extents, progress)
        finally:
            if not top.closed:
                reopen_backing(writable=False)
        if not drop:
            make_empty()
            top.flush()
    if drop:
        os.unlink(path)
        _sync_dir(path)


def _commit_into(top: Image, base: Image, extents: list[Extent], progress: Progress | None) -> None:
    """Copy the overlay's own ``extents`` into the (writable) ``base``."""
    total = sum(e.length for e in extents)
    done = 0
    if base.virtual_size < top.virtual_size:
        base.resize(top.virtual_size)
    for ext in extents:
        if ext.kind == "zero":
            base.write_zeroes(ext.start, ext.length)
            done += ext.length
        else:
            for start, stop in _chunks(ext.start, ext.start + ext.length, CHUNK):
                base.write(start, top.read(start, stop - start))
                done += stop - start
                if progress is not None:
                    progress(done, total)
        if progress is not None:
            progress(done, total)
    base.flush()

"""``qemu-img amend`` for qcow2: the compatibility level, lazy refcounts, the refcount width.

:func:`amend` changes, in place, the options of an existing qcow2 image that
QEMU 7.2's ``qemu-img amend`` changes (size and the backing file name have
their own entry points: :meth:`.Qcow2Image.resize` and
:func:`virtkit.images.rebase`):

- ``compat="1.1"`` (v2 -> v3): the header gets the v3 fields and QEMU's
  feature name table; snapshot entries without the v3 extra data (VM state
  size, disk size) are rewritten with it, as the specification asks.
- ``compat="0.10"`` (v3 -> v2): refused while anything v2 cannot express is
  in use (a refcount width other than 16, lazy refcounts asked for, an
  external data file, zstd compression, extended L2 entries, persistent
  bitmaps); zero clusters, which v2 has no flag for, are written out first in
  the active table and in every snapshot (an allocated zero cluster gets
  zeros in its data cluster; an unallocated one is dropped, or over a backing
  file gets a new cluster of zeros).
- ``lazy_refcounts``: the compatible feature bit (v3 only). virtkit itself
  keeps refcounts eager; the bit lets QEMU defer them.
- ``refcount_bits`` (1..64, a power of two; v3 only): a new refcount table
  and blocks of the new width are written past the end of the file, made
  durable, then the header switches to them in one write; the old structure
  becomes free space. Refused when a count does not fit the new width.

Crash safety: every new structure is written and flushed before anything
points at it, and each switch is one write inside the header's first sector
(the refcount width) or of the header cluster (the version), as QEMU does: a
crash leaves the old image, or the new one, plus unreferenced space at worst.
The image is checked first: one with corruptions is refused (repair it with
``check(repair=True)``) so that no rebuilt structure cements an error.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

from virtkit.errors import ConfigError, CorruptImageError, ImageError, UnsupportedFeatureError
from virtkit.images.qcow2 import layout, snapshots

if TYPE_CHECKING:
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["COMPAT_LEVELS", "amend", "amend_open"]

#: ``compat=`` spellings qemu-img accepts -> the header version
COMPAT_LEVELS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}

#: step -> done, total (a progress callback, as the other long operations take)
Progress = Callable[[int, int], None]


def _version_of(compat: str | None) -> int | None:
    if compat is None:
        return None
    if not isinstance(compat, str) or compat not in COMPAT_LEVELS:
        raise ConfigError(
            f"unknown compatibility level {compat!r} (use 0.10/v2 or 1.1/v3)",
            field="compat",
            value=compat,
        )
    return COMPAT_LEVELS[compat]


def _check_bits(refcount_bits: int | None) -> int | None:
    if refcount_bits is None:
        return None
    if (
        isinstance(refcount_bits, bool)
        or not isinstance(refcount_bits, int)
        or refcount_bits not in (1, 2, 4, 8, 16, 32, 64)
    ):
        raise ConfigError(
            "refcount width must be a power of two and may not exceed 64 bits "
            f"(got {refcount_bits!r})",
            field="refcount_bits",
            value=refcount_bits,
        )
    return refcount_bits.bit_length() - 1


def amend(
    path: str | os.PathLike[str],
    *,
    compat: str | None = None,
    lazy_refcounts: bool | None = None,
    refcount_bits: int | None = None,
    progress: Progress | None = None,
) -> None:
    """Change the compatibility level, lazy refcounts or refcount width of a qcow2 file.

    ``None`` leaves an option as it is. The image is opened for writing
    (QEMU-compatible locks: refused while a VM uses it).

    Raises:
        ConfigError: an option has a wrong value, or the combination asks for
            something v2 cannot hold (lazy refcounts, a width other than 16).
        UnsupportedFeatureError: the image uses a feature the target level
            lacks (data file, zstd, extended L2, bitmaps).
        ImageError: the file is not a qcow2 image, is in use, or a refcount
            does not fit the new width.
        CorruptImageError: the image has corruptions (repair them first).
    """
    from virtkit import images  # noqa: PLC0415 - the package imports this module's parent

    _version_of(compat)
    _check_bits(refcount_bits)
    if lazy_refcounts is not None and not isinstance(lazy_refcounts, bool):
        raise ConfigError(
            f"'lazy_refcounts' must be True or False (got {lazy_refcounts!r})",
            field="lazy_refcounts",
        )
    with images.open(path, writable=True, format="qcow2", cache="writethrough") as img:
        from virtkit.images.qcow2.image import Qcow2Image  # noqa: PLC0415 - cycle

        if not isinstance(img, Qcow2Image):  # pragma: no cover - format="qcow2" opened it
            raise ImageError("not a qcow2 image", path=str(path))
        amend_open(
            img,
            compat=compat,
            lazy_refcounts=lazy_refcounts,
            refcount_bits=refcount_bits,
            progress=progress,
        )


def amend_open(
    img: Qcow2Image,
    *,
    compat: str | None = None,
    lazy_refcounts: bool | None = None,
    refcount_bits: int | None = None,
    progress: Progress | None = None,
) -> None:
    """:func:`amend` on an image already open for writing; it is closed afterwards.

    The raw steps bypass the image's caches, so the handle is closed (without
    writing anything back) when this returns or fails.
    """
    try:
        _amend(img, compat, lazy_refcounts, refcount_bits, progress)
    finally:
        img.st.flush()
        img._writable = False  # the handle's caches are stale: write nothing back
        img.close()


def _amend(
    img: Qcow2Image,
    compat: str | None,
    lazy: bool | None,
    refcount_bits: int | None,
    progress: Progress | None,
) -> None:
    if not img.writable:
        raise ImageError("amend needs the image open for writing", path=img.path)
    old_version = 3 if img.v3 else 2
    version = _version_of(compat) or old_version
    order = _check_bits(refcount_bits)
    new_order = img.hdr.refcount_order if order is None else order
    old_lazy = bool(img.hdr.compatible_features & layout.COMPAT_LAZY_REFCOUNTS)
    new_lazy = old_lazy if lazy is None else lazy
    if version == 2:
        if new_order != 4:
            raise ConfigError(
                "refcount widths other than 16 bits require compatibility level 1.1 or "
                "above (use compat=1.1 or greater)"
                if order is not None
                else "compat=0.10 requires refcount_bits=16",
                field="refcount_bits",
            )
        if lazy:
            raise ConfigError(
                "lazy refcounts only supported with compatibility level 1.1 and above "
                "(use compat=1.1 or greater)",
                field="lazy_refcounts",
            )
        new_lazy = False
    img.flush()
    result = img.check(repair=False)
    if result.corruptions or result.errors:
        raise CorruptImageError(
            f"the image has {result.corruptions} corruptions and {result.errors} check "
            "errors; repair it first (check -r all)",
            path=img.path,
        )
    if version == 2 and old_version == 3:
        _refuse_v3_only(img)
    steps = int(version > old_version) + int(new_order != img.hdr.refcount_order)
    steps += int(version < old_version)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    if version > old_version:
        _upgrade(img, new_lazy)
        step()
    if new_order != img.hdr.refcount_order:
        _change_refcount_order(img, new_order)
        step()
    if version < old_version:
        _expand_zero_clusters(img)
        _write_header(img, version=2)
        step()
    elif img.v3 and new_lazy != bool(img.hdr.compatible_features & layout.COMPAT_LAZY_REFCOUNTS):
        features = img.hdr.compatible_features & ~layout.COMPAT_LAZY_REFCOUNTS
        features |= layout.COMPAT_LAZY_REFCOUNTS if new_lazy else 0
        img.st.pwrite(80, struct.pack(">Q", features))
        img.st.flush()
        img.hdr.compatible_features = features


def _refuse_v3_only(img: Qcow2Image) -> None:
    """Refuse a downgrade while the image uses what a v2 header cannot say."""
    hdr = img.hdr
    names = {
        layout.INCOMPAT_DATA_FILE: "an external data file",
        layout.INCOMPAT_COMPRESSION: "zstd compression",
        layout.INCOMPAT_EXTL2: "extended L2 entries",
        layout.INCOMPAT_CORRUPT: "the corrupt bit",
        layout.INCOMPAT_DIRTY: "the dirty bit",
    }
    used = [name for bit, name in names.items() if hdr.incompatible_features & bit]
    unknown = hdr.incompatible_features & ~layout.INCOMPAT_KNOWN
    if unknown:
        used.append(f"unknown incompatible features {unknown:#x}")
    if img.meta.bitmaps is not None:
        used.append(
            "persistent bitmaps (v2 cannot keep them: remove them first with "
            "'virtkit image bitmap --remove')"
        )
    if used:
        raise UnsupportedFeatureError(
            f"cannot downgrade {img.path} to compat=0.10: it uses {', '.join(used)}",
            feature="compat=0.10",
        )


# --- the header -----------------------------------------------------------------------


def _write_header(img: Qcow2Image, *, version: int, lazy: bool = False) -> None:
    """Rewrite the header cluster as ``version`` (extensions and backing name kept)."""
    old = img.hdr
    new = layout.Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=old.cluster_bits,
        size=old.size,
        crypt_method=old.crypt_method,
        l1_size=old.l1_size,
        l1_table_offset=old.l1_table_offset,
        refcount_table_offset=old.refcount_table_offset,
        refcount_table_clusters=old.refcount_table_clusters,
        nb_snapshots=old.nb_snapshots,
        snapshots_offset=old.snapshots_offset,
        incompatible_features=0,
        compatible_features=layout.COMPAT_LAZY_REFCOUNTS if lazy else 0,
        autoclear_features=0,
        refcount_order=4,
        header_length=layout.HEADER_V3_LENGTH if version >= 3 else layout.HEADER_V2.size,
        compression_type=0,
    )
    kept = [
        e
        for e in img.meta.extensions
        if e.type not in (layout.EXT_END, layout.EXT_FEATURE_TABLE, layout.EXT_BITMAPS)
    ]
    name = (img.meta.backing_file or "").encode()
    with_table = [*kept, layout.Extension(layout.EXT_FEATURE_TABLE, layout.default_feature_table())]
    exts = kept
    if version >= 3 and _header_bytes(new, with_table, name) <= img.cs:
        exts = with_table  # the names table is optional: left out when it does not fit
    if _header_bytes(new, exts, name) > img.cs:
        raise ImageError(
            "the header, its extensions and the backing file name do not fit in one cluster",
            path=img.path,
        )
    head = bytearray(layout.encode_header(new) + layout.encode_extensions(exts))
    if name:
        new.backing_file_offset, new.backing_file_size = len(head), len(name)
        head[: new.header_length] = layout.encode_header(new)
        head += name
    img.st.pwrite(0, bytes(head))
    img.st.flush()
    img.hdr = img.meta.header = new
    img.meta.extensions = exts
    img.v3 = version >= 3


def _header_bytes(hdr: layout.Header, exts: list[layout.Extension], name: bytes) -> int:
    return len(layout.encode_header(hdr)) + len(layout.encode_extensions(exts)) + len(name)


def _upgrade(img: Qcow2Image, lazy: bool) -> None:
    """v2 -> v3: snapshot entries get the v3 extra data, then the header switches."""
    if any(s.disk_size is None for s in img.snaps):
        # entries read without a disk size took the image's (as QEMU reads them)
        for s in img.snaps:
            if s.disk_size is None:
                s.disk_size = img.hdr.size
        img.v3 = True  # encode the entries as v3 ones (the 64-bit VM state size)
        img.hdr.version = 3
        try:
            snapshots.write_table(img, list(img.snaps))
        finally:
            img.v3 = False
            img.hdr.version = 2
    _write_header(img, version=3, lazy=lazy)


# --- v3 -> v2: zero clusters ------------------------------------------------------------


def _expand_zero_clusters(img: Qcow2Image) -> None:
    """Write out every zero-flagged L2 entry of the active table and the snapshots."""
    tables: list[tuple[array[int], int]] = [(img.l1, img.hdr.l1_table_offset)]
    tables += [(snapshots.load_l1(img, s), s.l1_table_offset) for s in img.snaps]
    size = img.st.size()
    seen: set[int] = set()
    has_backing = img.meta.backing_file is not None
    zero_cluster = bytes(img.cs)
    for l1, l1_offset in tables:
        for index, entry in enumerate(l1):
            l2_off = entry & layout.L1E_OFFSET_MASK
            if not l2_off or l2_off in seen:
                continue
            seen.add(l2_off)
            if l2_off % img.cs or l2_off + img.cs > size:
                raise CorruptImageError(
                    f"L1 entry {index} points at {l2_off:#x}, not a cluster inside the file",
                    path=img.path,
                    offset=l1_offset + index * 8,
                )
            l2 = layout.decode_u64_table(img.st.pread(l2_off, img.cs))
            l2_refs = img.refs.get(l2_off >> img.cb)
            changed = False
            for i, x in enumerate(l2):
                if x & layout.OFLAG_COMPRESSED or not x & layout.OFLAG_ZERO:
                    continue
                host = x & layout.L2E_OFFSET_MASK
                if host:
                    if host % img.cs or host + img.cs > size:
                        raise CorruptImageError(
                            f"L2 entry {i} points at {host:#x}, not a cluster inside the file",
                            path=img.path,
                            offset=l2_off + i * 8,
                        )
                    img.st.pwrite(host, zero_cluster)
                    l2[i] = x & ~layout.OFLAG_ZERO
                elif not has_backing:
                    l2[i] = 0  # reads as zeros without a backing file
                else:
                    new = img.refs.allocate(1)
                    if l2_refs > 1:  # one reference per table sharing this L2
                        img.refs.update([(new >> img.cb, l2_refs)], absolute=True)
                    img.st.pwrite(new, zero_cluster)
                    size = max(size, new + img.cs)
                    l2[i] = new | (layout.OFLAG_COPIED if l2_refs == 1 else 0)
                changed = True
            if changed:
                img.st.flush()  # the zeros and counts before the entries naming them
                img.st.pwrite(l2_off, layout.encode_u64_table(l2))
                img.st.flush()


# --- the refcount width -------------------------------------------------------------------


def _change_refcount_order(img: Qcow2Image, order: int) -> None:
    """Rebuild the refcount structure with ``1 << order`` bit counts past the end of the file."""
    refs, cb, cs = img.refs, img.cb, img.cs
    bits = 1 << order
    top = (1 << bits) - 1
    old_meta = {refs.table_offset >> cb} | {
        (refs.table_offset >> cb) + i for i in range(refs.table_clusters)
    }
    old_meta |= {(e & ~(cs - 1)) >> cb for e in refs.table if e}
    counts: dict[int, int] = {}
    for t in range(len(refs.table)):
        blk = refs.block(t)
        if blk is None:
            continue
        base = t * refs.per_block
        for i, n in enumerate(blk):
            if n and base + i not in old_meta:
                if n > top:
                    raise ImageError(
                        f"cannot decrease refcount entry width to {bits} bits: cluster at "
                        f"offset {(base + i) << cb:#x} has a refcount of {n}",
                        path=img.path,
                    )
                counts[base + i] = n
    per_block = cs * 8 // bits
    start = -(-img.st.size() // cs)  # the new structure goes past the end of the file
    if counts:
        start = max(start, max(counts) + 1)
    blocks = 0
    while True:  # the structure must also count its own clusters
        table_clusters = max(1, -(-blocks * 8 // cs))
        end = start + table_clusters + blocks
        need = -(-end // per_block)
        if need <= blocks:
            break
        blocks = need
    table_off = start << cb
    blocks_start = start + table_clusters
    for c in range(start, blocks_start + blocks):
        counts[c] = 1
    table = array("Q", [0]) * (table_clusters * cs // 8)
    for t in range(blocks):
        blk = layout.new_refblock(per_block, bits)
        base = t * per_block
        for c in range(base, min(base + per_block, end)):
            count = counts.get(c)
            if count:
                blk[c - base] = count
        table[t] = (blocks_start + t) << cb
        img.st.pwrite(table[t], layout.encode_refblock(blk, bits))
    img.st.pwrite(table_off, layout.encode_u64_table(table))
    img.st.flush()  # the new structure is durable before the header names it
    # one write inside the first sector switches table, size and width together
    img.hdr.refcount_table_offset, img.hdr.refcount_table_clusters = table_off, table_clusters
    img.hdr.refcount_order = order
    img.st.pwrite(layout.OFF_REFTABLE, layout.encode_header(img.hdr)[layout.OFF_REFTABLE : 100])
    img.st.flush()

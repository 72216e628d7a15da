"""The qcow2 access layer: reads and writes guest data through the mapping.

:class:`Qcow2Image` owns one open image: its storage, validated metadata, the
active L1 table, the :class:`~.mapping.Mapper` (where does offset X live) and
the :class:`~.allocator.Refcounts`. Reads gather runs of clusters into large
positional reads; writes keep QEMU's ordering (data, then the L2 entry, then
the L1 entry; refcounts raised before a reference exists and lowered after it
is gone), so a process dying mid-write may leak clusters but never corrupts.

Each write request is published according to the cache mode the image was
opened with, named after QEMU's ``cache=`` modes: ``"writeback"`` (the
default) keeps changed metadata in the :class:`~.cache.MetadataCache`, written
in dependency order on ``flush()``, when its bounded dirty set is full, and
on ``close()`` (what ``flush()`` returned for survives any crash; the image
is never corrupt); ``"writethrough"`` writes it at once with the barriers of
:func:`~.requests.commit_through` and fdatasyncs before each write call
returns. Structural operations (snapshots, resize, check, ``make_empty``,
backing changes) first write the cache back, then run write-through. After
a failed write step (ENOSPC, EIO) a write-through image reloads its tables
from the file, so a retry sees exactly what is on disk; a write-back request
publishes what it did change (each entry changes only after the data it
points at was written), and a failed write-back keeps everything dirty.

Policies, where QEMU leaves a choice:

- Refcounts are always updated eagerly, also on images with the lazy
  refcounts bit; a dirty image (left by QEMU with lazy refcounts) has its
  refcounts rebuilt when it is opened for writing.
- An image marked corrupt opens, but refuses writes until
  ``check(repair=True)`` leaves it clean (which clears the flag).
- Persistent dirty bitmaps are kept up to date by :mod:`.bitmaps` (flagged
  in-use before the first change to guest data, stored and consistent again
  at ``flush()``/``close()``), as QEMU does. Other autoclear features are
  cleared, as the specification asks of programs that do not maintain them.
- External data files are read, not written.

The class keeps the state, the checks and the public API; the work is done
by sibling modules: :mod:`.reads` (reads, block status, ``info()``),
:mod:`.writes` (the request write paths), :mod:`.structure` (resize,
``make_empty``, the backing file name), :mod:`.backing` (the backing image
and an external data file), :mod:`.snapshots` and :mod:`.check`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import ParamSpec, TypeVar

from virtkit.errors import ConfigError, CorruptImageError, ImageError, VirtkitError
from virtkit.images.args import check_bool, check_bytes, check_choice, check_int, check_name
from virtkit.images.base import CheckResult, Extent, Image, ImageInfo, SnapshotInfo
from virtkit.images.qcow2 import backing, layout, metadata, reads, snapshots, structure, writes
from virtkit.images.qcow2 import bitmaps as bitmapsmod
from virtkit.images.qcow2 import check as checkmod
from virtkit.images.qcow2.allocator import Refcounts
from virtkit.images.qcow2.bitmap_methods import BitmapsMixin
from virtkit.images.qcow2.cache import CACHE_MODES, MetadataCache
from virtkit.images.qcow2.compress import compress
from virtkit.images.qcow2.mapping import Mapper
from virtkit.images.qcow2.requests import Request
from virtkit.images.sizes import parse_size
from virtkit.images.storage import Storage

__all__ = ["Qcow2Image"]

P = ParamSpec("P")
R = TypeVar("R")

# The request record under its former name (create.py's preallocation uses it).
_Request = Request


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Second safety net: low-level exceptions become CorruptImageError."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except VirtkitError:
            raise
        except MemoryError as exc:  # a huge request, or a table the header makes huge
            raise ImageError(
                f"{fn.__name__}: not enough memory for this request; work on smaller ranges",
                path=getattr(args[0], "path", None),
            ) from exc
        except (struct.error, IndexError, OverflowError, ValueError) as exc:
            img = args[0]
            path = getattr(img, "path", None)
            raise CorruptImageError(
                f"malformed image metadata ({type(exc).__name__}: {exc})", path=path
            ) from exc

    return wrapper


class Qcow2Image(BitmapsMixin, Image):
    """An open qcow2 image (v2 or v3). Create with :func:`virtkit.images.open`."""

    format = "qcow2"

    def __init__(
        self,
        storage: Storage,
        meta: metadata.Metadata,
        *,
        writable: bool,
        allow_backing: Iterable[str | os.PathLike[str]] = (),
        force_share: bool = False,
        cache: str = "writeback",
    ) -> None:
        check_choice(cache, CACHE_MODES, "cache")
        self.cache_mode = cache
        self.st = storage
        self.path = storage.path
        self.meta = meta
        self.hdr = meta.header
        self._writable = writable
        self._closed = False
        self._allow = tuple(allow_backing)
        self._force_share = force_share
        self.cb = self.hdr.cluster_bits
        self.cs = 1 << self.cb
        self.v3 = self.hdr.version >= 3
        self.extended = meta.extended_l2
        self._corrupt = bool(self.hdr.incompatible_features & layout.INCOMPAT_CORRUPT)
        self._autoclear_done = False
        self._cfree = 0
        self._cfree_epoch = 0
        self._meta_set: set[int] | None = None
        self._table_set: set[int] | None = None
        self._refblock_set: set[int] | None = None
        self._cluster_cache: tuple[int, bytes] | None = None
        #: Data written that a coming L2 update depends on (see _barrier).
        self._deps = False
        #: A write-back request is running: publish into the cache (see _run_write).
        self._defer = False
        #: Requests begun and not yet published (nested: zeroing writes partial clusters).
        self._open: list[Request] = []
        self.backing: Image | None = None
        self.data_st: Storage = storage
        self._data_st_own: Storage | None = None
        self._mapper = Mapper(
            storage,
            cluster_bits=self.cb,
            extended_l2=self.extended,
            zero_flag=self.v3,
            file_size=storage.size,
        )
        self.l2_entries = self._mapper.l2_entries
        self.l2_bits = self._mapper.l2_bits
        self._load_l1()
        self.refs = Refcounts(
            storage,
            cluster_bits=self.cb,
            refcount_order=self.hdr.refcount_order,
            table_offset=self.hdr.refcount_table_offset,
            table_clusters=self.hdr.refcount_table_clusters,
            set_table=self._set_reftable,
        )
        self.refs.on_metadata_change = self._meta_changed
        self.refs.reserved = self.table_clusters
        self._wb = MetadataCache(self)
        self.snaps, self.snap_table_bytes = metadata.read_snapshot_table(storage, self.hdr)
        try:
            backing.open_children(self)
            if writable and self.hdr.incompatible_features & layout.INCOMPAT_DIRTY:
                structure.repair_dirty(self)
        except BaseException:
            self._close_children()
            raise

    # ---- opening ----
    def _load_l1(self) -> None:
        n = self.hdr.l1_size
        raw = self.st.pread(self.hdr.l1_table_offset, n * 8) if n else b""
        if len(raw) != n * 8:
            raise CorruptImageError(
                "L1 table is truncated", path=self.path, offset=self.hdr.l1_table_offset
            )
        self._l1 = layout.decode_u64_table(raw)
        self._mapper.l1 = self._l1
        self._mapper.l1_offset = self.hdr.l1_table_offset

    def reopen_backing(self, *, writable: bool) -> Image:
        """Reopen the backing file read-write (or back read-only) and return it.

        This is how :func:`virtkit.images.commit` writes into the base while
        the overlay stays open, as QEMU's commit reopens the backing node
        read-write: the read-only open (whose lock refuses writers) is closed
        and the file opened writable, taking the write lock. Reads of the
        overlay go on falling through to the returned image. Call it again
        with ``writable=False`` when done.

        Raises:
            ImageError: the image has no backing file, is closed, or is not
                open writable (a writable base under a read-only overlay is
                refused).
            ImageLockedError: another process holds the backing file (for
                example a QEMU running another overlay on it); the backing file
                is then open read-only again, as before the call.
        """
        return backing.reopen(self, writable=writable)

    def _close_children(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self._data_st_own is not None:
            self._data_st_own.close()
            self._data_st_own = None
        self.st.close()

    # ---- properties ----
    @property
    def l1(self) -> array[int]:
        """The active L1 table as on disk (the write-back cache written first)."""
        self._clean()
        return self._l1

    @property
    def mapper(self) -> Mapper:
        """The active disk's :class:`~.mapping.Mapper` (the write-back cache written first)."""
        self._clean()
        return self._mapper

    @property
    def metadata_cache(self) -> MetadataCache:
        """The write-back :class:`~.cache.MetadataCache` (what is dirty, write-back count)."""
        return self._wb

    def _clean(self) -> None:
        """Write the cache back (without fdatasync) so the file holds all metadata."""
        if self._wb.dirty and not self._defer and not self._closed and self._writable:
            self._wb.writeback(sync=False)
            # the frees it applied sit in dirty refcount blocks: write them too, or a
            # failing structural step (which reloads from the file) would drop them
            self.refs.write_dirty()

    @property
    def virtual_size(self) -> int:
        """Size of the virtual disk in bytes."""
        return self.hdr.size

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return self.cs

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the image."""
        return self.meta.backing_file

    @property
    def backing_format(self) -> str | None:
        """The recorded backing format (header extension), if any."""
        return self.meta.backing_format

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._writable

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has been called."""
        return self._closed

    @property
    def compression_type(self) -> str:
        """``"zlib"`` or ``"zstd"``: the codec of compressed clusters."""
        return layout.COMPRESSION_NAMES[self.hdr.compression_type]

    @property
    def corrupt(self) -> bool:
        """Whether the image is marked corrupt (writes refused until repaired)."""
        return self._corrupt

    # ---- small helpers ----
    def _live(self) -> None:
        if self._closed:
            raise ImageError("image is closed", path=self.path)

    def _check_range(self, offset: int, length: int, action: str) -> None:
        self._live()
        check_int(offset, "offset")
        check_int(length, "length")
        if offset < 0 or length < 0 or offset + length > self.hdr.size:
            raise ImageError(
                f"cannot {action} {length} bytes at offset {offset}: outside the virtual disk "
                f"(0..{self.hdr.size})",
                path=self.path,
            )

    def _require_writable(self, action: str) -> None:
        self._live()
        if not self._writable:
            raise ImageError(f"cannot {action}: image is open read-only", path=self.path)

    def _write_u64(self, off: int, value: int) -> None:
        self.st.pwrite(off, struct.pack(">Q", value))

    def _set_reftable(self, offset: int, clusters: int) -> None:
        self.st.pwrite(layout.OFF_REFTABLE, struct.pack(">QI", offset, clusters))
        self.st.flush()
        self.hdr.refcount_table_offset = offset
        self.hdr.refcount_table_clusters = clusters
        self._meta_changed()

    def _meta_changed(self) -> None:
        self._meta_set = None
        self._table_set = None
        self._refblock_set = None

    def table_clusters(self) -> set[int]:
        """Clusters of the fixed structures: header, L1/refcount/snapshot tables, L1 copies."""
        if self._table_set is None:
            cb = self.cb
            out = {0}
            first = self.hdr.refcount_table_offset >> cb
            out.update(range(first, first + self.hdr.refcount_table_clusters))
            first = self.hdr.l1_table_offset >> cb
            out.update(range(first, first + -(-len(self._l1) * 8 // self.cs)))
            if self.hdr.nb_snapshots:
                first = self.hdr.snapshots_offset >> cb
                out.update(range(first, first + -(-self.snap_table_bytes // self.cs)))
            for sn in self.snaps:
                first = sn.l1_table_offset >> cb
                out.update(range(first, first + -(-sn.l1_size * 8 // self.cs)))
            self._table_set = out
        return self._table_set

    def _refblocks(self) -> set[int]:
        if self._refblock_set is None:
            self._refblock_set = self.refs.metadata_clusters()
        return self._refblock_set

    def metadata_clusters(self) -> set[int]:
        """Host clusters holding metadata (header, tables, refcount blocks, L2 tables)."""
        if self._meta_set is None:
            cb = self.cb
            out = set(self.table_clusters())
            out |= self._refblocks()
            for e in self._l1:
                off = e & layout.L1E_OFFSET_MASK
                if off:
                    out.add(off >> cb)
            self._meta_set = out
        return self._meta_set

    def _check_in_file(self, host: int) -> None:
        """A COPIED data cluster must already exist in the file before writing in place."""
        if host >= self.st.size():
            self._mark_corrupt(
                f"L2 entry points at host offset {host:#x}, past the end of the file", host
            )

    def _check_overlap(self, host: int, count: int) -> None:
        meta = self.metadata_clusters()
        first = host >> self.cb
        for c in range(first, first + count):
            if c in meta:
                self._mark_corrupt(
                    f"writing guest data to host cluster {c} would overwrite image metadata",
                    host,
                )

    def _mark_corrupt(self, message: str, offset: int | None = None) -> None:
        """Set the corrupt flag (v3: on disk too) and raise CorruptImageError."""
        self._corrupt = True
        if self._writable and self.v3 and not self._closed:
            self.hdr.incompatible_features |= layout.INCOMPAT_CORRUPT
            try:
                self._write_u64(layout.OFF_INCOMPAT, self.hdr.incompatible_features)
                self.st.flush()
            except ImageError:
                pass
        raise CorruptImageError(
            message + "; the image is now marked corrupt, run check(repair=True)",
            path=self.path,
            offset=offset,
        )

    def _prepare_write(self) -> None:
        if self._corrupt:
            raise CorruptImageError(
                "the image is marked corrupt; writes are refused until check(repair=True) fixes it",
                path=self.path,
            )
        if not self._autoclear_done:
            self._autoclear_done = True
            structure.drop_autoclear(self)
        bitmapsmod.before_write(self)  # bitmaps: in-use on disk before guest data changes

    def _run_write(self, fn: Callable[[], None], *, request: bool = False) -> None:
        """Run a write step; corruption found on the way sets the corrupt flag.

        ``request``: a guest write request (write, zeroes, discard, compressed),
        published into the write-back cache in ``"writeback"`` mode and made
        durable before returning in ``"writethrough"`` mode. Anything else is a
        structural operation: the cache is written back first, then it runs
        write-through.
        """
        defer = request and self.cache_mode == "writeback"
        if not defer:
            self._clean()
        self._defer = self.refs.defer = defer
        try:
            fn()
        except ImageError as exc:
            self._write_failed(exc, defer=defer)
            raise
        finally:
            self._defer = self.refs.defer = False
            self._open.clear()
        if defer:
            if self._wb.over_limit():
                self._wb.writeback(sync=False)  # bounded memory
        elif request:
            self._flush()  # writethrough: the write is durable when the call returns

    def _write_failed(self, exc: ImageError, *, defer: bool) -> None:
        """A write step raised ``exc``: flag corruption, or make memory agree with the file."""
        if isinstance(exc, CorruptImageError):
            if not self._corrupt:
                with contextlib.suppress(CorruptImageError):
                    self._mark_corrupt(str(exc.message), exc.offset)
        elif defer:
            # Write-back requests change the cached tables in place, and an entry
            # changes only after the data it points at was written: publish what
            # the failed request did change, so memory and the coming write-back agree.
            for req in self._open:
                self._wb.publish(req)
            self._cluster_cache = None
            self._cfree = 0
        else:
            # a write or flush failed (ENOSPC, EIO): trust only what the file holds
            self._resync()

    # ---- reading ----
    @guarded
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes starting at ``offset``."""
        self._check_range(offset, length, "read")
        return reads.read(self, offset, length)

    def read_into(self, out: bytearray, offset: int, mapper: Mapper | None = None) -> None:
        """Fill ``out`` with guest bytes from ``offset`` (no range check; internal).

        ``mapper`` reads through another L1 table (a snapshot's) instead.
        """
        reads.read_into(self, out, offset, mapper)

    # ---- L1/L2 for writing ------------------------------------------------------------------
    def grow_l1(self, needed: int) -> None:
        """Make the active L1 table hold at least ``needed`` entries."""
        writes.grow_l1(self, needed)

    def _set_l1_entry(self, index: int, value: int) -> None:
        """Write one active L1 entry; memory changes only once the write succeeded."""
        self.st.pwrite(self.hdr.l1_table_offset + index * 8, struct.pack(">Q", value))
        self._l1[index] = value

    # ---- ordering: barriers and requests ----
    def _flush(self) -> None:
        """fdatasync, and forget the pending ordering dependencies."""
        self.st.flush()
        self._deps = False
        self.refs.raised = False

    def _barrier(self) -> None:
        """Make raised refcounts and dependent data durable before a reference to them.

        QEMU's ``qcow2_cache_depends_on_flush``: a new L2/L1 entry may reach the
        disk only after the refcounts and the data (or COW copy) it points at.
        No-op when the request raised no refcount and wrote no dependent data.
        """
        if self._deps or self.refs.raised:
            self._flush()

    def _resync(self) -> None:
        """After a failed write step: make memory equal the file (L1, L2 and refcount caches).

        The file holds whatever writes succeeded; reloading from it means a retry
        never trusts an update that did not reach the disk.
        """
        self._cluster_cache = None
        self._cfree = 0
        self._deps = True  # unknown writes may be in flight: order the next reference
        self._mapper.drop_cache()
        with contextlib.suppress(VirtkitError):
            self.refs.reload()
        with contextlib.suppress(VirtkitError):
            self._load_l1()
        self._meta_changed()

    def _req_l2(self, req: Request, l1i: int) -> tuple[int, array[int]]:
        """``req``'s working copy of the L2 table for L1 index ``l1i`` (:func:`.writes.req_l2`)."""
        return writes.req_l2(self, req, l1i)

    def _commit(self, req: Request) -> None:
        """Publish ``req`` (see :func:`.writes.commit`)."""
        writes.commit(self, req)

    # ---- writing ----
    @guarded
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at guest ``offset`` (any size and alignment)."""
        self._require_writable("write")
        mv = check_bytes(data)
        self._check_range(offset, len(mv), "write")
        if len(mv):
            bitmapsmod.mark(self, offset, len(mv))  # persistent dirty bitmaps
            if not writes.write_small(self, offset, mv):
                self._run_write(lambda: writes.write_guest(self, offset, mv), request=True)

    def write_guest(self, offset: int, mv: memoryview) -> None:
        """Write without the range check (internal; VM state lives past the disk end)."""
        writes.write_guest(self, offset, mv)

    @guarded
    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write one whole cluster compressed (zlib or zstd, per the image).

        ``offset`` must be cluster aligned and ``data`` one cluster long (or
        reach exactly the end of the disk for the last, partial cluster). Data
        that does not shrink is written uncompressed, as QEMU does.

        Like every write, in write-back mode the mapping reaches the file at
        the next ``flush()`` (or ``close()``), so a run of compressed writes
        needs no barrier per cluster.

        Raises:
            ImageError: misaligned, wrong length, or an external data file.
        """
        self._require_writable("write compressed data")
        mv = check_bytes(data)
        writes.check_compressed_range(self, offset, len(mv))
        self._run_write(lambda: writes.write_compressed(self, offset, bytes(mv)), request=True)

    def compress_cluster(self, data: bytes) -> bytes:
        """Compress one cluster's data (padded to a cluster) as ``write_compressed`` would.

        Pure computation, safe to call from several threads at once: parallel
        convert compresses on every core, then stores the results in order
        with :meth:`write_precompressed`.
        """
        return compress(self.hdr.compression_type, data + bytes(self.cs - len(data)))

    @guarded
    def write_precompressed(self, offset: int, data: bytes, compressed: bytes) -> None:
        """Store one cluster that the caller already compressed (parallel convert).

        ``compressed`` must be what :func:`~.compress.compress` returns for
        ``data`` padded to a cluster, with this image's compression type; the
        result is byte for byte what ``write_compressed(offset, data)`` stores.

        Raises:
            ImageError: misaligned, wrong length, or a read-only image.
        """
        self._require_writable("write compressed data")
        mv = check_bytes(data)
        comp = bytes(check_bytes(compressed, "compressed"))
        writes.check_compressed_range(self, offset, len(mv))
        self._run_write(
            lambda: writes.write_compressed(self, offset, bytes(mv), comp), request=True
        )

    # ---- zeroes and discard ----
    @guarded
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeroes (zero flags for whole clusters on v3)."""
        self._require_writable("write zeroes")
        self._check_range(offset, length, "write zeroes")
        if length:
            bitmapsmod.mark(self, offset, length)  # persistent dirty bitmaps
            self._run_write(
                lambda: writes.zero_range(self, offset, length, discard=False), request=True
            )

    @guarded
    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters in the range; partial clusters are left as they are.

        On v3 images discarded clusters read as zeroes; on v2 images with a
        backing file they read the backing file's data again (as QEMU does).
        """
        self._require_writable("discard")
        self._check_range(offset, length, "discard")
        if length:
            bitmapsmod.mark(self, offset, length)  # persistent dirty bitmaps
            self._run_write(
                lambda: writes.zero_range(self, offset, length, discard=True), request=True
            )

    def _zero_range(self, offset: int, length: int, *, discard: bool, full: bool = False) -> None:
        writes.zero_range(self, offset, length, discard=discard, full=full)

    # ---- emptying ----
    @guarded
    def make_empty(self) -> None:
        """Drop every cluster mapping of the active disk, as QEMU's ``bdrv_make_empty``.

        Afterwards nothing is allocated in this image: every range reads
        through to the backing file (zeroes without one). It is the last step
        of ``qemu-img commit`` (without ``-d``). Internal snapshots keep their
        clusters; every cluster only the active disk used is freed and its
        space given back where the file system can (hole punched); without
        snapshots or bitmaps the file is also cut after its last cluster in use.

        Crash-safe like every write here: a batch of L1 entries is cleared and
        flushed before the L2 tables and data clusters they reached lose their
        references, so dying half-way leaks clusters (``check(repair=True)``
        reclaims them) but never leaves a reference to a freed cluster.

        Raises:
            ImageError: the image is open read-only.
            CorruptImageError: an L2 entry points at a cluster whose refcount
                is already zero (the image is marked corrupt; nothing changed).
        """
        self._require_writable("empty the image")
        self._run_write(lambda: structure.make_empty(self))

    # ---- block status ----
    @guarded
    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Yield allocation extents for ``[offset, offset+length)`` (whole runs at a time)."""
        if length is None:
            length = max(0, self.hdr.size - check_int(offset, "offset"))
        self._check_range(offset, length, "query")
        return reads.merge(reads.status(self, offset, length, include_backing))

    # ---- flush / resize ----
    @guarded
    def flush(self) -> None:
        """Write the metadata cache back and fdatasync: everything written so far is durable."""
        self._live()
        if self._writable:
            self._wb.writeback(sync=True)
            self._deps = False
            self.refs.raised = False
            bitmapsmod.store(self)  # persistent dirty bitmaps consistent again

    @guarded
    def resize(self, size: int | str, *, shrink: bool = False) -> None:
        """Change the virtual size.

        Growing zeroes the new range where a longer backing file would
        otherwise show through. Shrinking refuses to drop allocated data
        unless ``shrink=True``; images with snapshots cannot shrink.

        Raises:
            ImageError: shrinking would drop data, or snapshots forbid it.
            ConfigError: the size is not a multiple of 512.
        """
        check_bool(shrink, "shrink")
        self._require_writable("resize")
        new = parse_size(size, field="size")
        if new % 512:
            raise ConfigError(f"'size' must be a multiple of 512 (got {new})", field="size")
        old = self.hdr.size
        if new == old:
            return
        if self.snaps and not self.v3:
            raise ImageError("cannot resize a v2 image that has snapshots", path=self.path)
        bitmapsmod.check_resize(self)  # QEMU refuses with an inconsistent bitmap
        self._run_write(lambda: structure.resize(self, old, new, shrink))
        bitmapsmod.resized(self)  # bitmaps follow the new size

    def _set_size(self, size: int) -> None:
        structure.set_size(self, size)

    # ---- info / check ----
    @guarded
    def info(self) -> ImageInfo:
        """What ``qemu-img info --output=json`` reports for this image.

        ``format_specific`` holds qemu-img's qcow2 fields, in its order; with
        persistent dirty bitmaps it has ``bitmaps``, a list of ``{"flags",
        "name", "granularity"}`` (flags ``"in-use"``, ``"auto"``), omitted when
        there are none (or the bitmaps extension is stale).

        Raises:
            CorruptImageError: the bitmap directory is damaged.
        """
        self._live()
        return reads.info(self)

    @guarded
    def check(self, repair: bool = False) -> CheckResult:
        """Check refcounts and flags as ``qemu-img check`` does (``repair`` fixes them)."""
        self._live()
        check_bool(repair, "repair")
        if repair and not self._writable:
            raise ImageError("check(repair=True) needs the image open writable", path=self.path)
        if self._writable:
            # check reads the file's own structures: write back cached metadata first
            # (a new L2 table may exist only in the cache, past the file's end)
            self.flush()
        return checkmod.check(self, repair=repair)

    # ---- snapshots ----
    @property
    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """Internal snapshots, in table order (oldest first)."""
        self._live()
        return tuple(snapshots.snapinfo(s) for s in self.snaps)

    @guarded
    def create_snapshot(self, name: str, *, vm_state: bytes | None = None) -> SnapshotInfo:
        """Take an internal snapshot (optionally with a VM state blob)."""
        self._require_writable("create a snapshot")
        check_name(name)
        if vm_state is not None:
            vm_state = bytes(check_bytes(vm_state, "vm_state"))

        out: list[SnapshotInfo] = []
        self._run_write(lambda: out.append(snapshots.create(self, name, vm_state)))
        return out[0]

    @guarded
    def revert_snapshot(self, name: str) -> None:
        """Make the disk (and its size) what it was when snapshot ``name`` was taken."""
        self._require_writable("revert to a snapshot")

        bitmapsmod.check_revert(self)  # QEMU refuses with persistent dirty bitmaps
        self._run_write(lambda: snapshots.revert(self, name))

    @guarded
    def delete_snapshot(self, name: str) -> None:
        """Delete snapshot ``name`` (name or id), freeing what only it used."""
        self._require_writable("delete a snapshot")

        self._run_write(lambda: snapshots.delete(self, name))

    @guarded
    def snapshot_vm_state(self, name: str) -> bytes:
        """The VM state blob saved with snapshot ``name`` (empty if none)."""
        self._live()

        return snapshots.read_vm_state(self, name)

    @guarded
    def read_snapshot(self, name: str, offset: int, length: int) -> bytes:
        """Read guest bytes as they were in snapshot ``name`` (read-only view)."""
        self._live()
        check_name(name)
        check_int(offset, "offset")
        check_int(length, "length")
        return snapshots.read(self, name, offset, length)

    # ---- header rewrite ----
    @guarded
    def set_backing_file(self, name: str | None, backing_format: str | None = None) -> None:
        """Record a new backing file name and format (the data is not touched: rebase -u).

        Unknown header extensions are kept. The new backing file is not opened
        until the image is reopened.

        Raises:
            ImageError: the name does not fit in the first cluster.
        """
        self._require_writable("change the backing file")
        if name is not None:
            check_name(name, "backing")
        if backing_format is not None:
            check_name(backing_format, "backing_format")
        structure.set_backing_file(self, name, backing_format)

    # ---- close ----
    def close(self) -> None:
        """Flush and release the files (and the backing chain). Idempotent."""
        if self._closed:
            return
        try:
            if self._writable:
                self._wb.writeback(sync=True)
                bitmapsmod.store(self)  # persistent dirty bitmaps consistent again
        finally:
            self._closed = True
            self._close_children()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("rw" if self._writable else "ro")
        return f"<Qcow2Image {self.path!r} {self.hdr.size} bytes v{self.hdr.version} {state}>"

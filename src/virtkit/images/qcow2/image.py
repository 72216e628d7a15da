"""The qcow2 access layer: reads and writes guest data through the mapping.

:class:`Qcow2Image` owns one open image: its storage, validated metadata, the
active L1 table, the :class:`~.mapping.Mapper` (where does offset X live) and
the :class:`~.allocator.Refcounts`. Reads gather runs of clusters into large
positional reads; writes keep QEMU's ordering (data, then the L2 entry, then
the L1 entry; refcounts raised before a reference exists and lowered after it
is gone), so a process dying mid-write may leak clusters but never corrupts.

Each write request works on copies of the L2 tables it changes
(:class:`~.requests.Request`). How it is published depends on the cache mode
the image was opened with, named after QEMU's ``cache=`` modes:

- ``"writeback"`` (the default): in memory, by the
  :class:`~.cache.MetadataCache`, which writes the metadata on ``flush()``,
  when its bounded dirty set is full, and on ``close()``, in dependency order.
  A run of allocating writes costs no fdatasync per request. What ``flush()``
  returned for survives any crash; unflushed writes may be lost; the image is
  never corrupt (at worst clusters leak).
- ``"writethrough"``: written at once with the barriers of
  :func:`~.requests.commit_through`, and the file is fdatasynced before each
  write call returns, so every completed write is durable.

Structural operations (snapshots, resize, check, ``make_empty``, backing
changes) first write the cache back, then run write-through.

On the write-through path memory never runs ahead of the file: any
:class:`~virtkit.ImageError` from a write step (ENOSPC, EIO) reloads the L1
table and drops the L2 and refcount caches, so a retry after the space comes
back sees exactly what is on disk. In write-back mode a request changes the
cached tables in place, each entry only after the data it points at was
written, so a failed request publishes what it did change (its range then
reads old or new data); a failed write-back keeps everything dirty for the
next attempt.

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
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import attrs

from virtkit import images
from virtkit.errors import (
    ConfigError,
    CorruptImageError,
    ImageError,
    UnsupportedFeatureError,
    VirtkitError,
)
from virtkit.images.args import check_bool, check_bytes, check_int, check_name
from virtkit.images.base import CheckResult, Extent, Image, ImageInfo, SnapshotInfo
from virtkit.images.qcow2 import bitmaps as bitmapsmod
from virtkit.images.qcow2 import chain, layout, metadata, snapshots
from virtkit.images.qcow2 import check as checkmod
from virtkit.images.qcow2.allocator import Refcounts
from virtkit.images.qcow2.bitmap_methods import BitmapsMixin
from virtkit.images.qcow2.cache import CACHE_MODES, MetadataCache
from virtkit.images.qcow2.compress import compress, decompress
from virtkit.images.qcow2.mapping import COMPRESSED, DATA, UNALLOCATED, ZERO, Mapper, Run
from virtkit.images.qcow2.requests import Request, coalesce, commit_through
from virtkit.images.sizes import parse_size
from virtkit.images.storage import FileStorage, Storage

__all__ = ["Qcow2Image"]

P = ParamSpec("P")
R = TypeVar("R")

#: Largest buffer a single internal zero-fill or copy step uses.
CHUNK = 4 * 1024 * 1024

# The request record under its former name (create.py's preallocation uses it).
_Request = Request
_coalesce = coalesce


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
        if cache not in CACHE_MODES:
            raise ConfigError(
                f"'cache' must be one of {', '.join(CACHE_MODES)} (got {cache!r})",
                field="cache",
                value=cache,
            )
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
            self._open_files()
            if writable and self.hdr.incompatible_features & layout.INCOMPAT_DIRTY:
                self._repair_dirty()
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

    def _open_files(self) -> None:
        meta = self.meta
        if meta.data_file is not None:
            if self._writable:
                raise UnsupportedFeatureError(
                    "writing images with an external data file is not supported; open read-only",
                    feature="external data file (write)",
                    path=self.path,
                )
            real = chain.resolve(self.path, meta.data_file, self._allow, what="data file")
            # QEMU's data-file child of a read-only node: consistent read, write unshared
            self._data_st_own = FileStorage(real, writable=False, force_share=self._force_share)
            self.data_st = self._data_st_own
            self._mapper.external = True
        if meta.backing_file is not None:
            self.backing = self._open_backing(writable=False)

    def _open_backing(self, *, writable: bool) -> Image:
        """Open the recorded backing file with the locks QEMU takes for a backing child.

        QEMU (``bdrv_default_perms_for_cow`` in ``block.c``) asks a backing
        file for consistent read only and shares neither write nor resize, so
        read-only, without ``force_share``: nobody may write the base under an
        overlay, while any number of overlays (ours or a running QEMU's) read
        it. ``force_share`` on the overlay (``qemu-img -U``) is inherited, as
        QEMU's ``force-share`` option is.
        """
        meta = self.meta
        if meta.backing_file is None:
            raise ImageError("the image has no backing file", path=self.path)
        real = chain.resolve(self.path, meta.backing_file, self._allow, what="backing file")
        fmt = chain.backing_format(meta.backing_format, real, self.path)
        chain.STACK.push(self.path)
        try:
            opened: Image = images.open(
                real,
                writable=writable,
                format=fmt,  # type: ignore[arg-type]
                allow_backing=self._allow,
                force_share=self._force_share and not writable,
            )
        finally:
            chain.STACK.pop()
        return opened

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
        self._live()
        if writable:
            self._require_writable("reopen the backing file read-write")
        if self.backing is None:
            raise ImageError("the image has no backing file to reopen", path=self.path)
        if self.backing.writable == writable:
            return self.backing
        old, self.backing = self.backing, None
        old.close()
        try:
            self.backing = self._open_backing(writable=writable)
        except BaseException:
            restored = False
            with contextlib.suppress(VirtkitError):
                self.backing = self._open_backing(writable=False)
                restored = True
            if not restored:
                # Reads would show zeroes where the base has data: give up the image.
                self.close()
            raise
        return self.backing

    def _repair_dirty(self) -> None:

        checkmod.check(self, repair=True)
        self.hdr.incompatible_features &= ~layout.INCOMPAT_DIRTY
        self._write_u64(layout.OFF_INCOMPAT, self.hdr.incompatible_features)
        self.st.flush()

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
            if self.v3 and self.hdr.autoclear_features:
                keep = 0
                if self.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS and (
                    self._mark_bitmaps_in_use()
                ):
                    keep = layout.AUTOCLEAR_BITMAPS
                if self.hdr.autoclear_features != keep:
                    # features we do not keep in sync lose their claim, as the spec asks
                    self.hdr.autoclear_features = keep
                    self._write_u64(layout.OFF_AUTOCLEAR, keep)
                    self.st.flush()
        bitmapsmod.before_write(self)  # bitmaps: in-use on disk before guest data changes

    def _mark_bitmaps_in_use(self) -> bool:
        """Flag every persistent bitmap in-use (stale), as QEMU does while writing.

        Returns False when the bitmap directory cannot be parsed (the caller
        then clears the bitmaps autoclear bit instead).
        """
        return bitmapsmod.begin_write(self)

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
        except CorruptImageError as exc:
            if not self._corrupt:
                with contextlib.suppress(CorruptImageError):
                    self._mark_corrupt(str(exc.message), exc.offset)
            raise
        except ImageError:
            if defer:
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
            raise
        finally:
            self._defer = self.refs.defer = False
            self._open.clear()
        if defer:
            if self._wb.over_limit():
                self._wb.writeback(sync=False)  # bounded memory
        elif request:
            self._flush()  # writethrough: the write is durable when the call returns

    # ---- reading ----
    @guarded
    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes starting at ``offset``."""
        self._check_range(offset, length, "read")
        runs = self._mapper.runs(offset, length)
        first = next(runs, None)
        if first is not None and first.kind == DATA and first.length == length:
            self._check_data_host(first.host, length)  # one contiguous run: no extra copy
            chunk = self.data_st.pread(first.host, length)
            return chunk if len(chunk) == length else chunk + bytes(length - len(chunk))
        out = bytearray(length)
        if first is not None:
            self._fill(out, offset, itertools.chain((first,), runs))
        return bytes(out)

    def read_into(self, out: bytearray, offset: int, mapper: Mapper | None = None) -> None:
        """Fill ``out`` with guest bytes from ``offset`` (no range check; internal).

        ``mapper`` reads through another L1 table (a snapshot's) instead.
        """
        if out:
            self._fill(out, offset, (mapper or self._mapper).runs(offset, len(out)))

    def _fill(self, out: bytearray, offset: int, runs: Iterable[Run]) -> None:
        cs = self.cs
        for run in runs:
            pos = run.guest - offset
            if run.kind == DATA:
                self._check_data_host(run.host, run.length)
                chunk = self.data_st.pread(run.host, run.length)
                out[pos : pos + len(chunk)] = chunk
            elif run.kind == COMPRESSED:
                data = self._cluster_data(run.host)
                in_off = run.guest & (cs - 1)
                out[pos : pos + run.length] = data[in_off : in_off + run.length]
            elif run.kind == UNALLOCATED and self.backing is not None:
                bsize = self.backing.virtual_size
                if run.guest < bsize:
                    n = min(run.length, bsize - run.guest)
                    out[pos : pos + n] = self.backing.read(run.guest, n)

    def _check_data_host(self, host: int, length: int) -> None:
        """Refuse data clusters past the end of the file or inside metadata."""
        first = host >> self.cb
        last = (host + length - 1) >> self.cb
        if (first << self.cb) >= self.data_st.size():
            raise CorruptImageError(
                f"guest data mapped to host offset {host:#x}, past the end of the file",
                path=self.data_st.path,
                offset=host,
            )
        if self.data_st is self.st and not self.metadata_clusters().isdisjoint(
            range(first, last + 1)
        ):
            raise CorruptImageError(
                f"guest data mapped to host offset {host:#x}, inside image metadata",
                path=self.path,
                offset=host,
            )

    def _cluster_data(self, entry: int) -> bytes:
        cached = self._cluster_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        host, nbytes = self._mapper.compressed_range(entry)
        if host < self.cs or host + nbytes > -(-self.st.size() // 512) * 512:
            raise CorruptImageError(
                f"compressed cluster at {host:#x} ({nbytes} bytes) runs outside the file",
                path=self.path,
                offset=host,
            )
        raw = self.st.pread(host, nbytes)
        data = decompress(self.hdr.compression_type, raw, self.cs, path=self.path, offset=host)
        self._cluster_cache = (entry, data)
        return data

    def _current(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(buf, offset)
        return buf

    # ---- L1/L2 for writing ------------------------------------------------------------------
    def grow_l1(self, needed: int) -> None:
        """Make the active L1 table hold at least ``needed`` entries."""
        old_n = len(self._l1)
        if needed <= old_n:
            return
        cap = layout.MAX_L1_BYTES // 8
        if needed > cap:
            raise ImageError(
                f"the L1 table would need {needed} entries, over QEMU's limit of {cap}; use a "
                "larger cluster size",
                path=self.path,
            )
        if self._wb.dirty:  # the new table copies the L1 the file has: make it complete
            self._wb.writeback(sync=False)
        new_n = min(cap, max(needed, old_n + old_n // 2))
        clusters = -(-new_n * 8 // self.cs)
        new_off = self.refs.allocate(clusters)
        table = array("Q", self._l1)
        table.extend([0] * (new_n - old_n))
        self.st.pwrite(
            new_off, layout.encode_u64_table(table) + bytes(clusters * self.cs - new_n * 8)
        )
        self.refs.write_dirty()  # its refcounts before the header names it
        self.st.flush()
        old_off = self.hdr.l1_table_offset
        self.st.pwrite(layout.OFF_L1, struct.pack(">IQ", new_n, new_off))
        self.st.flush()
        self.hdr.l1_size, self.hdr.l1_table_offset = new_n, new_off
        self._l1 = table
        self._mapper.l1 = table
        self._mapper.l1_offset = new_off
        if old_n:
            self.refs.free(old_off, -(-old_n * 8 // self.cs))
        self._meta_changed()

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
        """``req``'s working copy of the L2 table for L1 index ``l1i`` (ours alone).

        An L2 table shared with a snapshot (or missing) gets a new cluster here;
        the L1 entry pointing at it is written by :meth:`_commit`, after the barrier.
        """
        got = req.tables.get(l1i)
        if got is not None:
            return got
        if l1i >= len(self._l1):
            self.grow_l1(l1i + 1)
        where = self.hdr.l1_table_offset + l1i * 8
        entry = self._l1[l1i]
        off = entry & layout.L1E_OFFSET_MASK
        if off and entry & layout.OFLAG_COPIED:
            if off >> self.cb in self.table_clusters() or off >> self.cb in self._refblocks():
                self._mark_corrupt(
                    f"L2 table at {off:#x} (L1 index {l1i}) overlaps other image metadata", where
                )
            table = self._mapper.load_l2(off, where=where)
            if not self._defer:  # write-through: memory changes only after the writes
                table = array("Q", table)
            req.tables[l1i] = (off, table)
            return off, table
        if off:
            table = array("Q", self._mapper.load_l2(off, where=where))
        else:
            table = array("Q", bytes(self.cs))
        new = self.refs.allocate(1)
        self._check_overlap(new, 1)
        req.tables[l1i] = (new, table)
        req.new[l1i] = off
        return new, table

    def _new_request(self) -> Request:
        req = Request()
        self._open.append(req)
        return req

    def _commit(self, req: Request) -> None:
        """Publish ``req``: into the write-back cache, or written through now."""
        if self._open and self._open[-1] is req:
            self._open.pop()
        if self._defer:
            self._wb.publish(req)
        else:
            commit_through(self, req)

    # ---- writing ----
    @guarded
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at guest ``offset`` (any size and alignment)."""
        self._require_writable("write")
        mv = check_bytes(data)
        self._check_range(offset, len(mv), "write")
        if len(mv):
            bitmapsmod.mark(self, offset, len(mv))  # persistent dirty bitmaps
            self._run_write(lambda: self.write_guest(offset, mv), request=True)

    def write_guest(self, offset: int, mv: memoryview) -> None:
        """Write without the range check (internal; VM state lives past the disk end).

        One request: every cluster is allocated and its data written first,
        then :meth:`_commit` publishes all the L2/L1 updates behind one barrier.
        """
        self._prepare_write()
        cs = self.cs
        pos = 0
        n = len(mv)
        req = self._new_request()
        while pos < n:
            g = offset + pos
            if not g & (cs - 1) and n - pos >= cs:
                ci = g >> self.cb
                k = min((n - pos) // cs, self.l2_entries - (ci & (self.l2_entries - 1)))
                self._write_full(req, ci, k, mv[pos : pos + k * cs])
                pos += k * cs
            else:
                m = min(cs - (g & (cs - 1)), n - pos)
                self._write_partial(req, g, mv[pos : pos + m])
                pos += m
        self._commit(req)

    def _write_fresh(self, host: int, in_off: int, mv: memoryview) -> None:
        """Fill a newly allocated cluster whose other bytes must read as zeroes.

        A cluster past the end of the file needs only the new bytes (the file
        is extended over the whole cluster first, so the rest reads as zeroes,
        as QEMU's zero-writing copy-on-write areas do); a reused one is
        written whole.
        """
        cs = self.cs
        if host >= self.st.size():
            self.st.truncate(host + cs)
            self.st.pwrite(host + in_off, mv)
            return
        buf = bytearray(cs)
        buf[in_off : in_off + len(mv)] = mv
        self.st.pwrite(host, buf)

    def _write_full(self, req: Request, ci: int, k: int, mv: memoryview) -> None:
        cs = self.cs
        step = self._mapper.step
        l1i = ci >> self.l2_bits
        l2off, l2 = self._req_l2(req, l1i)
        base = ci & (self.l2_entries - 1)
        inplace: list[tuple[int, int]] = []
        need: list[int] = []
        for j in range(k):
            idx = base + j
            e = l2[idx * step]
            if e & layout.OFLAG_COPIED and not e & layout.OFLAG_COMPRESSED:
                host = self._mapper.data_host(e, l2off + idx * 8 * step)
                if host:
                    inplace.append((j, host))
                    continue
            need.append(j)
        for j0, j1, host in coalesce(inplace, cs):
            self._check_overlap(host, j1 - j0)
            self._check_in_file(host)
            self.st.pwrite(host, mv[j0 * cs : j1 * cs])
        changed = False
        if need:
            new_base = self.refs.allocate(len(need))
            self._check_overlap(new_base, len(need))
            planned = [(j, new_base + t * cs) for t, j in enumerate(need)]
            for j0, j1, host in coalesce(planned, cs):
                self.st.pwrite(host, mv[j0 * cs : j1 * cs])
            for j, host in planned:
                idx = base + j
                req.olds.append(l2[idx * step])
                l2[idx * step] = host | layout.OFLAG_COPIED
                if step == 2:
                    l2[idx * 2 + 1] = layout.BITMAP_ALLOC_ALL
            changed = True
        for j, host in inplace:
            idx = base + j
            if step == 2:
                if l2[idx * 2 + 1] != layout.BITMAP_ALLOC_ALL:
                    l2[idx * 2 + 1] = layout.BITMAP_ALLOC_ALL
                    changed = self._deps = True
            elif l2[idx] != host | layout.OFLAG_COPIED:
                l2[idx] = host | layout.OFLAG_COPIED
                changed = self._deps = True
        if changed:
            req.mark(l1i, base, base + k)

    def _write_partial(self, req: Request, g: int, mv: memoryview) -> None:
        cs = self.cs
        ci = g >> self.cb
        in_off = g & (cs - 1)
        n = len(mv)
        l1i = ci >> self.l2_bits
        l2off, l2 = self._req_l2(req, l1i)
        idx = ci & (self.l2_entries - 1)
        step = self._mapper.step
        e = l2[idx * step]
        compressed = bool(e & layout.OFLAG_COMPRESSED)
        host = 0 if compressed else self._mapper.data_host(e, l2off + idx * 8 * step)
        copied = bool(e & layout.OFLAG_COPIED) and host and not compressed
        cluster_start = ci << self.cb
        if step == 1:
            if copied:
                self._check_overlap(host, 1)
                self._check_in_file(host)
                if not (self.v3 and e & layout.OFLAG_ZERO):
                    self.st.pwrite(host + in_off, mv)
                    return
                buf = bytearray(cs)
                buf[in_off : in_off + n] = mv
                self.st.pwrite(host, buf)
                self._deps = True  # the zeroes must be there before the zero flag goes
                l2[idx] = host | layout.OFLAG_COPIED
                req.mark(l1i, idx, idx + 1)
                return
            new = self.refs.allocate(1)
            self._check_overlap(new, 1)
            if (e == 0 and self.backing is None) or (e == layout.OFLAG_ZERO and self.v3):
                self._write_fresh(new, in_off, mv)  # the rest of the cluster reads as zeroes
            else:
                buf = self._current(cluster_start, cs)
                buf[in_off : in_off + n] = mv
                self.st.pwrite(new, buf)
            l2[idx] = new | layout.OFLAG_COPIED
            req.mark(l1i, idx, idx + 1)
            req.olds.append(e)
            return
        sc = self._mapper.sc_size
        a = in_off - in_off % sc
        b = min(cs, -(-(in_off + n) // sc) * sc)
        k0, k1 = a // sc, b // sc
        units = ((1 << (k1 - k0)) - 1) << k0
        bitmap = l2[idx * 2 + 1]
        if copied:
            self._check_overlap(host, 1)
            self._check_in_file(host)
            if bitmap & units == units:
                self.st.pwrite(host + in_off, mv)
                return
            buf = self._current(cluster_start + a, b - a)
            buf[in_off - a : in_off - a + n] = mv
            self.st.pwrite(host + a, buf)
            self._deps = True  # the subclusters' data before their allocation bits
            l2[idx * 2 + 1] = (bitmap | units) & ~(units << 32)
            req.mark(l1i, idx, idx + 1)
            return
        if host or compressed:
            buf = self._current(cluster_start, cs)
            buf[in_off : in_off + n] = mv
            new = self.refs.allocate(1)
            self._check_overlap(new, 1)
            self.st.pwrite(new, buf)
            l2[idx * 2] = new | layout.OFLAG_COPIED
            l2[idx * 2 + 1] = layout.BITMAP_ALLOC_ALL
            req.mark(l1i, idx, idx + 1)
            req.olds.append(e)
            return
        buf = self._current(cluster_start + a, b - a)
        buf[in_off - a : in_off - a + n] = mv
        new = self.refs.allocate(1)
        self._check_overlap(new, 1)
        self.st.pwrite(new + a, buf)
        l2[idx * 2] = new | layout.OFLAG_COPIED
        l2[idx * 2 + 1] = (bitmap & ~(units << 32) & ~0xFFFFFFFF) | units
        req.mark(l1i, idx, idx + 1)

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
        self._check_compressed_range(offset, len(mv))
        self._run_write(lambda: self._write_compressed(offset, bytes(mv)), request=True)

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
        self._check_compressed_range(offset, len(mv))
        self._run_write(lambda: self._write_compressed(offset, bytes(mv), comp), request=True)

    def _check_compressed_range(self, offset: int, length: int) -> None:
        self._check_range(offset, length, "write")
        cs = self.cs
        if offset & (cs - 1) or not (
            length == cs or (offset + length == self.hdr.size and length < cs)
        ):
            raise ImageError(
                f"compressed writes take one whole aligned cluster ({cs} bytes) "
                f"(got {length} bytes at {offset})",
                path=self.path,
            )

    def _write_compressed(self, offset: int, data: bytes, comp: bytes | None = None) -> None:
        bitmapsmod.mark(self, offset, len(data))  # persistent dirty bitmaps
        self._prepare_write()
        cs = self.cs
        if comp is None:
            comp = compress(self.hdr.compression_type, data + bytes(cs - len(data)))
        if len(comp) >= cs and len(data) < cs:
            self.write_guest(offset, memoryview(data))
            return
        ci = offset >> self.cb
        l1i = ci >> self.l2_bits
        req = self._new_request()
        if len(comp) >= cs:  # does not shrink: stored uncompressed, as QEMU does
            self._write_full(req, ci, 1, memoryview(data))
            self._commit(req)
            return
        _l2off, l2 = self._req_l2(req, l1i)
        idx = ci & (self.l2_entries - 1)
        step = self._mapper.step
        host = self._alloc_bytes(len(comp))
        self._cluster_cache = None  # the same entry value may now mean new data
        self.st.pwrite(host, comp)
        nsec = ((host + len(comp) - 1) >> 9) - (host >> 9)
        req.olds.append(l2[idx * step])
        l2[idx * step] = layout.OFLAG_COMPRESSED | (nsec << self._mapper.csize_shift) | host
        if step == 2:
            l2[idx * 2 + 1] = 0
        req.mark(l1i, idx, idx + 1)
        self._commit(req)

    def _alloc_bytes(self, n: int) -> int:
        cs, cb = self.cs, self.cb
        # a cluster freed since the last compressed write may belong to someone else now
        cur = self._cfree if self._cfree_epoch == self.refs.frees else 0
        if cur:
            first = cur >> cb
            partial = bool(cur & (cs - 1))
            new_from = first + 1 if partial else first
            new_to = (((cur + n - 1) | 511) + 1 - 1) >> cb  # last cluster the sectors touch
            ok = not partial or 0 < self.refs.get(first) < self.refs.max
            if ok and new_to >= new_from:  # continue into the next clusters if free
                ok = self.refs.try_allocate_at(new_from, new_to - new_from + 1)
                if ok:
                    self._check_overlap(new_from << cb, new_to - new_from + 1)
            if ok:
                if partial:
                    self.refs.update([(first, 1)])
                self._cfree = cur + n
                self._cfree_epoch = self.refs.frees
                return cur
        k = -(-n // cs)
        host = self.refs.allocate(k)
        self._check_overlap(host, k)
        self._cfree = host + n
        self._cfree_epoch = self.refs.frees
        return host

    # ---- zeroes and discard ----
    @guarded
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeroes (zero flags for whole clusters on v3)."""
        self._require_writable("write zeroes")
        self._check_range(offset, length, "write zeroes")
        if length:
            bitmapsmod.mark(self, offset, length)  # persistent dirty bitmaps
            self._run_write(lambda: self._zero_range(offset, length, discard=False), request=True)

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
            self._run_write(lambda: self._zero_range(offset, length, discard=True), request=True)

    def _zero_range(self, offset: int, length: int, *, discard: bool, full: bool = False) -> None:
        self._prepare_write()
        cs = self.cs
        end = offset + length
        first = -(-offset // cs) * cs
        last = end - end % cs if end < self.hdr.size else -(-end // cs) * cs
        if first >= last:
            first = last = end
        pieces = [(offset, min(first, end)), (max(last, first), end)]
        if not discard:
            for a, b in pieces:
                if a < b:
                    self._zero_partial(a, b - a)
        pos = first
        req = self._new_request()  # one request: a constant number of barriers for any length
        while pos < last:
            ci = pos >> self.cb
            k = min((last - pos) >> self.cb, self.l2_entries - (ci & (self.l2_entries - 1)))
            if k == 0:  # last partial cluster at the end of the disk
                k = 1
            self._zero_clusters(req, ci, k, discard=discard, full=full)
            pos += k * cs
        self._commit(req)

    def _zero_partial(self, offset: int, length: int) -> None:
        for run in list(self._mapper.runs(offset, length)):  # the writes below change the map
            if run.kind == ZERO or (run.kind == UNALLOCATED and self.backing is None):
                continue
            self.write_guest(run.guest, memoryview(bytes(run.length)))

    def _zero_clusters(self, req: Request, ci: int, k: int, *, discard: bool, full: bool) -> None:
        step = self._mapper.step
        l1i = ci >> self.l2_bits
        backing = self.backing is not None and not full
        if not self.v3 and backing and not discard:
            for c in range(ci, ci + k, CHUNK // self.cs or 1):
                n = min(CHUNK // self.cs or 1, ci + k - c)
                self.write_guest(c << self.cb, memoryview(bytes(n * self.cs)))
            return
        _l2_off, l2 = self._mapper.l2_for(l1i)
        if l2 is None and not backing:
            return
        if l2 is not None and not backing:
            base = ci & (self.l2_entries - 1)
            if not any(l2[(base + j) * step] for j in range(k)) and (
                step == 1 or not any(l2[(base + j) * 2 + 1] for j in range(k))
            ):
                return
        _l2off, l2 = self._req_l2(req, l1i)
        base = ci & (self.l2_entries - 1)
        if backing and self.v3:
            target = (0, layout.BITMAP_ZERO_ALL) if step == 2 else (layout.OFLAG_ZERO, 0)
        else:
            target = (0, 0)
        changed = False
        for j in range(k):
            idx = base + j
            e = l2[idx * step]
            if step == 2:
                if (e, l2[idx * 2 + 1]) == target:
                    continue
                l2[idx * 2 + 1] = target[1]
            elif e == target[0]:
                continue
            req.olds.append(e)
            l2[idx * step] = target[0]
            changed = True
        if changed:
            req.mark(l1i, base, base + k)

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
        self._run_write(self._make_empty)

    def _make_empty(self) -> None:
        self._prepare_write()
        cb = self.cb
        # bounded memory: this many L1 entries' worth of references at a time
        batch = max(1, (1 << 18) // self.l2_entries)
        l1_off = self.hdr.l1_table_offset
        punch = getattr(self.st, "punch_hole", None)
        for lo in range(0, len(self._l1), batch):
            hi = min(lo + batch, len(self._l1))
            part = array("Q", self._l1[lo:hi])
            if not any(e & layout.L1E_OFFSET_MASK for e in part):
                continue
            changes = snapshots.tree_refs(self, part, l1_off + lo * 8, -1)
            drops: dict[int, int] = {}
            for c, d in changes:
                drops[c] = drops.get(c, 0) - d
            for c, n in drops.items():
                if self.refs.get(c) < n:
                    self._mark_corrupt(
                        f"host cluster {c} is referenced from the active L1/L2 tables but its "
                        f"refcount is {self.refs.get(c)}",
                        c << cb,
                    )
            self.st.pwrite(l1_off + lo * 8, bytes((hi - lo) * 8))
            self.st.flush()
            self._l1[lo:hi] = array("Q", bytes((hi - lo) * 8))
            self._meta_changed()
            self.refs.update(changes)
            for e in part:
                off = e & layout.L1E_OFFSET_MASK
                if off and not self.refs.get(off >> cb):
                    self._mapper.forget_l2(off)
            if callable(punch):  # nothing references these any more: give the space back
                freed = sorted(c for c in drops if not self.refs.get(c))
                for first, stop, _ in coalesce([(c, c << cb) for c in freed], self.cs):
                    if not punch(first << cb, (stop - first) << cb):
                        punch = None
                        break
        self._cluster_cache = None
        self._cfree = 0
        self.st.flush()
        self._trim_free_tail()

    def _trim_free_tail(self) -> None:
        """Cut the file after its last referenced cluster (free clusters only are dropped).

        Only when the active disk is all there is (no snapshots, no bitmaps),
        as QEMU's ``make_completely_empty``: then every cluster in use is one
        whose refcount was just checked or a fixed table, and a wrong refcount
        elsewhere cannot make us cut off data.
        """
        if self.snaps or self.meta.bitmaps is not None:
            return
        refs = self.refs
        end = (max(self.metadata_clusters()) + 1) << self.cb
        for t in range(len(refs.table) - 1, -1, -1):
            blk = refs.block(t)
            if blk is None:
                continue
            last = next((i for i in range(len(blk) - 1, -1, -1) if blk[i]), -1)
            if last >= 0:
                end = max(end, (t * refs.per_block + last + 1) << self.cb)
                break
        if end < self.st.size():
            self.st.truncate(end)
            self.st.flush()

    # ---- block status ----
    @guarded
    def block_status(
        self, offset: int = 0, length: int | None = None, *, include_backing: bool = True
    ) -> Iterator[Extent]:
        """Yield allocation extents for ``[offset, offset+length)`` (whole runs at a time)."""
        if length is None:
            length = max(0, self.hdr.size - check_int(offset, "offset"))
        self._check_range(offset, length, "query")
        return _merge(self._status(offset, length, include_backing))

    def _status(self, offset: int, length: int, include_backing: bool) -> Iterator[Extent]:
        for run in self._mapper.runs(offset, length):
            if run.kind in (DATA, COMPRESSED):
                yield Extent(run.guest, run.length, "data")
            elif run.kind == ZERO:
                yield Extent(run.guest, run.length, "zero")
            elif not include_backing:
                yield Extent(run.guest, run.length, "unallocated")
            elif self.backing is None:
                yield Extent(run.guest, run.length, "zero")
            else:
                bsize = self.backing.virtual_size
                end = run.guest + run.length
                if run.guest < bsize:
                    n = min(end, bsize) - run.guest
                    for ext in self.backing.block_status(run.guest, n, include_backing=True):
                        if ext.kind == "data":
                            yield Extent(ext.start, ext.length, "data", from_backing=True)
                        else:
                            yield Extent(ext.start, ext.length, "zero")
                if end > bsize:
                    start = max(run.guest, bsize)
                    yield Extent(start, end - start, "zero")

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
        self._run_write(lambda: self._resize(old, new, shrink))
        bitmapsmod.resized(self)  # bitmaps follow the new size

    def _resize(self, old: int, new: int, shrink: bool) -> None:
        self._prepare_write()
        if new < old:
            if self.snaps:
                raise ImageError("cannot shrink an image with internal snapshots", path=self.path)
            stored = [
                e
                for e in self.block_status(new, old - new, include_backing=False)
                if e.kind == "data"
            ]
            if stored and not shrink:
                raise ImageError(
                    f"shrinking to {new} bytes would drop data stored at guest offset "
                    f"{stored[0].start}; pass shrink=True to drop it",
                    path=self.path,
                )
            self._zero_range(new, old - new, discard=True, full=True)
            self._set_size(new)
            return
        self.grow_l1(self.meta.l1_entries_for(new))
        self._set_size(new)
        tail_end = min(new, -(-old // self.cs) * self.cs)
        if tail_end > old:
            self._zero_partial(old, tail_end - old)
        if self.backing is not None and self.backing.virtual_size > old:
            self._zero_range(old, min(new, self.backing.virtual_size) - old, discard=False)

    def _set_size(self, size: int) -> None:
        self.st.pwrite(layout.OFF_SIZE, struct.pack(">Q", size))
        self.st.flush()
        self.hdr.size = size

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
        alloc = getattr(self.st, "allocated_bytes", None)
        actual = int(alloc()) if callable(alloc) else os.stat(self.path).st_blocks * 512
        # keys in the order qemu-img prints them
        spec: dict[str, Any] = {"compat": "1.1" if self.v3 else "0.10"}
        spec["compression-type"] = self.compression_type
        if self.v3:
            spec["lazy-refcounts"] = bool(
                self.hdr.compatible_features & layout.COMPAT_LAZY_REFCOUNTS
            )
        bitmaps = bitmapsmod.read_directory(self.st, self.meta) if self.v3 else []
        if bitmaps:
            spec["bitmaps"] = [
                {"flags": b.flag_names(), "name": b.name, "granularity": 1 << b.granularity_bits}
                for b in bitmaps
            ]
        spec["refcount-bits"] = 1 << self.hdr.refcount_order
        if self.meta.data_file is not None:
            spec["data-file"] = self.meta.data_file
            spec["data-file-raw"] = bool(
                self.hdr.autoclear_features & layout.AUTOCLEAR_DATA_FILE_RAW
            )
        if self.v3:
            spec["corrupt"] = self._corrupt
            spec["extended-l2"] = self.extended
        return ImageInfo(
            filename=self.path,
            format="qcow2",
            virtual_size=self.hdr.size,
            actual_size=actual,
            cluster_size=self.cs,
            backing_filename=self.meta.backing_file,
            backing_format=self.meta.backing_format,
            dirty_flag=bool(self.hdr.incompatible_features & layout.INCOMPAT_DIRTY),
            snapshots=self.snapshots,
            format_specific=spec,
        )

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
        self._prepare_write()
        exts = [
            e
            for e in self.meta.extensions
            if e.type not in (layout.EXT_BACKING_FORMAT, layout.EXT_END)
        ]
        if name is not None and backing_format is not None:
            exts.insert(0, layout.Extension(layout.EXT_BACKING_FORMAT, backing_format.encode()))
        hdr = self.hdr
        head = bytearray(layout.encode_header(hdr))
        head += layout.encode_extensions(exts)
        raw_name = name.encode() if name is not None else b""
        if len(raw_name) > layout.MAX_BACKING_NAME:
            raise ImageError("backing file name longer than 1023 bytes", path=self.path)
        if len(head) + len(raw_name) > self.cs:
            raise ImageError(
                "header, extensions and backing name do not fit in one cluster", path=self.path
            )
        new_hdr = layout.Header(
            **{f.name: getattr(hdr, f.name) for f in attrs.fields(layout.Header)}
        )
        new_hdr.backing_file_offset = len(head) if raw_name else 0
        new_hdr.backing_file_size = len(raw_name)
        head[: len(layout.encode_header(new_hdr))] = layout.encode_header(new_hdr)
        head += raw_name
        self.st.pwrite(0, bytes(head))
        self.st.flush()
        self.hdr = new_hdr
        self.meta.header = new_hdr
        self.meta.extensions = exts
        self.meta.backing_file = name
        self.meta.backing_format = backing_format if name is not None else None

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


def _merge(extents: Iterable[Extent]) -> Iterator[Extent]:
    pend: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if (
            pend is not None
            and pend.kind == ext.kind
            and pend.from_backing == ext.from_backing
            and pend.start + pend.length == ext.start
        ):
            pend = Extent(pend.start, pend.length + ext.length, pend.kind, pend.from_backing)
            continue
        if pend is not None:
            yield pend
        pend = ext
    if pend is not None:
        yield pend

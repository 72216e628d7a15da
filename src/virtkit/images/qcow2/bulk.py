"""Filling a freshly created, empty qcow2 image front to back (the convert fast path).

:class:`BulkWriter` takes a file that :func:`~.create.create` just made (no
data, an empty L1 table, no snapshots, bitmaps or backing file) and stores
guest clusters in strictly increasing guest order, as ``convert`` produces
them. It needs none of :class:`~.image.Qcow2Image`'s machinery for updating
a live image, because nothing else can see the file yet (``convert`` builds
it under a hidden name and publishes it only when complete):

- clusters are laid out sequentially from the end of the file: an L2 table
  when the first cluster of its range arrives, a refcount block when the
  file grows into a range no block covers yet (it counts itself, as QEMU
  places them), then the data. Compressed clusters are packed byte by byte,
  as QEMU's ``qcow2_alloc_bytes`` packs them, and a host cluster is shared
  only while its count stays within the refcount width;
- consecutive clusters go out in large writes, and the kernel is asked to
  start writing the data back early (``sync_file_range``) so that the final
  ``fdatasync`` has little left to wait for;
- the L2 table being filled and the refcount blocks of the clusters around
  the end of the file are kept in memory; each is written once, when it is
  complete, and the L1 table (and, if it had to grow, a new refcount table
  with its header fields) once at :meth:`BulkWriter.finish`, followed by one
  ``fdatasync``.

Memory is bounded by the format, not the data: one L2 table, at most a few
refcount blocks, the L1 table and the refcount table (both of which QEMU
keeps in memory too). The layout is a pure function of which guest
clusters are written and with what, so the same input gives the same file.
"""

from __future__ import annotations

import ctypes
import os
import struct
from array import array
from collections.abc import Callable

from virtkit.errors import ImageError
from virtkit.images.qcow2 import layout, metadata
from virtkit.images.qcow2.compress import compress
from virtkit.images.storage import FileStorage

__all__ = ["BulkWriter"]

#: Written data the kernel is asked to start writing back once this much has piled up.
WRITEBACK_STEP = 8 << 20
#: Compressed clusters are gathered into one write of up to this many bytes.
GATHER_BYTES = 1 << 20

_SYNC_FILE_RANGE_WRITE = 2
_sfr_cache: list[Callable[[int, int, int, int], int] | None] = []


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc ``sync_file_range`` through ctypes (the os module has none), or None."""
    if not _sfr_cache:
        fn: Callable[[int, int, int, int], int] | None
        try:
            cfn = ctypes.CDLL(None, use_errno=True).sync_file_range  # libc is loaded already
            cfn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            cfn.restype = ctypes.c_int
            fn = cfn
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            fn = None
        _sfr_cache.append(fn)
    return _sfr_cache[0]


class BulkWriter:
    """Stores clusters into a new, empty qcow2 image at ``path``, in guest order.

    Call :meth:`write_clusters` / :meth:`write_precompressed` with increasing
    guest offsets, then :meth:`finish` (metadata, one fdatasync, close), or
    :meth:`close` to abandon the file (the caller deletes it).

    Raises:
        ImageError: the file is not a freshly created, empty qcow2 image.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.st = FileStorage(path, writable=True)
        self.path = self.st.path
        try:
            self._load()
        except BaseException:
            self.st.close()
            raise

    def _load(self) -> None:
        meta = metadata.load(self.st)
        hdr = meta.header
        self.hdr = hdr
        path = self.path
        if (
            meta.backing_file is not None
            or meta.data_file is not None
            or meta.bitmaps is not None
            or hdr.nb_snapshots
            or hdr.incompatible_features & (layout.INCOMPAT_DIRTY | layout.INCOMPAT_CORRUPT)
        ):
            raise ImageError(
                "bulk writing needs a new image with no backing file, external data file, "
                "bitmaps or snapshots",
                path=path,
            )
        self.cs = cs = meta.cluster_size
        self.cb = hdr.cluster_bits
        self.virtual_size = hdr.size
        self.step = 2 if meta.extended_l2 else 1
        self.l2_entries = meta.l2_entries
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.bits = 1 << hdr.refcount_order
        self.maxref = (1 << self.bits) - 1
        self.per_block = cs * 8 // self.bits
        self.csize_shift = 62 - (self.cb - 8)
        end = self.st.size()
        if end % cs:
            raise ImageError(f"a new image ends on a cluster boundary (size {end})", path=path)
        self.l1 = layout.decode_u64_table(self.st.pread(hdr.l1_table_offset, hdr.l1_size * 8))
        if len(self.l1) != hdr.l1_size or any(self.l1):
            raise ImageError("bulk writing needs an image with no data yet", path=path)
        rt_bytes = hdr.refcount_table_clusters * cs
        table = layout.decode_u64_table(self.st.pread(hdr.refcount_table_offset, rt_bytes))
        if len(table) * 8 != rt_bytes:
            raise ImageError("the refcount table runs past the end of the file", path=path)
        used = len(table)
        while used and not table[used - 1]:
            used -= 1
        #: Refcount table entries (grows past the table's room in memory; moved at finish).
        self.reftable = array("Q", table[:used])
        self.rt_capacity = len(table)
        #: Refcount blocks still being counted, by index (the rest are on disk, complete).
        self.blocks: dict[int, array[int]] = {}
        for k in range((end >> self.cb) // self.per_block, used):
            off = self.reftable[k] & layout.REFT_OFFSET_MASK
            if not off or off % cs or off >= end:
                raise ImageError(f"refcount block {k} at {off:#x} is not usable", path=path)
            self.blocks[k] = layout.decode_refblock(self.st.pread(off, cs), self.bits)
        #: Offset of the next free cluster at the end of the file.
        self.front = end
        # QEMU compresses into a buffer of cluster_size - 1 bytes, and zlib's deflate
        # reports a stream that fills it exactly as not finished: such clusters (and
        # any that do not shrink) are stored uncompressed, as QEMU stores them
        zlib = hdr.compression_type == layout.COMPRESSION_ZLIB
        self._compressed_limit = cs - 1 if zlib else cs
        #: Where the next compressed cluster may go in a partly used cluster (0: none).
        self._cfree = 0
        self._next_guest = 0
        self._l2i = -1
        self._l2: array[int] = array("Q")
        self._l2_host = 0
        self._gather = bytearray()
        self._gather_at = 0
        self._kicked = end
        self._old_tables: list[int] = []
        fd = self.st.fd
        assert fd is not None  # just opened
        self.fd = fd

    @property
    def cluster_size(self) -> int:
        """The image's cluster size in bytes."""
        return self.cs

    # ---- host allocation ----------------------------------------------------------------
    def _has_block(self, k: int) -> bool:
        return k in self.blocks or (k < len(self.reftable) and self.reftable[k] != 0)

    def _block(self, c: int) -> array[int]:
        blk = self.blocks.get(c // self.per_block)
        if blk is None:  # pragma: no cover - every allocation creates its blocks first
            raise ImageError(f"cluster {c} has no refcount block in memory", path=self.path)
        return blk

    def _new_block(self, k: int) -> None:
        """Place refcount block ``k`` at the next free cluster (counted by its own block)."""
        while True:  # the cluster it lands on must be counted by some block first
            c = self.front >> self.cb
            home = c // self.per_block
            if home == k or self._has_block(home):
                break
            self._new_block(home)
        if k >= len(self.reftable):
            self.reftable.extend([0] * (k + 1 - len(self.reftable)))
        self.reftable[k] = c << self.cb
        self.blocks[k] = layout.new_refblock(self.per_block, self.bits)
        self.front = (c + 1) << self.cb
        self._block(c)[c % self.per_block] = 1

    def _missing_block(self, first: int, last: int) -> int | None:
        for k in range(first // self.per_block, last // self.per_block + 1):
            if not self._has_block(k):
                return k
        return None

    def _ensure_blocks(self, clusters: int) -> None:
        """Place the refcount blocks the next ``clusters`` clusters at the front need."""
        while True:
            first = self.front >> self.cb
            missing = self._missing_block(first, first + clusters - 1)
            if missing is None:
                return
            self._new_block(missing)

    def _take(self, nbytes: int) -> int:
        """Allocate whole clusters for ``nbytes`` at the end of the file; return the offset."""
        cb, pb = self.cb, self.per_block
        clusters = -(-nbytes // self.cs)
        self._ensure_blocks(clusters)
        start = self.front
        c = first = start >> cb
        last = first + clusters - 1
        while c <= last:  # fresh clusters: each counted once
            k = c // pb
            stop = min(last + 1, (k + 1) * pb)
            blk = self.blocks[k]
            blk[c % pb : c % pb + (stop - c)] = array(blk.typecode, [1]) * (stop - c)
            c = stop
        self.front = (last + 1) << cb
        self._retire()
        return start

    def _take_bytes(self, nbytes: int) -> int:
        """Allocate ``nbytes`` for compressed data, packed as QEMU's ``qcow2_alloc_bytes`` packs.

        The data continues the partly used cluster the previous compressed
        cluster ended in while that cluster's count has room (running on into
        the clusters right after it when they are the next free ones); other
        allocations in between take whole clusters of their own.
        """
        cs, cb, pb = self.cs, self.cb, self.per_block
        cur = self._cfree
        if cur:
            c = cur >> cb
            blk = self._block(c)
            room = ((c + 1) << cb) - cur
            if blk[c % pb] < self.maxref:
                if nbytes <= room:
                    blk[c % pb] += 1
                    self._cfree = 0 if nbytes == room else cur + nbytes
                    return cur
                more = -(-(nbytes - room) // cs)
                if (c + 1) << cb == self.front and self._missing_block(c + 1, c + more) is None:
                    blk[c % pb] += 1
                    self._take(more * cs)
                    self._cfree = (cur + nbytes) % cs and cur + nbytes
                    return cur
        start = self._take(nbytes)
        self._cfree = (start + nbytes) % cs and start + nbytes
        return start

    def _retire(self) -> None:
        """Write the refcount blocks no later allocation can touch."""
        done = (self.front >> self.cb) // self.per_block
        shared = (self._cfree >> self.cb) // self.per_block if self._cfree else -1
        for k in [k for k in self.blocks if k < done and k != shared]:
            self._write_block(k)  # (the partly used cluster's block waits: it may count more)

    def _write_block(self, k: int) -> None:
        blk = self.blocks.pop(k)
        self.st.pwrite(self.reftable[k], layout.encode_refblock(blk, self.bits))

    # ---- writes -----------------------------------------------------------------------------
    def _flush_gather(self) -> None:
        if self._gather:
            self.st.pwrite(self._gather_at, self._gather)
            self._gather = bytearray()
            self._kick()

    def _kick(self) -> None:
        """Have the kernel start writing back what was written (the final fdatasync waits less)."""
        end = self.front
        if end - self._kicked >= WRITEBACK_STEP:
            fn = _sync_file_range()
            if fn is not None:
                fn(self.fd, self._kicked, end - self._kicked, _SYNC_FILE_RANGE_WRITE)
            self._kicked = end

    def _check_guest(self, guest: int, length: int) -> None:
        cs = self.cs
        if guest < self._next_guest or guest % cs:
            raise ImageError(
                f"bulk writes go in increasing order of whole clusters (got offset {guest}, "
                f"expected at least {self._next_guest})",
                path=self.path,
            )
        if length <= 0 or guest + length > self.virtual_size:
            raise ImageError(
                f"bulk write of {length} bytes at {guest} runs past the end of the "
                f"{self.virtual_size}-byte disk",
                path=self.path,
            )
        if length % cs and guest + length != self.virtual_size:
            raise ImageError(
                f"bulk writes take whole clusters (got {length} bytes at {guest})", path=self.path
            )
        self._next_guest = guest + length

    def _l2_for(self, l1i: int) -> array[int]:
        """The L2 table of L1 entry ``l1i``, allocating it when its first cluster arrives."""
        if l1i != self._l2i:
            self._write_l2()
            host = self._take(self.cs)
            self.l1[l1i] = host | layout.OFLAG_COPIED
            self._l2i, self._l2_host = l1i, host
            self._l2 = array("Q", bytes(self.cs))
        return self._l2

    def _write_l2(self) -> None:
        if self._l2i >= 0:
            self.st.pwrite(self._l2_host, layout.encode_u64_table(self._l2))
            self._l2i = -1

    def write_clusters(self, guest: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` (whole clusters, or up to the disk's end) at guest offset ``guest``.

        Raises:
            ImageError: out of order, misaligned, past the end, or the write failed.
        """
        mv = memoryview(data).cast("B")
        self._check_guest(guest, len(mv))
        cs, cb, step = self.cs, self.cb, self.step
        ci = guest >> cb
        n = -(-len(mv) // cs)
        done = 0
        while done < n:
            l1i = (ci + done) >> self.l2_bits
            l2 = self._l2_for(l1i)
            idx = (ci + done) & (self.l2_entries - 1)
            k = min(n - done, self.l2_entries - idx)
            host = self._take(k * cs)
            for j in range(k):
                l2[(idx + j) * step] = (host + j * cs) | layout.OFLAG_COPIED
                if step == 2:
                    piece = bytes(mv[(done + j) * cs : (done + j + 1) * cs])
                    l2[(idx + j) * 2 + 1] = self._subclusters(piece)
            self.st.pwrite(host, mv[done * cs : (done + k) * cs])
            done += k
            self._kick()

    def _subclusters(self, piece: bytes) -> int:
        """Allocation bitmap of an extended L2 entry: the subclusters that hold data.

        qemu-img leaves zero runs inside a cluster unwritten, so their
        subclusters stay unallocated (reading as zeroes); here a subcluster
        is allocated exactly when it is not all zeroes, which never allocates
        more than qemu-img does.
        """
        sub = self.cs // layout.SUBCLUSTERS
        zero = bytes(sub)
        bitmap = 0
        for i in range(min(layout.SUBCLUSTERS, -(-len(piece) // sub))):
            if not piece.startswith(zero[: len(piece) - i * sub], i * sub, (i + 1) * sub):
                bitmap |= 1 << i
        return bitmap

    def compress_cluster(self, data: bytes) -> bytes:
        """Compress one cluster (padded to a whole cluster) with the image's codec, as QEMU."""
        return compress(self.hdr.compression_type, data + bytes(self.cs - len(data)))

    def write_precompressed(self, guest: int, data: bytes, compressed: bytes) -> None:
        """Store one cluster ``data`` whose :meth:`compress_cluster` result is ``compressed``.

        A cluster that does not shrink below QEMU's limit is stored
        uncompressed, as QEMU does.

        Raises:
            ImageError: out of order, misaligned, past the end, or the write failed.
        """
        cs = self.cs
        if len(data) != cs and guest + len(data) != self.virtual_size:
            raise ImageError(
                f"compressed writes take one whole cluster (got {len(data)} bytes at {guest})",
                path=self.path,
            )
        if len(compressed) >= self._compressed_limit or not compressed:
            self.write_clusters(guest, data)
            return
        self._check_guest(guest, len(data))
        ci = guest >> self.cb
        l2 = self._l2_for(ci >> self.l2_bits)
        host = self._take_bytes(len(compressed))
        if self._gather and self._gather_at + len(self._gather) != host:
            self._flush_gather()
        if not self._gather:
            self._gather_at = host
        self._gather += compressed
        nsec = ((host + len(compressed) - 1) >> 9) - (host >> 9)
        idx = ci & (self.l2_entries - 1)
        l2[idx * self.step] = layout.OFLAG_COMPRESSED | (nsec << self.csize_shift) | host
        if len(self._gather) >= GATHER_BYTES:
            self._flush_gather()

    # ---- the end ----------------------------------------------------------------------------
    def _grow_reftable(self) -> None:
        """Put a refcount table with room for every block at the end of the file."""
        cs = self.cs
        while True:
            n = -(-len(self.reftable) * 8 // cs)
            first = self.front >> self.cb
            missing = self._missing_block(first, first + n - 1)
            if missing is None:
                break
            self._new_block(missing)
        if n * cs > layout.MAX_REFTABLE_BYTES:
            raise ImageError(
                "the refcount table would exceed QEMU's 8 MiB limit; use a larger cluster size",
                path=self.path,
            )
        old = self.hdr.refcount_table_offset >> self.cb
        self._old_tables = list(range(old, old + self.hdr.refcount_table_clusters))
        host = self._take(n * cs)
        self.hdr.refcount_table_offset = host
        self.hdr.refcount_table_clusters = n
        self.rt_capacity = n * cs // 8

    def _free_old_tables(self) -> None:
        """Drop the counts of the refcount table that a bigger one replaced."""
        for c in self._old_tables:
            k = c // self.per_block
            blk = self.blocks.get(k)
            if blk is not None:
                blk[c % self.per_block] -= 1
                continue
            off = self.reftable[k]
            disk = layout.decode_refblock(self.st.pread(off, self.cs), self.bits)
            disk[c % self.per_block] -= 1
            self.st.pwrite(off, layout.encode_refblock(disk, self.bits))

    def finish(self) -> None:
        """Write the remaining metadata, make the whole file durable, and close it.

        Raises:
            ImageError: a write or the flush failed (the file is then not a valid image).
        """
        self._write_l2()
        self._flush_gather()
        moved = len(self.reftable) > self.rt_capacity
        if moved:
            self._grow_reftable()
        for k in sorted(self.blocks):
            self._write_block(k)
        self._free_old_tables()
        hdr = self.hdr
        table = array("Q", self.reftable) + array(
            "Q", bytes(8 * (self.rt_capacity - len(self.reftable)))
        )
        self.st.pwrite(hdr.refcount_table_offset, layout.encode_u64_table(table))
        if hdr.l1_size:
            self.st.pwrite(hdr.l1_table_offset, layout.encode_u64_table(self.l1))
        if moved:
            self.st.pwrite(
                layout.OFF_REFTABLE,
                struct.pack(">QI", hdr.refcount_table_offset, hdr.refcount_table_clusters),
            )
        end = self.front
        if self._cfree and (self._cfree >> self.cb) + 1 == self.front >> self.cb:
            end = -(-self._cfree // 512) * 512  # a compressed tail ends on a sector, as QEMU's
        if self.st.size() < end:
            self.st.truncate(end)
        self.st.flush()
        self.st.close()

    def close(self) -> None:
        """Abandon the file without finishing it (the caller removes it). Idempotent."""
        self.st.close()

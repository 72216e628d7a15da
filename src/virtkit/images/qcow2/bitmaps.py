"""Persistent dirty bitmaps of qcow2 images, kept up to date as QEMU keeps them.

A persistent dirty bitmap records, one bit per *granule* (512 B .. 2 GiB of
guest data), which parts of the disk were written since the bitmap was added
or last cleared: what an incremental backup copies. The on-disk structures
follow QEMU's ``docs/interop/qcow2.txt`` ("Bitmaps extension"):

- a header extension (count, directory size and offset) and the ``bitmaps``
  autoclear bit, which a program that does not maintain bitmaps must clear;
- the bitmap directory: one 24-byte entry per bitmap (table offset and size,
  flags ``in_use``/``auto``, type 1, granularity bits, name length, extra
  data length), then the name, padded to 8 bytes;
- each bitmap's table: one 64-bit entry per cluster of bitmap data (bits
  9..55 the data cluster, 0 and bit 0 clear: all zeroes, 0 and bit 0 set:
  all ones; bits 1..8 and 56..63 reserved);
- the data: granule ``k`` is bit ``k % 8`` (least significant first) of
  byte ``k // 8``, ``cluster_size * 8`` granules per data cluster.

Behaviour mirrors QEMU (``block/qcow2-bitmap.c``):

- The directory is read on first use (``info()``, ``bitmaps()``, the first
  write) and one that breaks QEMU's constraints is refused
  (:mod:`.bitmap_format`); QEMU refuses to open such an image at all. A
  write to it drops the bitmaps (clears the autoclear bit) rather than
  failing. A bitmap already flagged ``in_use`` was left by a writer that
  did not close cleanly: it is *inconsistent*, listed and removable but not
  usable (as QEMU reports it), and kept as it is.
- Before the first change to guest data, every consistent bitmap is loaded
  and flagged ``in_use`` on disk (flushed before any data is written; QEMU
  does this when it opens the image writable, virtkit at the first write,
  so opening and reading leaves the file untouched); each guest write,
  zeroing, discard or compressed write then sets the bits of the granules
  it touches in every enabled (``auto``) bitmap.
- ``flush()`` and ``close()`` store the bitmaps and clear ``in_use`` again:
  changed data clusters are written (in place while ``in_use`` says their
  content is not to be trusted, new clusters for newly dirty parts), then a
  barrier, then the tables, a barrier, then the flags. Clusters no longer
  referenced are freed only after that, so a crash at any point leaves the
  bitmaps either consistent or flagged ``in_use`` (inconsistent), and at
  worst leaked clusters, never a corrupt image.
- Adding, removing or resizing rewrites the directory copy-on-write (new
  clusters, then the header extension, then the old clusters are freed),
  as QEMU's ``update_ext_header_and_dir``. A resize carries the bitmaps to
  the new size (refused with an inconsistent one, as QEMU); a snapshot
  revert is refused while bitmaps exist, as ``qemu-img snapshot -a``
  refuses it.

Memory is bounded as QEMU bounds it: a bitmap's data is at most 512 MiB
(``BME_MAX_PHYS_SIZE``), only data clusters with a bit set are held, and
every all-ones cluster shares one buffer.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

import attrs

from virtkit.errors import CorruptImageError, ImageError
from virtkit.images.base import BitmapInfo
from virtkit.images.qcow2 import layout
from virtkit.images.qcow2.bitmap_format import (
    ENTRY_ALL_ONES,
    ENTRY_OFFSET_MASK,
    FLAG_AUTO,
    FLAG_IN_USE,
    MAX_DIRECTORY,
    DirEntry,
    clear_bits,
    corrupt,
    read_directory,
    read_table,
    runs,
    set_bits,
    table_size_for,
)

#: Extensions QEMU writes before the bitmaps extension (qcow2_update_header's order).
_BEFORE_BITMAPS = {
    layout.EXT_BACKING_FORMAT,
    layout.EXT_DATA_FILE,
    layout.EXT_CRYPTO,
    layout.EXT_FEATURE_TABLE,
}


if TYPE_CHECKING:  # the image module imports this one
    from virtkit.images.qcow2.image import Qcow2Image

__all__ = ["DirEntry", "LiveBitmap", "Tracker", "read_directory"]


# --- one bitmap in memory ---------------------------------------------------------------------
@attrs.define
class LiveBitmap:
    """A bitmap as this process sees it: its directory entry and (once loaded) its bits."""

    entry: DirEntry
    enabled: bool
    inconsistent: bool
    #: Data clusters with a bit set, by table index; None until loaded. A
    #: cluster of all ones is the tracker's shared, immutable ``full`` bytes.
    chunks: dict[int, bytearray | bytes] | None = None
    #: The table as on disk (loaded with the data).
    table: array[int] = attrs.field(factory=lambda: array("Q"))
    #: Bits changed since the last store.
    changed: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def granularity(self) -> int:
        return 1 << self.entry.granularity_bits


class Tracker:
    """The bitmaps of one open image: what is on disk and what changed since."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.items = [
            LiveBitmap(e, bool(e.flags & FLAG_AUTO), bool(e.flags & FLAG_IN_USE))
            for e in read_directory(img.st, img.meta)
        ]
        #: True while this process has flagged the consistent bitmaps in-use on disk.
        self.in_use = False
        #: One cluster of set bits, shared by every all-ones cluster of every bitmap.
        self.full = b"\xff" * img.cs

    # ---- lookups ----
    def find(self, name: str) -> LiveBitmap:
        for bm in self.items:
            if bm.name == name:
                return bm
        raise ImageError(f"no bitmap named {name!r} in this image", path=self.img.path)

    def usable(self, name: str, action: str) -> LiveBitmap:
        bm = self.find(name)
        if bm.inconsistent:
            raise ImageError(
                f"cannot {action} bitmap {name!r}: it is inconsistent (flagged in-use by a "
                "writer that did not close the image cleanly); remove it and add a new one",
                path=self.img.path,
            )
        return bm

    # ---- data ----
    def load(self, bm: LiveBitmap) -> dict[int, bytearray | bytes]:
        """Read a consistent bitmap's data (once)."""
        if bm.chunks is not None:
            return bm.chunks
        img = self.img
        cs = img.cs
        table = read_table(img.st, bm.entry, cs)
        chunks: dict[int, bytearray | bytes] = {}
        file_size = img.st.size()
        for i, e in enumerate(table):
            off = e & ENTRY_OFFSET_MASK
            if off:
                if off < cs or off + cs > file_size:
                    raise corrupt(
                        f"bitmap {bm.name!r} data cluster at {off:#x} lies outside the file",
                        img.path,
                        bm.entry.table_offset + i * 8,
                    )
                data = img.st.pread(off, cs)
                if data == self.full:
                    chunks[i] = self.full
                elif data.count(0) != len(data):
                    chunks[i] = bytearray(data)
            elif e & ENTRY_ALL_ONES:
                chunks[i] = self.full  # shared: memory follows the file, not the disk size
        bm.table = table
        bm.chunks = chunks
        self._trim(bm, img.virtual_size)
        return chunks

    def _trim(self, bm: LiveBitmap, size: int) -> None:
        """Clear bits past the last granule of a ``size``-byte disk."""
        assert bm.chunks is not None
        per = self.img.cs * 8
        granules = -(-size >> bm.entry.granularity_bits)
        for i in [i for i in bm.chunks if (i + 1) * per > granules]:
            lo = max(0, granules - i * per)
            if lo == 0:
                del bm.chunks[i]
            else:
                buf = bm.chunks[i] = bytearray(bm.chunks[i])
                clear_bits(buf, lo, per)

    def set_granules(self, bm: LiveBitmap, first: int, stop: int) -> None:
        """Set granules ``[first, stop)`` of a loaded bitmap."""
        chunks = self.load(bm)
        per = self.img.cs * 8
        for i in range(first // per, (stop - 1) // per + 1 if stop > first else first // per):
            lo = max(first, i * per) - i * per
            hi = min(stop, (i + 1) * per) - i * per
            buf = chunks.get(i)
            if isinstance(buf, bytes):
                continue  # all ones already
            if lo == 0 and hi == per:
                chunks[i] = self.full
                continue
            if buf is None:
                buf = chunks[i] = bytearray(self.img.cs)
            set_bits(buf, lo, hi)
        bm.changed = True

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of the granules ``[offset, offset+length)`` touches, in enabled bitmaps."""
        size = self.img.virtual_size
        end = min(offset + length, size)
        if end <= offset:
            return
        for bm in self.items:
            if bm.enabled and not bm.inconsistent:
                gb = bm.entry.granularity_bits
                self.set_granules(bm, offset >> gb, -(-end >> gb))

    def extents(self, bm: LiveBitmap) -> list[tuple[int, int]]:
        """Dirty ``(offset, length)`` byte ranges of a consistent bitmap, merged."""
        chunks = self.load(bm)
        per = self.img.cs * 8
        gran = bm.granularity
        size = self.img.virtual_size
        out: list[tuple[int, int]] = []
        for i in sorted(chunks):
            buf = chunks[i]
            spans = [(0, per)] if buf is self.full else runs(buf)
            for first, count in spans:
                start = (i * per + first) * gran
                length = min(count * gran, size - start)
                if length <= 0:
                    continue
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((start, length))
        return out

    # ---- the in-use flag ----
    # Barriers here are plain fdatasyncs of the image file (``st.flush()``): they
    # order this module's own writes and leave the access layer's bookkeeping of
    # its pending requests alone.
    def begin(self) -> None:
        """Load every consistent bitmap and flag it in-use on disk (flushed) before data changes."""
        if self.in_use:
            return
        todo = [bm for bm in self.items if not bm.inconsistent]
        if not todo:
            return
        for bm in todo:
            self.load(bm)
        img = self.img
        for bm in todo:
            img.st.pwrite(bm.entry.flags_at, (bm.entry.flags | FLAG_IN_USE).to_bytes(4, "big"))
        img.st.flush()
        for bm in todo:
            bm.entry.flags |= FLAG_IN_USE
        self.in_use = True

    # ---- storing ----
    def store(self, *, structural: bool = False) -> None:
        """Write every consistent bitmap back and clear its in-use flag (see the module doc).

        ``structural``: the directory itself changes (a bitmap added or
        removed): it is rewritten copy-on-write even when no bitmap was in use.
        """
        if not self.in_use and not structural:
            return
        img = self.img
        if not structural:
            self.begin()  # no-op when already in use
        cs = img.cs
        size = img.virtual_size
        drops: list[tuple[int, int]] = []  # (offset, clusters) to free once unreferenced
        new_tables: dict[int, tuple[int, array[int]]] = {}  # item index -> (offset, table)
        for k, bm in enumerate(self.items):
            if bm.inconsistent or bm.chunks is None:
                continue
            want = table_size_for(size, bm.entry.granularity_bits, cs)
            same_table = want == bm.entry.table_size and len(bm.table) == want
            if not bm.changed and same_table:
                continue
            table = array("Q", bm.table[:want])
            if want > len(table):
                table.extend([0] * (want - len(table)))
            for i in range(want, len(bm.table)):
                off = bm.table[i] & ENTRY_OFFSET_MASK
                if off:
                    drops.append((off, 1))
            for i in range(want):
                buf = bm.chunks.get(i)
                off = table[i] & ENTRY_OFFSET_MASK
                if buf is None or buf.count(0) == len(buf):
                    if off:
                        drops.append((off, 1))
                    table[i] = 0
                    continue
                if not off:
                    off = img.refs.allocate(1)
                img.st.pwrite(off, bytes(buf))  # in place: the bitmap is in-use on disk
                table[i] = off
            new_tables[k] = (bm.entry.table_offset if same_table else 0, table)
        img.st.flush()  # data and raised refcounts before the tables that reference them
        moved = structural
        for k, (in_place, table) in new_tables.items():
            bm = self.items[k]
            raw = layout.encode_u64_table(table)
            if in_place:
                img.st.pwrite(in_place, raw)
                continue
            clusters = -(-len(raw) // cs)
            t_off = img.refs.allocate(clusters)
            img.st.pwrite(t_off, raw + bytes(clusters * cs - len(raw)))
            drops.append((bm.entry.table_offset, -(-bm.entry.table_size * 8 // cs)))
            new_tables[k] = (t_off, table)
            moved = True
        img.st.flush()  # tables before the directory says the bitmaps are consistent
        entries = []
        for k, bm in enumerate(self.items):
            e = attrs.evolve(bm.entry)
            if not bm.inconsistent and bm.chunks is not None:
                e.flags = FLAG_AUTO if bm.enabled else 0
            if k in new_tables:
                e.table_offset, e.table_size = new_tables[k][0], len(new_tables[k][1])
            entries.append(e)
        if moved:
            drops.extend(self._write_directory(entries))
        else:
            for e in entries:
                img.st.pwrite(e.flags_at, e.flags.to_bytes(4, "big"))
            img.st.flush()
        # memory follows the file only now
        for k, bm in enumerate(self.items):
            bm.entry = entries[k]
            if k in new_tables:
                bm.table = new_tables[k][1]
            bm.changed = False
        self.in_use = False
        for off, n in drops:
            if off and n and img.refs.get(off >> img.cb) > 0:
                img.refs.free(off, n)

    def _write_directory(self, entries: list[DirEntry]) -> list[tuple[int, int]]:
        """Write a new directory and header extension; return the old directory to free."""
        img = self.img
        cs = img.cs
        old = img.meta.bitmaps
        drops: list[tuple[int, int]] = []
        if old is not None and img.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS:
            drops.append((old[2], -(-old[1] // cs)))
        if entries:
            raw = b"".join(e.encode() for e in entries)
            if len(raw) > MAX_DIRECTORY:
                raise ImageError("the bitmap directory would be too large", path=img.path)
            clusters = -(-len(raw) // cs)
            doff = img.refs.allocate(clusters)
            pos = doff
            for e in entries:
                e.at = pos
                pos += len(e.encode())
            img.st.pwrite(doff, raw + bytes(clusters * cs - len(raw)))
            img.st.flush()
            write_extension(img, (len(entries), len(raw), doff))
        else:
            write_extension(img, None)
        return drops

    def resized(self, size: int) -> None:
        """The disk changed size: bits past the end go, the tables follow at the next store."""
        for bm in self.items:
            if bm.chunks is not None:
                self._trim(bm, size)
                bm.changed = True

    def info(self, bm: LiveBitmap) -> BitmapInfo:
        count = 0
        if not bm.inconsistent:
            per = self.img.cs * 8
            bits = sum(
                per if c is self.full else int.from_bytes(c, "little").bit_count()
                for c in self.load(bm).values()
            )
            count = bits * bm.granularity  # QEMU's count: whole granules, the last one too
        return BitmapInfo(
            name=bm.name,
            granularity=bm.granularity,
            enabled=bm.enabled,
            inconsistent=bm.inconsistent,
            count=count,
        )


def write_extension(img: Qcow2Image, value: tuple[int, int, int] | None) -> None:
    """Rewrite the header's extension area with a new bitmaps extension (None: drop it).

    The bitmaps autoclear bit is set with the extension and cleared without
    it; other extensions keep their order, the new one goes where QEMU puts
    it (after the feature table).
    """
    hdr = img.hdr
    exts = [e for e in img.meta.extensions if e.type != layout.EXT_BITMAPS]
    if value is not None:
        at = 0
        while at < len(exts) and exts[at].type in _BEFORE_BITMAPS:
            at += 1
        nb, dsize, doff = value
        payload = layout.BITMAPS_EXT.pack(nb, 0, dsize, doff)
        exts.insert(at, layout.Extension(layout.EXT_BITMAPS, payload))
    new = attrs.evolve(hdr)
    if value is None:
        new.autoclear_features &= ~layout.AUTOCLEAR_BITMAPS
    else:
        new.autoclear_features |= layout.AUTOCLEAR_BITMAPS
    head = bytearray(layout.encode_header(new)) + layout.encode_extensions(exts)
    name = (img.meta.backing_file or "").encode()
    new.backing_file_offset = len(head) if name else 0
    new.backing_file_size = len(name)
    head[: len(layout.encode_header(new))] = layout.encode_header(new)
    head += name
    if len(head) > img.cs:
        raise ImageError(
            "the header, its extensions and the backing file name do not fit in one cluster",
            path=img.path,
        )
    img.st.pwrite(0, bytes(head))
    img.st.flush()
    img.hdr = new
    img.meta.header = new
    img.meta.extensions = exts
    img.meta.bitmaps = value


# --- the image's side: hooks and public methods ---------------------------------------------
def tracker(img: Qcow2Image) -> Tracker | None:
    """The image's bitmap tracker, created on first use; None without bitmaps support.

    Raises:
        CorruptImageError: the directory is damaged.
    """
    got = img._bitmap_tracker
    live = bool(img.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS)
    if img.v3 and (got is None or (got.items and not live)):
        # (re)read: a dropped autoclear bit means the bitmaps are gone, as for QEMU
        got = img._bitmap_tracker = Tracker(img)
    return got


def begin_write(img: Qcow2Image) -> bool:
    """First change to guest data: flag the bitmaps in-use. False when they cannot be kept.

    A directory QEMU would refuse leaves the bitmaps unmaintained: the caller
    then clears the autoclear bit, as the specification asks.
    """
    try:
        t = tracker(img)
        if t is None or not t.items:
            return False
        t.begin()
    except CorruptImageError:
        return False  # a table or data cluster QEMU would refuse: the bitmaps are dropped
    return True


def before_write(img: Qcow2Image) -> None:
    """Every change to guest data: bitmaps stored by a flush are flagged in-use again first."""
    t = img._bitmap_tracker
    if t is not None and not t.in_use and img.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS:
        t.begin()


def mark(img: Qcow2Image, offset: int, length: int) -> None:
    """Guest bytes ``[offset, offset+length)`` are about to change: set their dirty bits."""
    if img.meta.bitmaps is None or not img.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS:
        return
    try:
        t = tracker(img)
    except CorruptImageError:
        return  # the write drops the extension (begin_write says so)
    if t is not None and t.items:
        try:
            t.mark(offset, length)
        except CorruptImageError:
            return  # unreadable bitmap data: the write drops the extension (begin_write)


def store(img: Qcow2Image) -> None:
    """flush()/close(): write the bitmaps back and leave them consistent."""
    t = img._bitmap_tracker
    if t is not None and t.in_use:
        img._run_write(t.store)


def check_resize(img: Qcow2Image) -> None:
    """Refuse a resize QEMU refuses: with an inconsistent bitmap (it cannot follow the size)."""
    if img.meta.bitmaps is None or not img.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS:
        return
    t = tracker(img)
    if t is None:
        return
    for bm in t.items:
        if bm.inconsistent:
            raise ImageError(
                f"cannot resize: bitmap {bm.name!r} is inconsistent (left in-use); remove it first",
                path=img.path,
            )


def check_revert(img: Qcow2Image) -> None:
    """Refuse a snapshot revert while the image has persistent bitmaps, as QEMU does.

    (``qemu-img snapshot -a``: "Device has active dirty bitmaps", even for
    disabled ones: a revert changes the disk behind every bitmap's back.)

    Raises:
        ImageError: the image has bitmaps.
    """
    if img.meta.bitmaps is None or not img.hdr.autoclear_features & layout.AUTOCLEAR_BITMAPS:
        return
    t = tracker(img)
    if t is not None and t.items:
        names = ", ".join(repr(bm.name) for bm in t.items)
        raise ImageError(
            f"cannot revert to a snapshot while the image has persistent dirty bitmaps "
            f"({names}); QEMU refuses too: remove them first",
            path=img.path,
        )


def resized(img: Qcow2Image) -> None:
    """After a resize: the bitmaps follow the new size."""
    t = img._bitmap_tracker
    if t is not None:
        t.resized(img.virtual_size)

"""Where a guest offset of a VHDX disk lives: the BAT and the sector bitmaps.

The block allocation table (BAT) has one 64-bit entry per payload block,
with one sector bitmap entry interleaved after every ``chunk_ratio`` payload
entries. A payload entry's low three bits give the block's state, bits 20-63
its file offset in MiB. In a differencing disk a *partially present* block
has a sector bitmap saying, sector by sector, whether the data is here or in
the parent.

The BAT is read in 64 KiB pages on demand (a bounded cache), so memory does
not follow the size the file declares. Every file offset taken from it is
checked against the file and the other structures before use.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Iterator
from typing import Literal

from virtkit.errors import CorruptImageError
from virtkit.images.storage import Storage
from virtkit.images.vhdx import layout as L
from virtkit.images.vhdx.metadata import VhdxMeta

__all__ = ["Mapper", "Run"]

RunKind = Literal["data", "zero", "unallocated"]
#: ``(guest offset, length, kind, file offset of the data or None)``
Run = tuple[int, int, RunKind, int | None]

_PAGE_ENTRIES = 8192
_MAX_PAGES = 64  # 4 MiB of BAT in memory at most
_ZERO_STATES = (L.PAYLOAD_ZERO, L.PAYLOAD_UNMAPPED, L.PAYLOAD_UNMAPPED_V095)
_ABSENT_STATES = (L.PAYLOAD_NOT_PRESENT, L.PAYLOAD_UNDEFINED)


class Mapper:
    """Answers "where does guest offset X live" for one VHDX file."""

    def __init__(self, st: Storage, meta: VhdxMeta) -> None:
        self.st = st
        self.meta = meta
        self.file_size = st.size()
        self._pages: dict[int, array.array[int]] = {}
        self._empty: dict[int, bool] = {}
        self._uniform: dict[int, int | None] = {}

    # -- the BAT ----------------------------------------------------------------
    def page(self, page: int) -> array.array[int]:
        """BAT page ``page`` (8192 entries, fewer at the end), from the cache or the file."""
        entries = self._pages.get(page)
        if entries is None:
            first = page * _PAGE_ENTRIES
            count = min(_PAGE_ENTRIES, self.meta.bat_count - first)
            raw = self.st.pread(self.meta.bat_offset + first * 8, count * 8)
            raw += bytes(count * 8 - len(raw))  # a BAT cut short by the file reads as absent
            entries = array.array("Q", raw)
            if sys.byteorder == "big":
                entries.byteswap()
            if len(self._pages) >= _MAX_PAGES:
                self._pages.pop(next(iter(self._pages)))
            self._pages[page] = entries
            self._empty[page] = not any(entries)
            self._uniform[page] = self._uniform_state(page, entries)
        return entries

    def _uniform_state(self, page: int, entries: array.array[int]) -> int | None:
        """The one state every payload entry of a page has, when none points into the file."""
        ratio = self.meta.chunk_ratio
        first = page * _PAGE_ENTRIES
        states = {e for i, e in enumerate(entries) if (first + i) % (ratio + 1) != ratio}
        if len(states) != 1:
            return None
        (value,) = states
        if value & L.OFFSET_MASK or value not in (*_ZERO_STATES, *_ABSENT_STATES):
            return None
        return value

    def page_empty(self, page: int) -> bool:
        """Whether every entry of BAT page ``page`` is zero (nothing allocated there)."""
        self.page(page)
        return self._empty[page]

    def page_uniform(self, page: int) -> int | None:
        """The state every payload block of BAT page ``page`` shares (zero or absent), or None."""
        self.page(page)
        return self._uniform[page]

    def nonzero_entries(self) -> Iterator[tuple[int, int]]:
        """``(index, entry)`` of every non-zero BAT entry, empty pages skipped whole."""
        for page in range(-(-self.meta.bat_count // _PAGE_ENTRIES)):
            if self.page_empty(page):
                continue
            for slot, entry in enumerate(self.page(page)):
                if entry:
                    yield page * _PAGE_ENTRIES + slot, entry

    def entry(self, index: int) -> int:
        """BAT entry ``index`` (payload or sector bitmap)."""
        if not 0 <= index < self.meta.bat_count:
            raise CorruptImageError(f"VHDX: BAT index {index} out of range", path=self.st.path)
        page, slot = divmod(index, _PAGE_ENTRIES)
        return self.page(page)[slot]

    def set_entry(self, index: int, value: int) -> None:
        """Write BAT entry ``index`` to the file, then to the cache."""
        self.st.pwrite(self.meta.bat_offset + index * 8, struct.pack("<Q", value))
        page, slot = divmod(index, _PAGE_ENTRIES)
        if page in self._pages:
            self._pages[page][slot] = value
            self._empty[page] = self._empty[page] and not value
            self._uniform[page] = self._uniform_state(page, self._pages[page])

    def payload_index(self, block: int) -> int:
        """BAT index of payload block ``block``."""
        return block + block // self.meta.chunk_ratio

    def _last_block_in_page(self, page: int) -> int:
        """The last payload block whose BAT entry is in ``page``."""
        ratio = self.meta.chunk_ratio
        limit = (page + 1) * _PAGE_ENTRIES  # first BAT index of the next page
        block = max(limit * ratio // (ratio + 1) - 2, 0)
        while self.payload_index(block + 1) < limit:
            block += 1
        return block

    def bitmap_index(self, block: int) -> int:
        """BAT index of the sector bitmap block covering payload block ``block``."""
        ratio = self.meta.chunk_ratio
        return block // ratio * (ratio + 1) + ratio

    def _offset(self, entry: int, index: int, length: int, what: str) -> int:
        off = entry & L.OFFSET_MASK
        where = self.meta.bat_offset + index * 8
        if off < L.MiB or off >= self.file_size:
            raise CorruptImageError(
                f"VHDX: BAT entry {index} puts a {what} at {off:#x}, outside the file "
                f"({self.file_size} bytes)",
                path=self.st.path,
                offset=where,
            )
        for start, end in self.meta.regions:
            if off < end and start < off + length:
                raise CorruptImageError(
                    f"VHDX: BAT entry {index} puts a {what} at {off:#x}, over the file's "
                    f"metadata at [{start:#x}, {end:#x})",
                    path=self.st.path,
                    offset=where,
                )
        return off

    def block(self, block: int) -> tuple[int, int | None]:
        """``(state, file offset or None)`` of payload block ``block``, validated."""
        index = self.payload_index(block)
        entry = self.entry(index)
        state = entry & L.STATE_MASK
        if state in (L.PAYLOAD_FULLY_PRESENT, L.PAYLOAD_PARTIALLY_PRESENT):
            if state == L.PAYLOAD_PARTIALLY_PRESENT and not self.meta.has_parent:
                raise CorruptImageError(
                    f"VHDX: block {block} is partially present in a disk without a parent",
                    path=self.st.path,
                    offset=self.meta.bat_offset + index * 8,
                )
            return state, self._offset(entry, index, self.meta.block_size, "payload block")
        if state in _ZERO_STATES or state in _ABSENT_STATES:
            return state, None
        raise CorruptImageError(
            f"VHDX: BAT entry {index} has the undefined block state {state}",
            path=self.st.path,
            offset=self.meta.bat_offset + index * 8,
        )

    def _bitmap(self, block: int, first: int, count: int) -> bytes:
        """Sector bitmap bits of sectors ``first`` to ``first+count`` of ``block``, one per byte."""
        index = self.bitmap_index(block)
        entry = self.entry(index)
        if entry & L.STATE_MASK != L.SB_PRESENT:
            raise CorruptImageError(
                f"VHDX: block {block} is partially present but its sector bitmap is not",
                path=self.st.path,
                offset=self.meta.bat_offset + index * 8,
            )
        base = self._offset(entry, index, L.MiB, "sector bitmap")
        spb = self.meta.block_size // self.meta.logical_sector
        bit0 = (block % self.meta.chunk_ratio) * spb + first
        raw = self.st.pread(base + bit0 // 8, (bit0 % 8 + count + 7) // 8)
        raw += bytes((bit0 % 8 + count + 7) // 8 - len(raw))
        bits = int.from_bytes(raw, "little") >> (bit0 % 8)
        return bytes((bits >> i) & 1 for i in range(count))

    # -- runs ---------------------------------------------------------------------
    def runs(self, offset: int, length: int) -> Iterator[Run]:
        """Yield the runs of ``[offset, offset+length)`` with one kind each (merged)."""
        cur: Run | None = None
        for piece in self._pieces(offset, length):
            if cur is not None:
                start, n, kind, host = cur
                nxt = piece[3]
                same = nxt is None if host is None else nxt == host + n
                if kind == piece[2] and same:
                    cur = (start, n + piece[1], kind, host)
                    continue
                yield cur
            cur = piece
        if cur is not None:
            yield cur

    def _pieces(self, offset: int, length: int) -> Iterator[Run]:
        bs = self.meta.block_size
        sector = self.meta.logical_sector
        pos = offset
        end = offset + length
        while pos < end:
            block, within = divmod(pos, bs)
            index = self.payload_index(block)
            uniform = self.page_uniform(index // _PAGE_ENTRIES)
            if uniform is not None:  # a page of blocks all zero or all absent, at once
                last = self._last_block_in_page(index // _PAGE_ENTRIES)
                n = min((last + 1) * bs - pos, end - pos)
                yield pos, n, "zero" if uniform in _ZERO_STATES else "unallocated", None
                pos += n
                continue
            n = min(bs - within, end - pos)
            state, host = self.block(block)
            if state == L.PAYLOAD_FULLY_PRESENT:
                assert host is not None
                yield pos, n, "data", host + within
            elif state == L.PAYLOAD_PARTIALLY_PRESENT:
                assert host is not None
                first = within // sector
                count = -(-(within + n) // sector) - first
                bits = self._bitmap(block, first, count)
                i = 0
                while i < count:
                    j = i
                    while j < count and bits[j] == bits[i]:
                        j += 1
                    a = max(pos, block * bs + (first + i) * sector)
                    b = min(pos + n, block * bs + (first + j) * sector)
                    if bits[i]:
                        yield a, b - a, "data", host + (a - block * bs)
                    else:
                        yield a, b - a, "unallocated", None
                    i = j
            elif state in _ZERO_STATES:
                yield pos, n, "zero", None
            else:
                yield pos, n, "unallocated", None
            pos += n

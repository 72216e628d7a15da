"""Where a guest offset of a VDI disk lives: the block map, read in bounded pages.

A VDI block map has one 32-bit entry per 1 MiB block. It is read on demand
in 64 KiB pages kept in a bounded cache, so memory does not follow the size
the header declares.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterator
from typing import Literal

from virtkit.images.storage import Storage
from virtkit.images.vdi import layout as L

__all__ = ["BlockMap", "Run"]

RunKind = Literal["data", "zero", "unallocated"]
#: ``(guest offset, length, kind, file offset of the data or None)``
Run = tuple[int, int, RunKind, int | None]

_PAGE = 16384  # entries per page (64 KiB)
_MAX_PAGES = 64  # 4 MiB of block map in memory at most


class BlockMap:
    """The block map of one VDI file (entries validated against the header by the caller)."""

    def __init__(self, st: Storage, offset: int, count: int, data_offset: int) -> None:
        self.st = st
        self.offset = offset
        self.count = count
        self.data_offset = data_offset
        self._pages: dict[int, array.array[int]] = {}
        self._empty: dict[int, bool] = {}

    def page(self, page: int) -> array.array[int]:
        """Block map page ``page`` (16384 entries, fewer at the end)."""
        entries = self._pages.get(page)
        if entries is None:
            first = page * _PAGE
            n = min(_PAGE, self.count - first)
            raw = self.st.pread(self.offset + first * 4, n * 4)
            raw += b"\xff" * (n * 4 - len(raw))
            entries = array.array("I", raw)
            if sys.byteorder == "big":
                entries.byteswap()
            if len(self._pages) >= _MAX_PAGES:
                self._pages.pop(next(iter(self._pages)))
            self._pages[page] = entries
            self._empty[page] = min(entries, default=L.UNALLOCATED) >= L.DISCARDED
        return entries

    def page_empty(self, page: int) -> bool:
        """Whether no block of map page ``page`` is allocated."""
        self.page(page)
        return self._empty[page]

    def entry(self, block: int) -> int:
        """The map entry of ``block``."""
        page, slot = divmod(block, _PAGE)
        return self.page(page)[slot]

    def allocated(self) -> Iterator[tuple[int, int]]:
        """``(block, entry)`` of every allocated block, empty pages skipped whole."""
        for page in range(-(-self.count // _PAGE)):
            if self.page_empty(page):
                continue
            for slot, e in enumerate(self.page(page)):
                if e < L.DISCARDED:
                    yield page * _PAGE + slot, e

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        """Yield merged runs of ``[offset, offset+length)``: data (with file offset) or not."""
        cur: Run | None = None
        pos, end = offset, offset + length
        while pos < end:
            block, within = divmod(pos, L.BLOCK_SIZE)
            piece: Run
            if self.page_empty(block // _PAGE):  # a whole page of unallocated blocks at once
                n = min((block // _PAGE + 1) * _PAGE * L.BLOCK_SIZE - pos, end - pos)
                e = L.UNALLOCATED
            else:
                n = min(L.BLOCK_SIZE - within, end - pos)
                e = self.entry(block)
            if e < L.DISCARDED:
                piece = (pos, n, "data", self.data_offset + e * L.BLOCK_SIZE + within)
            else:
                piece = (pos, n, "unallocated", None)
            pos += n
            if cur is not None:
                s, m, kind, host = cur
                nxt = piece[3]
                same = nxt is None if host is None else nxt == host + m
                if kind == piece[2] and same:
                    cur = (s, m + n, kind, host)
                    continue
                yield cur
            cur = piece
        if cur is not None:
            yield cur

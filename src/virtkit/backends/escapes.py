"""Terminal escape sequences removed from a byte stream that arrives in pieces.

Guests' shells and boot loaders colour their output and query the terminal
(busybox's line editor sends ``ESC [ 6 n`` to ask for the cursor position).
:class:`EscapeStripper` removes ECMA-48 sequences (CSI, OSC, DCS and the
other string controls, two-byte ``ESC x``; 8-bit C1 controls are left alone,
as UTF-8 terminals do) and keeps everything else,
carrying a sequence that is cut between two pieces over to the next one. It
also records where it removed bytes, so a position in the clean stream maps
back to a position in the raw one.
"""

from __future__ import annotations

import bisect

__all__ = ["EscapeStripper", "strip_escapes"]

ESC = 0x1B
_BEL = 0x07

# states of the scanner
_TEXT, _ESC, _CSI, _STRING, _STRING_ESC = range(5)
#: what follows ESC to open a string control: OSC ], DCS P, SOS X, PM ^, APC _
_STRING_OPENERS = frozenset(b"]PX^_")


class EscapeStripper:
    """Incremental escape-sequence remover with a clean -> raw position map."""

    def __init__(self) -> None:
        self._state = _TEXT
        self._raw = 0  # raw bytes consumed so far
        self._clean = 0  # clean bytes produced so far
        # clean position c maps to raw position c + shifts[i], where
        # clean_marks[i] is the last mark at or before c
        self._clean_marks: list[int] = [0]
        self._shifts: list[int] = [0]

    def feed(self, data: bytes) -> bytes:
        """Return ``data`` without escape sequences (state carries across calls)."""
        out = bytearray()
        state = self._state
        i, end = 0, len(data)
        while i < end:
            if state == _TEXT:
                stop = data.find(b"\x1b", i)
                stop = end if stop < 0 else stop
                if stop > i:  # plain text up to the next ESC, copied in one piece
                    clean = self._clean + len(out)
                    shift = self._raw + i - clean
                    if shift != self._shifts[-1]:
                        self._clean_marks.append(clean)
                        self._shifts.append(shift)
                    out += data[i:stop]
                if stop < end:
                    state = _ESC
                i = stop + 1
                continue
            byte = data[i]
            if state == _ESC:
                if byte == ord("["):
                    state = _CSI
                elif byte in _STRING_OPENERS:
                    state = _STRING
                elif not 0x20 <= byte <= 0x2F:
                    state = _TEXT  # the final byte of ESC x (intermediates 0x20-0x2F go on)
            elif state == _CSI:
                if 0x40 <= byte <= 0x7E:
                    state = _TEXT  # the final byte
                elif byte == ESC:
                    state = _ESC  # an aborted sequence
            elif state == _STRING:
                if byte == _BEL:
                    state = _TEXT
                elif byte == ESC:
                    state = _STRING_ESC
            else:  # _STRING_ESC: ESC \ ends the string
                state = _TEXT if byte == ord("\\") else _STRING
            i += 1
        self._state = state
        self._raw += len(data)
        self._clean += len(out)
        return bytes(out)

    def to_raw(self, clean_offset: int) -> int:
        """The raw-stream offset of clean-stream offset ``clean_offset``."""
        i = bisect.bisect_right(self._clean_marks, clean_offset) - 1
        return clean_offset + self._shifts[i]

    def to_clean(self, raw_offset: int) -> int:
        """The clean-stream offset of the first clean byte at or after ``raw_offset``."""
        # marks are monotonic in raw too (raw = clean + shift, shifts only grow)
        raws = [c + s for c, s in zip(self._clean_marks, self._shifts, strict=True)]
        i = bisect.bisect_right(raws, raw_offset) - 1
        clean = raw_offset - self._shifts[i]
        if i + 1 < len(raws):
            clean = min(clean, self._clean_marks[i + 1])
        return min(clean, self._clean)


def strip_escapes(data: bytes) -> bytes:
    """``data`` with terminal escape sequences removed (a complete piece of output)."""
    return EscapeStripper().feed(data)

"""The bzImage's decompressor, done on the host: the kernel as an ELF to load directly.

A bzImage carries the kernel proper (a stripped ``vmlinux`` ELF64) compressed
inside its protected-mode part; the setup header's ``payload_offset`` and
``payload_length`` (boot protocol 2.08) locate it. Running the decompressor
in the emulator is slow (on unicorn every store to a page that is also
executable takes the self-modifying-code path, and the decompressor's
identity map has no NX), so, as firecracker and cloud-hypervisor do, the
loader decompresses it here and enters the kernel proper at its 64-bit entry
``startup_64`` (see :func:`virtkit.backends.emulator.bootparams.load_linux`).

Formats: LZ4 (the kernel build's *legacy* frame: magic ``02 21 4C 18``, then
blocks of ``<u32 LE compressed size><LZ4 block>`` of at most 8 MiB each, and
the decompressed size as the payload's last four bytes), gzip and xz (the
standard library). Anything else returns None and the caller runs the
kernel's own decompressor. The kernel file is untrusted: every size, offset
and count is bounded and nonsense raises :class:`ConfigError`.

Results are cached in memory by the payload's digest, so a second boot of
the same kernel pays nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import lzma
import struct
import threading
import zlib
from collections import OrderedDict

import attrs
import lz4.block  # type: ignore[import-untyped]

from virtkit.errors import ConfigError

__all__ = ["Segment", "Vmlinux", "decompress_payload", "unpack"]

_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_BLOCK_MAX = 8 << 20  # the kernel's LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
#: the largest kernel image accepted (decompressed): far above any real kernel
MAX_KERNEL = 512 << 20
_PT_LOAD = 1
_EM_X86_64 = 62
_CACHE_ENTRIES = 2  # each holds a kernel image (tens of MiB)
_cache: OrderedDict[bytes, Vmlinux | None] = OrderedDict()
_cache_lock = threading.Lock()


def _bad(source: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: cannot unpack the kernel: {why}", field="kernel")


@attrs.frozen
class Segment:
    """One ``PT_LOAD`` segment: ``data`` at guest-physical ``address``, then zeros to ``memsz``."""

    address: int
    data: bytes = attrs.field(repr=False)
    memsz: int


@attrs.frozen
class Vmlinux:
    """The kernel proper: its loadable segments and its physical 64-bit entry point.

    Use :meth:`parse` (or :func:`unpack` from a bzImage payload).
    """

    entry: int
    segments: tuple[Segment, ...]

    @property
    def start(self) -> int:
        """The lowest physical address loaded."""
        return min(segment.address for segment in self.segments)

    @property
    def end(self) -> int:
        """One past the highest physical address loaded (bss included)."""
        return max(segment.address + segment.memsz for segment in self.segments)

    @classmethod
    def parse(cls, elf: bytes, *, source: str = "kernel") -> Vmlinux:
        """Check ``elf`` as an x86-64 executable and read its ``PT_LOAD`` segments.

        Raises:
            ConfigError: not an ELF64 x86-64 file, or headers or segments
                outside the file or the 4 GiB a kernel loads in, or the entry
                point in no segment.
        """
        if len(elf) < 64 or elf[:4] != b"\x7fELF":
            raise _bad(source, "the payload is not an ELF file")
        if elf[4] != 2 or elf[5] != 1:
            raise _bad(source, "the ELF file is not 64-bit little-endian")
        (machine,) = struct.unpack_from("<H", elf, 0x12)
        if machine != _EM_X86_64:
            raise _bad(source, f"the ELF machine is {machine}, not x86-64 ({_EM_X86_64})")
        (entry, phoff) = struct.unpack_from("<QQ", elf, 0x18)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        if phentsize < 56 or not 0 < phnum <= 64:
            raise _bad(source, f"{phnum} program headers of {phentsize} bytes")
        if phoff + phnum * phentsize > len(elf):
            raise _bad(
                source,
                f"program headers at {phoff:#x} ({phnum} x {phentsize}) pass the end of "
                f"the {len(elf)}-byte file",
            )
        segments = []
        for index in range(phnum):
            kind, _flags, offset, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
                "<IIQQQQQQ", elf, phoff + index * phentsize
            )
            if kind != _PT_LOAD or memsz == 0:
                continue
            where = f"segment {index}"
            if filesz > memsz:
                raise _bad(source, f"{where}: file size {filesz} exceeds memory size {memsz}")
            if offset + filesz > len(elf):
                raise _bad(
                    source, f"{where}: bytes {offset:#x}+{filesz:#x} pass the end of the file"
                )
            if paddr < 0x100000 or paddr + memsz > 1 << 32:
                raise _bad(
                    source,
                    f"{where}: physical range {paddr:#x}+{memsz:#x} is not between 1 MiB and 4 GiB",
                )
            segments.append(Segment(paddr, bytes(elf[offset : offset + filesz]), memsz))
        if not segments:
            raise _bad(source, "the ELF file has no loadable segment")
        ordered = sorted(segments, key=lambda segment: segment.address)
        for before, after in itertools.pairwise(ordered):
            if before.address + before.memsz > after.address:
                raise _bad(
                    source, f"segments at {before.address:#x} and {after.address:#x} overlap"
                )
        if not any(s.address <= entry < s.address + len(s.data) for s in ordered):
            raise _bad(source, f"the entry point {entry:#x} is in no loaded segment")
        return cls(entry=entry, segments=tuple(ordered))


def _lz4_legacy(payload: bytes, source: str) -> bytes:
    if len(payload) < 8:
        raise _bad(source, "the LZ4 payload is truncated")
    (expected,) = struct.unpack_from("<I", payload, len(payload) - 4)
    if not 0 < expected <= MAX_KERNEL:
        raise _bad(source, f"the LZ4 payload claims {expected} decompressed bytes")
    out = bytearray()
    offset = 4
    end = len(payload) - 4
    while offset < end:
        if payload[offset : offset + 4] == _LZ4_LEGACY_MAGIC:  # concatenated frames
            offset += 4
            continue
        if offset + 4 > end:
            raise _bad(source, f"an LZ4 block header at {offset:#x} is cut off")
        (size,) = struct.unpack_from("<I", payload, offset)
        offset += 4
        if size == 0 or offset + size > end:
            raise _bad(
                source,
                f"an LZ4 block of {size} bytes at {offset - 4:#x} passes the payload's end "
                f"({end:#x})",
            )
        try:
            block = lz4.block.decompress(
                payload[offset : offset + size], uncompressed_size=_LZ4_BLOCK_MAX
            )
        except lz4.block.LZ4BlockError as exc:
            raise _bad(source, f"the LZ4 block at {offset - 4:#x} is corrupt ({exc})") from exc
        out += block
        offset += size
        if len(out) > expected:
            break
    if len(out) != expected:
        raise _bad(
            source,
            f"the LZ4 payload decompressed to {len(out)} bytes, its trailer says {expected}",
        )
    return bytes(out)


def decompress_payload(payload: bytes, *, source: str = "kernel") -> bytes | None:
    """Decompress a bzImage payload; None for a compression not handled here.

    Raises:
        ConfigError: a handled format whose data is corrupt or larger than
            :data:`MAX_KERNEL`.
    """
    if payload.startswith(_LZ4_LEGACY_MAGIC):
        return _lz4_legacy(payload, source)
    try:
        if payload.startswith(_GZIP_MAGIC):
            # the kernel appends its decompressed size; gzip.decompress stops at the member
            unpacker = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            data = unpacker.decompress(payload, MAX_KERNEL + 1)
        elif payload.startswith(_XZ_MAGIC):
            xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            data = xz.decompress(payload, max_length=MAX_KERNEL + 1)
        else:
            return None
    except (zlib.error, lzma.LZMAError, gzip.BadGzipFile, EOFError) as exc:
        raise _bad(source, f"the compressed payload is corrupt ({exc})") from exc
    if len(data) > MAX_KERNEL:
        raise _bad(source, f"the payload decompresses to more than {MAX_KERNEL} bytes")
    return data


def unpack(payload: bytes, *, source: str = "kernel") -> Vmlinux | None:
    """The kernel proper from a bzImage's compressed payload (cached by its digest).

    None if the compression is not one handled here (the caller then runs
    the kernel's own decompressor).

    Raises:
        ConfigError: the payload or the ELF inside it is corrupt.
    """
    key = hashlib.blake2b(payload, digest_size=20).digest()
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    elf = decompress_payload(payload, source=source)
    result = None if elf is None else Vmlinux.parse(elf, source=source)
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return result

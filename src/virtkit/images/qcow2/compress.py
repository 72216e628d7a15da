"""Compressed cluster codecs: zlib (raw deflate, QEMU's default) and zstd.

QEMU stores a compressed cluster as a raw deflate stream (window bits -12) or
one zstd frame; the stored bytes may be followed by padding or the next
cluster's data, so decompression stops once a whole cluster came out.
Python 3.11 has no zstd in its standard library: ``backports.zstd`` provides
the API that becomes ``compression.zstd`` in 3.14.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

from virtkit.errors import CorruptImageError, UnsupportedFeatureError
from virtkit.images.qcow2 import layout

__all__ = ["compress", "decompress"]


def _zstd() -> Any:
    try:
        if sys.version_info >= (3, 14):
            import compression.zstd as mod  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional by Python version
        else:
            from backports import zstd as mod  # noqa: PLC0415 - imported only when zstd is used
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedFeatureError(
            "zstd compressed images need the backports.zstd package (pip install backports.zstd)",
            feature="compression type zstd",
        ) from exc
    return mod


def decompress(ctype: int, data: bytes, cluster_size: int, *, path: str, offset: int) -> bytes:
    """Decompress one cluster; the result is exactly ``cluster_size`` bytes.

    Raises:
        CorruptImageError: the stream is damaged or yields less than a cluster.
    """
    try:
        if ctype == layout.COMPRESSION_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        else:
            out = _zstd().ZstdDecompressor().decompress(data, max_length=cluster_size)
    except (zlib.error, EOFError, ValueError) as exc:
        raise CorruptImageError(
            f"compressed cluster does not decompress: {exc}", path=path, offset=offset
        ) from exc
    except Exception as exc:  # zstd raises its own ZstdError
        if type(exc).__name__ == "ZstdError":
            raise CorruptImageError(
                f"compressed cluster does not decompress: {exc}", path=path, offset=offset
            ) from exc
        raise
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}",
            path=path,
            offset=offset,
        )
    return bytes(out)


def compress(ctype: int, data: bytes) -> bytes:
    """Compress one cluster the way QEMU does."""
    if ctype == layout.COMPRESSION_ZLIB:
        co = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return co.compress(data) + co.flush()
    result: bytes = _zstd().compress(data)
    return result

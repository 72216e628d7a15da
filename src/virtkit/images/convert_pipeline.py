"""The copy loop of :func:`virtkit.images.convert`, as a bounded pipeline of threads.

Three stages overlap, as ``qemu-img convert`` overlaps its coroutines:

1. a *reader* thread walks the source's allocation (``block_status``) and
   reads the data in chunks of :data:`CHUNK` bytes, ahead of the writer;
2. for compressed output, a pool of *compressor* threads (one per core by
   default) compresses the clusters of each chunk: zlib and zstd release the
   GIL while they work, so both cores compress at once;
3. the calling thread *writes*, strictly in guest-offset order.

Because the writer stores the chunks in order, with exactly the bytes the
sequential path would compute, the output file is byte-identical to a
sequential convert and the same on every run, whatever the thread timing.

Memory is bounded by the pipeline depth: at most ``depth`` chunks are read
but not yet written (each with, for compressed output, its compressed
clusters, never bigger than the chunk itself), so a convert holds at most
``depth * 2 * CHUNK`` bytes of data (:func:`memory_bound`), 20 MiB by
default, however large the image. The destination's own metadata caches are
bounded separately (the qcow2 write-back cache: 16 MiB of dirty L2 tables).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from virtkit.images.base import Image

__all__ = ["CHUNK", "copy_compressed", "copy_plain", "default_workers", "memory_bound"]

#: Bytes read, compressed and written as one unit of the pipeline.
CHUNK = 2 << 20

Progress = Callable[[int, int], None]
#: (offset, data) of a chunk to write, or (end, None) for a range that needs no write.
Item = tuple[int, bytes | None]


def default_workers() -> int:
    """Compressor threads: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _depth(workers: int) -> int:
    return 2 * workers + 1


def memory_bound(workers: int | None = None) -> int:
    """Most bytes of image data the pipeline holds at once (read, compressed, unwritten)."""
    return _depth(workers or default_workers()) * 2 * CHUNK


def _is_zero(data: bytes | memoryview) -> bool:
    return not any(data) if len(data) < 64 else data == bytes(len(data))


def _extents(src: Image, granule: int, *, whole: bool) -> Iterator[Item]:
    """What the reader produces: data chunks split at ``granule`` multiples, skipped ranges.

    ``whole``: chunks cover whole granules (compressed clusters), so a data
    extent is widened to its clusters; chunks still never overlap and offsets
    only grow. Otherwise chunks cover exactly the data extents.
    """
    total = src.virtual_size
    step = max(CHUNK // granule, 1) * granule
    done = 0  # end of the last data chunk (granule aligned, or the disk end, when whole)
    for extent in src.block_status(0, total, include_backing=True):
        end = extent.start + extent.length
        if extent.kind != "data":
            if end > done:
                yield end, None
            continue
        if whole:
            pos = max(extent.start // granule * granule, done)
            stop_all = min(-(-end // granule) * granule, total)
        else:
            pos, stop_all = extent.start, end
        while pos < stop_all:
            nxt = min((pos // step + 1) * step, stop_all)
            yield pos, src.read(pos, nxt - pos)
            pos = nxt
        done = max(done, stop_all)


class _Reader:
    """Runs :func:`_extents` on a thread, at most ``depth`` items ahead of the consumer."""

    _DONE = object()

    def __init__(self, src: Image, granule: int, depth: int, *, whole: bool) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(src, granule, whole), name="virtkit-convert-reader", daemon=True
        )
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, src: Image, granule: int, whole: bool) -> None:
        try:
            for item in _extents(src, granule, whole=whole):
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[Item]:
        while True:
            item = self._q.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (after a failure downstream) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._q.get(timeout=0.1)
        self._thread.join()


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _nonzero_runs(data: bytes, granule: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` runs of ``data`` whose ``granule``-sized pieces are not all zero."""
    if data == bytes(len(data)):
        return
    zero = bytes(granule)
    run_start: int | None = None
    n = len(data)
    for pos in range(0, n, granule):
        piece = data[pos : pos + granule]
        if piece == zero[: len(piece)]:
            if run_start is not None:
                yield run_start, pos
                run_start = None
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        yield run_start, n


def copy_plain(src: Image, out: Image, granule: int, progress: Progress | None) -> None:
    """Copy every non-zero ``granule`` of ``src`` into ``out``, reading ahead on a thread."""
    total = src.virtual_size
    reader = _Reader(src, granule, _depth(default_workers()), whole=False)
    done = 0
    try:
        _report(progress, 0, total)
        for pos, data in reader:
            if data is None:
                done = pos
            else:
                for a, b in _nonzero_runs(data, granule):
                    out.write(pos + a, data[a:b] if (a, b) != (0, len(data)) else data)
                done = pos + len(data)
            _report(progress, done, total)
    finally:
        reader.close()
    if done != total:
        _report(progress, total, total)


def _compress_chunk(
    pos: int, data: bytes, cluster: int, compress: Callable[[bytes], bytes]
) -> list[tuple[int, bytes, bytes]]:
    """``(offset, cluster data, compressed)`` of each non-zero cluster in a chunk.

    The short last cluster of a disk whose size is no multiple of the cluster
    is compressed zero-padded, as QEMU does.
    """
    out: list[tuple[int, bytes, bytes]] = []
    for at in range(0, len(data), cluster):
        piece = data[at : at + cluster]
        if not _is_zero(piece):
            out.append((pos + at, piece, compress(piece)))
    return out


def copy_compressed(
    src: Image, out: Any, progress: Progress | None, *, workers: int | None = None
) -> None:
    """Write each non-zero cluster of ``src`` into qcow2 ``out`` compressed, on all cores.

    ``out`` must offer ``compress_cluster(data) -> bytes`` (thread-safe, no
    I/O) and ``write_precompressed(offset, data, compressed)``.
    """
    total = src.virtual_size
    cluster = out.cluster_size
    n = workers or default_workers()
    depth = _depth(n)
    reader = _Reader(src, cluster, depth, whole=True)
    pending: deque[tuple[int, Future[list[tuple[int, bytes, bytes]]] | None]] = deque()
    done = 0
    _report(progress, 0, total)

    def drain_one() -> None:
        nonlocal done
        end, fut = pending.popleft()
        if fut is not None:
            for offset, piece, comp in fut.result():
                out.write_precompressed(offset, piece, comp)
        done = end
        _report(progress, done, total)

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="virtkit-compress") as pool:
        try:
            for pos, data in reader:
                if data is None:
                    pending.append((pos, None))
                else:
                    job = pool.submit(_compress_chunk, pos, data, cluster, out.compress_cluster)
                    pending.append((pos + len(data), job))
                while len(pending) >= depth:
                    drain_one()
            while pending:
                drain_one()
        finally:
            reader.close()
            for _end, fut in pending:
                if fut is not None:
                    fut.cancel()
    if done != total:
        _report(progress, total, total)

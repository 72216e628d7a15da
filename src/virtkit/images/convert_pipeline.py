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

A raw file source is read with ``os.preadv`` into a small pool of reused
buffers (no fresh allocation, and no page faults, per chunk); other sources
through ``Image.read``. Zero clusters are found by comparing in place.

Memory is bounded by the pipeline depth (``depth = 2 x workers + 1``): at
most ``depth + 2`` read buffers of :data:`CHUNK` bytes, and for compressed
output the compressed clusters of at most ``depth`` chunks (never bigger
than the chunks), so a convert holds at most ``(2 x depth + 2) x CHUNK``
bytes of data (:func:`memory_bound`), 24 MiB on two cores, however large
the image. The destination's own metadata is bounded separately (a new
qcow2 target filled by :class:`~virtkit.images.qcow2.bulk.BulkWriter`: one
L2 table and a few refcount blocks; otherwise the qcow2 write-back cache,
16 MiB of dirty L2 tables).
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

from virtkit.errors import ImageError
from virtkit.images.base import Image
from virtkit.images.storage import FileStorage

__all__ = [
    "CHUNK",
    "copy_clusters",
    "copy_compressed",
    "copy_plain",
    "default_workers",
    "memory_bound",
]

#: Bytes read, compressed and written as one unit of the pipeline.
CHUNK = 2 << 20

Progress = Callable[[int, int], None]
#: (offset, buffer, length) of a chunk whose data is ``buffer[:length]``, or
#: (end, None, 0) for a range up to ``end`` that needs no write.
Item = tuple[int, bytes | bytearray | None, int]


def default_workers() -> int:
    """Compressor threads: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _depth(workers: int) -> int:
    return 2 * workers + 1


def _buffers(depth: int) -> int:
    """Chunks out at once: the reader's queue (``depth``), one being read, one spare."""
    return depth + 2


def memory_bound(workers: int | None = None) -> int:
    """Most bytes of image data the pipeline holds at once (read, compressed, unwritten).

    ``depth + 2`` read buffers of :data:`CHUNK` bytes, and the compressed
    clusters of at most ``depth`` chunks (never bigger than the chunks).
    """
    depth = _depth(workers or default_workers())
    return (_buffers(depth) + depth) * CHUNK


_ZERO = bytes(CHUNK)
_ZERO_VIEW = memoryview(_ZERO)


def _zero(buf: bytes | bytearray, start: int, end: int) -> bool:
    """Whether ``buf[start:end]`` is all zero bytes (compared in place: no copy of either)."""
    return buf.startswith(_ZERO_VIEW[: end - start], start, end)


def _plan(src: Image, granule: int, *, whole: bool) -> Iterator[tuple[int, int, bool]]:
    """The reads to make: ``(start, end, is_data)`` chunks split at ``granule`` multiples.

    ``whole``: chunks cover whole granules (clusters of a qcow2 target), so a
    data extent is widened to its clusters; chunks still never overlap and
    offsets only grow. Otherwise chunks cover exactly the data extents.
    A range that needs no read comes as ``(done, end, False)``.
    """
    total = src.virtual_size
    step = max(CHUNK // granule, 1) * granule
    done = 0  # end of the last data chunk (granule aligned, or the disk end, when whole)
    for extent in src.block_status(0, total, include_backing=True):
        end = extent.start + extent.length
        if extent.kind != "data":
            if end > done:
                yield done, end, False
            continue
        if whole:
            pos = max(extent.start // granule * granule, done)
            stop_all = min(-(-end // granule) * granule, total)
        else:
            pos, stop_all = extent.start, end
        while pos < stop_all:
            nxt = min((pos // step + 1) * step, stop_all)
            yield pos, nxt, True
            pos = nxt
        done = max(done, stop_all)


def _file_reader(src: Image) -> Callable[[bytearray, int, int], None] | None:
    """A way to read a raw file source straight into a buffer, or None (use ``src.read``).

    A raw image's bytes are its file's bytes: ``os.preadv`` into a reused
    buffer spares a fresh allocation (and its page faults) per chunk.
    """
    if src.format != "raw":
        return None
    st = getattr(src, "_st", None)  # the raw driver's storage (a test checks this path is taken)
    fd = st.fd if isinstance(st, FileStorage) else None
    if fd is None:
        return None
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(buf: bytearray, pos: int, n: int) -> None:
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                k = os.preadv(fd, [view[got:n]], pos + got)
                if k <= 0:  # the file shrank under us: the missing tail reads as zeroes
                    view[got:n] = _ZERO[: n - got]
                    break
                got += k
        except OSError as exc:
            raise ImageError(f"read failed: {exc.strerror}", path=src.path, offset=pos) from exc
        finally:
            view.release()

    return read


class _Reader:
    """Reads the source on a thread, at most ``depth`` chunks ahead of the consumer.

    At most ``depth + 2`` chunks are read and not yet handed back: the
    consumer returns each with :meth:`release` once it no longer needs the
    bytes. Chunks of a raw file source are read into reused buffers.
    """

    _DONE = object()

    def __init__(self, src: Image, granule: int, depth: int, *, whole: bool) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._slots = threading.Semaphore(_buffers(depth))  # chunks read, not yet released
        self._read_into = _file_reader(src)
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

    def _slot(self) -> bool:
        """Wait until fewer than ``depth + 2`` chunks are out; False once stopped."""
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def _buffer(self) -> bytearray:
        """A read buffer: a released one, else a new one (the slots bound how many exist)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return bytearray(CHUNK)

    def _run(self, src: Image, granule: int, whole: bool) -> None:
        try:
            for start, end, is_data in _plan(src, granule, whole=whole):
                item: Item
                if not is_data:
                    item = (end, None, 0)
                elif not self._slot():
                    return
                elif self._read_into is None:
                    item = (start, src.read(start, end - start), end - start)
                else:
                    buf = self._buffer()
                    self._read_into(buf, start, end - start)
                    item = (start, buf, end - start)
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

    def release(self, buf: bytes | bytearray | None) -> None:
        """Hand a chunk back: its slot frees, and a read buffer is reused."""
        if buf is None:
            return
        if isinstance(buf, bytearray):
            self._free.put(buf)
        self._slots.release()

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


def _nonzero_runs(buf: bytes | bytearray, n: int, granule: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` runs of ``buf[:n]`` whose ``granule``-sized pieces are not all zero."""
    if _zero(buf, 0, n):
        return
    run_start: int | None = None
    for pos in range(0, n, granule):
        if _zero(buf, pos, min(pos + granule, n)):
            if run_start is not None:
                yield run_start, pos
                run_start = None
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        yield run_start, n


def copy_plain(src: Image, out: Image, granule: int, progress: Progress | None) -> None:
    """Copy every non-zero ``granule`` of ``src`` into ``out``, reading ahead on a thread."""
    _copy_nonzero(src, granule, False, out.write, progress)


def copy_clusters(src: Image, out: Any, progress: Progress | None) -> None:
    """Write every non-zero cluster of ``src`` into a new qcow2 image, in guest order.

    ``out`` is a :class:`~virtkit.images.qcow2.bulk.BulkWriter`: reads are
    widened to whole clusters (a qcow2 target allocates clusters, so a cluster
    with any data is stored whole, as qemu-img stores it) and each run of
    non-zero clusters goes out in one write.
    """
    _copy_nonzero(src, out.cluster_size, True, out.write_clusters, progress)


def _copy_nonzero(
    src: Image,
    granule: int,
    whole: bool,
    write: Callable[[int, memoryview], None],
    progress: Progress | None,
) -> None:
    """Read ``src`` ahead on a thread and ``write`` each run of non-zero ``granule`` s."""
    total = src.virtual_size
    reader = _Reader(src, granule, _depth(default_workers()), whole=whole)
    done = 0
    try:
        _report(progress, 0, total)
        for pos, data, n in reader:
            if data is None:
                done = pos
            else:
                with memoryview(data) as view:
                    for a, b in _nonzero_runs(data, n, granule):
                        write(pos + a, view[a:b])
                reader.release(data)
                done = pos + n
            _report(progress, done, total)
    finally:
        reader.close()
    if done != total:
        _report(progress, total, total)


def _compress_chunk(
    pos: int, data: bytes | bytearray, n: int, cluster: int, compress: Callable[[bytes], bytes]
) -> list[tuple[int, bytes, bytes]]:
    """``(offset, cluster data, compressed)`` of each non-zero cluster in ``data[:n]``.

    The short last cluster of a disk whose size is no multiple of the cluster
    is compressed zero-padded, as QEMU does.
    """
    out: list[tuple[int, bytes, bytes]] = []
    with memoryview(data) as view:
        for at in range(0, n, cluster):
            end = min(at + cluster, n)
            if not _zero(data, at, end):
                piece = bytes(view[at:end])
                out.append((pos + at, piece, compress(piece)))
    return out


def copy_compressed(
    src: Image, out: Any, progress: Progress | None, *, workers: int | None = None
) -> None:
    """Write each non-zero cluster of ``src`` into qcow2 ``out`` compressed, on all cores.

    ``out`` must offer ``compress_cluster(data) -> bytes`` (thread-safe, no
    I/O) and ``write_precompressed(offset, data, compressed)``: a
    :class:`~virtkit.images.qcow2.bulk.BulkWriter` or a
    :class:`~virtkit.images.qcow2.Qcow2Image`.
    """
    total = src.virtual_size
    cluster = out.cluster_size
    n_workers = workers or default_workers()
    depth = _depth(n_workers)
    reader = _Reader(src, cluster, depth, whole=True)
    Job = Future[list[tuple[int, bytes, bytes]]]
    pending: deque[tuple[int, Job | None, bytes | bytearray | None]] = deque()
    done = 0
    _report(progress, 0, total)

    def drain_one() -> None:
        nonlocal done
        end, fut, data = pending.popleft()
        if fut is not None:
            for offset, piece, comp in fut.result():
                out.write_precompressed(offset, piece, comp)
            reader.release(data)
        done = end
        _report(progress, done, total)

    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="virtkit-compress") as pool:
        try:
            for pos, data, n in reader:
                if data is None:
                    pending.append((pos, None, None))
                else:
                    job = pool.submit(_compress_chunk, pos, data, n, cluster, out.compress_cluster)
                    pending.append((pos + n, job, data))
                while len(pending) >= depth:
                    drain_one()
            while pending:
                drain_one()
        finally:
            reader.close()
            for _end, fut, _data in pending:
                if fut is not None:
                    fut.cancel()
    if done != total:
        _report(progress, total, total)

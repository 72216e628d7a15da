"""Hypothesis: random qcow2 operation sequences behave like a bytearray and stay qemu-img clean."""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtkit import images
from virtkit.errors import ImageError

QemuImg = Callable[..., subprocess.CompletedProcess[str]]
SIZE = 256 * 1024

_offsets = st.integers(0, SIZE - 1)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _offsets, st.integers(1, 40_000), st.integers(0, 255)),
        st.tuples(st.just("zero"), _offsets, st.integers(1, 80_000), st.just(0)),
        st.tuples(st.just("discard"), _offsets, st.integers(1, 80_000), st.just(0)),
        st.tuples(
            st.just("compress"), st.integers(0, SIZE // 16384 - 1), st.just(0), st.integers(0, 255)
        ),
        st.tuples(st.just("snapshot"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("revert"), st.integers(0, 3), st.just(0), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 3), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)
_caches = st.sampled_from(["writeback", "writethrough", "writeback-tiny"])
_variants = st.sampled_from(
    [
        {"cluster_size": 16384},
        {"cluster_size": 16384, "compat": "0.10"},
        {"cluster_size": 16384, "extended_l2": True},
        {"cluster_size": 16384, "refcount_bits": 2},
        {"cluster_size": 16384, "backing": "qcow2"},
        {"cluster_size": 16384, "backing": "raw", "compat": "0.10"},
        {"cluster_size": 16384, "backing": "raw", "extended_l2": True},
    ]
)
#: Backing files are shorter than the overlay (reads past their end are zeroes).
BASE_SIZE = SIZE - 40960


def _apply(
    img: Any, model: bytearray, snaps: dict[str, bytes], op: tuple[Any, ...], base: bytes
) -> None:
    kind, a, b, c = op
    cs = img.cluster_size
    if kind == "write":
        n = min(b, SIZE - a)
        data = bytes([c]) * n
        img.write(a, data)
        model[a : a + n] = data
    elif kind == "zero":
        n = min(b, SIZE - a)
        img.write_zeroes(a, n)
        model[a : a + n] = bytes(n)
    elif kind == "discard":
        n = min(b, SIZE - a)
        img.discard(a, n)
        first = -(-a // cs) * cs
        last = (a + n) // cs * cs
        if last > first:  # whole clusters read as zeroes; on v2 the backing file shows again
            v2_backing = img.backing_file is not None and not img.v3
            model[first:last] = base[first:last] if v2_backing else bytes(last - first)
    elif kind == "compress":
        off = a * cs
        data = bytes([c, c ^ 1]) * (cs // 2)
        img.write_compressed(off, data)
        model[off : off + cs] = data
    elif kind == "snapshot":
        name = next(f"s{i}" for i in range(5) if f"s{i}" not in snaps)  # unique among live ones
        if len(snaps) < 4:
            try:
                img.create_snapshot(name)
            except ImageError as exc:  # narrow refcounts: clusters already shared too often
                if "overflow" not in str(exc):
                    raise
                return
            snaps[name] = bytes(model)
    elif kind in ("revert", "delete") and snaps:
        name = sorted(snaps)[a % len(snaps)]
        if kind == "revert":
            try:
                img.revert_snapshot(name)
            except ImageError as exc:  # narrow refcounts: both trees counted at once
                if "overflow" not in str(exc):
                    raise
                return
            model[:] = snaps[name]
        else:
            img.delete_snapshot(name)
            del snaps[name]


class TestModel:
    """The image always reads like the model; qemu-img always finds it clean."""

    @settings(
        max_examples=int(os.environ.get("VIRTKIT_QCOW2_EXAMPLES", "40")),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(ops=_ops, variant=_variants, cache=_caches)
    def test_random_sequences(
        self, qemu_img: QemuImg, ops: list[tuple[Any, ...]], variant: dict[str, Any], cache: str
    ) -> None:
        """Writes, zeroes, discards, compressed writes and snapshots match a bytearray.

        In each cache mode: writethrough, writeback, and writeback with a dirty
        set of one table (a write-back after nearly every request).
        """
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.qcow2"
            opts = dict(variant)
            cs = opts.pop("cluster_size")
            base = bytes(SIZE)
            fmt = opts.pop("backing", None)
            if fmt is not None:
                content = random.Random(len(ops)).randbytes(BASE_SIZE)
                base_path = Path(tmp) / f"base.{fmt}"
                if fmt == "raw":
                    base_path.write_bytes(content)
                else:
                    with images.create(base_path, BASE_SIZE, cluster_size=4096) as b:
                        b.write(0, content)
                base = content + bytes(SIZE - BASE_SIZE)
                opts.update(backing=base_path.name, backing_format=fmt)
            model = bytearray(base)
            snaps: dict[str, bytes] = {}
            images.create(path, SIZE, cluster_size=cs, **opts).close()
            mode = "writethrough" if cache == "writethrough" else "writeback"
            with images.open(path, writable=True, cache=mode) as img:  # type: ignore[arg-type]
                if cache == "writeback-tiny":
                    img.metadata_cache._limit = 1  # type: ignore[attr-defined]
                assert img.read(0, SIZE) == model
                for op in ops:
                    _apply(img, model, snaps, op, base)
                    assert img.read(0, SIZE) == model, op
                for name, content in snaps.items():
                    assert img.read_snapshot(name, 0, SIZE) == content  # type: ignore[attr-defined]
                result = img.check()
                assert result.ok, result.problems
            qemu_img("check", path)
            raw = Path(tmp) / "m.raw"
            raw.write_bytes(model)
            qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw)

#!/usr/bin/env python3
"""Structure-aware mutation fuzzing of the image readers (qcow2, vmdk, vpc).

Seeds are valid images made by the real ``qemu-img`` (v2 and v3, compressed,
with snapshots, extended L2, 1-bit refcounts, small clusters, a backing file).
Each input is a seed with a few *structure-aware* mutations: a header field,
an L1/L2/refcount table or block entry, a snapshot table field or a header
extension field is set to an interesting value (0, all ones, 2^31, just past
the end of the file, an unaligned neighbour, the offset of another table...),
or a byte in the header cluster is flipped. Each input is then opened and
exercised (info, snapshots, block_status, a full read, check) and must either
work or raise a :class:`virtkit.VirtkitError` subclass, within a time and
memory bound. Anything else (IndexError, struct.error, MemoryError, a hang) is
a *failure*; distinct failures (by exception type and raising line) are
counted and their inputs saved for regression tests.

Usage::

    .venv/bin/python scripts/fuzz_images.py --seconds 600 --out fuzz-out
    .venv/bin/python scripts/fuzz_images.py --atheris -max_total_time=600   # pip install atheris

The short bounded variant runs in ``tests/images/test_malformed.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import virtkit
import virtkit.images
from virtkit.images.storage import FileStorage
from virtkit.images.vhdx import metadata as vhdx_metadata
from virtkit.images.vhdx.crc import crc32c

#: Header fields: (name, offset, struct code).
HEADER_FIELDS: list[tuple[str, int, str]] = [
    ("magic", 0, ">I"),
    ("version", 4, ">I"),
    ("backing_file_offset", 8, ">Q"),
    ("backing_file_size", 16, ">I"),
    ("cluster_bits", 20, ">I"),
    ("size", 24, ">Q"),
    ("crypt_method", 32, ">I"),
    ("l1_size", 36, ">I"),
    ("l1_table_offset", 40, ">Q"),
    ("refcount_table_offset", 48, ">Q"),
    ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"),
    ("snapshots_offset", 64, ">Q"),
    ("incompatible_features", 72, ">Q"),
    ("compatible_features", 80, ">Q"),
    ("autoclear_features", 88, ">Q"),
    ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
]

#: Formats whose inputs :func:`exercise` also writes to (the others virtkit only reads).
WRITE_FORMATS = {"qcow2"}

#: Disks up to this size are read whole; of bigger ones, only data extents up to this much.
READ_ALL = 64 << 20

#: Per-input limits.
TIME_LIMIT_S = 20
MEMORY_LIMIT = 96 << 20


class Hang(Exception):
    """An input took longer than the time limit."""


@dataclass
class Field:
    """One mutable spot in an image: where, how wide, and what it means."""

    name: str
    offset: int
    code: str  # struct code, e.g. ">Q"

    @property
    def width(self) -> int:
        return struct.calcsize(self.code)


@dataclass
class Seed:
    """A valid image and the map of its structures (parsed from trusted bytes)."""

    name: str
    data: bytes
    fields: list[Field] = field(default_factory=list)
    cluster_size: int = 65536
    table_offsets: list[int] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # companions (backing files)
    format: str = "qcow2"  # the driver the input is opened with (also its file suffix)
    #: Recomputes checksums after a mutation (VHDX headers and region tables), if any.
    fixup: Callable[[bytearray], None] | None = None


def _u(data: bytes, off: int, code: str) -> int:
    value: int = struct.unpack_from(code, data, off)[0]
    return value


def map_image(name: str, data: bytes) -> Seed:
    """List every header field and table entry of a valid qcow2 image."""
    seed = Seed(name, data)
    seed.fields += [Field(n, o, c) for n, o, c in HEADER_FIELDS]
    version = _u(data, 4, ">I")
    cluster = 1 << _u(data, 20, ">I")
    seed.cluster_size = cluster
    l1_off, l1_size = _u(data, 40, ">Q"), _u(data, 36, ">I")
    rt_off, rt_clusters = _u(data, 48, ">Q"), _u(data, 56, ">I")
    sn_off, nb_sn = _u(data, 64, ">Q"), _u(data, 60, ">I")
    seed.table_offsets = [0, l1_off, rt_off, sn_off]
    ext_l2 = version >= 3 and bool(_u(data, 72, ">Q") & 0x10)
    l2_entry = 16 if ext_l2 else 8
    for i in range(l1_size):
        seed.fields.append(Field(f"l1[{i}]", l1_off + 8 * i, ">Q"))
        l2 = _u(data, l1_off + 8 * i, ">Q") & 0x00FFFFFFFFFFFE00
        if l2:
            seed.table_offsets.append(l2)
            for j in range(cluster // l2_entry):
                entry = _u(data, l2 + l2_entry * j, ">Q")
                if entry:
                    seed.fields.append(Field(f"l2@{l2:#x}[{j}]", l2 + l2_entry * j, ">Q"))
                    if ext_l2:
                        seed.fields.append(Field(f"l2bm@{l2:#x}[{j}]", l2 + l2_entry * j + 8, ">Q"))
    for i in range(rt_clusters * cluster // 8):
        block = _u(data, rt_off + 8 * i, ">Q")
        if not block:
            continue
        seed.fields.append(Field(f"reftable[{i}]", rt_off + 8 * i, ">Q"))
        seed.table_offsets.append(block)
        for k in range(0, 64, 2):  # the first refcounts of each block
            seed.fields.append(Field(f"refblock@{block:#x}+{k}", block + k, ">H"))
    pos = sn_off
    for s in range(nb_sn):
        seed.fields += [
            Field(f"snap{s}.l1_offset", pos, ">Q"),
            Field(f"snap{s}.l1_size", pos + 8, ">I"),
            Field(f"snap{s}.id_len", pos + 12, ">H"),
            Field(f"snap{s}.name_len", pos + 14, ">H"),
            Field(f"snap{s}.vm_state_size", pos + 32, ">I"),
            Field(f"snap{s}.extra_size", pos + 36, ">I"),
        ]
        extra = _u(data, pos + 36, ">I")
        id_len, name_len = _u(data, pos + 12, ">H"), _u(data, pos + 14, ">H")
        if extra >= 16:
            seed.fields.append(Field(f"snap{s}.disk_size", pos + 40 + 8, ">Q"))
        size = 40 + extra + id_len + name_len
        pos += size + (-size % 8)
    if version >= 3:
        hdr_len = _u(data, 100, ">I")
        pos = hdr_len + (-hdr_len % 8)
        for n in range(16):
            if pos + 8 > cluster:
                break
            etype, elen = _u(data, pos, ">I"), _u(data, pos + 4, ">I")
            seed.fields += [Field(f"ext{n}.type", pos, ">I"), Field(f"ext{n}.len", pos + 4, ">I")]
            if etype == 0:
                break
            if etype == 0x23852875 and elen >= 24:  # bitmaps
                seed.fields += [
                    Field("bitmaps.nb", pos + 8, ">I"),
                    Field("bitmaps.dir_size", pos + 16, ">Q"),
                    Field("bitmaps.dir_offset", pos + 24, ">Q"),
                ]
            pos += 8 + elen + (-elen % 8)
    return seed


def interesting_values(seed: Seed, fld: Field, current: int) -> list[int]:
    """Values likely to break a parser for ``fld``."""
    bits = fld.width * 8
    top = (1 << bits) - 1
    size = len(seed.data)
    cluster = seed.cluster_size
    values = {0, 1, top, top >> 1, 1 << (bits - 1), current ^ 1, current + 1, current - 1,
              current << 1, current >> 1, 0x7FFFFFFF, 1 << 31, 1 << 20, 0xFFFF}  # fmt: skip
    if bits == 64:
        flags = current & 0xC000000000000001
        for off in (size, size + cluster, 1 << 40, cluster // 2, 512, *seed.table_offsets):
            values.add(flags | off)
            values.add(flags | (off & 0x00FFFFFFFFFFFE00))
        values |= {1 << 62, 1 << 63, current | (1 << 62), current & ~(1 << 63),
                   current | 1, 1 << 56}  # fmt: skip
    return [v & top for v in values]


def mutate(seed: Seed, rng: random.Random, count: int) -> tuple[bytes, list[str]]:
    """Apply ``count`` structure-aware mutations; return the bytes and what was done."""
    data = bytearray(seed.data)
    notes: list[str] = []
    for _ in range(count):
        if rng.random() < 0.15:  # a raw byte in the header cluster
            pos = rng.randrange(min(len(data), seed.cluster_size))
            old = data[pos]
            data[pos] = rng.choice([0, 0xFF, old ^ (1 << rng.randrange(8))])
            notes.append(f"byte[{pos}] {old:#x}->{data[pos]:#x}")
            continue
        fld = rng.choice(seed.fields)
        if fld.offset + fld.width > len(data):
            continue
        current = _u(bytes(data), fld.offset, fld.code)
        value = rng.choice(interesting_values(seed, fld, current))
        struct.pack_into(fld.code, data, fld.offset, value)
        notes.append(f"{fld.name} {current:#x}->{value:#x}")
    if seed.fixup is not None and rng.random() < 0.8:  # else the checksums catch it
        seed.fixup(data)
        notes.append("checksums fixed")
    return bytes(data), notes


def apply_field(data: bytes, seed: Seed, name: str, value: int) -> bytes:
    """Set the named field of ``seed``'s map in ``data`` to ``value`` (for regression cases)."""
    for fld in seed.fields:
        if fld.name == name:
            out = bytearray(data)
            struct.pack_into(fld.code, out, fld.offset, value)
            return bytes(out)
    raise KeyError(name)


# -- seeds ----------------------------------------------------------------------------


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=120)


def make_seeds(workdir: Path) -> dict[str, Seed]:
    """Make the valid seed images with qemu-img / qemu-io and map them."""
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "data.raw"
    _run("qemu-img", "create", "-f", "raw", raw, "2M")
    _run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 65536", "-c", "write -P 0x33 1M 5000",
         "-c", "write -P 0x77 1900k 64k", raw)  # fmt: skip
    specs: dict[str, list[str]] = {
        "v3": ["-o", "compat=1.1"],
        "v2": ["-o", "compat=0.10"],
        "c4k_rc1": ["-o", "cluster_size=4096,refcount_bits=1"],
        "c512": ["-o", "cluster_size=512"],
        "extl2": ["-o", "extended_l2=on"],
        "compressed": ["-c"],
        "zstd": ["-c", "-o", "compression_type=zstd"],
    }
    seeds: dict[str, Seed] = {}
    for name, opts in specs.items():
        path = workdir / f"{name}.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, raw, path)
        if name == "v3":
            _run("qemu-img", "snapshot", "-c", "snap1", path)
            _run("qemu-io", "-f", "qcow2", "-c", "write -z 0 65536", path)
            _run("qemu-img", "bitmap", "--add", path, "bm0")
        seeds[name] = map_image(name, path.read_bytes())
    base = workdir / "base.raw"
    shutil.copy(raw, base)
    top = workdir / "overlay.qcow2"
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 64k 4k", top)
    seed = map_image("overlay", top.read_bytes())
    seed.files["base.raw"] = base.read_bytes()
    seeds["overlay"] = seed
    seeds.update(make_vmdk_seeds(workdir, raw))
    seeds.update(make_vpc_seeds(workdir, raw))
    seeds.update(make_vhdx_vdi_seeds(workdir, raw))
    return seeds


def map_vmdk(name: str, data: bytes) -> Seed:
    """Header fields, grain directory and grain table entries (and grain markers) of a VMDK."""
    seed = Seed(name, data, format="vmdk")
    names = ("version", "flags", "capacity", "granularity", "desc_offset", "desc_size",
             "num_gtes_per_gt", "rgd_offset", "gd_offset", "grain_offset")  # fmt: skip
    codes = ("<I", "<I", "<Q", "<Q", "<Q", "<Q", "<I", "<Q", "<Q", "<Q")
    pos = 4
    for n, c in zip(names, codes, strict=True):
        seed.fields.append(Field(n, pos, c))
        pos += struct.calcsize(c)
    seed.fields.append(Field("compress_algorithm", 77, "<H"))
    header = 0
    if _u(data, 56, "<Q") == 0xFFFFFFFFFFFFFFFF:  # stream-optimized: the footer has the header
        header = len(data) - 1024
        seed.fields += [Field(f"footer.{f.name}", header + f.offset, f.code) for f in seed.fields]
    gtes, gran = _u(data, header + 44, "<I"), _u(data, header + 20, "<Q")
    gd = _u(data, header + 56, "<Q") * 512
    entries = -(-_u(data, header + 12, "<Q") // (gtes * gran))
    seed.table_offsets = [0, gd]
    for i in range(entries):
        seed.fields.append(Field(f"gd[{i}]", gd + 4 * i, "<I"))
        gt = _u(data, gd + 4 * i, "<I") * 512
        if not gt:
            continue
        seed.table_offsets.append(gt)
        for j in range(gtes):
            grain = _u(data, gt + 4 * j, "<I")
            if grain:
                seed.fields.append(Field(f"gt@{gt:#x}[{j}]", gt + 4 * j, "<I"))
                if _u(data, header + 8, "<I") & (1 << 17):  # grain marker: lba, size
                    seed.fields.append(Field(f"grain@{grain:#x}.size", grain * 512 + 8, "<I"))
    return seed


def make_vmdk_seeds(workdir: Path, raw: Path) -> dict[str, Seed]:
    """Sparse and streamOptimized VMDKs of ``raw`` by qemu-img, a true stream by virtkit."""
    seeds: dict[str, Seed] = {}
    for name, sub in (("vmdk-sparse", "monolithicSparse"), ("vmdk-stream", "streamOptimized")):
        path = workdir / f"{name}.vmdk"
        _run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", raw, path)
        seeds[name] = map_vmdk(name, path.read_bytes())
    # a true stream (grain directory after the grains, header in the footer), as VMware writes
    path = workdir / "vmdk-vstream.vmdk"
    virtkit.images.convert(raw, path, format="vmdk", src_format="raw")
    seeds["vmdk-vstream"] = map_vmdk("vmdk-vstream", path.read_bytes())
    return seeds


def map_vpc(name: str, data: bytes) -> Seed:
    """Footer fields, dynamic header fields and BAT entries of a VHD."""
    seed = Seed(name, data, format="vpc", cluster_size=4096)
    footer = 0 if data[:8] == b"conectix" else len(data) - 512
    for fname, off, code in (("data_offset", 16, ">Q"), ("current_size", 48, ">Q"),
                             ("cyls", 56, ">H"), ("heads", 58, ">B"), ("secs", 59, ">B"),
                             ("type", 60, ">I"), ("creator_app", 28, ">I")):  # fmt: skip
        seed.fields.append(Field(f"footer.{fname}", footer + off, code))
    if footer == 0:
        dyn = _u(data, 16, ">Q")
        seed.fields += [
            Field("dyn.table_offset", dyn + 16, ">Q"),
            Field("dyn.max_table_entries", dyn + 28, ">I"),
            Field("dyn.block_size", dyn + 32, ">I"),
        ]
        bat = _u(data, dyn + 16, ">Q")
        seed.table_offsets = [0, dyn, bat]
        for i in range(_u(data, dyn + 28, ">I")):
            seed.fields.append(Field(f"bat[{i}]", bat + 4 * i, ">I"))
    return seed


def make_vpc_seeds(workdir: Path, raw: Path) -> dict[str, Seed]:
    """Dynamic and fixed VHDs of ``raw`` made by qemu-img."""
    seeds: dict[str, Seed] = {}
    for sub in ("dynamic", "fixed"):
        path = workdir / f"vpc-{sub}.vhd"
        _run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}", raw, path)
        seeds[f"vpc-{sub}"] = map_vpc(f"vpc-{sub}", path.read_bytes())
    return seeds


def _vhdx_fixup(data: bytearray) -> None:
    """Give both VHDX headers and region tables valid CRC-32C checksums again."""
    for off, size in ((64 << 10, 4096), (128 << 10, 4096), (192 << 10, 65536), (256 << 10, 65536)):
        if off + size <= len(data):
            block = bytearray(data[off : off + size])
            block[4:8] = bytes(4)
            struct.pack_into("<I", data, off + 4, crc32c(block))


def map_vhdx(name: str, data: bytes, path: Path) -> Seed:
    """Header, region table, metadata table and item, parent locator and BAT fields of a VHDX."""
    seed = Seed(name, data, format="vhdx", cluster_size=320 << 10, fixup=_vhdx_fixup)
    for h in (64 << 10, 128 << 10):
        seed.fields += [
            Field(f"hdr@{h:#x}.{n}", h + o, c)
            for n, o, c in (
                ("sequence", 8, "<Q"),
                ("log_guid", 48, "<Q"),
                ("log_version", 64, "<H"),
                ("version", 66, "<H"),
                ("log_length", 68, "<I"),
                ("log_offset", 72, "<Q"),
            )
        ]
    rt = 192 << 10
    seed.fields.append(Field("regions.count", rt + 8, "<I"))
    for i in range(_u(data, rt + 8, "<I")):
        e = rt + 16 + 32 * i
        seed.fields += [Field(f"region{i}.offset", e + 16, "<Q"),
                        Field(f"region{i}.length", e + 24, "<I"),
                        Field(f"region{i}.flags", e + 28, "<I")]  # fmt: skip
    st = FileStorage(path, writable=False, lock=False)
    try:
        meta = vhdx_metadata.load(st)
    finally:
        st.close()
    base = meta.metadata_offset
    seed.table_offsets = [0, base, meta.bat_offset, meta.header.log_offset]
    seed.fields.append(Field("meta.count", base + 10, "<H"))
    for i in range(_u(data, base + 10, "<H")):
        e = base + 32 + 32 * i
        seed.fields += [Field(f"meta{i}.offset", e + 16, "<I"),
                        Field(f"meta{i}.length", e + 20, "<I"),
                        Field(f"meta{i}.flags", e + 24, "<I")]  # fmt: skip
        off = base + _u(data, e + 16, "<I")
        seed.fields += [Field(f"meta{i}.value32", off, "<I"), Field(f"meta{i}.value64", off, "<Q"),
                        Field(f"meta{i}.value32b", off + 4, "<I"),
                        Field(f"meta{i}.locator_count", off + 18, "<H")]  # fmt: skip
        for k in range(4 if meta.has_parent else 0):
            seed.fields += [Field(f"meta{i}.kv{k}.{n}", off + 20 + 12 * k + o, c)
                            for n, o, c in (("key", 0, "<I"), ("value", 4, "<I"),
                                            ("klen", 8, "<H"), ("vlen", 10, "<H"))]  # fmt: skip
    for i in range(meta.bat_count):
        seed.fields.append(Field(f"bat[{i}]", meta.bat_offset + 8 * i, "<Q"))
    return seed


def map_vdi(name: str, data: bytes) -> Seed:
    """Header fields and block map entries of a VDI."""
    seed = Seed(name, data, format="vdi", cluster_size=512)
    for fname, off, code in (("signature", 0x40, "<I"), ("version", 0x44, "<I"),
                             ("header_size", 0x48, "<I"), ("image_type", 0x4C, "<I"),
                             ("offset_bmap", 0x154, "<I"), ("offset_data", 0x158, "<I"),
                             ("sector_size", 0x168, "<I"), ("disk_size", 0x170, "<Q"),
                             ("block_size", 0x178, "<I"), ("block_extra", 0x17C, "<I"),
                             ("blocks_in_image", 0x180, "<I"), ("blocks_allocated", 0x184, "<I"),
                             ("uuid_parent", 0x1B8, "<Q")):  # fmt: skip
        seed.fields.append(Field(fname, off, code))
    bmap = _u(data, 0x154, "<I")
    seed.table_offsets = [0, bmap, _u(data, 0x158, "<I")]
    for i in range(_u(data, 0x180, "<I")):
        seed.fields.append(Field(f"bmap[{i}]", bmap + 4 * i, "<I"))
    return seed


def _vhdx_dirty_seed(workdir: Path, clean: Path) -> Seed:
    """A VHDX whose BAT update lives only in its log: one entry (a data and a zero descriptor)."""
    data = bytearray(clean.read_bytes())
    seed = map_vhdx("vhdx-dirty", bytes(data), clean)
    bat = next(f.offset for f in seed.fields if f.name == "bat[0]")
    log_off = _u(bytes(data), (64 << 10) + 72, "<Q")
    sector = bytes(data[bat : bat + 4096])
    data[bat : bat + 4096] = bytes(4096)
    guid = bytes(range(1, 17))
    entry = bytearray(3 * 4096)  # header+descriptors, one data sector, room to spare
    struct.pack_into("<4sIIIQII16sQQ", entry, 0, b"loge", 0, 2 * 4096, 0, 5, 2, 0, guid,
                     len(data), len(data))  # fmt: skip
    lead, trail = _u(sector, 0, "<Q"), _u(sector, 4092, "<I")
    struct.pack_into("<4sIQQQ", entry, 64, b"desc", trail, lead, bat, 5)
    struct.pack_into("<4sIQQQ", entry, 96, b"zero", 0, 4096, bat + 4096, 5)
    entry[4096:4100] = b"data"
    struct.pack_into("<I", entry, 4100, 0)
    entry[4104:8188] = sector[8:4092]
    struct.pack_into("<I", entry, 8188, 5)
    data[log_off : log_off + len(entry)] = entry
    for h in (64 << 10, 128 << 10):
        data[h + 48 : h + 64] = guid
    fields = [("length", 8, "<I"), ("tail", 12, "<I"), ("sequence", 16, "<Q"),
              ("descriptors", 24, "<I"), ("flushed", 48, "<Q"), ("last", 56, "<Q"),
              ("desc0.offset", 80, "<Q"), ("desc0.lead", 72, "<Q"), ("desc0.seq", 88, "<Q"),
              ("desc1.length", 104, "<Q"), ("desc1.offset", 112, "<Q"),
              ("data.seq_high", 4100, "<I"), ("data.seq_low", 8188, "<I")]  # fmt: skip
    seed.fields += [Field(f"log.{n}", log_off + o, c) for n, o, c in fields]

    def fixup(buf: bytearray) -> None:
        _vhdx_fixup(buf)
        length = min(_u(bytes(buf), log_off + 8, "<I"), 1 << 20)
        if length >= 64 and log_off + length <= len(buf):
            block = bytearray(buf[log_off : log_off + length])
            block[4:8] = bytes(4)
            struct.pack_into("<I", buf, log_off + 4, crc32c(block))

    fixup(data)
    seed.data = bytes(data)
    seed.fixup = fixup
    return seed


def make_vhdx_vdi_seeds(workdir: Path, raw: Path) -> dict[str, Seed]:
    """Dynamic and fixed VHDX and dynamic and static VDI of ``raw`` (qemu-img), and a VHDX child."""
    seeds: dict[str, Seed] = {}
    for sub in ("dynamic", "fixed"):
        path = workdir / f"vhdx-{sub}.vhdx"
        _run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o",
             f"subformat={sub},block_size=1M", raw, path)  # fmt: skip
        seeds[f"vhdx-{sub}"] = map_vhdx(f"vhdx-{sub}", path.read_bytes(), path)
    base = workdir / "vhdx-dynamic.vhdx"
    child = workdir / "vhdx-child.vhdx"
    with virtkit.images.create(child, format="vhdx", backing=base.name) as img:
        img.write(65536, b"\x42" * 5000)
    seed = map_vhdx("vhdx-child", child.read_bytes(), child)
    seed.files[base.name] = base.read_bytes()
    seeds["vhdx-child"] = seed
    seeds["vhdx-dirty"] = _vhdx_dirty_seed(workdir, workdir / "vhdx-dynamic.vhdx")
    for static in ("off", "on"):
        path = workdir / f"vdi-{static}.vdi"
        _run("qemu-img", "convert", "-f", "raw", "-O", "vdi", "-o", f"static={static}", raw, path)
        seeds[f"vdi-static-{static}"] = map_vdi(f"vdi-static-{static}", path.read_bytes())
    return seeds


# -- running one input ----------------------------------------------------------------


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"input took longer than {TIME_LIMIT_S}s")


def exercise(path: Path, *, swallow: bool = True, write: bool = True) -> str:
    """Open and use ``path`` as a qcow2 image. Return "ok" or the VirtkitError class name.

    Reads everything (info, snapshots, block status, the whole disk, check),
    then, with ``write``, reopens it writable and writes, zeroes, discards and
    snapshots a little (a damaged image must refuse or stay consistent).

    Raises whatever non-virtkit exception the engine raised (a failure), or
    :class:`Hang`, or MemoryError when the traced peak passes the memory bound.
    With ``swallow=False`` VirtkitErrors are raised too.
    """
    fmt = path.suffix.lstrip(".") or "qcow2"
    try:
        with virtkit.images.open(path, format=fmt) as img:  # type: ignore[arg-type]
            img.info()
            _ = img.snapshots
            for bitmap in img.bitmaps():  # persistent dirty bitmaps: directory, tables, data
                if not bitmap.inconsistent:
                    img.bitmap_extents(bitmap.name)
            extents = list(img.block_status())
            step = 1 << 20
            if img.virtual_size <= READ_ALL:
                for pos in range(0, img.virtual_size, step):
                    img.read(pos, min(step, img.virtual_size - pos))
            else:  # a huge sparse disk (legal in VMDK/VHD): its data, up to a bound
                budget = READ_ALL
                for ext in extents:
                    if ext.kind != "data":
                        continue
                    for pos in range(ext.start, ext.start + ext.length, step):
                        n = min(step, ext.start + ext.length - pos, budget)
                        img.read(pos, n)
                        budget -= n
                        if budget <= 0:
                            break
                    if budget <= 0:
                        break
                img.read(img.virtual_size - 512, 512)
            img.check()
        if write and fmt in WRITE_FORMATS:
            with virtkit.images.open(path, writable=True, format=fmt) as img:  # type: ignore[arg-type]
                size = img.virtual_size
                if size >= 8192:
                    img.write(size // 3, b"\xa5" * 5000)
                    img.write_zeroes(0, 4096)
                    img.discard(size // 2, min(size // 2, 1 << 20))
                    # QEMU cannot snapshot 1-bit refcount images either.
                    spec = img.info().format_specific
                    if spec.get("refcount-bits", 16) >= 2:
                        img.create_snapshot("fuzz")
                        img.write(size // 3 + 10, b"\x5a" * 100)
                        if "bitmaps" not in spec:  # QEMU refuses a revert with bitmaps too
                            img.revert_snapshot("fuzz")
                    img.check()
    except virtkit.VirtkitError as exc:
        if not swallow:
            raise
        return type(exc).__name__
    return "ok"


def run_bounded(path: Path, *, swallow: bool = True, write: bool = True) -> str:
    """:func:`exercise` under the time limit and a tracemalloc memory bound."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    tracemalloc.start()
    try:
        outcome = exercise(path, swallow=swallow, write=write)
        _, peak = tracemalloc.get_traced_memory()
        if peak > MEMORY_LIMIT:
            raise MemoryError(f"peak traced memory {peak} bytes > {MEMORY_LIMIT}")
        return outcome
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def failure_key(exc: BaseException) -> str:
    """Identify a failure by exception type and the innermost virtkit frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "virtkit" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__}@{where}"


def write_input(folder: Path, seed: Seed, data: bytes) -> Path:
    """Write an input image (and its seed's companion files) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in seed.files.items():
        (folder / name).write_bytes(content)
    path = folder / f"input.{seed.format}"
    path.write_bytes(data)
    return path


def iterate(seeds: dict[str, Seed], rng: random.Random) -> Iterator[tuple[Seed, bytes, list[str]]]:
    """Endless stream of mutated inputs."""
    names = sorted(seeds)
    while True:
        seed = seeds[rng.choice(names)]
        data, notes = mutate(seed, rng, rng.choice([1, 1, 1, 2, 3]))
        yield seed, data, notes


def campaign(
    seconds: float, out: Path, seed_value: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run random structure-aware mutations for ``seconds``; return the statistics."""
    rng = random.Random(seed_value)
    with tempfile.TemporaryDirectory(prefix="vk-fuzz-") as tmp:
        seeds = make_seeds(Path(tmp) / "seeds")
        stats: dict[str, Any] = {"inputs": 0, "outcomes": {}, "failures": {}}
        deadline = time.monotonic() + seconds
        for seed, data, notes in iterate(seeds, rng):
            if time.monotonic() > deadline:
                break
            stats["inputs"] += 1
            path = write_input(Path(tmp) / "cur", seed, data)
            try:
                outcome = run_bounded(path)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                key = failure_key(exc)
                outcome = "FAILURE"
                if key not in stats["failures"]:
                    stats["failures"][key] = {"seed": seed.name, "mutations": notes,
                                              "error": repr(exc)[:300]}  # fmt: skip
                    crash = out / f"crash-{len(stats['failures']):03d}"
                    write_input(crash, seed, data)
                    (crash / "what.json").write_text(json.dumps(stats["failures"][key], indent=2))
                    log(f"new failure {key}: {seed.name} {notes}")
                if isinstance(exc, MemoryError):
                    gc.collect()
            stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1
        return stats


def atheris_main(out: Path, extra: list[str]) -> None:
    """Drive the same mutator from atheris/libFuzzer (bytes choose seed and mutations)."""
    import atheris  # type: ignore[import-not-found]  # noqa: PLC0415 - optional extra

    tmp = Path(tempfile.mkdtemp(prefix="vk-atheris-"))
    seeds = make_seeds(tmp / "seeds")
    names = sorted(seeds)

    def one(buf: bytes) -> None:
        # The input bytes pick the seed, the fields and the values directly, so
        # libFuzzer's byte mutations stay local (one flipped byte = one changed choice).
        fdp = atheris.FuzzedDataProvider(buf)
        seed = seeds[names[fdp.ConsumeIntInRange(0, len(names) - 1)]]
        data = bytearray(seed.data)
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            fld = seed.fields[fdp.ConsumeIntInRange(0, len(seed.fields) - 1)]
            current = _u(bytes(data), fld.offset, fld.code)
            values = interesting_values(seed, fld, current)
            pick = fdp.ConsumeIntInRange(0, len(values))
            value = values[pick] if pick < len(values) else fdp.ConsumeInt(fld.width * 8)
            struct.pack_into(fld.code, data, fld.offset, value & ((1 << (fld.width * 8)) - 1))
        run_bounded(write_input(tmp / "cur", seed, bytes(data)))

    atheris.instrument_all()  # coverage feedback from every loaded module (virtkit included)
    atheris.Setup([sys.argv[0], f"-artifact_prefix={out}/", *extra], one)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"))
    parser.add_argument("--atheris", action="store_true", help="use atheris (pip install atheris)")
    parser.add_argument(
        "--max-memory",
        type=int,
        default=3 << 30,
        help="address-space cap in bytes (RLIMIT_AS): an allocation bomb becomes a "
        "MemoryError finding instead of the kernel's OOM killer",
    )
    args, extra = parser.parse_known_args()
    resource.setrlimit(resource.RLIMIT_AS, (args.max_memory, args.max_memory))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.atheris:
        atheris_main(args.out, extra)
        return 0
    start = time.monotonic()
    stats = campaign(args.seconds, args.out, args.seed, log=lambda m: print(m, flush=True))
    elapsed = time.monotonic() - start
    print(json.dumps({"seed": args.seed, "seconds": round(elapsed, 1), **stats}, indent=2))
    print(f"{stats['inputs']} inputs, {len(stats['failures'])} distinct failures "
          f"({stats['inputs'] / elapsed:.1f} inputs/s); crashers in {args.out}")  # fmt: skip
    return 1 if stats["failures"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

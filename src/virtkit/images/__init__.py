"""Disk images: a native qcow2 (v2/v3) and raw engine that interoperates with qemu-img.

It also reads VMDK, VHD (vpc), VHDX and VDI and writes streamOptimized VMDK,
fixed VHD and VHDX as ``convert`` targets; see the formats page of the docs.

The public surface::

    img = virtkit.images.create(path, size="10GiB", format="qcow2")
    with virtkit.images.open(path, writable=True) as img:
        img.write(0, b"hello")
    virtkit.images.convert(src, dst, format="qcow2", compress=True)

Format reference: QEMU's ``docs/interop/qcow2.txt``. Images are untrusted
input: every offset, size and count read from a file is checked before use.
This package knows nothing about machines; it imports only ``virtkit.errors``.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterable
from typing import Any, Literal

from virtkit.errors import ConfigError, UnsupportedFeatureError
from virtkit.images.args import check_bool, check_name, check_path
from virtkit.images.base import (
    BitmapInfo,
    CheckProblem,
    CheckResult,
    Extent,
    Image,
    ImageInfo,
    SnapshotInfo,
)
from virtkit.images.convert import commit, convert, measure, rebase
from virtkit.images.probe import PROBED_FORMATS, format_for_name, probe_file
from virtkit.units import parse_size

__all__ = [
    "BitmapInfo",
    "CheckProblem",
    "CheckResult",
    "Extent",
    "Image",
    "ImageInfo",
    "SnapshotInfo",
    "commit",
    "convert",
    "create",
    "measure",
    "open",
    "probe_format",
    "rebase",
]

Format = Literal["qcow2", "raw", "vmdk", "vpc", "vhdx", "vdi"]

# Format drivers are imported on first use: ``module:create``, ``module:open``.
_DRIVERS: dict[str, str] = {
    "qcow2": "virtkit.images.qcow2",
    "raw": "virtkit.images.raw",
    "vmdk": "virtkit.images.vmdk",
    "vpc": "virtkit.images.vpc",
    "vhdx": "virtkit.images.vhdx",
    "vdi": "virtkit.images.vdi",
}

QCOW2_MAGIC = b"QFI\xfb"


#: Options each driver's ``create`` takes besides path and size.
_CREATE_OPTIONS: dict[str, frozenset[str]] = {
    "qcow2": frozenset(
        {
            "backing",
            "backing_format",
            "cluster_size",
            "compat",
            "refcount_bits",
            "lazy_refcounts",
            "extended_l2",
            "preallocation",
            "compression_type",
            "allow_backing",
        }
    ),
    "raw": frozenset({"preallocation", "cluster_size"}),
    "vmdk": frozenset({"subformat", "adapter_type", "hwversion", "toolsversion"}),
    "vpc": frozenset({"subformat", "force_size"}),
    "vhdx": frozenset({"subformat", "block_size", "backing", "backing_format", "allow_backing"}),
    "vdi": frozenset({"static"}),
}


def _driver(fmt: str) -> Any:
    if not isinstance(fmt, str) or fmt not in _DRIVERS:
        raise UnsupportedFeatureError(
            f"unknown image format {fmt!r}; supported: {', '.join(sorted(_DRIVERS))}",
            feature=f"format {fmt}",
        )
    return importlib.import_module(_DRIVERS[fmt])


def probe_format(path: str | os.PathLike[str]) -> str:
    """Name the format of a file as qemu-img 7.2 would probe it.

    Every format qemu-img probes is recognised (qcow2, qcow, vmdk, vdi, vhdx,
    vpc, qed, parallels, bochs, luks, cloop, dmg) with QEMU's own tests and
    scores (see :mod:`virtkit.images.probe`); ``"raw"`` only when nothing else
    matches. Like qemu-img, a fixed VHD (its footer is at the end) probes as raw.

    Only use this for an image a user names directly; backing files are opened
    with their recorded format, never probed (a raw file must not be read as
    something else).

    Raises:
        ConfigError: ``path`` is not a file path.
        ImageError: the file cannot be read.
    """
    return probe_file(path)


def create(
    path: str | os.PathLike[str],
    size: int | str | None = None,
    format: Format | None = None,  # noqa: A002 - qemu-img's own word
    *,
    backing: str | None = None,
    backing_format: Format | None = None,
    cluster_size: int | str | None = None,
    **options: Any,
) -> Image:
    """Create a new image file and return it open for writing.

    Args:
        path: the file to create; it must not exist.
        size: virtual size (``"10GiB"``, ``"512M"``, bytes). With a backing
            file it defaults to the backing file's size.
        format: ``"qcow2"``, ``"raw"``, ``"vhdx"`` or ``"vpc"`` (fixed).
            When omitted it follows the file name as ``virtkit.Disk`` does
            (:func:`~virtkit.images.probe.format_for_name`): ``.raw``,
            ``.img``, ``.iso`` and ``.bin`` are raw, ``.vhdx`` VHDX, ``.vhd``
            VPC, any other name qcow2.
        backing: backing file name, stored as given and resolved relative to
            the new image's directory (qcow2 and vhdx).
        backing_format: the backing file's format; required with ``backing``
            unless it can be read from a qcow2 backing file.
        cluster_size: qcow2 cluster size, a power of two from 512 B to 2 MiB.
        options: format options (qcow2: ``compat``, ``refcount_bits``,
            ``lazy_refcounts``, ``extended_l2``, ``preallocation``,
            ``compression_type``).

    Raises:
        ConfigError: an option value is not allowed.
        ImageError: the file exists or cannot be written.
    """
    path = check_path(path)
    fmt: str = format_for_name(path) if format is None else format
    driver = _driver(fmt)
    size_bytes = None if size is None else parse_size(size, field="size")
    unknown = sorted(set(options) - _CREATE_OPTIONS[fmt])
    if unknown:
        raise ConfigError(
            f"unknown {fmt} option {unknown[0]!r}; known: "
            f"{', '.join(sorted(_CREATE_OPTIONS[fmt]))}",
            field=unknown[0],
        )
    for name in ("compat", "preallocation", "compression_type"):
        if options.get(name) is not None and not isinstance(options[name], str):
            raise ConfigError(
                f"'{name}' must be a str (got {options[name]!r})", field=name, value=options[name]
            )
    if backing is not None:
        check_name(backing, "backing")
    if backing_format is not None:
        check_name(backing_format, "backing_format")
    if fmt == "raw":
        if backing is not None:
            raise ConfigError("raw images cannot have a backing file", field="backing")
        if size_bytes is None:
            raise ConfigError("a raw image needs a size", field="size")
    if cluster_size is not None:
        options["cluster_size"] = parse_size(cluster_size, field="cluster_size")
    if backing is not None:
        options["backing"] = backing
        options["backing_format"] = backing_format
    created: Image = driver.create(path, size_bytes, **options)
    return created


def open(  # noqa: A001 - mirrors the built-in, as gzip.open and tarfile.open do
    path: str | os.PathLike[str],
    writable: bool = False,
    *,
    format: Format | None = None,  # noqa: A002 - qemu-img's own word
    allow_backing: Iterable[str | os.PathLike[str]] = (),
    force_share: bool = False,
    cache: Literal["writeback", "writethrough"] = "writeback",
) -> Image:
    """Open an existing image.

    Args:
        path: the image file.
        writable: open for writing (takes QEMU-compatible write locks).
        format: ``"qcow2"`` or ``"raw"``; probed from the magic when omitted.
        allow_backing: extra files or directories backing files may come
            from; by default only names inside the image's own directory tree.
        force_share: open even if another process holds the image (read-only
            opens only), as ``qemu-img -U`` does.
        cache: as QEMU's cache modes. ``"writeback"`` (the default): metadata
            is cached and written at ``flush()``/``close()``; what ``flush()``
            returned for survives a crash, unflushed writes may be lost, the
            image is never corrupt. ``"writethrough"``: every write is durable
            when it returns. See the performance page for the exact contract.

    Raises:
        ConfigError: an argument has the wrong type or value.
        ImageError: the file cannot be opened.
        CorruptImageError: its metadata is damaged.
        UnsupportedFeatureError: it uses a feature virtkit does not implement.
    """
    path = check_path(path)
    check_bool(writable, "writable")
    check_bool(force_share, "force_share")
    fmt = probe_format(path) if format is None else format
    if fmt not in _DRIVERS and fmt in PROBED_FORMATS:
        raise UnsupportedFeatureError(
            f"the image is in {fmt} format, which virtkit cannot read; convert it with "
            f"qemu-img first (or pass format='raw' to see its bytes as a raw disk)",
            feature=f"format {fmt}",
            path=path,
        )
    driver = _driver(fmt)
    try:
        allowed = tuple(check_path(p, "allow_backing") for p in allow_backing)
    except TypeError as exc:
        raise ConfigError(
            f"'allow_backing' must be a list of paths (got {allow_backing!r})",
            field="allow_backing",
        ) from exc
    if cache not in ("writeback", "writethrough"):
        raise ConfigError(
            f"'cache' must be 'writeback' or 'writethrough' (got {cache!r})",
            field="cache",
            value=cache,
        )
    extra: dict[str, Any] = {}
    if cache != "writeback":  # every driver caches like QEMU's writeback by default
        if "cache" not in inspect.signature(driver.open).parameters:
            raise UnsupportedFeatureError(
                f"{fmt} images have no cache={cache!r} mode", feature=f"cache {cache}", path=path
            )
        extra["cache"] = cache
    opened: Image = driver.open(
        path, writable=writable, allow_backing=allowed, force_share=force_share, **extra
    )
    return opened

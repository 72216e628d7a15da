"""``virtkit image compare|map|amend|dd|bitmap``: chain readers, range copies, bitmaps."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import Any

import click

from virtkit import images
from virtkit.cli.chain import MapEntry, compare_images, map_chain, open_chain
from virtkit.cli.options import (
    OPTIONS,
    PROGRESS,
    QUIET,
    SHARE,
    as_format,
    check_parent,
    fmt_option,
    parse_options,
)
from virtkit.cli.output import OUTPUT, error, human_bool
from virtkit.cli.progress import progress_bar
from virtkit.errors import ConfigError, UnsupportedFeatureError, VirtkitError
from virtkit.images.qcow2.amend import amend as qcow2_amend

__all__ = ["COMMANDS"]


@click.command()
@click.option("-f", "fmt1", metavar="FMT", help="Format of the first image.")
@click.option("-F", "fmt2", metavar="FMT", help="Format of the second image.")
@click.option(
    "-s", "strict", is_flag=True, help="Strict: a size or allocation difference is a difference."
)
@SHARE
@PROGRESS
@QUIET
@click.argument("filename1")
@click.argument("filename2")
def compare(
    fmt1: str | None,
    fmt2: str | None,
    strict: bool,
    force_share: bool,
    progress: bool,
    quiet: bool,
    filename1: str,
    filename2: str,
) -> int:
    """Compare what two images show the guest (qemu-img compare).

    Exit status: 0 identical, 1 they differ, 2 an error (cannot open, I/O).
    """
    try:
        with progress_bar("compare", enabled=progress and not quiet) as bar:
            verdict = compare_images(
                filename1, filename2, fmt1=fmt1, fmt2=fmt2, strict=strict,
                force_share=force_share, progress=bar,
            )  # fmt: skip
    except VirtkitError as exc:
        error(str(exc))
        return 2
    if not quiet:
        for line in verdict.messages:
            click.echo(line)
    return 0 if verdict.same else 1


def _map_json(entries: list[MapEntry]) -> str:
    rows = []
    for e in entries:
        parts = [
            f'"start": {e.start}',
            f'"length": {e.length}',
            f'"depth": {e.depth}',
            f'"present": {human_bool(e.present)}',
            f'"zero": {human_bool(e.zero)}',
            f'"data": {human_bool(e.data)}',
        ]
        if e.offset is not None:
            parts.append(f'"offset": {e.offset}')
        rows.append("{ " + ", ".join(parts) + "}")
    return "[" + ",\n".join(rows) + "]"


@click.command(name="map")
@fmt_option()
@SHARE
@OUTPUT
@click.option("--start-offset", default="0", metavar="OFFSET", help="Start at this guest offset.")
@click.option("--max-length", default=None, metavar="LENGTH", help="Map at most this many bytes.")
@click.argument("filename")
def map_(
    fmt: str | None,
    force_share: bool,
    output: str,
    start_offset: str,
    max_length: str | None,
    filename: str,
) -> int:
    """Show where each range of the disk lives (qemu-img map).

    JSON entries carry start, length, depth, present, zero, data and the host
    ``offset`` as qemu-img prints them for raw and qcow2 (no offset for
    compressed clusters, which the human table refuses, as qemu-img does);
    other formats' entries have no offset (``-`` in the table).
    """
    from virtkit.units import parse_size  # noqa: PLC0415

    start = parse_size(start_offset, field="--start-offset")
    limit = None if max_length is None else parse_size(max_length, field="--max-length")
    with open_chain(filename, fmt=fmt, force_share=force_share, whole=True) as chain:
        entries = map_chain(chain, start, limit)
        names = [layer.path for layer in chain]
    if output == "json":
        click.echo(_map_json(entries))
        return 0
    click.echo(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in entries:
        if e.data:
            if e.unplaceable:  # as qemu-img: the human table has no way to say where
                error("File contains external, encrypted or compressed clusters.")
                return 1
            mapped = "-" if e.offset is None else hex(e.offset)
            click.echo(f"{_hex(e.start):<16}{_hex(e.length):<16}{mapped:<16}{names[e.depth]}")
    return 0


def _hex(value: int) -> str:
    return "0" if value == 0 else hex(value)


#: -o options qemu-img accepts only when creating an image
_CREATION_ONLY = (
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
    "nocow",
)
#: -o options amend changes through virtkit.images.qcow2.amend
_AMEND_QCOW2 = ("compat", "lazy_refcounts", "refcount_bits")


def _amend_refusals(opts: dict[str, Any]) -> None:
    """Refuse, as qemu-img does, what amend cannot change on an existing image."""
    for key in opts:
        if key in _CREATION_ONLY:
            raise ConfigError(
                f"invalid parameter '{key}': this option is only supported for image creation",
                field=key,
            )
        if key == "data_file":
            raise UnsupportedFeatureError(
                "data_file can only be set for images that use an external data file, and "
                "virtkit does not write external data files",
                feature="amend data_file",
            )
        if key == "data_file_raw":
            raise ConfigError("data_file_raw cannot be set on existing images", field=key)
        if key.startswith("encrypt."):
            raise UnsupportedFeatureError(
                f"amend cannot change {key}: virtkit does not write encrypted images",
                feature=f"amend {key}",
            )
        if key not in (*_AMEND_QCOW2, "size", "backing", "backing_format"):
            raise ConfigError(f"invalid parameter '{key}' for amend", field=key)


@click.command()
@fmt_option()
@OPTIONS
@PROGRESS
@QUIET
@click.option("--force", is_flag=True, help="Accepted for qemu-img compatibility.")
@click.argument("filename")
def amend(
    fmt: str | None,
    options: tuple[str, ...],
    progress: bool,
    quiet: bool,
    force: bool,
    filename: str,
) -> int:
    """Change options of an existing qcow2 image (qemu-img amend).

    Changes ``compat`` (0.10/v2 or 1.1/v3, up or down), ``lazy_refcounts``
    (on/off), ``refcount_bits`` (1..64), ``size`` and ``backing_file`` /
    ``backing_fmt`` (header only, as qemu-img). Creation-only options
    (cluster_size, preallocation...) are refused, as qemu-img refuses them.
    """
    del progress, quiet, force
    opts = parse_options(options)
    if not opts:
        raise ConfigError("amend needs options: -o KEY=VALUE[,...]", field="-o")
    _amend_refusals(opts)
    with images.open(filename, format=as_format(fmt), force_share=True) as img:
        current, fmt_name = img.backing_file, img.format
    if fmt_name != "qcow2":
        raise UnsupportedFeatureError(
            f"format {fmt_name} does not support option amendment (qcow2 only)",
            feature="amend",
        )
    engine = {k: opts[k] for k in _AMEND_QCOW2 if k in opts}
    if engine:
        qcow2_amend(filename, **engine)
    if "backing" in opts or "backing_format" in opts:
        backing = opts.get("backing", current)
        images.rebase(filename, backing or None, as_format(opts.get("backing_format")), unsafe=True)
    if "size" in opts:
        with images.open(filename, writable=True, format="qcow2") as img:
            img.resize(opts["size"])
    return 0


def _dd_operands(operands: tuple[str, ...]) -> dict[str, str]:
    known = ("if", "of", "bs", "count", "skip")
    out: dict[str, str] = {}
    for item in operands:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise click.UsageError(f"unknown dd operand {item!r} (known: {', '.join(known)})")
        out[key] = value
    for needed in ("if", "of"):
        if needed not in out:
            raise click.UsageError(f"dd needs {needed}=FILE")
    return out


def _temp_next_to(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.virtkit-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def _replacing(dst: str) -> Iterator[str]:
    """Yield a temp path next to ``dst``; rename it over ``dst`` on success, delete it otherwise."""
    check_parent(dst, "the output image")
    tmp = _temp_next_to(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@click.command()
@fmt_option("Input format (probed when omitted).")
@click.option(
    "-O", "out_fmt", metavar="FMT", default="raw", show_default=True, help="Output format."
)
@SHARE
@PROGRESS
@click.argument("operands", nargs=-1, required=True)
def dd(
    fmt: str | None, out_fmt: str, force_share: bool, progress: bool, operands: tuple[str, ...]
) -> int:
    """Copy part of an image, dd style (qemu-img dd).

    Operands: if=IN of=OUT [bs=N] [count=N] [skip=N].

    As qemu-img, the output holds min(count*bs, input size) - skip*bs bytes
    starting at input offset skip*bs. OUT is replaced atomically.
    """
    from virtkit.units import parse_size  # noqa: PLC0415

    ops = _dd_operands(operands)
    bs = parse_size(ops.get("bs", "512"), field="bs")
    if bs <= 0:
        raise ConfigError("bs must be at least 1 byte", field="bs")
    with images.open(ops["if"], format=as_format(fmt), force_share=force_share) as src:
        size = src.virtual_size
        if "count" in ops:
            size = min(size, parse_size(ops["count"], field="count") * bs)
        skip = parse_size(ops["skip"], field="skip") * bs if "skip" in ops else 0
        if skip > size:
            raise ConfigError(f"skip={ops['skip']} is past the end of the input", field="skip")
        size -= skip
        with _replacing(ops["of"]) as tmp, progress_bar("dd", enabled=progress) as bar:
            out = images.create(tmp, size, as_format(out_fmt))
            try:
                _copy_range(src, out, skip, size, bar)
            finally:
                out.close()
    return 0


def _copy_range(src: images.Image, out: images.Image, skip: int, size: int, bar: Any) -> None:
    chunk = 1 << 20
    for ext in list(src.block_status(skip, size)):
        if ext.kind != "data":
            continue
        pos = ext.start
        end = ext.start + ext.length
        while pos < end:
            n = min(chunk, end - pos)
            data = src.read(pos, n)
            if data.count(0) != len(data):
                out.write(pos - skip, data)
            pos += n
            bar(pos - skip, size)
    bar(size, size)


@click.command()
@fmt_option()
@click.option("--add", "add", is_flag=True, help="Add BITMAP (empty).")
@click.option("--remove", "remove", is_flag=True, help="Remove BITMAP.")
@click.option("--clear", "clear", is_flag=True, help="Clear every bit of BITMAP.")
@click.option("--enable", "enable", is_flag=True, help="Make BITMAP record writes.")
@click.option("--disable", "disable", is_flag=True, help="Stop BITMAP recording writes.")
@click.option("--merge", "merge", metavar="SOURCE", help="Set in BITMAP every bit of SOURCE.")
@click.option("-b", "source_file", metavar="FILE", help="Image holding the --merge source.")
@click.option("-F", "source_fmt", metavar="FMT", help="Format of the -b image.")
@click.option("-g", "granularity", metavar="SIZE", help="Granularity of an --add'ed bitmap.")
@click.argument("filename")
@click.argument("bitmap")
def bitmap(
    fmt: str | None,
    add: bool,
    remove: bool,
    clear: bool,
    enable: bool,
    disable: bool,
    merge: str | None,
    source_file: str | None,
    source_fmt: str | None,
    granularity: str | None,
    filename: str,
    bitmap: str,
) -> int:
    """Edit persistent dirty bitmaps (qemu-img bitmap).

    Several actions may be given; they run in this order: --add, --merge,
    --clear, --enable, --disable, --remove.
    """
    if not (add or remove or clear or enable or disable or merge is not None):
        raise click.UsageError(
            "give at least one of --add --remove --clear --enable --disable --merge"
        )
    if enable and disable:
        raise click.UsageError("--enable and --disable contradict each other")
    if granularity is not None and not add:
        raise click.UsageError("-g only applies to --add")
    if source_file is not None and merge is None:
        raise click.UsageError("-b only applies to --merge")
    with images.open(filename, writable=True, format=as_format(fmt)) as img:
        if add:
            img.add_bitmap(bitmap, granularity=granularity)
        if merge is not None:
            source: Any = None
            if source_file is not None:
                source = images.open(source_file, format=as_format(source_fmt), force_share=True)
            try:
                img.merge_bitmap(merge, bitmap, source_image=source)
            finally:
                if source is not None:
                    source.close()
        if clear:
            img.clear_bitmap(bitmap)
        if enable:
            img.enable_bitmap(bitmap)
        if disable:
            img.disable_bitmap(bitmap)
        if remove:
            img.remove_bitmap(bitmap)
    return 0


#: the commands, added to the ``virtkit image`` group by :mod:`virtkit.cli.image`
COMMANDS = (compare, map_, amend, dd, bitmap)

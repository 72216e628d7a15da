"""``virtkit image``: qemu-img's commands, flags, exit codes and JSON, over virtkit.images.

Each command takes the flags its qemu-img namesake takes (``-f`` source
format, ``-F`` backing format, ``-O`` output format, ``-o`` options, ``-U``
force share, ``-p`` progress, ``-q`` quiet) and prints what it prints, so a
script can switch from ``qemu-img`` to ``virtkit image`` (and back).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from virtkit import images
from virtkit.cli.chain import MapEntry, compare_images, map_chain, open_chain
from virtkit.cli.output import OUTPUT, emit_json, error, human_bool, human_size
from virtkit.cli.progress import progress_bar
from virtkit.errors import ConfigError, ImageError, UnsupportedFeatureError, VirtkitError

__all__ = ["image", "parse_options"]

F = TypeVar("F", bound=Callable[..., Any])


def _f(fmt: str | None) -> Any:
    """A format name from the command line; virtkit.images checks it (and names the choices)."""
    return fmt


#: -o options that are switches: on/off (or true/false), nothing else.
_SWITCHES = ("lazy_refcounts", "extended_l2")
#: qemu-img's -o spelling -> virtkit.images keyword
_OPTION_NAMES = {"backing_file": "backing", "backing_fmt": "backing_format"}
_INT_OPTIONS = ("refcount_bits",)


def parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    """Turn qemu-img ``-o a=b,c=d`` (repeatable) into keyword arguments.

    Raises:
        ConfigError: an item is not ``key=value`` or a switch is not on/off.
    """
    out: dict[str, Any] = {}
    for value in values:
        for pair in value.split(","):
            if not pair:
                continue
            key, sep, raw = pair.partition("=")
            name = key.strip().replace("-", "_")
            if not sep or not name:
                raise ConfigError(f"-o expects key=value (got {pair!r})", field="-o")
            lowered = raw.lower()
            if name in _SWITCHES:
                if lowered not in ("on", "off", "true", "false"):
                    raise ConfigError(f"-o {key} takes on or off (got {raw!r})", field=key)
                out[name] = lowered in ("on", "true")
                continue
            if name in _INT_OPTIONS:
                if not raw.isdigit():
                    raise ConfigError(f"-o {key} takes a number (got {raw!r})", field=key)
                out[name] = int(raw)
                continue
            out[_OPTION_NAMES.get(name, name)] = raw
    return out


def _fmt_option(
    help_text: str = "Image format (probed from the file when omitted).",
) -> Callable[[F], F]:
    return click.option("-f", "fmt", metavar="FMT", default=None, help=help_text)


_SHARE = click.option(
    "-U",
    "--force-share",
    "force_share",
    is_flag=True,
    help="Open the image even if another process (a running VM) holds it.",
)
_QUIET = click.option("-q", "quiet", is_flag=True, help="Print nothing but errors.")
_PROGRESS = click.option(
    "-p", "progress", is_flag=True, help="Show a progress bar (on a terminal, on stderr)."
)
_OPTIONS = click.option(
    "-o",
    "options",
    metavar="KEY=VALUE[,...]",
    multiple=True,
    help="Format options, as qemu-img -o (cluster_size, compat, refcount_bits, "
    "lazy_refcounts, extended_l2, preallocation, compression_type, backing_file...).",
)


def _check_parent(path: str, what: str) -> None:
    """Refuse early when ``path``'s folder is missing, naming ``path`` (not a temp file)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ImageError(f"cannot create {what}: the folder {folder} does not exist", path=path)


def _local_time(value: Any) -> str:
    return str(value.astimezone().strftime("%Y-%m-%d %H:%M:%S"))


def _snapshot_header() -> str:
    return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def _snapshot_line(snap: images.SnapshotInfo) -> str:
    ms = snap.vm_clock_ns // 1_000_000
    clock = f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
    icount = "" if snap.icount is None else str(snap.icount)
    return (
        f"{snap.id:<9} {snap.name:<16} {human_size(snap.vm_state_size):>8}"
        f"{_local_time(snap.date):>20}{clock:>13}{icount:>11}"
    )


def _snapshot_json(snap: images.SnapshotInfo) -> dict[str, Any]:
    """One snapshot as qemu-img info --output=json prints it."""
    stamp = snap.date.timestamp()
    out: dict[str, Any] = {}
    if snap.icount is not None:
        out["icount"] = snap.icount
    out.update(
        {
            "vm-clock-nsec": snap.vm_clock_ns % 1_000_000_000,
            "name": snap.name,
            "date-sec": int(stamp),
            "date-nsec": snap.date.microsecond * 1000,
            "vm-clock-sec": snap.vm_clock_ns // 1_000_000_000,
            "id": snap.id,
            "vm-state-size": snap.vm_state_size,
        }
    )
    return out


def _info_json(info: images.ImageInfo) -> dict[str, Any]:
    data = info.to_json()
    if info.snapshots:
        data["snapshots"] = [_snapshot_json(s) for s in info.snapshots]
    backing = info.backing_filename
    if backing is not None:
        data["full-backing-filename"] = (
            backing
            if os.path.isabs(backing)
            else os.path.join(os.path.dirname(info.filename), backing)
        )
    return data


def _print_specific(data: Any, indent: int) -> None:
    pad = " " * indent
    if isinstance(data, dict):
        for key, value in data.items():
            label = str(key).replace("-", " ")
            if isinstance(value, dict | list):
                click.echo(f"{pad}{label}:")
                _print_specific(value, indent + 4)
            else:
                click.echo(f"{pad}{label}: {human_bool(value)}")
    elif isinstance(data, list):
        for index, item in enumerate(data):
            click.echo(f"{pad}[{index}]:")
            _print_specific(item, indent + 4)
    else:
        click.echo(f"{pad}{human_bool(data)}")


def _print_info(info: images.ImageInfo) -> None:
    click.echo(f"image: {info.filename}")
    click.echo(f"file format: {info.format}")
    click.echo(f"virtual size: {human_size(info.virtual_size)} ({info.virtual_size} bytes)")
    click.echo(f"disk size: {human_size(info.actual_size)}")
    if info.cluster_size is not None:
        click.echo(f"cluster_size: {info.cluster_size}")
    if info.backing_filename is not None:
        click.echo(f"backing file: {info.backing_filename}")
        if info.backing_format is not None:
            click.echo(f"backing file format: {info.backing_format}")
    if info.dirty_flag:
        click.echo("cleanly shut down: no")
    if info.snapshots:
        click.echo("Snapshot list:")
        click.echo(_snapshot_header())
        for snap in info.snapshots:
            click.echo(_snapshot_line(snap))
    if info.format_specific:
        click.echo("Format specific information:")
        _print_specific(info.format_specific, 4)


@click.group()
def image() -> None:
    """Disk image tools: qemu-img's commands, flags, exit codes and JSON."""


@image.command()
@_fmt_option()
@_SHARE
@OUTPUT
@click.option("--json", "as_json", is_flag=True, help="Same as --output=json.")
@click.option("--backing-chain", is_flag=True, help="Show every image of the backing chain.")
@click.argument("filename")
def info(
    fmt: str | None,
    force_share: bool,
    output: str,
    as_json: bool,
    backing_chain: bool,
    filename: str,
) -> int:
    """Show an image's format, sizes, backing file, snapshots (qemu-img info)."""
    with open_chain(filename, fmt=fmt, force_share=force_share, whole=backing_chain) as chain:
        infos = [layer.image.info() for layer in chain]
    if output == "json" or as_json:
        emit_json([_info_json(i) for i in infos] if backing_chain else _info_json(infos[0]))
        return 0
    for index, one in enumerate(infos):
        if index:
            click.echo()
        _print_info(one)
    return 0


@image.command(context_settings={"ignore_unknown_options": True})
@click.option("-f", "fmt", metavar="FMT", default="raw", show_default=True, help="Image format.")
@click.option("-b", "backing", metavar="FILE", help="Backing file (stored as given).")
@click.option("-F", "backing_fmt", metavar="FMT", help="Backing file format.")
@_OPTIONS
@_QUIET
@click.argument("filename")
@click.argument("size", required=False)
def create(
    fmt: str,
    backing: str | None,
    backing_fmt: str | None,
    options: tuple[str, ...],
    quiet: bool,
    filename: str,
    size: str | None,
) -> int:
    """Create an image (qemu-img create).

    SIZE is 1G, 512M or bytes; the format is raw unless -f says otherwise.
    """
    opts = parse_options(options)
    if "size" in opts:
        size = size or opts.pop("size")
        opts.pop("size", None)
    backing = backing if backing is not None else opts.pop("backing", None)
    backing_fmt = backing_fmt if backing_fmt is not None else opts.pop("backing_format", None)
    _check_parent(filename, "the image")
    if backing and backing_fmt is None:  # "" is left for images.create to refuse
        folder = os.path.dirname(os.path.abspath(filename))
        probe = backing if os.path.isabs(backing) else os.path.join(folder, backing)
        backing_fmt = images.probe_format(probe)
    created = images.create(
        filename, size, _f(fmt), backing=backing, backing_format=_f(backing_fmt), **opts
    )
    try:
        virtual = created.virtual_size
    finally:
        created.close()
    if not quiet:
        extra = f" backing_file={backing} backing_fmt={backing_fmt}" if backing else ""
        click.echo(f"Formatting '{filename}', fmt={fmt}{extra} size={virtual}")
    return 0


def _check_json(result: images.CheckResult, filename: str, fmt: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if result.image_end_offset:
        data["image-end-offset"] = result.image_end_offset
    if result.total_clusters:
        data["total-clusters"] = result.total_clusters
    data["check-errors"] = result.errors
    if result.allocated_clusters:
        data["allocated-clusters"] = result.allocated_clusters
    data["filename"] = filename
    data["format"] = fmt
    remaining = {
        "corruptions": result.corruptions - result.corruptions_fixed,
        "leaks": result.leaks - result.leaks_fixed,
        "corruptions-fixed": result.corruptions_fixed,
        "leaks-fixed": result.leaks_fixed,
    }
    data.update({k: v for k, v in remaining.items() if v})
    return data


@image.command()
@_fmt_option()
@_SHARE
@OUTPUT
@_QUIET
@click.option(
    "-r",
    "repair",
    type=click.Choice(["leaks", "all"]),
    default=None,
    help="Repair leaks only, or leaks and corruptions.",
)
@click.option("--repair", "repair_all", is_flag=True, help="Same as -r all.")
@click.argument("filename")
def check(
    fmt: str | None,
    force_share: bool,
    output: str,
    quiet: bool,
    repair: str | None,
    repair_all: bool,
    filename: str,
) -> int:
    """Check an image's metadata, -r repairs (qemu-img check).

    Exit status: 0 no problem, 1 the check could not run, 2 corruptions,
    3 only leaked clusters, 63 the format has nothing to check (raw).
    """
    fix = repair is not None or repair_all
    if fix and force_share:
        raise ConfigError("-r cannot be used with -U (repairing needs the image to itself)")
    with images.open(filename, writable=fix, format=_f(fmt), force_share=force_share) as img:
        if img.format == "raw":
            error("this image format (raw) does not support checks")
            return 63
        result = img.check(repair=fix)
        fmt_name = img.format
    remaining_corrupt = result.corruptions - result.corruptions_fixed
    remaining_leaks = result.leaks - result.leaks_fixed
    if output == "json":
        emit_json(_check_json(result, filename, fmt_name))
    elif not quiet:
        _print_check(result, remaining_corrupt, remaining_leaks)
    if result.errors:
        return 1
    if remaining_corrupt:
        return 2
    if remaining_leaks:
        return 3
    return 0


def _print_check(result: images.CheckResult, corrupt: int, leaks: int) -> None:
    for problem in result.problems:
        where = f" at offset {problem.offset:#x}" if problem.offset is not None else ""
        click.echo(f"{problem.kind.upper()}: {problem.message}{where}")
    if result.leaks_fixed or result.corruptions_fixed:
        click.echo(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n"
        )
    if not corrupt and not leaks and not result.errors:
        click.echo("No errors were found on the image.")
    if corrupt:
        click.echo(
            f"\n{corrupt} errors were found on the image.\n"
            "Data may be corrupted, or further writes to the image may corrupt it."
        )
    if leaks:
        click.echo(
            f"\n{leaks} leaked clusters were found on the image.\n"
            "This means waste of disk space, but no harm to data."
        )
    if result.errors:
        click.echo(f"\n{result.errors} internal errors have occurred during the check.")
    if result.total_clusters:
        share = 100.0 * result.allocated_clusters / result.total_clusters
        click.echo(
            f"{result.allocated_clusters}/{result.total_clusters} = {share:.2f}% allocated, "
            "0.00% fragmented, 0.00% compressed clusters"
        )
    if result.image_end_offset:
        click.echo(f"Image end offset: {result.image_end_offset}")


@image.command()
@_fmt_option("Source format (probed when omitted).")
@click.option(
    "-O", "out_fmt", metavar="FMT", default="raw", show_default=True, help="Output format."
)
@click.option("-c", "compress", is_flag=True, help="Write compressed clusters (qcow2).")
@click.option(
    "-B",
    "backing",
    metavar="FILE",
    help="Backing file of the output (only differences are written).",
)
@click.option("-F", "backing_fmt", metavar="FMT", help="Format of the -B backing file.")
@_OPTIONS
@_SHARE
@_PROGRESS
@_QUIET
@click.argument("src")
@click.argument("dst")
def convert(
    fmt: str | None,
    out_fmt: str,
    compress: bool,
    backing: str | None,
    backing_fmt: str | None,
    options: tuple[str, ...],
    force_share: bool,
    progress: bool,
    quiet: bool,
    src: str,
    dst: str,
) -> int:
    """Convert SRC into a new image DST (qemu-img convert).

    The backing chain of SRC is flattened and the copy is sparse.

    DST is written to a hidden temporary file next to it and renamed over it
    once complete: an interrupted convert leaves DST as it was.
    """
    opts = parse_options(options)
    if backing is not None:
        opts["backing"] = backing
        opts["backing_format"] = backing_fmt or (
            backing
            and images.probe_format(
                backing
                if os.path.isabs(backing)
                else os.path.join(os.path.dirname(os.path.abspath(dst)), backing)
            )
        )
    _check_parent(dst, "the output image")
    with progress_bar("convert", enabled=progress and not quiet) as bar:
        images.convert(
            src,
            dst,
            format=out_fmt,
            compress=compress,
            progress=bar,
            src_format=_f(fmt),
            force_share=force_share,
            **opts,
        )
    return 0


@image.command()
@_fmt_option()
@_SHARE
@_QUIET
@click.option("-l", "do_list", is_flag=True, help="List the snapshots.")
@click.option("-c", "create_name", metavar="NAME", help="Create snapshot NAME.")
@click.option("-a", "apply_name", metavar="NAME", help="Revert the disk to snapshot NAME.")
@click.option("-d", "delete_name", metavar="NAME", help="Delete snapshot NAME.")
@click.argument("filename")
def snapshot(
    fmt: str | None,
    force_share: bool,
    quiet: bool,
    do_list: bool,
    create_name: str | None,
    apply_name: str | None,
    delete_name: str | None,
    filename: str,
) -> int:
    """List, create, apply or delete snapshots (qemu-img snapshot)."""
    chosen = [x for x in (do_list, create_name, apply_name, delete_name) if x not in (None, False)]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of -l, -c NAME, -a NAME, -d NAME")
    writable = not do_list
    with images.open(
        filename, writable=writable, format=_f(fmt), force_share=force_share and not writable
    ) as img:
        if do_list:
            if img.snapshots and not quiet:
                click.echo("Snapshot list:")
                click.echo(_snapshot_header())
                for snap in img.snapshots:
                    click.echo(_snapshot_line(snap))
        elif create_name is not None:
            img.create_snapshot(create_name)
        elif apply_name is not None:
            img.revert_snapshot(apply_name)
        elif delete_name is not None:
            img.delete_snapshot(delete_name)
    return 0


@image.command(context_settings={"ignore_unknown_options": True})
@_fmt_option()
@click.option(
    "--shrink", is_flag=True, help="Allow making the image smaller (data past the end is lost)."
)
@_QUIET
@click.argument("filename")
@click.argument("size")
def resize(fmt: str | None, shrink: bool, quiet: bool, filename: str, size: str) -> int:
    """Change the virtual size (qemu-img resize).

    SIZE is the new size, or +SIZE / -SIZE to grow or shrink by that much.
    """
    from virtkit.units import parse_size  # noqa: PLC0415 - only this command needs it

    with images.open(filename, writable=True, format=_f(fmt)) as img:
        if size[:1] in "+-" and size[:1]:
            delta = parse_size(size[1:], field="size")
            new = img.virtual_size + delta if size[0] == "+" else img.virtual_size - delta
            if new < 0:
                raise ConfigError(f"the new size would be negative ({new} bytes)", field="size")
        else:
            new = parse_size(size, field="size")
        if new < img.virtual_size and not shrink:
            raise ConfigError(
                f"shrinking {filename} from {img.virtual_size} to {new} bytes loses data past "
                "the new end; use --shrink if that is what you want",
                field="size",
            )
        img.resize(new, shrink=shrink)
    if not quiet:
        click.echo("Image resized.")
    return 0


@image.command()
@_fmt_option()
@click.option(
    "-b", "backing", metavar="FILE", required=True, help='The new backing file ("" for none).'
)
@click.option("-F", "backing_fmt", metavar="FMT", help="Format of the new backing file.")
@click.option(
    "-u", "unsafe", is_flag=True, help="Only rewrite the header (the file was moved or renamed)."
)
@_PROGRESS
@_QUIET
@click.argument("filename")
def rebase(
    fmt: str | None,
    backing: str,
    backing_fmt: str | None,
    unsafe: bool,
    progress: bool,
    quiet: bool,
    filename: str,
) -> int:
    """Change an overlay's backing file (qemu-img rebase).

    Safe mode (the default) keeps what the guest sees; -u only rewrites the header.
    """
    if fmt is not None and fmt != "qcow2":
        raise UnsupportedFeatureError(
            f"{fmt} images have no backing file to rebase", feature="rebase"
        )
    with progress_bar("rebase", enabled=progress and not quiet) as bar:
        images.rebase(filename, backing or None, _f(backing_fmt), unsafe, progress=bar)
    return 0


@image.command()
@_fmt_option()
@click.option(
    "-d", "drop", is_flag=True, help="Delete the overlay afterwards instead of emptying it."
)
@_PROGRESS
@_QUIET
@click.argument("filename")
def commit(fmt: str | None, drop: bool, progress: bool, quiet: bool, filename: str) -> int:
    """Write an overlay into its backing file (qemu-img commit)."""
    if fmt is not None and fmt != "qcow2":
        raise UnsupportedFeatureError(f"cannot commit {fmt} images", feature="commit")
    with progress_bar("commit", enabled=progress and not quiet) as bar:
        images.commit(filename, drop=drop, progress=bar)
    if not quiet:
        click.echo("Image committed.")
    return 0


@image.command()
@_fmt_option("Source format (probed when omitted).")
@click.option(
    "-O", "out_fmt", metavar="FMT", default="raw", show_default=True, help="Target format."
)
@_OPTIONS
@click.option("--size", metavar="SIZE", help="Measure a new empty image of SIZE instead of a file.")
@OUTPUT
@click.argument("filename", required=False)
def measure(
    fmt: str | None,
    out_fmt: str,
    options: tuple[str, ...],
    size: str | None,
    output: str,
    filename: str | None,
) -> int:
    """Size needed to convert to -O (qemu-img measure).

    Measures FILENAME, or a new empty image of --size.
    """
    if (filename is None) == (size is None):
        raise click.UsageError("give either an image file or --size, not both")
    opts = parse_options(options)
    result = images.measure(filename, out_fmt, size=size, src_format=_f(fmt), **opts)
    if output == "json":
        emit_json(result)
        return 0
    click.echo(f"required size: {result['required']}")
    click.echo(f"fully allocated size: {result['fully-allocated']}")
    if "bitmaps" in result:
        click.echo(f"bitmaps size: {result['bitmaps']}")
    return 0


@image.command()
@click.option("-f", "fmt1", metavar="FMT", help="Format of the first image.")
@click.option("-F", "fmt2", metavar="FMT", help="Format of the second image.")
@click.option(
    "-s", "strict", is_flag=True, help="Strict: a size or allocation difference is a difference."
)
@_SHARE
@_PROGRESS
@_QUIET
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


@image.command(name="map")
@_fmt_option()
@_SHARE
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

    JSON entries carry start, length, depth, present, zero, data as qemu-img
    prints them; ``offset`` (the host offset) is given for raw layers only.
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
            mapped = "-" if e.offset is None else hex(e.offset)
            click.echo(f"{_hex(e.start):<16}{_hex(e.length):<16}{mapped:<16}{names[e.depth]}")
    return 0


def _hex(value: int) -> str:
    return "0" if value == 0 else hex(value)


@image.command()
@_fmt_option()
@_OPTIONS
@_PROGRESS
@_QUIET
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
    """Change options of an existing image (qemu-img amend).

    Supported: ``size`` and ``backing_file``/``backing_fmt`` (header only, as
    qemu-img). Other options (compat, refcount_bits, lazy_refcounts...) are
    refused with an error: virtkit.images cannot rewrite them in place.
    """
    del progress, quiet, force
    opts = parse_options(options)
    if not opts:
        raise click.UsageError("amend needs -o KEY=VALUE options")
    unknown = sorted(set(opts) - {"size", "backing", "backing_format"})
    if unknown:
        raise UnsupportedFeatureError(
            f"amend cannot change {', '.join(unknown)}: virtkit can change only size, "
            "backing_file and backing_fmt of an existing image",
            feature=f"amend {unknown[0]}",
        )
    if "backing" in opts or "backing_format" in opts:
        with images.open(filename, format=_f(fmt), force_share=True) as img:
            current = img.backing_file
        backing = opts.get("backing", current)
        images.rebase(filename, backing or None, _f(opts.get("backing_format")), unsafe=True)
    if "size" in opts:
        with images.open(filename, writable=True, format=_f(fmt)) as img:
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
    _check_parent(dst, "the output image")
    tmp = _temp_next_to(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@image.command()
@_fmt_option("Input format (probed when omitted).")
@click.option(
    "-O", "out_fmt", metavar="FMT", default="raw", show_default=True, help="Output format."
)
@_SHARE
@_PROGRESS
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
    with images.open(ops["if"], format=_f(fmt), force_share=force_share) as src:
        size = src.virtual_size
        if "count" in ops:
            size = min(size, parse_size(ops["count"], field="count") * bs)
        skip = parse_size(ops["skip"], field="skip") * bs if "skip" in ops else 0
        if skip > size:
            raise ConfigError(f"skip={ops['skip']} is past the end of the input", field="skip")
        size -= skip
        with _replacing(ops["of"]) as tmp, progress_bar("dd", enabled=progress) as bar:
            out = images.create(tmp, size, _f(out_fmt))
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


@image.command()
@_fmt_option()
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
    with images.open(filename, writable=True, format=_f(fmt)) as img:
        if add:
            img.add_bitmap(bitmap, granularity=granularity)
        if merge is not None:
            source: Any = None
            if source_file is not None:
                source = images.open(source_file, format=_f(source_fmt), force_share=True)
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

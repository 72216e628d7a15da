"""``virtkit image``: qemu-img's commands, flags, exit codes and JSON, over virtkit.images.

Each command takes the flags its qemu-img namesake takes (``-f`` source
format, ``-F`` backing format, ``-O`` output format, ``-o`` options, ``-U``
force share, ``-p`` progress, ``-q`` quiet) and prints what it prints, so a
script can switch from ``qemu-img`` to ``virtkit image`` (and back).
"""

from __future__ import annotations

import os
from typing import Any

import click

from virtkit import images
from virtkit.cli import image_tools
from virtkit.cli.chain import open_chain
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
from virtkit.cli.output import OUTPUT, emit_json, error, human_bool, human_size
from virtkit.cli.progress import progress_bar
from virtkit.errors import ConfigError, UnsupportedFeatureError
from virtkit.units import parse_size

__all__ = ["image", "parse_options"]


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


#: the order qemu-img info --output=json prints its keys in
_INFO_ORDER = (
    "snapshots",
    "backing-filename-format",
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
    "actual-size",
    "format-specific",
    "full-backing-filename",
    "backing-filename",
    "dirty-flag",
)


def _info_json(info: images.ImageInfo) -> dict[str, Any]:
    data = _info_fields(info)
    ordered = {k: data.pop(k) for k in _INFO_ORDER if k in data}
    return {**ordered, **data}


def _info_fields(info: images.ImageInfo) -> dict[str, Any]:
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
@fmt_option()
@SHARE
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
@OPTIONS
@QUIET
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
    check_parent(filename, "the image")
    if backing and backing_fmt is None:  # "" is left for images.create to refuse
        folder = os.path.dirname(os.path.abspath(filename))
        probe = backing if os.path.isabs(backing) else os.path.join(folder, backing)
        backing_fmt = images.probe_format(probe)
    created = images.create(
        filename,
        size,
        as_format(fmt),
        backing=backing,
        backing_format=as_format(backing_fmt),
        **opts,
    )
    try:
        asked = None if size is None else parse_size(size, field="size")
        line = _formatting_line(filename, created, asked, opts, backing, backing_fmt)
    finally:
        created.close()
    if not quiet:
        click.echo(line)
    return 0


def _on_off(value: Any) -> str:
    return "on" if value else "off"


def _formatting_line(
    filename: str,
    created: images.Image,
    asked: int | None,
    opts: dict[str, Any],
    backing: str | None,
    backing_fmt: str | None,
) -> str:
    """qemu-img create's "Formatting ..." line: the options in the order qemu-img 7.2 prints
    them, with its defaults (qcow2, raw, VPC exactly; other formats' defaults when no -o).
    The size is the one asked for (a VHD's geometry may round the disk up), else the
    backing file's."""
    fmt = created.format
    size = created.virtual_size if asked is None else asked
    given = {k: v for k, v in opts.items() if v is not None}
    words: list[str] = []
    if fmt == "qcow2":
        spec = created.info().format_specific or {}
        words += [f"cluster_size={created.cluster_size}"]
        words += [f"extended_l2={_on_off(spec.get('extended-l2'))}"]
        if "preallocation" in given:
            words += [f"preallocation={given['preallocation']}"]
        words += [f"compression_type={spec.get('compression-type', 'zlib')}", f"size={size}"]
        if "compat" in given:
            words += [f"compat={given['compat']}"]
        if backing:
            words += [f"backing_file={backing}", f"backing_fmt={backing_fmt}"]
        words += [f"lazy_refcounts={_on_off(spec.get('lazy-refcounts'))}"]
        words += [f"refcount_bits={spec.get('refcount-bits', 16)}"]
    else:
        words += [f"size={size}"]
        if backing:
            words += [f"backing_file={backing}", f"backing_fmt={backing_fmt}"]
        defaults = {
            "vmdk": ["compat6=off", "hwversion=undefined"],
            "vdi": ["static=off"],
            "vhdx": ["log_size=1048576", "block_size=0"],
        }
        if not given:
            words += defaults.get(fmt, [])
        words += [f"{k}={_on_off(v) if isinstance(v, bool) else v}" for k, v in given.items()]
    return f"Formatting '{filename}', fmt={fmt} " + " ".join(words)


#: formats qemu-img check refuses (exit 63): nothing in them to check
_UNCHECKABLE = ("raw", "vpc")


def _check_json(result: images.CheckResult, filename: str, fmt: str) -> dict[str, Any]:
    """The dict ``qemu-img check --output=json`` prints, keys in its order; zeros left out."""
    fields: list[tuple[str, int | str]] = [
        ("image-end-offset", result.image_end_offset or 0),
        ("total-clusters", result.total_clusters),
        ("corruptions", result.corruptions - result.corruptions_fixed),
        ("corruptions-fixed", result.corruptions_fixed),
        ("check-errors", result.errors),
        ("leaks", result.leaks - result.leaks_fixed),
        ("leaks-fixed", result.leaks_fixed),
        ("allocated-clusters", result.allocated_clusters),
        ("filename", filename),
        ("format", fmt),
    ]
    qcow2_only = ("image-end-offset", "total-clusters", "allocated-clusters")
    return {
        k: v
        for k, v in fields
        if (v or k in ("check-errors", "filename", "format"))
        and (fmt == "qcow2" or k not in qcow2_only)  # qemu-img counts clusters of qcow2 only
    }


@image.command()
@fmt_option()
@SHARE
@OUTPUT
@QUIET
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
    3 only leaked clusters, 63 the format has nothing to check (raw, vpc).
    """
    fix = repair is not None or repair_all
    if fix and force_share:
        raise ConfigError("-r cannot be used with -U (repairing needs the image to itself)")
    with images.open(filename, writable=fix, format=as_format(fmt), force_share=force_share) as img:
        if img.format in _UNCHECKABLE:
            error(f"this image format ({img.format}) does not support checks")
            return 63
        result = img.check(repair=fix)
        fmt_name = img.format
    remaining_corrupt = result.corruptions - result.corruptions_fixed
    remaining_leaks = result.leaks - result.leaks_fixed
    if output == "json":
        emit_json(_check_json(result, filename, fmt_name))
    elif not quiet:
        _print_check(result, remaining_corrupt, remaining_leaks, qcow2=fmt_name == "qcow2")
    if result.errors:
        return 1
    if remaining_corrupt:
        return 2
    if remaining_leaks:
        return 3
    return 0


def _print_check(result: images.CheckResult, corrupt: int, leaks: int, *, qcow2: bool) -> None:
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
    if result.total_clusters and qcow2:
        share = 100.0 * result.allocated_clusters / result.total_clusters
        click.echo(
            f"{result.allocated_clusters}/{result.total_clusters} = {share:.2f}% allocated, "
            "0.00% fragmented, 0.00% compressed clusters"
        )
    if result.image_end_offset and qcow2:
        click.echo(f"Image end offset: {result.image_end_offset}")


@image.command()
@fmt_option("Source format (probed when omitted).")
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
@OPTIONS
@SHARE
@PROGRESS
@QUIET
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
    check_parent(dst, "the output image")
    with progress_bar("convert", enabled=progress and not quiet) as bar:
        images.convert(
            src,
            dst,
            format=out_fmt,
            compress=compress,
            progress=bar,
            src_format=as_format(fmt),
            force_share=force_share,
            **opts,
        )
    return 0


@image.command()
@fmt_option()
@SHARE
@QUIET
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
        filename, writable=writable, format=as_format(fmt), force_share=force_share and not writable
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
@fmt_option()
@click.option(
    "--shrink", is_flag=True, help="Allow making the image smaller (data past the end is lost)."
)
@QUIET
@click.argument("filename")
@click.argument("size")
def resize(fmt: str | None, shrink: bool, quiet: bool, filename: str, size: str) -> int:
    """Change the virtual size (qemu-img resize).

    SIZE is the new size, or +SIZE / -SIZE to grow or shrink by that much.
    """
    with images.open(filename, writable=True, format=as_format(fmt)) as img:
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
@fmt_option()
@click.option(
    "-b", "backing", metavar="FILE", required=True, help='The new backing file ("" for none).'
)
@click.option("-F", "backing_fmt", metavar="FMT", help="Format of the new backing file.")
@click.option(
    "-u", "unsafe", is_flag=True, help="Only rewrite the header (the file was moved or renamed)."
)
@PROGRESS
@QUIET
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
        images.rebase(filename, backing or None, as_format(backing_fmt), unsafe, progress=bar)
    return 0


@image.command()
@fmt_option()
@click.option(
    "-d", "drop", is_flag=True, help="Delete the overlay afterwards instead of emptying it."
)
@PROGRESS
@QUIET
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
@fmt_option("Source format (probed when omitted).")
@click.option(
    "-O", "out_fmt", metavar="FMT", default="raw", show_default=True, help="Target format."
)
@OPTIONS
@click.option("--size", metavar="SIZE", help="Measure a new empty image of SIZE instead of a file.")
@SHARE
@OUTPUT
@click.argument("filename", required=False)
def measure(
    fmt: str | None,
    out_fmt: str,
    options: tuple[str, ...],
    size: str | None,
    force_share: bool,
    output: str,
    filename: str | None,
) -> int:
    """Size needed to convert to -O (qemu-img measure).

    Measures FILENAME, or a new empty image of --size.
    """
    if (filename is None) == (size is None):
        raise click.UsageError("give either an image file or --size, not both")
    opts = parse_options(options)
    result = images.measure(
        filename,
        out_fmt,
        size=size,
        src_format=as_format(fmt),
        force_share=force_share,
        **opts,
    )
    if output == "json":
        emit_json(result)
        return 0
    click.echo(f"required size: {result['required']}")
    click.echo(f"fully allocated size: {result['fully-allocated']}")
    if "bitmaps" in result:
        click.echo(f"bitmaps size: {result['bitmaps']}")
    return 0


for _command in image_tools.COMMANDS:
    image.add_command(_command)

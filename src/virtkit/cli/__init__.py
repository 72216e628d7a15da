"""The ``virtkit`` command: a thin shell over the public API.

::

    virtkit image info disk.qcow2 [--json]
    virtkit image create disk.qcow2 10G [-f qcow2] [-b base.qcow2 -F qcow2] [-o cluster_size=65536]
    virtkit image check disk.qcow2 [--repair]
    virtkit image convert src.raw dst.qcow2 [-O qcow2] [-c]
    virtkit image snapshot disk.qcow2 (-l | -c NAME | -a NAME | -d NAME)
    virtkit vm show FOLDER
    virtkit vm run FOLDER [--backend emulator] [--timeout SECONDS]

Exit status: 0 on success, 1 when virtkit reports an error (printed on
stderr), 2 for a usage error, 3 when ``image check`` finds problems.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import virtkit
from virtkit import images

__all__ = ["main"]


#: -o options that are switches: they take on/off (or true/false), nothing else.
_SWITCHES = ("lazy_refcounts", "extended_l2")


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise virtkit.ConfigError(f"-o expects key=value (got {pair!r})", field="-o")
        lowered = value.lower()
        if key.replace("-", "_") in _SWITCHES and lowered not in ("on", "off", "true", "false"):
            raise virtkit.ConfigError(
                f"-o {key} takes on or off (got {value!r})", field=key, value=value
            )
        out[key.replace("-", "_")] = (
            True if lowered in ("on", "true") else False if lowered in ("off", "false") else value
        )
        if key.replace("-", "_") in ("cluster_size", "refcount_bits") and value.isdigit():
            out[key.replace("-", "_")] = int(value)
    return out


def _snapshot_line(snap: images.SnapshotInfo) -> str:
    return f"{snap.id:<4} {snap.name:<24} {snap.vm_state_size:>10} {snap.date:%Y-%m-%d %H:%M:%S}"


def _image_info(args: argparse.Namespace) -> int:
    with images.open(args.path, force_share=True) as img:
        info = img.info()
    if args.json:
        print(json.dumps(info.to_json(), indent=4, default=str))
        return 0
    print(f"image: {info.filename}")
    print(f"file format: {info.format}")
    print(f"virtual size: {info.virtual_size} bytes")
    print(f"disk size: {info.actual_size} bytes")
    if info.cluster_size:
        print(f"cluster_size: {info.cluster_size}")
    if info.backing_filename:
        print(f"backing file: {info.backing_filename}")
    if info.snapshots:
        print("Snapshot list:")
        for snap in info.snapshots:
            print("  " + _snapshot_line(snap))
    for key, value in info.format_specific.items():
        print(f"  {key}: {value}")
    return 0


def _image_create(args: argparse.Namespace) -> int:
    options = _options(args.o)
    img = images.create(
        args.path,
        args.size,
        args.format,
        backing=args.backing,
        backing_format=args.backing_format,
        **options,
    )
    img.close()
    print(f"Formatting '{args.path}', fmt={args.format} size={img.virtual_size}")
    return 0


def _image_check(args: argparse.Namespace) -> int:
    with images.open(args.path, writable=args.repair) as img:
        result = img.check(repair=args.repair)
    for problem in result.problems:
        where = f" at offset {problem.offset:#x}" if problem.offset is not None else ""
        print(f"{problem.kind.upper()}: {problem.message}{where}")
    if result.ok:
        print("No errors were found on the image.")
        return 0
    print(
        f"{result.leaks - result.leaks_fixed} leaked clusters, "
        f"{result.corruptions - result.corruptions_fixed} corruptions remain."
    )
    return 3


def _image_convert(args: argparse.Namespace) -> int:
    def progress(done: int, total: int) -> None:
        if args.progress and total:
            print(f"\r    ({100 * done / total:6.2f}/100%)", end="", file=sys.stderr)

    images.convert(
        args.src,
        args.dst,
        format=args.out_format,
        compress=args.compress,
        progress=progress,
        **_options(args.o),
    )
    if args.progress:
        print(file=sys.stderr)
    return 0


def _image_snapshot(args: argparse.Namespace) -> int:
    writable = not args.list
    with images.open(args.path, writable=writable) as img:
        if args.list:
            print(f"{'ID':<4} {'TAG':<24} {'VM SIZE':>10} {'DATE':<19}")
            for snap in img.snapshots:
                print(_snapshot_line(snap))
        elif args.create is not None:
            img.create_snapshot(args.create)
        elif args.apply is not None:
            img.revert_snapshot(args.apply)
        elif args.delete is not None:
            img.delete_snapshot(args.delete)
    return 0


def _vm_show(args: argparse.Namespace) -> int:
    machine = virtkit.load(args.folder)
    print(f"name: {machine.name}")
    print(f"uuid: {machine.uuid}")
    print(f"cpus: {machine.vcpus}  memory: {machine.memory} bytes  firmware: {machine.firmware}")
    for disk in machine.disks:
        print(
            f"disk {disk.target}: {disk.path} ({disk.format}, {disk.bus}"
            f"{', read-only' if disk.read_only else ''})"
        )
    for cd in machine.cdroms:
        print(f"cdrom {cd.target}: {cd.path}")
    for nic in machine.nics:
        print(f"nic {nic.name}: {nic.model} {nic.mac} ({nic.network})")
    return 0


def _vm_run(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.timeout >= 0:  # NaN too: it would never expire
        raise virtkit.ConfigError(
            f"--timeout must be a number of seconds >= 0 (got {args.timeout})", field="--timeout"
        )
    machine = virtkit.load(args.folder)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with virtkit.connect(args.backend) as hv:
        guest = hv.define(machine, folder=args.folder)
        guest.start()
        shown = 0
        try:
            while True:
                try:
                    state = guest.wait(timeout=0.2)
                except virtkit.TimeoutError:
                    state = None
                out = guest.console.output
                sys.stdout.buffer.write(out[shown:])
                sys.stdout.flush()
                shown = len(out)
                if state is not None:
                    print(
                        f"\n[guest {guest.name} stopped: {state.value}"
                        f"{': ' + guest.crash_reason if guest.crash_reason else ''}]",
                        file=sys.stderr,
                    )
                    return 0 if state is virtkit.State.SHUTOFF else 1
                if deadline is not None and time.monotonic() >= deadline:
                    raise virtkit.TimeoutError(
                        f"the guest did not power off within {args.timeout} s",
                        timeout=args.timeout,
                    )
        finally:
            if guest.state in (virtkit.State.RUNNING, virtkit.State.PAUSED):
                guest.kill()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``virtkit`` command."""
    parser = argparse.ArgumentParser(
        prog="virtkit", description="Virtual machines and disk images."
    )
    top = parser.add_subparsers(dest="group", required=True)

    image = top.add_parser("image", help="disk image tools (qcow2, raw)").add_subparsers(
        dest="cmd", required=True
    )
    p = image.add_parser("info", help="show what qemu-img info shows")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print qemu-img info --output=json")
    p.set_defaults(func=_image_info)
    p = image.add_parser("create", help="create an image")
    p.add_argument("path")
    p.add_argument("size", nargs="?")
    p.add_argument("-f", dest="format", default="qcow2", choices=["qcow2", "raw"])
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_format", choices=["qcow2", "raw"])
    p.add_argument("-o", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_image_create)
    p = image.add_parser("check", help="check (and repair) an image's metadata")
    p.add_argument("path")
    p.add_argument("--repair", action="store_true", help="fix leaks and refcount errors")
    p.set_defaults(func=_image_check)
    p = image.add_parser("convert", help="convert between formats (sparse)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("-O", dest="out_format", default="qcow2", choices=["qcow2", "raw"])
    p.add_argument("-c", dest="compress", action="store_true", help="write compressed clusters")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-o", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_image_convert)
    p = image.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    p.add_argument("path")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("-l", dest="list", action="store_true")
    group.add_argument("-c", dest="create", metavar="NAME")
    group.add_argument("-a", dest="apply", metavar="NAME")
    group.add_argument("-d", dest="delete", metavar="NAME")
    p.set_defaults(func=_image_snapshot)

    vm = top.add_parser("vm", help="VM folders").add_subparsers(dest="cmd", required=True)
    p = vm.add_parser("show", help="summarise a VM folder")
    p.add_argument("folder")
    p.set_defaults(func=_vm_show)
    p = vm.add_parser("run", help="boot a VM folder and stream its console until it powers off")
    p.add_argument("folder")
    p.add_argument("--backend", default="emulator")
    p.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    p.set_defaults(func=_vm_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``virtkit`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except virtkit.VirtkitError as exc:
        print(f"virtkit: error: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())

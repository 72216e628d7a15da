"""``virtkit vm``: virsh's verbs over VM folders and hypervisor connections.

A VM is named by its folder (``vms/web``, holding ``machine.toml``; a bare
name is a folder in the current directory). On a persistent backend the
domain of the machine's name is adopted when it exists, else defined.
``--connect`` picks the hypervisor: a backend name (``emulator``,
``qemu``) or a libvirt URI (``qemu:///system``).

Where the guest runs matters for a one-shot command. The ``emulator`` and
``qemu`` backends run guests *inside or under this process*: a guest started
by ``virtkit vm start`` would die as the command returns. So with them,
``vm run`` (boot and stream the console until power-off) and ``vm console``
(boot and attach interactively) are the ways to run a VM, while
``start``/``stop``/``kill``/``pause``/``resume``/``reset`` refuse with an
error saying so; those verbs need a persistent backend such as libvirt,
where the guest outlives the command (the CLI never closes such a
connection: closing stops the guests it touched). Snapshots, define and
show work on folders with every backend: the folder is the truth.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

import virtkit
from virtkit.cli import vm_devices
from virtkit.cli.console import interactive
from virtkit.cli.output import human_size
from virtkit.cli.progress import progress_bar
from virtkit.errors import BackendError, ConfigError, StateError

__all__ = ["IN_PROCESS", "vm"]

#: backends whose guests live only as long as the process that started them
IN_PROCESS = frozenset({"emulator", "qemu"})

_JSON = click.option("--json", "as_json", is_flag=True, help="Print the data as JSON.")


def _backend(connect: str) -> tuple[str, dict[str, Any]]:
    """A --connect value as (backend name, connect() options)."""
    if "://" in connect or connect.startswith(("qemu:", "test:")):
        return "libvirt", {"uri": connect}
    return connect, {}


@contextlib.contextmanager
def _hypervisor(ctx: click.Context, root: str | None = None) -> Iterator[virtkit.Hypervisor]:
    name, options = _backend(ctx.obj["connect"])
    if name in IN_PROCESS:
        if root is not None:
            options["root"] = root
        with virtkit.connect(name, **options) as hv:
            yield hv
        return
    # A persistent hypervisor is never close()d here: closing stops the guests this
    # connection touched. The domains stay with the daemon, as after a virsh command,
    # and the connection ends with the process.
    yield virtkit.connect(name, **options)


def _in_process(ctx: click.Context) -> bool:
    return _backend(ctx.obj["connect"])[0] in IN_PROCESS


def _is_folder(vm_arg: str) -> bool:
    return os.path.isfile(os.path.join(vm_arg, "machine.toml"))


def _guest(hv: virtkit.Hypervisor, vm_arg: str) -> virtkit.Guest:
    """The guest a VM argument names: its folder (or a folder of that name here).

    On a persistent hypervisor an existing domain of the machine's name is
    adopted (``hv.attach``); otherwise the folder's machine is defined.
    """
    if not _is_folder(vm_arg):
        if os.path.isdir(vm_arg):
            raise ConfigError(f"{vm_arg} is a folder but holds no machine.toml", field="VM")
        raise ConfigError(
            f"no VM folder {vm_arg!r} (a folder holding machine.toml) here", field="VM"
        )
    machine = virtkit.load(vm_arg)
    for guest in hv.guests:
        if guest.name == machine.name:
            return guest
    adopt = getattr(hv, "attach", None)
    if adopt is not None:
        domain = getattr(hv, "name_prefix", "") + machine.name
        with contextlib.suppress(BackendError):  # no such domain yet: define it below
            adopted: virtkit.Guest = adopt(domain, machine, vm_arg)
            return adopted
    return _define_folder(hv, machine, vm_arg, progress=True)


def _define_folder(
    hv: virtkit.Hypervisor, machine: virtkit.Machine, folder: str, *, progress: bool
) -> virtkit.Guest:
    """Define the VM folder on ``hv``; a libvirt host without shared storage gets its
    disks uploaded first (``hv.push``), with a bar on a terminal when ``progress``."""
    push = getattr(hv, "push", None)
    if push is not None and not getattr(hv, "local_files", True):
        with progress_bar("upload", enabled=progress) as bar:
            pushed: virtkit.Guest = push(folder, progress=bar)
        return pushed
    return hv.define(machine, folder=folder)


def _needs_persistent(ctx: click.Context, verb: str) -> None:
    if _in_process(ctx):
        raise StateError(
            f"'vm {verb}' needs a persistent hypervisor: the {ctx.obj['connect']!r} backend runs "
            "guests inside this command's process, so they stop when it exits. Use "
            "'virtkit vm run' or 'virtkit vm console' to run a VM here, or --connect a "
            "libvirt URI (qemu:///system) for a VM that outlives the command",
            action=verb,
        )


@click.group()
@click.option(
    "-c",
    "--connect",
    default=lambda: os.environ.get("VIRTKIT_CONNECT", "emulator"),
    show_default="emulator, or $VIRTKIT_CONNECT",
    metavar="BACKEND|URI",
    help="Hypervisor: a backend name (emulator, qemu) or a libvirt URI (qemu:///system).",
)
@click.pass_context
def vm(ctx: click.Context, connect: str) -> None:
    """Virtual machines: virsh's verbs over VM folders and hypervisors."""
    ctx.ensure_object(dict)
    ctx.obj["connect"] = connect


def _summary(machine: virtkit.Machine, folder: str | None, state: str) -> dict[str, Any]:
    return {
        "name": machine.name,
        "uuid": str(machine.uuid),
        "state": state,
        "folder": folder,
        "cpus": machine.vcpus,
        "memory": machine.memory,
        "firmware": str(machine.firmware),
        "disks": [
            {
                "target": d.target,
                "path": d.path,
                "format": str(d.format),
                "bus": str(d.bus),
                "read-only": d.read_only,
            }
            for d in machine.disks
        ],
        "cdroms": [{"target": c.target, "path": c.path} for c in machine.cdroms],
        "nics": [
            {"name": n.name, "model": str(n.model), "mac": n.mac, "network": str(n.network)}
            for n in machine.nics
        ],
    }


_DOMAIN_STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting down",
    5: "shut off",
    6: "crashed",
    7: "suspended",
}


def _domains(hv: virtkit.Hypervisor) -> list[dict[str, Any]]:
    """Every domain the host knows (not only this connection's guests), as virsh list --all."""
    connection = getattr(hv, "connection", None)
    raw = getattr(connection, "raw", None)
    if raw is None:
        return [
            {"name": g.name, "state": g.state.value, "folder": str(g.folder)} for g in hv.guests
        ]
    gone = connection.lv.libvirtError  # type: ignore[union-attr]
    rows = []
    for domain in raw.listAllDomains():
        try:
            name, code = domain.name(), int(domain.state()[0])
        except gone:  # undefined by someone else since the listing: not there any more
            continue
        rows.append({"name": name, "state": _DOMAIN_STATES.get(code, str(code)), "folder": None})
    return sorted(rows, key=lambda row: str(row["name"]))


@vm.command(name="list")
@click.option(
    "--root",
    default=".",
    show_default=True,
    help="Folder whose subfolders are VMs (in-process backends).",
)
@click.option("--all", "show_all", is_flag=True, help="Accepted for virsh compatibility.")
@_JSON
@click.pass_context
def list_(ctx: click.Context, root: str, show_all: bool, as_json: bool) -> int:
    """List VMs (folders under --root, or a persistent hypervisor's guests)."""
    del show_all
    rows: list[dict[str, Any]] = []
    if _in_process(ctx):
        base = Path(root)
        folders = sorted(p for p in base.iterdir() if (p / "machine.toml").is_file())
        for folder in folders:
            machine = virtkit.load(folder)
            rows.append({"name": machine.name, "state": "shut off", "folder": str(folder)})
    else:
        with _hypervisor(ctx) as hv:
            rows = _domains(hv)
    if as_json:
        click.echo(json.dumps(rows, indent=4))
        return 0
    click.echo(f" {'Name':<24} {'State':<10} Folder")
    click.echo("-" * 60)
    for row in rows:
        click.echo(f" {row['name']:<24} {row['state']:<10} {row['folder'] or '-'}")
    return 0


@vm.command()
@click.argument("folder")
@_JSON
def show(folder: str, as_json: bool) -> int:
    """Summarise the VM in FOLDER (CPUs, memory, disks, NICs)."""
    machine = virtkit.load(folder)
    data = _summary(machine, folder, "shut off")
    if as_json:
        click.echo(json.dumps(data, indent=4))
        return 0
    click.echo(f"name: {machine.name}")
    click.echo(f"uuid: {machine.uuid}")
    click.echo(
        f"cpus: {machine.vcpus}  memory: {human_size(machine.memory)}  firmware: {data['firmware']}"
    )
    for disk in machine.disks:
        click.echo(
            f"disk {disk.target}: {disk.path} ({disk.format}, {disk.bus}"
            f"{', read-only' if disk.read_only else ''})"
        )
    for cd in machine.cdroms:
        click.echo(f"cdrom {cd.target}: {cd.path}")
    for nic in machine.nics:
        click.echo(f"nic {nic.name}: {nic.model} {nic.mac} ({nic.network})")
    return 0


@vm.command()
@click.argument("source")
@click.option(
    "--root",
    default=".",
    show_default=True,
    help="Where the VM folder is created (in-process backends).",
)
@click.option(
    "-p",
    "progress",
    is_flag=True,
    help="Show a progress bar while disks are uploaded (on a terminal).",
)
@click.pass_context
def define(ctx: click.Context, source: str, root: str, progress: bool) -> int:
    """Define a VM from a machine.toml file or a VM folder.

    On an in-process backend this creates ROOT/NAME (machine.toml, disks/ with
    the images that have a size, snapshots/); on libvirt it defines a domain
    for a VM folder in place, uploading its disks to a host without shared
    storage (qemu+ssh://...).
    """
    if not _in_process(ctx) and _is_folder(source):
        with _hypervisor(ctx) as hv:
            guest = _define_folder(hv, virtkit.load(source), source, progress=progress)
            click.echo(f"Domain '{guest.name}' defined from {source}")
        return 0
    path = Path(source)
    if path.is_file() and path.name != "machine.toml":
        import tempfile  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(path, Path(tmp) / "machine.toml")
            machine = virtkit.load(tmp)
    else:
        machine = virtkit.load(path.parent if path.is_file() else path)
    with _hypervisor(ctx, root=root) as hv:
        guest = hv.define(machine)
        click.echo(f"Domain '{guest.name}' defined in {guest.folder}")
    return 0


@vm.command()
@click.argument("name", metavar="VM")
@click.pass_context
def undefine(ctx: click.Context, name: str) -> int:
    """Forget a stopped VM (its files stay). Persistent hypervisors only."""
    if _in_process(ctx):
        raise StateError(
            f"'vm undefine' needs a persistent hypervisor: with {ctx.obj['connect']!r} a VM is "
            "just its folder; delete the folder to forget it",
            action="undefine",
        )
    with _hypervisor(ctx) as hv:
        guest = _guest(hv, name)
        hv.undefine(guest)
    click.echo(f"Domain '{guest.name}' has been undefined")
    return 0


def _lifecycle(verb: str, done: str, doc: str) -> None:
    @vm.command(name=verb, help=doc)
    @click.argument("vm_arg", metavar="VM")
    @click.pass_context
    def command(ctx: click.Context, vm_arg: str) -> int:
        _needs_persistent(ctx, verb)
        with _hypervisor(ctx) as hv:
            guest = _guest(hv, vm_arg)
            if verb == "stop":
                guest.shutdown(timeout=60)
            else:
                getattr(guest, verb)()
            click.echo(f"Domain '{guest.name}' {done}")
        return 0


_lifecycle("start", "started", "Start VM (persistent hypervisors; see 'vm run' otherwise).")
_lifecycle("stop", "is shut down", "Press VM's ACPI power button; wait (60 s) until it is off.")
_lifecycle("kill", "destroyed", "Stop VM at once, like pulling the plug.")
_lifecycle("pause", "suspended", "Freeze VM's CPUs.")
_lifecycle("resume", "resumed", "Continue a paused VM.")
_lifecycle("reset", "was reset", "Press VM's reset button.")


def _stream(guest: virtkit.Guest, deadline: float | None, timeout: float | None) -> int:
    shown = 0
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
            reason = f": {guest.crash_reason}" if guest.crash_reason else ""
            click.echo(f"\n[guest {guest.name} stopped: {state.value}{reason}]", file=sys.stderr)
            return 0 if state is virtkit.State.SHUTOFF else 1
        if deadline is not None and time.monotonic() >= deadline:
            raise virtkit.TimeoutError(
                f"the guest did not power off within {timeout} s", timeout=timeout
            )


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:  # NaN too: it would never expire
        raise ConfigError(
            f"--timeout must be a number of seconds >= 0 (got {timeout})", field="--timeout"
        )


@vm.command()
@click.argument("folder")
@click.option("--timeout", type=float, default=None, help="Seconds before giving up (killing it).")
@click.option("--backend", default=None, hidden=True, help="Old spelling of vm --connect.")
@click.pass_context
def run(ctx: click.Context, folder: str, timeout: float | None, backend: str | None) -> int:
    """Boot FOLDER here and stream its console until power-off.

    Exit status 0 when the guest powers off, 1 when it crashes or --timeout
    passes (it is killed then).
    """
    _check_timeout(timeout)
    if backend is not None:
        ctx.obj["connect"] = backend
    machine = virtkit.load(folder)
    deadline = None if timeout is None else time.monotonic() + timeout
    with _hypervisor(ctx) as hv:
        guest = hv.define(machine, folder=folder)
        try:
            guest.start()
            return _stream(guest, deadline, timeout)
        finally:
            if guest.state in (virtkit.State.RUNNING, virtkit.State.PAUSED, virtkit.State.CRASHED):
                guest.kill()


@vm.command()
@click.argument("vm_arg", metavar="VM")
@click.option(
    "--escape",
    default="^]",
    show_default=True,
    help="Key that detaches, as ^X (Ctrl-X).",
)
@click.pass_context
def console(ctx: click.Context, vm_arg: str, escape: str) -> int:
    """Attach to VM's serial console (Ctrl-] detaches).

    On an in-process backend the VM is booted first and killed on detach (it
    runs inside this command); on libvirt the running guest is attached.
    """
    if len(escape) != 2 or escape[0] != "^" or not "@" <= escape[1].upper() <= "_":
        raise ConfigError(f"--escape must look like ^] or ^X (got {escape!r})", field="--escape")
    key = bytes([ord(escape[1].upper()) & 0x1F])
    with _hypervisor(ctx) as hv:
        guest = _guest(hv, vm_arg)
        started_here = _in_process(ctx)
        if started_here:
            guest.start()
        elif guest.state not in (virtkit.State.RUNNING, virtkit.State.PAUSED):
            raise StateError(
                f"domain {guest.name!r} is not running ({guest.state.value}); "
                "'virtkit vm start' it first",
                action="console",
            )
        try:
            click.echo(f"Connected to domain '{guest.name}'", file=sys.stderr)
            click.echo(f"Escape character is {escape}", file=sys.stderr)
            state = interactive(guest, escape=key)
        finally:
            if started_here and guest.state in (
                virtkit.State.RUNNING,
                virtkit.State.PAUSED,
                virtkit.State.CRASHED,
            ):
                guest.kill()
        click.echo("", file=sys.stderr)
        if state is not None:
            click.echo(f"[guest {guest.name} stopped: {state.value}]", file=sys.stderr)
    return 0


@vm.group(name="snapshot")
def snapshot_group() -> None:
    """Create, list, revert and delete VM snapshots."""


@snapshot_group.command(name="create")
@click.argument("vm_arg", metavar="VM")
@click.argument("name")
@click.option("--description", default="", help="Free text kept with the snapshot.")
@click.option(
    "--disk-only/--memory",
    "disk_only",
    default=None,
    help="Disk only, or disk + RAM + CPU state (default: memory when running, else disk only).",
)
@click.pass_context
def snapshot_create(
    ctx: click.Context, vm_arg: str, name: str, description: str, disk_only: bool | None
) -> int:
    """Take snapshot NAME of VM."""
    with _hypervisor(ctx) as hv:
        guest = _guest(hv, vm_arg)
        memory = guest.state is not virtkit.State.SHUTOFF if disk_only is None else not disk_only
        snap = guest.snapshot(name, memory=memory, description=description)
    click.echo(f"Domain snapshot {snap.name} created")
    return 0


@snapshot_group.command(name="list")
@click.argument("vm_arg", metavar="VM")
@_JSON
@click.pass_context
def snapshot_list(ctx: click.Context, vm_arg: str, as_json: bool) -> int:
    """List VM's snapshots, oldest first."""
    with _hypervisor(ctx) as hv:
        guest = _guest(hv, vm_arg)
        snaps = guest.snapshots
        current = guest.current_snapshot
    rows = [
        {
            "name": s.name,
            "created": s.created_at.isoformat(),
            "kind": str(getattr(s.kind, "value", s.kind)),
            "state": str(getattr(s.state, "value", s.state)) if hasattr(s, "state") else None,
            "parent": s.parent,
            "current": current is not None and current.name == s.name,
            "description": s.description,
        }
        for s in snaps
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=4))
        return 0
    click.echo(f" {'Name':<20} {'Creation Time':<26} {'Kind':<6} Parent")
    click.echo("-" * 66)
    for row in rows:
        mark = "*" if row["current"] else " "
        click.echo(
            f"{mark}{row['name']:<20} {row['created']:<26} {row['kind']:<6} {row['parent'] or ''}"
        )
    return 0


@snapshot_group.command(name="revert")
@click.argument("vm_arg", metavar="VM")
@click.argument("name")
@click.pass_context
def snapshot_revert(ctx: click.Context, vm_arg: str, name: str) -> int:
    """Revert VM to snapshot NAME (a snapshot of a running VM needs a persistent hypervisor)."""
    with _hypervisor(ctx) as hv:
        guest = _guest(hv, vm_arg)
        guest.revert(name)
        if _in_process(ctx) and guest.state is not virtkit.State.SHUTOFF:
            guest.kill()
            click.echo(
                f"snapshot {name} held a running VM; its disks were reverted, but the VM "
                "stops with this command (in-process backend)",
                err=True,
            )
    click.echo(f"Domain '{guest.name}' reverted to snapshot {name}")
    return 0


@snapshot_group.command(name="delete")
@click.argument("vm_arg", metavar="VM")
@click.argument("name")
@click.pass_context
def snapshot_delete(ctx: click.Context, vm_arg: str, name: str) -> int:
    """Delete VM's snapshot NAME."""
    with _hypervisor(ctx) as hv:
        _guest(hv, vm_arg).delete_snapshot(name)
    click.echo(f"Domain snapshot {name} deleted")
    return 0


vm_devices.register(vm, _hypervisor, _guest, _in_process)

"""``virtkit vm clone|attach|detach|change-media|migrate|import-ova|export-ova``.

Copies, devices, moves and appliances.

Registered on the ``vm`` group by :mod:`virtkit.cli.vm`. Device changes on a
stopped VM edit its folder (on every backend); on a running guest of a
persistent hypervisor they are live (hot-plug, tray moves).
"""

from __future__ import annotations

from typing import Any

import click

import virtkit
from virtkit.cli.progress import progress_bar
from virtkit.errors import ConfigError, StateError

__all__ = ["register"]


def register(vm: click.Group, hypervisor: Any, guest_of: Any, in_process: Any) -> None:
    """Add the commands to the ``vm`` group (``hypervisor``/``guest_of`` from vm.py)."""

    @vm.command()
    @click.argument("src")
    @click.argument("dst")
    @click.option("--name", default=None, help="The clone's name (default: DST's folder name).")
    @click.option(
        "--full",
        is_flag=True,
        help="Copy the disks (default: linked clone, overlays over the source's disks).",
    )
    @click.option("-p", "progress", is_flag=True, help="Show a progress bar (on a terminal).")
    def clone(src: str, dst: str, name: str | None, full: bool, progress: bool) -> int:
        """Copy the stopped VM in SRC to a new folder DST (new UUID, MACs)."""
        with progress_bar("clone", enabled=progress) as bar:
            machine = virtkit.clone(src, dst, name=name, linked=not full, progress=bar)
        kind = "full" if full else "linked"
        click.echo(f"Domain '{machine.name}' cloned ({kind}) into {dst}")
        return 0

    @vm.command(name="import-ova")
    @click.argument("appliance", metavar="OVA")
    @click.argument("folder")
    @click.option("-p", "progress", is_flag=True, help="Show a progress bar (on a terminal).")
    def import_ova(appliance: str, folder: str, progress: bool) -> int:
        """Make the VM folder FOLDER from an OVA (or .ovf) appliance; disks become qcow2."""
        with progress_bar("import", enabled=progress) as bar:
            machine = virtkit.ova.import_ova(appliance, folder, progress=bar)
        click.echo(f"Domain '{machine.name}' imported into {folder}")
        return 0

    @vm.command(name="export-ova")
    @click.argument("folder")
    @click.argument("appliance", metavar="OVA")
    @click.option("-p", "progress", is_flag=True, help="Show a progress bar (on a terminal).")
    def export_ova(folder: str, appliance: str, progress: bool) -> int:
        """Write the VM in FOLDER as an OVA appliance (OVF 1.1, streamOptimized VMDK disks)."""
        with progress_bar("export", enabled=progress) as bar:
            virtkit.ova.export_ova(folder, appliance, progress=bar)
        click.echo(f"Exported {folder} to {appliance}")
        return 0

    @vm.command()
    @click.argument("vm_arg", metavar="VM")
    @click.option("--disk", "disk_path", metavar="PATH", help="Attach this image as a disk.")
    @click.option("--format", "disk_format", default=None, help="The disk's image format.")
    @click.option("--size", default=None, help="Create the image with this size if missing.")
    @click.option("--bus", default="virtio", show_default=True, help="Disk bus.")
    @click.option("--read-only", is_flag=True, help="Attach the disk read-only.")
    @click.option("--nic", is_flag=True, help="Attach a network card instead of a disk.")
    @click.option("--network", default="user", show_default=True, help="The NIC's network.")
    @click.option("--model", default="virtio", show_default=True, help="The NIC's model.")
    @click.pass_context
    def attach(
        ctx: click.Context,
        vm_arg: str,
        disk_path: str | None,
        disk_format: str | None,
        size: str | None,
        bus: str,
        read_only: bool,
        nic: bool,
        network: str,
        model: str,
    ) -> int:
        """Attach a disk (--disk PATH) or a network card (--nic) to VM."""
        if nic == (disk_path is not None):
            raise click.UsageError("give either --disk PATH or --nic")
        device: virtkit.Disk | virtkit.Nic
        if disk_path is not None:
            fields: dict[str, Any] = {"bus": bus, "read_only": read_only, "size": size}
            if disk_format is not None:
                fields["format"] = disk_format
            device = virtkit.Disk(disk_path, **fields)
        else:
            device = virtkit.Nic(network=network, model=model)
        with hypervisor(ctx) as hv:
            added = guest_of(hv, vm_arg).attach(device)
        label = added.target if isinstance(added, virtkit.Disk) else added.name
        click.echo(f"Device attached: {label}")
        return 0

    @vm.command()
    @click.argument("vm_arg", metavar="VM")
    @click.argument("target")
    @click.pass_context
    def detach(ctx: click.Context, vm_arg: str, target: str) -> int:
        """Detach the disk or network card TARGET (vdb, net1) from VM; its files stay."""
        with hypervisor(ctx) as hv:
            guest_of(hv, vm_arg).detach(target)
        click.echo(f"Device detached: {target}")
        return 0

    @vm.command(name="change-media")
    @click.argument("vm_arg", metavar="VM")
    @click.argument("cdrom")
    @click.argument("path", required=False)
    @click.option("--eject", is_flag=True, help="Empty the drive.")
    @click.pass_context
    def change_media(
        ctx: click.Context, vm_arg: str, cdrom: str, path: str | None, eject: bool
    ) -> int:
        """Insert PATH into VM's CD-ROM drive CDROM (cdrom0), or --eject its medium."""
        if eject == (path is not None):
            raise click.UsageError("give either a PATH to insert or --eject")
        with hypervisor(ctx) as hv:
            guest_of(hv, vm_arg).change_media(cdrom, path)
        click.echo(f"Media {'ejected from' if eject else 'inserted into'} {cdrom}")
        return 0

    @vm.command()
    @click.argument("vm_arg", metavar="VM")
    @click.argument("dest_uri", metavar="DEST_URI")
    @click.option("--offline", is_flag=True, help="Pause-copy-resume instead of a live migration.")
    @click.option("--copy-storage", is_flag=True, help="Copy the disks too (no shared storage).")
    @click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
    @click.option(
        "--migration-uri",
        default=None,
        metavar="URI",
        help="Where the destination receives migration data (tcp://ADDRESS; default: "
        "libvirt's choice from its host name).",
    )
    @click.pass_context
    def migrate(
        ctx: click.Context,
        vm_arg: str,
        dest_uri: str,
        offline: bool,
        copy_storage: bool,
        timeout: float,
        migration_uri: str | None,
    ) -> int:
        """Move the running VM to the libvirt host DEST_URI (libvirt only)."""
        if in_process(ctx):
            raise StateError(
                "'vm migrate' moves a guest between libvirt hosts: --connect a libvirt URI "
                f"(the {ctx.obj['connect']!r} backend's guests live in this process)",
                action="migrate",
            )
        if "://" not in dest_uri:
            raise ConfigError(
                f"DEST_URI must be a libvirt URI such as qemu+ssh://host/system (got {dest_uri!r})",
                field="DEST_URI",
            )
        extra = {} if migration_uri is None else {"migration_uri": migration_uri}
        # neither connection is closed: closing would stop the guest on either side
        dest = virtkit.connect("libvirt", uri=dest_uri, **extra)
        with hypervisor(ctx) as hv:
            guest = guest_of(hv, vm_arg)
            migrate_to = getattr(guest, "migrate", None)
            if migrate_to is None:
                raise StateError(f"the {hv.name} backend cannot migrate guests", action="migrate")
            moved = migrate_to(dest, live=not offline, copy_storage=copy_storage, timeout=timeout)
            click.echo(f"Domain '{moved.name}' migrated to {dest_uri} ({moved.state.value})")
        return 0

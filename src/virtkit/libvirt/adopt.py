"""Adopting a domain created elsewhere (virsh, virt-install) into a VM folder."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import attrs

from virtkit.errors import CapabilityWarning, ConfigError
from virtkit.libvirt.parse import build, parse_report
from virtkit.libvirt.schema import DOMAIN_XML_FILE
from virtkit.model import Machine

__all__ = ["LibvirtHost", "import_domain"]


class LibvirtHost(Protocol):
    """What :func:`import_domain` needs of a libvirt hypervisor connection
    (``virtkit.connect("libvirt")`` gives one; this module sits below the backends)."""

    name: str
    uri: str
    local_files: bool

    def read_domain(self, domain_name: str) -> tuple[str, bool]:
        """The domain's XML and whether it runs."""

    def attach(self, domain_name: str, machine: Machine, folder: str | os.PathLike[str]) -> Any:
        """Manage the existing domain as a guest with this machine and folder."""


def import_domain(
    hv: LibvirtHost,
    name: str,
    folder: str | os.PathLike[str],
    *,
    copy_disks: bool = False,
    machine_name: str | None = None,
) -> Any:
    """Adopt the existing domain ``name`` on ``hv``'s host into the VM folder ``folder``.

    The domain keeps running (or not) as it is; the returned guest manages it.
    Its XML is kept verbatim in ``folder/libvirt-domain.xml`` so nothing
    virtkit's model lacks is lost, and what the model leaves out is reported
    in one :class:`~virtkit.CapabilityWarning`.

    Args:
        hv: a ``virtkit.connect("libvirt", ...)`` hypervisor.
        name: the domain's name on that host.
        folder: the VM folder to write (``machine.toml``...).
        copy_disks: copy the disk images into ``folder/disks`` (the domain
            must be shut off, and the host must share this file system);
            ``False`` references them in place by absolute path.
        machine_name: the machine's name when the domain's name is not a DNS
            label (default: the domain's name).

    Returns:
        the :class:`~virtkit.backends.libvirt.LibvirtGuest` managing the domain.

    Raises:
        ConfigError: bad arguments, the folder already holds a machine, or the
            domain's XML cannot be expressed.
        StateError: ``copy_disks`` of a running domain.
        BackendError: no such domain, or libvirt failed (names the URI).
    """
    from virtkit import bundle  # noqa: PLC0415 - bundle sits above this module's own needs
    from virtkit.errors import StateError  # noqa: PLC0415

    if getattr(hv, "name", None) != "libvirt" or not hasattr(hv, "attach"):
        raise ConfigError(
            f"import_domain() needs a libvirt hypervisor (got {type(hv).__name__})", field="hv"
        )
    if not isinstance(name, str) or not name:
        raise ConfigError(f"'name' must be a domain name (got {name!r})", field="name")
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigError(f"'folder' must be a path (got {folder!r})", field="folder")
    if not isinstance(copy_disks, bool):
        raise ConfigError(f"'copy_disks' must be True or False (got {copy_disks!r})")
    target = Path(os.path.abspath(os.fspath(folder)))
    if (target / bundle.CONFIG_NAME).exists():
        raise ConfigError(
            f"{target} already holds a machine ({bundle.CONFIG_NAME}); choose an empty folder",
            field="folder",
        )
    xml, active = hv.read_domain(name)
    report = parse_report(xml)
    machine = report.machine
    if machine_name is not None:
        machine = build(Machine, "machine_name", **{**_fields(machine), "name": machine_name})
    if report.unmapped:
        warnings.warn(
            CapabilityWarning(
                f"domain {name!r}: kept in {DOMAIN_XML_FILE} but not represented in virtkit's "
                f"model: {', '.join(report.unmapped)}",
                backend="libvirt",
            ),
            stacklevel=2,
        )
    if copy_disks:
        if active:
            raise StateError(
                f"cannot copy the disks of domain {name!r} on {hv.uri} while it runs; shut it "
                "off first or import with copy_disks=False",
                action="import_domain",
            )
        if not hv.local_files:
            raise ConfigError(
                f"copy_disks needs the host's files here; {hv.uri} does not share storage",
                field="copy_disks",
            )
        machine = _copy_disks(machine, target)
    target.mkdir(parents=True, exist_ok=True)
    bundle.save(machine, target, create_disks=False)
    from virtkit.bundle.atomic import atomic_write  # noqa: PLC0415

    atomic_write(target / DOMAIN_XML_FILE, xml.encode())
    return hv.attach(name, machine, target)


def _fields(machine: Machine) -> dict[str, Any]:
    return {f.name: getattr(machine, f.name) for f in attrs.fields(Machine)}


def _copy_disks(machine: Machine, folder: Path) -> Machine:
    import shutil  # noqa: PLC0415

    disks_dir = folder / "disks"
    disks_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for disk in machine.disks:
        if disk.layers or disk.backing is not None:
            raise ConfigError(
                f"disk {disk.target} of {machine.name!r} has a backing chain; copy_disks "
                "copies single images only (import with copy_disks=False)",
                field="copy_disks",
            )
        src = Path(disk.path)
        dest = disks_dir / f"{disk.target}-{src.name}"
        try:
            shutil.copyfile(src, dest)
        except OSError as exc:
            raise ConfigError(f"cannot copy disk {src} to {dest}: {exc.strerror}") from exc
        copied.append(attrs.evolve(disk, path=dest.name))
    return attrs.evolve(machine, disks=tuple(copied))

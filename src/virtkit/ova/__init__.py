"""OVF/OVA appliances <-> VM folders.

:func:`import_ova` turns an OVA (a tar archive) or an ``.ovf`` descriptor with
its files beside it into a VM folder: CPUs, memory, firmware, disks
(converted to qcow2, with progress), NICs and empty CD-ROM drives become a
:class:`virtkit.Machine` saved with :func:`virtkit.save`. Whatever the
descriptor asks for that virtkit cannot express (a sound card, USB, a NIC
model QEMU lacks, a second virtual system...) is reported with an
:class:`OvfWarning` naming it.

:func:`export_ova` writes a VM folder as an OVF 1.1 appliance: the
descriptor, a SHA256 manifest and one streamOptimized VMDK per disk (the
format VMware, VirtualBox and cloud importers take), in a USTAR archive
written to a temporary name and renamed into place.

Appliances are untrusted: see :mod:`virtkit.ova.archive` (what an archive
may hold, the manifest) and :mod:`virtkit.ova.envelope` (the XML).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

from virtkit import images
from virtkit.bundle import load, save
from virtkit.errors import ConfigError, CorruptImageError, ImageError
from virtkit.images.args import check_callable, check_path
from virtkit.model import CdRom, CpuTopology, Disk, Machine, Nic
from virtkit.ova import archive, envelope, signature
from virtkit.ova.archive import Manifest, Source

__all__ = ["OvfWarning", "export_ova", "import_ova"]

Progress = Callable[[int, int], None]
_MAC = re.compile(r"^([0-9A-Fa-f]{2})[:-]?" + r"([0-9A-Fa-f]{2})[:-]?" * 4 + r"([0-9A-Fa-f]{2})$")
_NIC_MODELS = {"e1000": "e1000", "e1000e": "e1000", "virtio": "virtio", "rtl8139": "rtl8139"}
_RESOURCE_NAMES = {1: "other device", 14: "floppy drive", 21: "serial port",
                   22: "parallel port", 23: "USB controller", 24: "graphics controller",
                   35: "sound card"}  # fmt: skip


class OvfWarning(UserWarning):
    """Something in an appliance (or a VM folder being exported) that could not be mapped.

    Attributes:
        item: what was dropped or changed, e.g. ``"sound card 'Sound Card'"``.
    """

    def __init__(self, message: str, *, item: str | None = None) -> None:
        super().__init__(message)
        self.item = item


def _warn(message: str, item: str | None = None) -> None:
    warnings.warn(OvfWarning(message, item=item), stacklevel=3)


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    return name if name and name[0].isalpha() else f"vm-{name}".strip("-")[:63] or "appliance"


def _find(source: Source, suffix: str, what: str) -> str | None:
    found = [n for n in source.order if n.lower().endswith(suffix)]
    if len(found) > 1:
        raise CorruptImageError(f"the appliance holds {len(found)} {what} files; expected one",
                                path=source.path)  # fmt: skip
    return found[0] if found else None


# -- import ---------------------------------------------------------------------------------


def import_ova(
    path: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> Machine:
    """Turn an appliance (``.ova`` archive or ``.ovf`` with its files) into a VM folder.

    Disks are converted to qcow2 under ``folder/disks/``; the descriptor's
    CPUs, memory, firmware, NICs and CD-ROM drives are mapped; what cannot be
    mapped is reported as an :class:`OvfWarning`. A manifest, when present,
    must verify (the descriptor before it is parsed, each disk as it is
    copied). On any error nothing is left behind in ``folder``.

    Args:
        path: the ``.ova`` or ``.ovf`` file.
        folder: the VM folder to create (it must not exist, or be empty).
        progress: called as ``progress(done_bytes, total_bytes)`` over the
            disks' virtual sizes while they are converted.

    Returns:
        The machine as saved in ``folder``.

    Raises:
        ConfigError: bad arguments, ``folder`` not empty, or values the model refuses.
        CorruptImageError: a damaged or hostile archive, manifest, descriptor or disk.
        UnsupportedFeatureError: a valid appliance feature virtkit cannot import.
    """
    src_path = check_path(path, "path")
    root = Path(check_path(folder, "folder"))
    check_callable(progress, "progress")
    created = archive.check_new_folder(root)
    source = archive.open_source(src_path)
    work: Path | None = None
    try:
        ovf_name = (
            _find(source, ".ovf", "descriptor (.ovf)") if source.is_archive
            else Path(src_path).name
        )  # fmt: skip
        if ovf_name is None:
            raise CorruptImageError("the archive holds no .ovf descriptor", path=src_path)
        manifest = _manifest(source, ovf_name)
        text = source.read_text(ovf_name, "descriptor")
        if manifest is not None:
            digest = manifest.hasher(ovf_name)
            if digest is not None:
                digest.update(text)
            manifest.verify(ovf_name, digest)
        plan = envelope.parse(text, src_path)
        for note in plan.notes:
            _warn(note)
        root.mkdir(parents=True, exist_ok=True)
        work = root / f".ova-import-{secrets.token_hex(4)}"
        work.mkdir()
        machine = _import(source, plan, manifest=manifest, root=root, work=work, progress=progress)
        save(machine, root)
        return machine
    except BaseException:
        if created:
            archive.remove_tree(root)
        else:
            for child in list(root.iterdir()) if root.exists() else []:
                archive.remove_tree(child) if child.is_dir() else child.unlink()
        raise
    finally:
        source.close()
        if work is not None:
            archive.remove_tree(work)


def _manifest(source: Source, ovf_name: str) -> Manifest | None:
    stem = ovf_name.rsplit(".", 1)[0]
    mf = f"{stem}.mf" if f"{stem}.mf" in source.sizes else _find(source, ".mf", "manifest (.mf)")
    if mf is None:
        _warn("the appliance has no manifest; its files are not verified", item="manifest")
        return None
    text = source.read_text(mf, "manifest")
    certs = [n for n in source.order if n.lower().endswith(".cert")]
    if certs:
        cert = f"{stem}.cert" if f"{stem}.cert" in certs else certs[0]
        signer = signature.verify(source.read_text(cert, "certificate"), cert, text, mf,
                                  source.path)  # fmt: skip
        if signer is None:
            _warn(
                "the appliance is signed (.cert) but openssl is not installed: the signature "
                "is not checked, only the manifest digests",
                item="certificate",
            )
        else:
            _warn(
                f"the appliance is signed by {signer}: the signature over the manifest "
                "verifies, but the certificate is not checked against a trust store",
                item="certificate",
            )
    return Manifest.parse(text, source, mf)


def _source_format(fmt: str) -> str | None:
    low = fmt.lower()
    if "vmdk" in low:
        return "vmdk"
    if "qcow" in low:
        return "qcow2"
    if "vhdx" in low:
        return "vhdx"
    return None


def _import(
    source: Source,
    plan: envelope.Plan,
    *,
    manifest: Manifest | None,
    root: Path,
    work: Path,
    progress: Progress | None,
) -> Machine:
    items = plan.items
    controllers = {i.instance: i for i in items if i.resource_type in (5, 6, 20)}
    name = _dns_name(plan.name or Path(source.path).stem)
    drives = [i for i in items if i.resource_type == 17]
    total = 0
    wanted: list[tuple[envelope.Hardware, envelope.DiskRef]] = []
    for drive in drives:
        m = re.match(r"^(?:ovf:)?/+disk/(.+)$", drive.host_resource)
        disk = plan.disks.get(m[1]) if m else None
        if disk is None or disk.file is None:
            _warn(f"disk drive {drive.name!r} has no disk file ({drive.host_resource!r}); "
                  "skipped", item=f"disk drive {drive.name!r}")  # fmt: skip
            continue
        wanted.append((drive, disk))
        total += disk.capacity
    done = 0
    disks: list[Disk] = []
    (root / "disks").mkdir(exist_ok=True)
    for n, (drive, disk) in enumerate(wanted):
        assert disk.file is not None
        href = archive.plain_name(disk.file.href, f"file reference {disk.file.id!r}", source.path)
        if href not in source.sizes:
            raise CorruptImageError(f"the descriptor refers to {href!r}, which the appliance "
                                    "does not contain", path=source.path)  # fmt: skip
        if disk.file.size is not None and disk.file.size != source.sizes[href]:
            raise CorruptImageError(f"{href!r} is {source.sizes[href]} bytes but the descriptor "
                                    f"declares {disk.file.size}", path=source.path)  # fmt: skip
        tmp = work / f"disk{n}"
        digest = manifest.hasher(href) if manifest is not None else None
        source.copy(href, tmp, limit=disk.capacity + disk.capacity // 8 + (64 << 20),
                    on_bytes=digest.update if digest is not None else lambda b: None,
                    decompress=disk.file.compression == "gzip")  # fmt: skip
        if manifest is not None:
            manifest.verify(href, digest)
        out = f"{name}-disk{n + 1}.qcow2"
        base = done

        def step(d: int, t: int, base: int = base, cap: int = disk.capacity) -> None:
            if progress is not None:
                progress(base + d * cap // max(t, 1), total)

        fmt = _source_format(disk.format)
        with images.open(tmp, format=fmt) as img:  # type: ignore[arg-type]
            size = img.virtual_size
            real_fmt = img.format
        if size != disk.capacity:
            _warn(f"disk {disk.id!r} holds {size} bytes but the descriptor says {disk.capacity}; "
                  "the image's size is kept", item=f"disk {disk.id!r}")  # fmt: skip
        images.convert(tmp, root / "disks" / out, format="qcow2", progress=step,
                       src_format=real_fmt)  # fmt: skip
        tmp.unlink()
        done += disk.capacity
        if progress is not None:
            progress(done, total)
        disks.append(Disk(path=out, format="qcow2", bus=_bus(drive, controllers)))
    cdroms: list[CdRom] = []
    nics: list[Nic] = []
    cpus: int | CpuTopology = 1
    memory = 512 << 20
    for item in items:
        rt = item.resource_type
        if rt == 3:
            cpus = _cpus(item, plan.cores_per_socket)
        elif rt == 4:
            memory = _memory(item, source.path)
        elif rt == 10:
            nics.append(_nic(item))
        elif rt in (15, 16):
            if item.host_resource:
                _warn(f"CD/DVD drive {item.name!r} holds media ({item.host_resource!r}) that is "
                      "not imported; the drive is empty", item=f"cd-rom {item.name!r}")  # fmt: skip
            parent = controllers.get(item.parent)
            cd_bus = "sata" if parent is not None and parent.resource_type == 20 else "ide"
            cdroms.append(CdRom(bus=cd_bus))
        elif rt not in (5, 6, 17, 20):
            what = _RESOURCE_NAMES.get(rt, f"resource type {rt}")
            _warn(f"{what} {item.name!r} is not mapped (virtkit has no such device)",
                  item=f"{what} {item.name!r}")  # fmt: skip
    labels = {"ovf.os": plan.os_type[:200]} if plan.os_type else {}
    try:
        return Machine(name=name, cpus=cpus, memory=memory, firmware=plan.firmware or "bios",
                       disks=tuple(disks), cdroms=tuple(cdroms), nics=tuple(nics),
                       labels=labels)  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(f"the appliance's {exc.message}", field=exc.field,
                          file=source.path) from exc  # fmt: skip


def _bus(drive: envelope.Hardware, controllers: dict[str, envelope.Hardware]) -> str:
    ctl = controllers.get(drive.parent)
    if ctl is None:
        _warn(f"disk drive {drive.name!r} has no known controller; attached as SATA",
              item=f"disk drive {drive.name!r}")  # fmt: skip
        return "sata"
    if ctl.resource_type == 5:
        return "ide"
    if ctl.resource_type == 6:
        return "scsi"
    sub = ctl.subtype.lower()
    if sub.startswith("virtio"):
        return "virtio"
    if sub not in ("ahci", "vmware.sata.ahci", ""):
        _warn(f"storage controller {ctl.name!r} ({ctl.subtype}) is attached as SATA",
              item=f"controller {ctl.name!r}")  # fmt: skip
    return "sata"


def _cpus(item: envelope.Hardware, cores_per_socket: int | None) -> int | CpuTopology:
    count = item.quantity or 1
    if cores_per_socket and cores_per_socket > 1 and count % cores_per_socket == 0:
        return CpuTopology(sockets=count // cores_per_socket, cores=cores_per_socket)
    return count


def _memory(item: envelope.Hardware, path: str) -> int:
    mult = envelope.units(item.units, 1 << 20, "memory", path)
    size = (item.quantity or 0) * mult
    if size > envelope.MAX_BYTES:
        raise CorruptImageError(f"OVF descriptor: memory of {size} bytes is out of range",
                                path=path)  # fmt: skip
    rounded = -(-size // (1 << 20)) * (1 << 20)
    if rounded != size:
        _warn(f"memory of {size} bytes rounded up to {rounded >> 20} MiB", item="memory")
    return rounded


def _nic(item: envelope.Hardware) -> Nic:
    sub = item.subtype.lower()
    model = _NIC_MODELS.get(sub)
    if model is None:
        _warn(f"network adapter {item.name!r} ({item.subtype or 'no model'}) becomes an e1000",
              item=f"nic {item.name!r}")  # fmt: skip
        model = "e1000"
    m = _MAC.match(item.address)
    if m is None:
        if item.address:
            _warn(f"network adapter {item.name!r} has an unusable MAC {item.address!r}; a new "
                  "one is generated", item=f"nic {item.name!r}")  # fmt: skip
        return Nic(model=model)
    return Nic(model=model, mac=":".join(m.groups()).lower())


# -- export ---------------------------------------------------------------------------------


def export_ova(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> None:
    """Write the VM folder ``folder`` as an OVA appliance at ``path``.

    Each disk (its active layer, the chain flattened) becomes a
    streamOptimized VMDK; the archive holds the descriptor first, then the
    SHA256 manifest, then the disks. CD-ROM media, serial settings, cloud-init,
    kernel boot, port forwards and labels are not part of OVF and are reported
    with an :class:`OvfWarning`.

    Args:
        folder: the VM folder (as :func:`virtkit.save` writes it).
        path: the ``.ova`` file to write (replaced atomically if it exists).
        progress: called as ``progress(done_bytes, total_bytes)`` over the
            disks' virtual sizes while they are converted.

    Raises:
        ConfigError: bad arguments or folder.
        ImageError: a disk cannot be read, or the archive cannot be written.
    """
    root = Path(check_path(folder, "folder"))
    out = Path(check_path(path, "path"))
    check_callable(progress, "progress")
    machine = load(root)
    _export_warnings(machine)
    stem = machine.name
    tmp_dir = out.parent / f".{out.name}.virtkit-{secrets.token_hex(4)}.d"
    tmp_ova = out.parent / f".{out.name}.virtkit-{secrets.token_hex(4)}.tmp"
    sources = [p if os.path.isabs(p) else str(root / "disks" / p)
               for p in (d.active for d in machine.disks)]  # fmt: skip
    sizes = []
    for src in sources:
        with images.open(src) as img:
            sizes.append(img.virtual_size)
    total = sum(sizes)
    try:
        tmp_dir.mkdir()
        out_disks: list[envelope.OutDisk] = []
        done = 0
        for i, (disk, src, size) in enumerate(zip(machine.disks, sources, sizes, strict=True)):
            href = f"{stem}-disk{i + 1}.vmdk"
            base = done

            def step(d: int, t: int, base: int = base, size: int = size) -> None:
                if progress is not None:
                    progress(base + d * size // max(t, 1), total)

            images.convert(src, tmp_dir / href, format="vmdk", progress=step,
                           subformat="streamOptimized")  # fmt: skip
            out_disks.append(envelope.OutDisk(href, (tmp_dir / href).stat().st_size, size,
                                              disk.bus))  # fmt: skip
            done += size
        cpus = machine.cpus
        vcpus = cpus if isinstance(cpus, int) else cpus.sockets * cpus.cores * cpus.threads
        cps = cpus.cores if isinstance(cpus, CpuTopology) and cpus.cores > 1 else None
        nics = [envelope.OutNic(n.model, n.mac) for n in machine.nics]
        ovf = envelope.build(name=stem, vcpus=vcpus, cores_per_socket=cps,
                             memory_mib=machine.memory >> 20, firmware=machine.firmware,
                             disks=out_disks, nics=nics)  # fmt: skip
        lines = [f"SHA256({stem}.ovf)= {hashlib.sha256(ovf).hexdigest()}"]
        for d in out_disks:
            lines.append(f"SHA256({d.href})= {_sha256(tmp_dir / d.href)}")
        mf = ("\n".join(lines) + "\n").encode()
        _write_tar(tmp_ova, [(f"{stem}.ovf", ovf), (f"{stem}.mf", mf)],
                   [(d.href, tmp_dir / d.href) for d in out_disks])  # fmt: skip
        os.replace(tmp_ova, out)
        if progress is not None:
            progress(total, total)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_ova.unlink()
        raise
    finally:
        archive.remove_tree(tmp_dir)


def _export_warnings(machine: Machine) -> None:
    dropped = []
    if any(c.path for c in machine.cdroms):
        dropped.append("CD-ROM media")
    if machine.cdroms:
        dropped.append("CD-ROM drives")
    if machine.cloud_init is not None:
        dropped.append("cloud-init provisioning")
    if machine.kernel is not None:
        dropped.append("direct kernel boot")
    if any(n.forwards for n in machine.nics):
        dropped.append("port forwards")
    if isinstance(machine.cpus, CpuTopology) and machine.cpus.threads > 1:
        dropped.append("threads per core")
    if machine.labels:
        dropped.append("labels")
    for what in dropped:
        _warn(f"{what} are not exported to OVF", item=what)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_tar(dst: Path, small: list[tuple[str, bytes]], files: list[tuple[str, Path]]) -> None:
    try:
        with dst.open("xb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in small:
                    info = _info(name, len(data))
                    tar.addfile(info, io.BytesIO(data))
                for name, file in files:
                    with file.open("rb") as src:
                        tar.addfile(_info(name, file.stat().st_size), src)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise ImageError(f"cannot write the appliance: {exc.strerror}", path=str(dst)) from exc


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.uname = info.gname = "someone"
    return info

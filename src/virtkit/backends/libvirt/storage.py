"""VM folders on hosts without shared storage: disks through libvirt storage volumes.

Each pushed guest gets a directory storage pool of its own on the host,
``<remote_root>/<domain>/disks`` (default remote root
``/var/lib/libvirt/virtkit``), holding one volume per image file of the VM
folder's ``disks/`` (a disk's layers too: their relative backing names keep
working because they stay side by side). Bytes travel over the libvirt
connection itself (``virStorageVolUpload`` / ``Download`` streams), so ``ssh``
is all a remote host needs. Progress is reported as ``progress(done, total)``
in bytes. A download is written next to its target and renamed into place, so
an interrupted pull leaves the old file.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtkit.backends.libvirt.connection import Connection
from virtkit.errors import ConfigError

__all__ = [
    "CHUNK",
    "Progress",
    "delete_pool",
    "disk_files",
    "download_pool",
    "pool_for",
    "pool_name",
    "upload_files",
]

Progress = Callable[[int, int], None]
CHUNK = 1024 * 1024


def pool_name(domain: str) -> str:
    """The storage pool name of a pushed guest."""
    return f"virtkit-{domain}"


def disk_files(machine: Any, folder: Path) -> list[Path]:
    """Every image file the machine's disks and CD-ROMs use, which must sit in ``folder/disks``.

    Raises:
        ConfigError: a file lies outside ``disks/`` or in a sub-folder of it (a
            pool is flat), or a machine boots a kernel from the folder.
    """
    if machine.kernel is not None:
        raise ConfigError(
            f"machine {machine.name!r} boots a kernel from its folder; pushing it to a host "
            "without shared storage is not supported (put kernel and initrd on the host)",
            field="kernel",
        )
    files: list[Path] = []
    named = [(f"disks[{i}]", f) for i, d in enumerate(machine.disks) for f in d.files()]
    named += [(f"cdroms[{i}]", c.path) for i, c in enumerate(machine.cdroms) if c.path]
    for field, name in named:
        if os.path.isabs(name) or "/" in name.strip("/"):
            raise ConfigError(
                f"'{field}' {name!r} is not a file directly in the VM folder's disks/; only "
                "those can be pushed to a host without shared storage",
                field=field,
            )
        path = folder / "disks" / name
        if not path.is_file():
            raise ConfigError(f"'{field}' image {path} does not exist", field=field)
        if path not in files:
            files.append(path)
    return files


def pool_for(conn: Connection, domain: str, remote_dir: str, *, create: bool) -> Any:
    """The guest's directory pool on the host (defined, built and started when ``create``)."""
    lv = conn.lv
    name = pool_name(domain)
    try:
        pool = conn.raw.storagePoolLookupByName(name)
    except lv.libvirtError as exc:
        if exc.get_error_code() != lv.VIR_ERR_NO_STORAGE_POOL or not create:
            raise conn._translate(exc, f"find storage pool {name!r}") from exc
        root = ET.Element("pool", type="dir")
        ET.SubElement(root, "name").text = name
        ET.SubElement(ET.SubElement(root, "target"), "path").text = remote_dir
        xml = ET.tostring(root, encoding="unicode")
        pool = conn.call(f"define storage pool {name!r}", conn.raw.storagePoolDefineXML, xml, 0)
        conn.call(f"build storage pool {name!r}", pool.build, 0)
    if not pool.isActive():
        conn.call(f"start storage pool {name!r}", pool.create, 0)
    conn.call(f"refresh storage pool {name!r}", pool.refresh, 0)
    return pool


def upload_files(
    conn: Connection, pool: Any, files: list[Path], progress: Progress | None = None
) -> None:
    """Upload each file as a volume of the same name (replacing an older one)."""
    lv = conn.lv
    total = sum(f.stat().st_size for f in files)
    done = 0
    for path in files:
        size = path.stat().st_size
        with contextlib.suppress(lv.libvirtError):
            pool.storageVolLookupByName(path.name).delete(0)
        root = ET.Element("volume")
        ET.SubElement(root, "name").text = path.name
        ET.SubElement(root, "capacity", unit="bytes").text = str(max(size, 512))
        ET.SubElement(ET.SubElement(root, "target"), "format", type="raw")
        vol = conn.call(
            f"create volume {path.name!r}",
            pool.createXML,
            ET.tostring(root, encoding="unicode"),
            0,
        )
        stream = conn.call("open an upload stream", conn.raw.newStream, 0)
        try:
            conn.call(f"upload {path.name!r}", vol.upload, stream, 0, size, 0)
            with path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        sent = conn.call(f"upload {path.name!r}", stream.send, bytes(view))
                        view = view[sent:]
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            conn.call(f"finish uploading {path.name!r}", stream.finish)
        except BaseException:
            with contextlib.suppress(lv.libvirtError):
                stream.abort()
            raise
    if progress is not None and not files:
        progress(0, 0)


def download_pool(
    conn: Connection, pool: Any, files: list[Path], progress: Progress | None = None
) -> None:
    """Download the volumes named like ``files`` back into those files (atomically each)."""
    lv = conn.lv
    vols = [
        (path, conn.call(f"find volume {path.name!r}", pool.storageVolLookupByName, path.name))
        for path in files
    ]
    # the file's length: libvirt reports a qcow2 volume's capacity as its virtual size
    total = sum(int(vol.infoFlags(lv.VIR_STORAGE_VOL_GET_PHYSICAL)[2]) for _, vol in vols)
    done = 0
    for path, vol in vols:
        tmp = path.with_name(f".{path.name}.pull-{os.getpid()}")
        stream = conn.call("open a download stream", conn.raw.newStream, 0)
        try:
            conn.call(f"download {path.name!r}", vol.download, stream, 0, 0, 0)
            with tmp.open("wb") as out:
                while True:
                    chunk = conn.call(f"download {path.name!r}", stream.recv, CHUNK)
                    if not chunk:
                        break
                    if chunk == -2:
                        continue
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())
            conn.call(f"finish downloading {path.name!r}", stream.finish)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(lv.libvirtError):
                stream.abort()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def delete_pool(conn: Connection, domain: str, folder: str | None = None) -> None:
    """Remove the pushed guest's volumes and pool from the host, and its (then empty)
    ``folder`` there."""
    _delete_disks_pool(conn, domain)
    if folder is None:
        return
    lv = conn.lv
    # libvirt removes a directory only as a pool's target: a short-lived one for the folder
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = pool_name(domain) + "-folder"
    ET.SubElement(ET.SubElement(root, "target"), "path").text = folder
    try:
        pool = conn.raw.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
    except lv.libvirtError:
        return
    with contextlib.suppress(lv.libvirtError):
        pool.delete(0)  # rmdir: only when empty, as it should be
    with contextlib.suppress(lv.libvirtError):
        pool.undefine()


def _delete_disks_pool(conn: Connection, domain: str) -> None:
    lv = conn.lv
    try:
        pool = conn.raw.storagePoolLookupByName(pool_name(domain))
    except lv.libvirtError:
        return
    with contextlib.suppress(lv.libvirtError):
        if not pool.isActive():
            pool.create(0)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
    with contextlib.suppress(lv.libvirtError):
        pool.destroy()
    with contextlib.suppress(lv.libvirtError):
        pool.delete(0)
    with contextlib.suppress(lv.libvirtError):
        pool.undefine()

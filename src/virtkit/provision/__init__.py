"""cloud-init provisioning: the NoCloud seed ISO (built with ``pycdlib``).

cloud-init's NoCloud datasource finds a filesystem labelled ``cidata``
holding ``user-data`` and ``meta-data`` (and optionally ``network-config``).
The ISO carries Rock Ridge and Joliet names, so Linux (and Windows) see the
lowercase, hyphenated names whatever extension they read; the plain
ISO 9660 names are the 8.3 fallbacks (``USERDATA.;1``...).

When ``CloudInit.meta_data`` is ``None``, meta-data is generated from the
machine: ``instance-id`` (its uuid) and ``local-hostname`` (its name).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from virtkit.errors import ConfigError, ImageError
from virtkit.model import CloudInit, Machine

__all__ = ["VOLUME_LABEL", "build_seed_iso", "default_meta_data", "seed_files", "write_seed_iso"]

VOLUME_LABEL = "cidata"

#: file name on the ISO -> 8.3 ISO 9660 name
_ISO_NAMES = {
    "user-data": "/USERDATA.;1",
    "meta-data": "/METADATA.;1",
    "network-config": "/NETWORKC.;1",
}


def _check_machine(machine: object) -> Machine:
    if not isinstance(machine, Machine):
        raise ConfigError(
            f"'machine' must be a virtkit.Machine (got {type(machine).__name__} {machine!r})",
            field="machine",
        )
    return machine


def default_meta_data(machine: Machine) -> str:
    """NoCloud meta-data for ``machine``: instance-id and local-hostname.

    Raises:
        ConfigError: ``machine`` is not a Machine.
    """
    _check_machine(machine)
    return f"instance-id: {machine.uuid}\nlocal-hostname: {machine.name}\n"


def seed_files(machine: Machine, cloud_init: CloudInit | None = None) -> dict[str, bytes]:
    """The files of the seed, by name (``user-data``, ``meta-data``, ``network-config``).

    Raises:
        ConfigError: the machine has no ``cloud_init`` and none was given, or
            an argument has the wrong type.
    """
    _check_machine(machine)
    if cloud_init is not None and not isinstance(cloud_init, CloudInit):
        raise ConfigError(
            f"'cloud_init' must be a virtkit.CloudInit or None (got {cloud_init!r})",
            field="cloud_init",
        )
    ci = cloud_init if cloud_init is not None else machine.cloud_init
    if ci is None:
        raise ConfigError(
            f"machine {machine.name!r} has no cloud_init settings to build a seed from",
            field="cloud_init",
        )
    files = {
        "user-data": ci.user_data.encode(),
        "meta-data": (
            ci.meta_data if ci.meta_data is not None else default_meta_data(machine)
        ).encode(),
    }
    if ci.network_config is not None:
        files["network-config"] = ci.network_config.encode()
    return files


def build_seed_iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image (label ``cidata``, Rock Ridge + Joliet) holding ``files``.

    Raises:
        ConfigError: a file name is not one NoCloud reads, or a content is not bytes.
    """
    if not isinstance(files, dict):
        raise ConfigError(
            f"'files' must be a dict of file name to bytes (got {type(files).__name__})",
            field="files",
        )
    for name, data in files.items():
        if not isinstance(data, (bytes, bytearray)):
            raise ConfigError(
                f"'files[{name!r}]' must be bytes (got {type(data).__name__})",
                field=f"files[{name!r}]",
            )
    import pycdlib  # noqa: PLC0415 - the only user of pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for name, data in files.items():
            if name not in _ISO_NAMES:
                raise ConfigError(
                    f"{name!r} is not a NoCloud seed file (expected one of "
                    f"{', '.join(_ISO_NAMES)})",
                    field="files",
                )
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=_ISO_NAMES[name],
                rr_name=name,
                joliet_path=f"/{name}",
                file_mode=0o100444,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_seed_iso(machine: Machine, path: str | os.PathLike[str]) -> Path:
    """Write ``machine``'s NoCloud seed ISO to ``path`` (atomically, mode 0600).

    Raises:
        ConfigError: the machine has no ``cloud_init``, or ``path`` is not a file path.
        ImageError: the file cannot be written.
    """
    raw = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise ConfigError(
            f"'path' must be a non-empty file path without NUL bytes (got {path!r})",
            field="path",
        )
    target = Path(raw)
    data = build_seed_iso(seed_files(machine))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # user-data often carries passwords and keys: the seed is private (0600)
        tmp.unlink(missing_ok=True)  # a leftover of a crashed earlier write
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError(
            f"cannot write the cloud-init seed ISO: {exc.strerror}", path=str(target)
        ) from exc
    return target

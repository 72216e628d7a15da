"""Backends: hypervisor implementations behind one API, chosen by name.

``virtkit.connect("emulator")`` or ``virtkit.connect("qemu")``. Backends are
imported only when asked for, so a missing optional piece of one never breaks
another; a backend that cannot run here raises ``BackendUnavailable`` with a
hint. Third-party backends register with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
from typing import Any

from virtkit.backends.base import Guest, Hypervisor
from virtkit.backends.console import Console
from virtkit.errors import BackendUnavailable, ConfigError

__all__ = ["Console", "Guest", "Hypervisor", "available_backends", "connect", "register_backend"]

#: name -> ("module:Class", install hint)
_REGISTRY: dict[str, tuple[str, str]] = {
    "emulator": (
        "virtkit.backends.emulator:EmulatorHypervisor",
        "the emulator needs the 'unicorn' package: pip install 'unicorn>=2'",
    ),
    "qemu": (
        "virtkit.backends.qemu:QemuHypervisor",
        "install QEMU (Debian: apt-get install qemu-system-x86 qemu-utils) and the "
        "'qemu.qmp' package (pip install qemu.qmp)",
    ),
    "libvirt": (
        "virtkit.backends.libvirt:LibvirtHypervisor",
        "pip install 'virtkit[libvirt]' (needs Debian's libvirt-dev pkg-config gcc) and run a "
        "libvirt daemon (apt-get install libvirt-daemon libvirt-daemon-driver-qemu "
        "libvirt-clients; scripts/libvirtd start)",
    ),
}


def register_backend(name: str, target: str, hint: str = "") -> None:
    """Make ``connect(name)`` load ``target`` (``"package.module:HypervisorClass"``)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"backend name must be an identifier (got {name!r})", field="name")
    if not isinstance(target, str) or target.count(":") != 1:
        raise ConfigError(
            f"backend target must look like 'package.module:Class' (got {target!r})",
            field="target",
        )
    _REGISTRY[name] = (target, hint)


def available_backends() -> tuple[str, ...]:
    """Names ``connect()`` knows (whether or not they can run here)."""
    return tuple(_REGISTRY)


def _load(name: str) -> type[Hypervisor]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)}",
            field="backend",
            value=name,
        )
    target, hint = _REGISTRY[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} cannot be loaded: {exc}", hint=hint or None
        ) from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Hypervisor)):
        raise BackendUnavailable(f"backend {name!r}: {target} is not a Hypervisor class")
    return cls


def connect(name: str = "emulator", **options: Any) -> Hypervisor:
    """Open a hypervisor connection by backend name.

    Args:
        name: ``"emulator"`` (in-process, the default) or ``"qemu"``.
        options: backend options, e.g. ``root=``, ``host=``, ``policy=``;
            the emulator takes ``clock="virtual"``, the qemu backend
            ``accel="kvm"|"tcg"|"auto"``.

    Raises:
        ConfigError: unknown backend name or option.
        BackendUnavailable: the backend cannot run on this host (with a hint).
    """
    cls = _load(name)
    cls.probe(**options)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"backend {name!r} does not accept these options: {exc}") from exc

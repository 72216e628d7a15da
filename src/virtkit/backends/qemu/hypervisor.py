"""``QemuHypervisor``: guests as supervised ``qemu-system-*`` processes.

Options (``virtkit.connect("qemu", ...)``):

* ``accel``: ``"auto"`` (default: KVM only if a probe guest really runs
  under it, else TCG; see :mod:`virtkit.backends.qemu.accel`), ``"kvm"``
  or ``"tcg"``;
* ``binary`` / ``qemu_img``: the executables (default: found on ``PATH``);
* ``start_timeout``: seconds QEMU gets to connect its QMP monitor;
* ``cpu_model``: the ``-cpu`` model (default: QEMU's own default);
* plus the base options ``root``, ``host``, ``policy``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import attrs

from virtkit.backends.base import Hypervisor
from virtkit.backends.qemu.accel import ACCELERATORS, AccelChoice, choose_accel
from virtkit.backends.qemu.argv import KernelBoot
from virtkit.backends.qemu.guest import QemuGuest
from virtkit.errors import BackendUnavailable, ConfigError
from virtkit.images.args import check_choice
from virtkit.model import HypervisorType, Machine

__all__ = ["QemuHypervisor"]

_INSTALL_HINT = "install QEMU: apt-get install qemu-system-x86 qemu-utils (Debian/Ubuntu)"
_OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
_OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")


def _find(binary: str | None, default: str, option: str) -> str:
    name = binary or default
    found = shutil.which(name)
    if found is None:
        raise BackendUnavailable(
            f"the qemu backend needs {name!r}, which is not installed or not on PATH"
            + (f" (option {option}={binary!r})" if binary else ""),
            hint=_INSTALL_HINT,
        )
    return found


class QemuHypervisor(Hypervisor):
    """Runs each guest in its own ``qemu-system-x86_64`` process, controlled over QMP.

    Args:
        accel: ``"auto"``, ``"kvm"`` or ``"tcg"``.
        binary: the ``qemu-system-*`` executable (name or path).
        qemu_img: the ``qemu-img`` executable.
        start_timeout: seconds QEMU may take to start and connect.
        cpu_model: ``-cpu`` model name for every guest (``None``: QEMU's default).
        root, host, policy: see :class:`virtkit.backends.base.Hypervisor`.

    Raises:
        BackendUnavailable: QEMU is not installed (with an install hint).
        ConfigError: an option has a bad value.
    """

    name: ClassVar[str] = "qemu"

    def __init__(
        self,
        *,
        accel: str = "auto",
        binary: str | None = None,
        qemu_img: str | None = None,
        start_timeout: float = 30.0,
        cpu_model: str | None = None,
        **options: Any,
    ) -> None:
        check_choice(accel, ACCELERATORS, "accel")
        self.binary = _find(binary, "qemu-system-x86_64", "binary")
        self.qemu_img = _find(qemu_img, "qemu-img", "qemu_img")
        self.requested_accel = accel
        self.start_timeout = float(start_timeout)
        self.cpu_model = cpu_model
        self._accel: AccelChoice | None = None
        super().__init__(**options)

    @classmethod
    def probe(cls, **options: object) -> None:
        """Raise ``BackendUnavailable`` when QEMU is missing here."""
        binary = options.get("binary")
        _find(binary if isinstance(binary, str) else None, "qemu-system-x86_64", "binary")

    @property
    def accelerator(self) -> AccelChoice:
        """The accelerator guests run with, and why (probed once per host)."""
        if self._accel is None:
            self._accel = choose_accel(self.binary, self.requested_accel)
        return self._accel

    @property
    def kind(self) -> HypervisorType:
        """TYPE1 with KVM (the host kernel is the hypervisor), TYPE2 with TCG."""
        return HypervisorType.TYPE1 if self.accelerator.accel == "kvm" else HypervisorType.TYPE2

    def ovmf_code(self) -> Path:
        """The OVMF firmware code image (UEFI guests)."""
        return _first(_OVMF_CODE)

    def ovmf_vars(self) -> Path:
        """The OVMF variables template copied into each UEFI guest's folder."""
        return _first(_OVMF_VARS)

    def define(
        self,
        machine: Machine,
        *,
        folder: str | os.PathLike[str] | None = None,
        allow: Iterable[str | os.PathLike[str]] = (),
        strict: bool = False,
        kernel: KernelBoot | None = None,
    ) -> QemuGuest:
        """Place ``machine`` here; see :meth:`Hypervisor.define`.

        Args:
            kernel: deprecated: set ``Machine.kernel`` instead (it is saved in
                the folder, so the guest can be loaded and run again). Given
                here it is put into the machine, with a ``DeprecationWarning``.
        """
        if kernel is not None:
            if not isinstance(kernel, KernelBoot):
                raise ConfigError(f"'kernel' must be a KernelBoot (got {kernel!r})", field="kernel")
            if isinstance(machine, Machine) and machine.kernel is not None:
                raise ConfigError(
                    "the machine already has a kernel; drop define(kernel=...)", field="kernel"
                )
            warnings.warn(
                "define(kernel=...) is deprecated: set Machine(kernel=KernelBoot(...)) so the "
                "folder keeps it",
                DeprecationWarning,
                stacklevel=2,
            )
            if isinstance(machine, Machine):
                machine = attrs.evolve(machine, kernel=kernel)
        if isinstance(machine, Machine) and machine.firmware == "uefi":
            self.ovmf_code()
        guest = super().define(machine, folder=folder, allow=allow, strict=strict)
        assert isinstance(guest, QemuGuest)
        return guest

    def _create_guest(self, machine: Machine, folder: Path) -> QemuGuest:
        return QemuGuest(self, machine, folder)


def _first(candidates: tuple[str, ...]) -> Path:
    for path in candidates:
        if os.path.isfile(path):
            return Path(path)
    raise BackendUnavailable(
        f"firmware 'uefi' needs OVMF, not found at {', '.join(candidates)}",
        hint="apt-get install ovmf",
    )

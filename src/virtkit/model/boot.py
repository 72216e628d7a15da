"""Direct kernel boot: a kernel, an initramfs and a command line, part of the machine.

Relative paths are relative to the VM folder (not its ``disks/``), so a
folder that carries its own ``vmlinuz`` stays relocatable; absolute paths
name files anywhere the caller allows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from virtkit.errors import ConfigError
from virtkit.model._validate import call_errors_are_config_errors

__all__ = ["KernelBoot"]


def _path(value: Any, field: str) -> Path:
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        kind = "None" if value is None else f"{type(value).__name__} {value!r}"
        raise ConfigError(
            f"'{field}' must be a file path (str or os.PathLike) (got {kind})",
            field=field,
            value=value,
        )
    if not path:
        raise ConfigError(f"'{field}' must not be empty", field=field, value=value)
    if any(c in path for c in "\0\n\r"):
        raise ConfigError(
            f"'{field}' must not contain NUL or line breaks (got {path!r})",
            field=field,
            value=value,
        )
    return Path(path)


def _kernel_path(value: Any) -> Path:
    return _path(value, "kernel")


def _initrd_path(value: Any) -> Path | None:
    return None if value is None else _path(value, "initrd")


@call_errors_are_config_errors
@attrs.frozen
class KernelBoot:
    """Direct kernel boot (``-kernel``/``-initrd``/``-append``), skipping the boot loader.

    Part of a :class:`~virtkit.Machine` (``Machine.kernel``) and saved in its
    ``machine.toml``; a relative path is relative to the VM folder.

    Args:
        kernel: the kernel image (bzImage / vmlinuz).
        initrd: an initramfs, if any.
        append: the kernel command line.

    Raises:
        ConfigError: a path is not a non-empty path without NUL or line breaks,
            or ``append`` is not a string without NUL.
    """

    kernel: Path = attrs.field(converter=_kernel_path)
    initrd: Path | None = attrs.field(default=None, converter=_initrd_path)
    append: str = attrs.field(default="")

    @append.validator
    def _check_append(self, _attribute: object, value: object) -> None:
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(
                f"'append' must be a kernel command line str without NUL (got {value!r})",
                field="append",
                value=value,
            )

"""The virtkit exception hierarchy.

Every error a public virtkit call raises is a :class:`VirtkitError`::

    VirtkitError
    ├── ConfigError              a value in a definition or a bundle is wrong
    ├── ImageError               a disk image cannot be used as asked
    │   ├── CorruptImageError    the file's metadata is damaged or hostile
    │   ├── UnsupportedFeatureError  valid, but uses a feature we do not implement
    │   └── ImageLockedError     another process holds the image
    ├── ResourceError            the host (or its allocation policy) cannot give it
    ├── StateError               the operation is illegal in the object's state
    ├── BackendError             the hypervisor broke (QEMU died, unicorn faulted)
    │   └── BackendUnavailable   the backend cannot run on this host
    └── TimeoutError             something did not happen in time

    CapabilityWarning (a UserWarning) a backend ignores a device it cannot run

Data is kept on the exception as attributes (``.field``, ``.path``,
``.offset``, ...) and formatted by ``__str__``, so callers can react to the
details without parsing messages.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "CapabilityWarning",
    "ConfigError",
    "CorruptImageError",
    "ImageError",
    "ImageLockedError",
    "ResourceError",
    "StateError",
    "TimeoutError",
    "UnsupportedFeatureError",
    "VirtkitError",
]


class VirtkitError(Exception):
    """Base class of every error virtkit raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(VirtkitError, ValueError):
    """A definition or a bundle holds a value that is not allowed.

    Attributes:
        field: dotted name of the offending field (``"disks[1].bus"``), if known.
        value: the rejected value, if known.
        file: the config file it came from, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        file: str | None = None,
    ) -> None:
        self.field = field
        self.value = value
        self.file = file
        where = []
        if file is not None:
            where.append(f"in {file}")
        if field is not None and f"'{field}'" not in message:
            where.append(f"field '{field}'")
        text = f"{message} ({', '.join(where)})" if where else message
        super().__init__(text)


class ImageError(VirtkitError):
    """A disk image cannot be opened, read or written as asked.

    Attributes:
        path: the image file, if known.
        offset: the byte offset in the file where the problem is, if known.
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        self.path = path
        self.offset = offset
        where = []
        if path is not None:
            where.append(str(path))
        if offset is not None:
            where.append(f"offset {offset:#x}")
        text = f"{message} [{' @ '.join(where)}]" if where else message
        super().__init__(text)


class CorruptImageError(ImageError):
    """The image's metadata is inconsistent, out of bounds or hostile."""


class UnsupportedFeatureError(ImageError):
    """The image is valid but uses a feature virtkit does not implement.

    Attributes:
        feature: the feature's name or bit, e.g. ``"incompatible bit 5"``.
    """

    def __init__(
        self,
        message: str,
        *,
        feature: str | None = None,
        path: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.feature = feature
        super().__init__(message, path=path, offset=offset)


class ImageLockedError(ImageError):
    """Another process (QEMU, another virtkit) holds a conflicting lock.

    Attributes:
        permission: QEMU's name of the permission that clashed (``"write"``,
            ``"consistent read"``...), if known.
        conflict: ``"unshared"`` (someone refuses to share a permission we
            need) or ``"held"`` (someone holds a permission we refuse to share).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        permission: str | None = None,
        conflict: str | None = None,
    ) -> None:
        self.permission = permission
        self.conflict = conflict
        super().__init__(message, path=path)


class ResourceError(VirtkitError):
    """The host, or its allocation policy, cannot provide what was asked.

    Attributes:
        resource: ``"memory"``, ``"cpus"``, ``"storage"`` or ``"disk"``.
        requested: what was asked for (bytes or a count), if known.
        available: what the policy still allows, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        resource: str | None = None,
        requested: int | None = None,
        available: int | None = None,
    ) -> None:
        self.resource = resource
        self.requested = requested
        self.available = available
        super().__init__(message)


class StateError(VirtkitError):
    """An operation is not allowed in the object's current state.

    Attributes:
        state: the state the object was in (a ``virtkit.State`` or a string).
        action: what was attempted, e.g. ``"pause"``.
    """

    def __init__(self, message: str, *, state: Any = None, action: str | None = None) -> None:
        self.state = state
        self.action = action
        super().__init__(message)


class BackendError(VirtkitError):
    """The hypervisor behind a backend failed.

    Attributes:
        exit_code: the hypervisor process's exit code, if it exited.
        argv: the command line that was run, if any.
        stderr_tail: the last lines the process wrote to stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        argv: Sequence[str] | None = None,
        stderr_tail: str | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.argv = list(argv) if argv is not None else None
        self.stderr_tail = stderr_tail
        parts = [message]
        if exit_code is not None:
            parts.append(f"exit code: {exit_code}")
        if argv is not None:
            parts.append("command: " + " ".join(argv))
        if stderr_tail:
            parts.append("stderr:\n" + stderr_tail.rstrip())
        super().__init__("\n".join(parts))


class BackendUnavailable(BackendError):
    """A backend cannot run on this host; ``.hint`` says how to fix that."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(f"{message}\nhint: {hint}" if hint else message)


class TimeoutError(VirtkitError, builtins.TimeoutError):  # noqa: A001 - the design names it so
    """Something did not happen within the allowed time.

    Also a built-in :class:`TimeoutError`, so generic handlers catch it.

    Attributes:
        timeout: the limit in seconds that ran out.
    """

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        self.timeout = timeout
        super().__init__(message)


class CapabilityWarning(UserWarning):
    """A backend runs a machine without a device or setting it cannot express.

    Emitted by ``Hypervisor.define()`` once per ignored device (a NIC, a
    CD-ROM, extra vCPUs... on a backend that has none), naming it;
    ``define(..., strict=True)`` raises :class:`ConfigError` instead.

    Attributes:
        field: the machine field that is ignored (``"nics[0]"``).
        backend: the backend's name.
    """

    def __init__(
        self, message: str, *, field: str | None = None, backend: str | None = None
    ) -> None:
        self.field = field
        self.backend = backend
        super().__init__(message)

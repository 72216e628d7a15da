"""The hypervisor's side of the model: host capacity and the allocation policy."""

from __future__ import annotations

import attrs

from virtkit.errors import ConfigError
from virtkit.model._validate import call_errors_are_config_errors
from virtkit.units import parse_size

__all__ = ["AllocationPolicy", "HostResources"]


def _non_negative(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"'{attribute.name}' must be a non-negative integer (got {value!r})",
            field=attribute.name,
            value=value,
        )


def _memory(value: object) -> int:
    return parse_size(value, field="memory")


def _storage(value: object) -> int:
    return parse_size(value, field="storage")


def _reserved(value: object) -> int:
    return parse_size(value, field="reserved_memory")


def _ratio(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1000:
        raise ConfigError(
            f"'{attribute.name}' must be a ratio above 0 and at most 1000 (got {value!r})",
            field=attribute.name,
            value=value,
        )


@call_errors_are_config_errors
@attrs.frozen
class HostResources:
    """What a host offers guests, and how much of it is allocated.

    ``cpus`` are host CPUs, ``memory`` and ``storage`` bytes. The
    ``allocated_*`` fields count what running guests (CPUs, memory) and
    defined guests (storage) hold.
    """

    cpus: int = attrs.field(validator=_non_negative)
    memory: int = attrs.field(converter=_memory, validator=_non_negative)
    storage: int = attrs.field(converter=_storage, validator=_non_negative)
    allocated_cpus: int = attrs.field(default=0, validator=_non_negative)
    allocated_memory: int = attrs.field(default=0, validator=_non_negative)
    allocated_storage: int = attrs.field(default=0, validator=_non_negative)

    @classmethod
    def detect(cls, storage_path: str = ".") -> HostResources:
        """Read this host's CPU count, RAM and free storage under ``storage_path``."""
        import os  # noqa: PLC0415 - keep the model free of I/O at import time
        import shutil  # noqa: PLC0415

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        storage = shutil.disk_usage(storage_path).free
        return cls(cpus=cpus, memory=memory, storage=storage)


@call_errors_are_config_errors
@attrs.frozen
class AllocationPolicy:
    """Admission control rules, as a cloud scheduler or libvirt user sets them.

    Args:
        cpu_overcommit: running vCPUs may total ``host cpus * cpu_overcommit``.
        memory_overcommit: running guests' RAM may total
            ``(host memory - reserved_memory) * memory_overcommit``.
        reserved_memory: RAM kept for the host itself.
        storage_overcommit: defined guests' disk sizes may total
            ``host storage * storage_overcommit`` (thin provisioning).
    """

    cpu_overcommit: float = attrs.field(default=4.0, validator=_ratio)
    memory_overcommit: float = attrs.field(default=1.0, validator=_ratio)
    reserved_memory: int = attrs.field(
        default=512 * 1024**2, converter=_reserved, validator=_non_negative
    )
    storage_overcommit: float = attrs.field(default=10.0, validator=_ratio)
